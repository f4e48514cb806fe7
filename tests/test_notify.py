"""notify: the sd_notify datagram protocol against a real AF_UNIX socket."""

import os
import socket

import pytest

from hostagent.agent.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield path, s
    s.close()


def test_ready_status_watchdog_stopping(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("publishing\nseq 1")
    assert sock.recv(4096) == b"READY=1\nSTATUS=publishing seq 1"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading()
    assert sock.recv(4096).startswith(b"RELOADING=1\n")
    assert n.stopping()
    assert sock.recv(4096).startswith(b"STOPPING=1\n")
    assert n.sent[-1].startswith("STOPPING=1")


def test_abstract_namespace_socket():
    name = f"hostagent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).send(STATUS="x")
        assert s.recv(100) == b"STATUS=x"
    finally:
        s.close()


def test_no_socket_is_a_no_op_and_a_dead_socket_is_not_fatal(tmp_path):
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:3"}).enabled
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert n.enabled
    assert not n.ready("x")
    assert not n.watchdog()  # still no exception


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_a_receiver_that_does_not_read_never_blocks_the_sender(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    results = [n.status("x" * 1000) for _ in range(2000)]  # far beyond the socket queue
    assert results[0] is True and results[-1] is False
    assert sock.recv(4096) == b"STATUS=" + b"x" * 1000
