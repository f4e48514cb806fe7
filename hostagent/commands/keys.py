"""``hostagent keys DIR [--name NAME]``: a CURVE key pair for the agent or a subscriber.

Writes ``DIR/NAME.key`` (public; give it to the other side) and ``DIR/NAME.key_secret``
(mode 0600; keep it). Existing files are never overwritten. The agent's secret file is
``[curve] server_secret_key``; subscribers' public files go in
``[curve] allowed_clients_dir``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keys",
        help="create a CURVE key pair (agent or subscriber)",
        description="Create NAME.key (public) and NAME.key_secret (secret, mode 0600) in "
        "DIR, in ZeroMQ's certificate format. Refuses to overwrite existing keys.",
    )
    p.add_argument("dir", metavar="DIR", help="directory for the key files (made 0700 if new)")
    p.add_argument("--name", default="hostagent",
                   help="file name stem (default hostagent): e.g. server, or a scheduler's name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hostagent.curve import load_keys, make_keypair

    public, secret = make_keypair(args.dir, args.name)
    key, _ = load_keys(public, need_secret=False)
    print(f"public key  {public}\nsecret key  {secret}  (mode 0600)\n"
          f"z85 public  {key.decode()}")
    return 0
