"""Test helper: a raw ZMTP 3.0 peer (NULL mechanism) on a plain socket.

It speaks just enough of the protocol (greeting, READY, frames) to send what a libzmq
socket never would: frames with MORE set forever, floods of subscriptions, requests
whose replies are never read. Every call has a socket timeout, so nothing hangs.
"""

from __future__ import annotations

import socket
import struct

MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def _greeting() -> bytes:
    return (b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
            + b"\0" + b"\0" * 31)


def frame(data: bytes, flags: int = 0) -> bytes:
    """One ZMTP frame: flags, short or long size, body."""
    if len(data) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data


def ready(socket_type: bytes) -> bytes:
    """The READY command of a NULL-mechanism peer of ``socket_type``."""
    name = b"Socket-Type"
    body = (b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(socket_type))
            + socket_type)
    return frame(body, COMMAND)


class RawPeer:
    """A connected ZMTP 3.0 peer of ``socket_type`` (DEALER, SUB, ...) after the handshake."""

    def __init__(self, endpoint: str, socket_type: bytes = b"DEALER", *,
                 timeout: float = 10.0) -> None:
        if endpoint.startswith("ipc://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = endpoint[len("ipc://"):]
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (host, int(port))
        else:
            raise ValueError(f"unsupported endpoint {endpoint}")
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.sock.sendall(_greeting())
        greeting = self._read(64)
        assert greeting[0] == 0xFF and greeting[10] == 3, greeting
        self.sock.sendall(ready(socket_type))
        flags, body = self.recv_frame()
        assert flags & COMMAND and body.startswith(b"\x05READY"), body[:20]

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            buf += chunk
        return bytes(buf)

    def send_frame(self, data: bytes, *, more: bool = False) -> None:
        self.sock.sendall(frame(data, MORE if more else 0))

    def send_message(self, frames: list[bytes]) -> None:
        self.sock.sendall(b"".join(frame(f, MORE if i < len(frames) - 1 else 0)
                                   for i, f in enumerate(frames)))

    def recv_frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = struct.unpack(">Q", self._read(8))[0] if flags & LONG else self._read(1)[0]
        return flags, self._read(size)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
