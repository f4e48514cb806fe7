"""What an operator sees under systemd when something goes wrong (issue 22).

- A reload whose config is refused still ends ``systemctl reload`` with 0 (the agent keeps
  running), so the refusal is put in ``STATUS=`` (``systemctl status``) and stays there
  until a reload succeeds.
- A watchdog timeout makes systemd send SIGABRT: the agent's Python stacks go to stderr
  (the journal) before it dies, so a stuck loop shows where it was stuck.
"""

import signal

from daemon_helpers import DaemonProc

REFUSED = "reload refused: "
PREVIOUS = "running with the previous configuration"


def status_of(msg: str) -> str:
    return next(line for line in msg.split("\n") if line.startswith("STATUS="))


def test_a_refused_reload_shows_in_status_until_a_reload_succeeds():
    d = DaemonProc("vm-1s-nosmt", dedicated=None)
    try:
        d.wait_notify("READY=1")
        good = d.config.read_text()
        d.config.write_text(good.replace("coalesce_ms = 5.0", "coalesce_ms = -1"))
        d.signal(signal.SIGHUP)
        d.wait_notify("RELOADING=1")
        status = status_of(d.wait_notify("READY=1"))
        assert REFUSED in status and "publisher.coalesce_ms" in status, status
        assert PREVIOUS in status, status
        assert status.startswith("STATUS=seq "), status  # the usual status comes first
        d.config.write_text(good)
        d.signal(signal.SIGHUP)
        d.wait_notify("RELOADING=1")
        status = status_of(d.wait_notify("READY=1"))
        assert REFUSED not in status, status
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()


def test_sigabrt_writes_the_python_stacks_to_stderr():
    d = DaemonProc("vm-1s-nosmt", dedicated=None)
    try:
        d.wait_notify("READY=1")
        d.signal(signal.SIGABRT)
        assert d.proc is not None
        assert d.proc.wait(30) == -signal.SIGABRT
        log = d.log_text()
        assert "Fatal Python error: Aborted" in log, log
        assert "most recent call first" in log and 'File "' in log, log
        assert "hostagent/agent/daemon.py" in log or "asyncio" in log, log
    finally:
        d.close()
