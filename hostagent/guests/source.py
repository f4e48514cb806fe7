"""Read guests from a libvirt connection: ``virDomain`` → ``GuestRecord``.

``read_guest(dom)`` reads one domain: uuid, name, state, and for an *active* domain
(running, paused, ... — anything ``isActive()``) its live XML parsed into a
``GuestSpec``. An inactive domain holds nothing, so its XML is not read (``spec`` None).
A domain XML that does not parse never raises: the record carries ``error`` (the
``DomainXMLError`` text) and ``spec`` None, and the tracker lists it as a conflict.

``read_guests(conn)`` lists the **active** domains only (``listAllDomains(ACTIVE)``):
inactive ones hold no resources, and listing them would make every define/undefine a
snapshot change for nothing. A domain that vanishes between the listing and the read
(``VIR_ERR_NO_DOMAIN``) is skipped. Any other libvirt error propagates (the caller
decides: the CLI reports it, the daemon reconnects).

libvirt is imported lazily, inside the functions that need its constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hostagent.errors import HostagentError
from hostagent.guests.xml import DomainXMLError, GuestRecord, parse_domain

__all__ = [  # GuestRecord lives next to GuestSpec (pure); importable from here as before
    "GuestRecord", "LibvirtUnavailable", "STATE_NAMES", "open_readonly", "read_guest",
    "read_guests", "record_from_xml", "silence_libvirt_errors",
]

# virDomainState → name (libvirt-domain.h)
STATE_NAMES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

_VIR_ERR_NO_DOMAIN = 42
_LIST_ACTIVE = 1  # VIR_CONNECT_LIST_DOMAINS_ACTIVE


class LibvirtUnavailable(HostagentError):
    """The libvirt connection could not be opened (message names the URI)."""


def record_from_xml(
    xml: str, *, uuid: str, name: str, state: str = "running", active: bool = True
) -> GuestRecord:
    """A record from an XML string (what ``read_guest`` does after the libvirt calls)."""
    try:
        spec = parse_domain(xml)
    except DomainXMLError as exc:
        return GuestRecord(uuid.lower(), name, state, active, None, str(exc))
    return GuestRecord(uuid.lower(), name, state, active, spec, None)


def read_guest(dom: Any) -> GuestRecord:
    """Read one ``libvirt.virDomain`` (or anything with the same methods).

    Uses ``UUIDString()``, ``name()``, ``state()``, ``isActive()`` and, for an active
    domain, ``XMLDesc(0)`` (the live XML). libvirt errors propagate.
    """
    uuid = dom.UUIDString().lower()
    name = dom.name()
    st = dom.state()
    state = STATE_NAMES.get(st[0] if st else 0, f"state-{st[0] if st else '?'}")
    active = bool(dom.isActive())
    if not active:
        return GuestRecord(uuid, name, state, False, None, None)
    return record_from_xml(dom.XMLDesc(0), uuid=uuid, name=name, state=state, active=True)


def _is_no_domain(exc: Exception) -> bool:
    get_code = getattr(exc, "get_error_code", None)
    return bool(get_code and get_code() == _VIR_ERR_NO_DOMAIN)


def read_guests(conn: Any, progress: Callable[[str], None] | None = None) -> list[GuestRecord]:
    """Every active domain of ``conn``, sorted by uuid. Vanished domains are skipped.

    ``progress(what)``, when given, is called before the listing and before each domain
    read (the daemon's worker times each of these steps, not the whole resync)."""
    import libvirt

    out = []
    if progress is not None:
        progress("listAllDomains")
    doms = conn.listAllDomains(_LIST_ACTIVE)
    for i, dom in enumerate(doms):
        if progress is not None:
            progress(f"read domain {i + 1} of {len(doms)}")
        try:
            out.append(read_guest(dom))
        except libvirt.libvirtError as exc:
            if _is_no_domain(exc):
                continue
            raise
    out.sort(key=lambda r: r.uuid)
    return out


def read_guests_once(uri: str, timeout: float) -> list[GuestRecord]:
    """Open ``uri`` read-only, read every active domain, close: the one-shot read of
    ``hostagent snapshot``, bounded in time.

    The calls run on a daemon thread; when the open, the listing or one domain read does
    not return within ``timeout`` seconds (a stopped libvirtd, a socket that never
    answers), ``LibvirtUnavailable`` names the URI, the step and the limit, and the
    thread is left behind (it cannot be interrupted inside libvirt; the process exits
    without it). Errors of the calls are ``LibvirtUnavailable`` too.
    """
    import threading
    import time

    step = ["open"]
    since = [time.monotonic()]
    result: list[Any] = []

    def progress(what: str) -> None:
        step[0], since[0] = what, time.monotonic()

    def work() -> None:
        try:
            conn = open_readonly(uri)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            result.append(exc)
            return
        try:
            result.append(read_guests(conn, progress))
        except Exception as exc:  # noqa: BLE001 - libvirtError, without importing it
            result.append(LibvirtUnavailable(f"reading domains from {uri} failed: {exc}"))
        finally:
            progress("close")
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass

    thread = threading.Thread(target=work, name="libvirt-once", daemon=True)
    thread.start()
    while not result:
        thread.join(max(0.0, since[0] + timeout - time.monotonic()))
        if not result and time.monotonic() - since[0] >= timeout:
            raise LibvirtUnavailable(
                f"libvirt at {uri}: {step[0]} did not return within {timeout:g} s "
                "([libvirt] call_timeout_seconds, --libvirt-timeout)")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def silence_libvirt_errors() -> None:
    """Stop libvirt printing every error to stderr (errors still raise ``libvirtError``)."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def open_readonly(uri: str) -> Any:
    """``libvirt.openReadOnly(uri)`` with errors as ``LibvirtUnavailable`` naming the URI."""
    import libvirt

    silence_libvirt_errors()
    if uri.startswith("test:///") and uri != "test:///default":
        # libxml2 prints its own warning to stderr for a missing file: check first
        import os

        path = uri[len("test://"):]
        if not os.path.isfile(path):
            raise LibvirtUnavailable(
                f"cannot connect to libvirt at {uri}: no such node XML file {path}")
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtUnavailable(f"cannot connect to libvirt at {uri}: {_msg(exc)}") from None
    if conn is None:  # very old bindings returned None instead of raising
        raise LibvirtUnavailable(f"cannot connect to libvirt at {uri}")
    return conn


def _msg(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if get else None
    return str(text or exc).strip()
