"""CURVE keys and client authentication for the agent's sockets.

- ``make_keypair(dir, name)`` writes ``<name>.key`` (public) and ``<name>.key_secret``
  (public + secret, mode 0600) in ZeroMQ's certificate format; it refuses to overwrite.
- ``ServerCurve.load(config)`` reads the agent's secret key file and checks the directory
  of allowed client public keys; every problem is a ``ConfigError`` naming the file.
- A secret key file that group or others may read or write (``mode & 0o077``) is refused,
  as ssh does, naming the file and its mode: on the agent and on every subscriber.
- ``load_allowed_keys(dir)`` reads the allowed clients' ``*.key`` files one by one: a bad
  file (not a certificate, a key that is not 40 characters of z85, over
  ``MAX_KEY_FILE_BYTES``, not a regular file, unreadable) is skipped with a warning
  naming it, and the other keys stay allowed. Only a missing or unreadable directory is
  an error.
- ``start_authenticator(ctx, dir)`` starts the ZAP handler in the sockets' context:
  without a running ZAP handler a CURVE server would accept *any* client, so the agent
  starts it before binding. A client whose public key is not allowed gets nothing (its
  handshake fails). ``ClientAuthenticator.replace(keys)`` swaps the whole allowed set at
  once (SIGHUP) and returns the keys it removed; ZAP only runs at a handshake, so the
  caller drops live connections when keys were removed (``Publisher.drop_connections``).
- ``ClientCurve`` holds a subscriber's key pair and the agent's public key.

Everything fails closed: CURVE enabled but unavailable in libzmq is an error, never a
silent fallback to plaintext.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostagent.errors import ConfigError, HostagentError

log = logging.getLogger("hostagent.curve")

ZAP_DOMAIN = "hostagent"

#: A secret key file with any of these permission bits (group or others) is refused.
SECRET_KEY_FORBIDDEN_MODE = 0o077
#: A certificate is about 250 bytes; a bigger key file is not read.
MAX_KEY_FILE_BYTES = 64 * 1024
#: Length of a z85-encoded CURVE key (32 bytes).
Z85_KEY_CHARS = 40


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
    """(public, secret) z85 keys of a certificate file; ``ConfigError`` names the file.

    With ``need_secret`` the file must hold a secret key and must not be readable or
    writable by group or others (``SECRET_KEY_FORBIDDEN_MODE``).
    """
    import zmq.auth
    from zmq.utils import z85

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such key file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{p}: not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{p}: {st.st_size} bytes, over the limit of "
                          f"{MAX_KEY_FILE_BYTES} for a key file")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a ZeroMQ certificate: {exc}") from None
    if need_secret and not secret:
        raise ConfigError(f"{p}: has no secret-key (use the .key_secret file)")
    mode = stat.S_IMODE(st.st_mode)
    if need_secret and mode & SECRET_KEY_FORBIDDEN_MODE:
        raise ConfigError(f"{p}: mode {mode:04o}: a secret key must not be readable or "
                          "writable by group or others (chmod 600)")
    for key in (public, secret):
        if key is None:
            continue
        if len(key) != Z85_KEY_CHARS:
            raise ConfigError(f"{p}: key of {len(key)} characters, expected "
                              f"{Z85_KEY_CHARS} (z85)")
        try:
            z85.decode(key)
        except (KeyError, ValueError):
            raise ConfigError(f"{p}: key is not z85 text") from None
    return public, secret


@dataclass(frozen=True)
class AllowedKeys:
    """The allowed clients' public keys (z85) and one message per skipped file."""

    keys: frozenset[bytes]
    skipped: tuple[str, ...] = ()


def load_allowed_keys(directory: str | Path, *, what: str = "allowed-clients") -> AllowedKeys:
    """Every public key of the ``*.key`` files in ``directory``.

    A bad file is skipped with a warning naming it (the message is also in
    ``skipped``); the other keys stay allowed. A missing or unreadable directory is a
    ``ConfigError``: the caller keeps the keys it had. ``what`` names the directory in
    messages (``claimants`` for ``[curve] claimants_dir``).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"{d}: {what} directory does not exist")
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".key"))
    except OSError as exc:
        raise ConfigError(f"{d}: cannot read the {what} directory: "
                          f"{exc.strerror}") from None
    keys: set[bytes] = set()
    skipped: list[str] = []
    for name in names:
        try:
            public, _ = load_keys(d / name, need_secret=False)
        except ConfigError as exc:
            skipped.append(str(exc))
            log.warning("%s; file skipped, the other client keys stay allowed", exc)
            continue
        keys.add(public)
    if not keys and what == "allowed-clients":
        log.warning("%s: no allowed client key: every CURVE client is refused", d)
    elif not keys:
        log.warning("%s: no %s key: no client may claim", d, what)
    return AllowedKeys(frozenset(keys), tuple(skipped))


@dataclass(frozen=True)
class ServerCurve:
    public: bytes
    secret: bytes
    allowed_dir: str

    @classmethod
    def load(cls, server_secret_key: str, allowed_clients_dir: str) -> ServerCurve:
        """The agent's key pair; ``ConfigError`` for a bad key file or a missing directory."""
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
        """A subscriber's key pair and the agent's public key (``ConfigError`` names the
        file: a secret key file open to group or others is refused)."""
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


class ClientAuthenticator:
    """The running ZAP handler and the allowed client keys it checks at each handshake."""

    def __init__(self, zap: Any, allowed: AllowedKeys) -> None:
        self._zap = zap
        self._keys = allowed.keys
        self.skipped = allowed.skipped  # the bad files of the last load

    @property
    def keys(self) -> frozenset[bytes]:
        """The z85 public keys allowed now."""
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is this z85 client key allowed?"""
        return key in self._keys

    def replace(self, allowed: AllowedKeys) -> frozenset[bytes]:
        """Allow exactly ``allowed.keys`` from the next handshake on (one assignment:
        never a half-updated set); returns the keys no longer allowed."""
        removed = self._keys - allowed.keys
        self._keys, self.skipped = allowed.keys, allowed.skipped
        return removed

    def stop(self) -> None:
        self._zap.stop()


def start_authenticator(ctx: Any, allowed_dir: str, *,
                        asyncio_ctx: bool = True) -> ClientAuthenticator:
    """Start the ZAP handler of ``ctx`` allowing the public keys in ``allowed_dir``.

    Call it before any CURVE server socket binds; keep the returned object, give it a
    new key set with ``replace(load_allowed_keys(dir))`` on SIGHUP and ``stop()`` it at
    exit. Bad key files are skipped (``load_allowed_keys``); a missing directory is a
    ``ConfigError``.
    """
    _zmq()
    allowed = load_allowed_keys(allowed_dir)
    if asyncio_ctx:
        from zmq.auth.asyncio import AsyncioAuthenticator as Auth
    else:
        from zmq.auth.thread import ThreadAuthenticator as Auth
    zap = Auth(ctx)
    auth = ClientAuthenticator(zap, allowed)
    zap.start()
    zap.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=auth)
    return auth
