"""``hostagent run [--config F]``: the daemon (see ``hostagent.agent.daemon`` and docs/daemon.md).

Without ``--config`` it reads ``/etc/hostagent/hostagent.toml`` when that file exists and
runs on the built-in defaults otherwise (``hostagent.config.config_path``, the rule of
every command that reads the config; ``$HOSTAGENT_DEFAULT_CONFIG`` moves that path).
A bad config, an unreadable sysfs tree or an endpoint that cannot be bound is one
``hostagent: <message>`` line and exit code 2; SIGTERM/SIGINT stop it cleanly with exit
code 0.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the agent: publish snapshots, answer requests (systemd service)",
        description="Run the agent daemon: probe the host, follow libvirt and hotplug, "
        "publish snapshots over ZeroMQ and answer requests. SIGHUP reloads the config, "
        "SIGUSR1 writes a debug dump, SIGTERM stops.",
    )
    p.add_argument("--config", metavar="F",
                   help="config file (default /etc/hostagent/hostagent.toml if it exists, "
                   "else built-in defaults)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hostagent.agent.daemon import run_agent
    from hostagent.config import config_path

    return run_agent(config_path(args.config))
