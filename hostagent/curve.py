"""CURVE keys and client authentication for the agent's sockets.

- ``make_keypair(dir, name)`` writes ``<name>.key`` (public) and ``<name>.key_secret``
  (public + secret, mode 0600) in ZeroMQ's certificate format; it refuses to overwrite.
- ``ServerCurve.load(config)`` reads the agent's secret key file and checks the directory
  of allowed client public keys; every problem is a ``ConfigError`` naming the file.
- ``start_authenticator(ctx, dir)`` starts the ZAP handler in the sockets' context:
  without a running ZAP handler a CURVE server would accept *any* client, so the agent
  starts it before binding. A client whose public key is not in the directory gets
  nothing (its handshake fails).
- ``ClientCurve`` holds a subscriber's key pair and the agent's public key.

Everything fails closed: CURVE enabled but unavailable in libzmq is an error, never a
silent fallback to plaintext.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.errors import ConfigError, HostagentError

ZAP_DOMAIN = "hostagent"


def _zmq() -> Any:
    import zmq

    if not zmq.has("curve"):
        raise ConfigError("CURVE is enabled but this libzmq was built without CURVE support")
    return zmq


def make_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Create ``<name>.key`` and ``<name>.key_secret`` in ``directory`` (made 0700 if new).

    The secret file is created with mode 0600 from the start. Existing files are never
    overwritten (``HostagentError``).
    """
    import zmq

    if not name or "/" in name or name.startswith("."):
        raise HostagentError(f"key name {name!r}: must be a plain file name")
    d = Path(directory)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HostagentError(f"{d}: cannot create directory: {exc.strerror}") from None
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise HostagentError(f"{path}: already exists; refusing to overwrite a key")
    pub, sec = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate made by `hostagent keys`\n"
    _write(public, 0o644, f"{header}metadata\ncurve\n    public-key = \"{pub.decode()}\"\n")
    _write(secret, 0o600, f"{header}#   THIS FILE IS SECRET\nmetadata\ncurve\n"
                          f"    public-key = \"{pub.decode()}\"\n"
                          f"    secret-key = \"{sec.decode()}\"\n")
    return public, secret


def _write(path: Path, mode: int, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise HostagentError(f"{path}: cannot create: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)  # the umask may have cleared bits of a public file


def load_keys(path: str | Path, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of a certificate file; ``ConfigError`` names the file."""
    import zmq.auth

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a ZeroMQ certificate: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{p}: has no secret-key (use the .key_secret file)")
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise ConfigError(f"{p}: key of {len(key)} characters, expected 40 (z85)")
    return public, secret


@dataclass(frozen=True)
class ServerCurve:
    public: bytes
    secret: bytes
    allowed_dir: str

    @classmethod
    def load(cls, server_secret_key: str, allowed_clients_dir: str) -> ServerCurve:
        _zmq()
        public, secret = load_keys(server_secret_key, need_secret=True)
        d = Path(allowed_clients_dir)
        if not d.is_dir():
            raise ConfigError(f"{d}: allowed-clients directory does not exist")
        assert secret is not None
        return cls(public, secret, str(d))

    def apply(self, sock: Any) -> None:
        """Make ``sock`` a CURVE server (before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()


@dataclass(frozen=True)
class ClientCurve:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, client_secret_key: str | Path, server_public_key: str | Path) -> ClientCurve:
        _zmq()
        public, secret = load_keys(client_secret_key, need_secret=True)
        server, _ = load_keys(server_public_key, need_secret=False)
        assert secret is not None
        return cls(public, secret, server)

    def apply(self, sock: Any) -> None:
        """Make ``sock`` a CURVE client of the agent (before connect)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def start_authenticator(ctx: Any, allowed_dir: str, *, asyncio_ctx: bool = True) -> Any:
    """Start the ZAP handler of ``ctx`` allowing the public keys in ``allowed_dir``.

    Call it before any CURVE server socket binds; keep the returned object and call
    ``reload_allowed`` on SIGHUP (the directory is read once per call) and ``stop()``
    at exit.
    """
    _zmq()
    if asyncio_ctx:
        from zmq.auth.asyncio import AsyncioAuthenticator as Auth
    else:
        from zmq.auth.thread import ThreadAuthenticator as Auth
    auth = Auth(ctx)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=allowed_dir)
    return auth


def reload_allowed(auth: Any, allowed_dir: str) -> int:
    """Re-read the allowed client keys; returns how many there are."""
    import zmq.auth

    if not Path(allowed_dir).is_dir():
        raise ConfigError(f"{allowed_dir}: allowed-clients directory does not exist")
    auth.configure_curve(domain=ZAP_DOMAIN, location=allowed_dir)
    return len(zmq.auth.load_certificates(allowed_dir))
