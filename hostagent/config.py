"""The agent's configuration: ``/etc/hostagent/hostagent.toml``, parsed and validated.

One frozen dataclass per TOML table; every option is documented in
``etc/hostagent.toml``. Loading is strict: an unknown table or key, a wrong type, a bad
CPU list or an inconsistent value raises ``ConfigError`` naming the file, the key and the
value, so that a typo never silently falls back to a default (and ``SIGHUP`` with a bad
file keeps the old configuration).

CPU sets here are what the operator wrote. ``resolve_resources`` turns them into the
effective sets for one host (defaults filled in against the probed topology), which is
what the snapshot's ``config`` part carries.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hostagent.claim_limits import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS
from hostagent.cpulist import format_cpulist, parse_cpulist
from hostagent.errors import ConfigError
from hostagent.fit_limits import MAX_SEARCH_STEPS, STEP_BUDGET
from hostagent.model import HostTopology
from hostagent.probe.roots import DEFAULT_SYSFS_ROOT, default_resctrl_root

DEFAULT_PATH = "/etc/hostagent/hostagent.toml"
#: environment variable naming another default path (tests, a staged install): the file
#: read when no ``--config`` is given, if it exists, instead of ``DEFAULT_PATH``
DEFAULT_PATH_ENV = "HOSTAGENT_DEFAULT_CONFIG"
#: ``[libvirt] thread_check_seconds`` when not set, for ``qemu…`` URIs (other drivers have
#: no QEMU processes: off unless set); 0 = off, else within the bounds below
DEFAULT_THREAD_CHECK_SECONDS = 10.0
MIN_THREAD_CHECK_SECONDS = 0.1  # a shorter period would keep a CPU busy scanning /proc
MAX_THREAD_CHECK_SECONDS = 86400.0


@dataclass(frozen=True)
class HostConfig:
    name: str = ""  # "" = this machine's hostname


@dataclass(frozen=True)
class ProbeConfig:
    sysfs_root: str = DEFAULT_SYSFS_ROOT
    # not in the file: <sysfs_root>/fs/resctrl (hostagent.probe.roots), as on the CLI
    resctrl_root: str = default_resctrl_root(DEFAULT_SYSFS_ROOT)
    hugepage_poll_seconds: float = 5.0
    udev: bool = True


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = "qemu:///system"
    resync_seconds: float = 60.0
    reconnect_max_seconds: float = 30.0
    call_timeout_seconds: float = 10.0  # one libvirt call longer than this: connection lost
    demo_guests: bool = False  # define the bundled demo guests (test:/// driver only)
    # guests' threads and host intruders re-checked this often; None = the default
    # (thread_check_period), 0 = off
    thread_check_seconds: float | None = None


@dataclass(frozen=True)
class ReservedHugepages:
    cell: int
    size_kib: int
    count: int


@dataclass(frozen=True)
class ResourcesConfig:
    dedicated_cpus: tuple[int, ...] | None = None  # None = none dedicated
    shared_cpus: tuple[int, ...] | None = None  # None = online, non-isolated, not dedicated
    reserved_memory_kib: Mapping[int, int] | int = 0  # int = the same for every cell
    reserved_hugepages: tuple[ReservedHugepages, ...] = ()
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    # which host tasks allowed on dedicated threads are a host_tasks_on_dedicated
    # conflict: "pinned", "all" or "off" (hostagent.guests.intruders)
    host_tasks_conflict: str = "pinned"


@dataclass(frozen=True)
class PublisherConfig:
    endpoints: tuple[str, ...] = ("tcp://127.0.0.1:6510",)
    request_endpoints: tuple[str, ...] = ("tcp://127.0.0.1:6511",)
    coalesce_ms: float = 50.0
    heartbeat_seconds: float = 1.0
    send_hwm: int = 100
    max_message_bytes: int = 1 << 20
    insecure: bool = False  # allow tcp beyond loopback without CURVE (see exposed_endpoints)
    forward_to: tuple[str, ...] = ()  # the XPUB also connects to these (a forwarder's listen)
    advertise_request: str = ""  # the request endpoint schedulers claim at ("" = not said)


@dataclass(frozen=True)
class CurveConfig:
    enabled: bool = False
    server_secret_key: str = "/etc/hostagent/curve/server.key_secret"
    allowed_clients_dir: str = "/etc/hostagent/curve/clients"
    claimants_dir: str = ""  # public keys that may also claim and release; "" = none


@dataclass(frozen=True)
class AgentConfig:
    runtime_dir: str = "/run/hostagent"
    log_level: str = "info"


@dataclass(frozen=True)
class FitConfig:
    cell_strategy: str = "spread"  # "spread" | "pack"
    search_steps: int = STEP_BUDGET  # the fit search's step budget (docs/fit.md)


@dataclass(frozen=True)
class ClaimsConfig:
    default_ttl_seconds: float = DEFAULT_TTL_SECONDS  # a claim without ttl_s lasts this long


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "" = off; "HOST:PORT" of the Prometheus endpoint (docs/metrics.md)
    allow_remote: bool = False  # a listen address that is not loopback needs this


@dataclass(frozen=True)
class VcpuGroupBinding:
    """``[[resctrl.vcpu_groups]]``: these threads of guest ``guest`` (a name or uuid) go
    into resctrl group ``hostagent-<group>`` while it runs (docs/resctrl.md)."""

    group: str
    guest: str
    vcpus: tuple[int, ...] = ()
    emulator: bool = False


#: the most ``[resctrl] vcpu_groups`` entries a config may hold
MAX_VCPU_GROUPS = 256


@dataclass(frozen=True)
class ResctrlConfig:
    vcpu_groups: tuple[VcpuGroupBinding, ...] = ()


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resctrl: ResctrlConfig = field(default_factory=ResctrlConfig)
    source: str = "<defaults>"

    @property
    def host_name(self) -> str:
        return self.host.name or socket.gethostname()


#: the longest ``[publisher] advertise_request`` accepted (characters)
MAX_ADVERTISE_CHARS = 256


def _check_advertised(pub: _Reader, endpoint: str) -> None:
    """``[publisher] advertise_request``: an endpoint a scheduler can connect to."""
    if len(endpoint) > MAX_ADVERTISE_CHARS:
        pub.fail("advertise_request", endpoint[:64] + "...",
                 f"at most {MAX_ADVERTISE_CHARS} characters")
    if not endpoint.startswith(("tcp://", "ipc://")):
        pub.fail("advertise_request", endpoint, "must start with tcp:// or ipc://")
    host = endpoint[len("tcp://"):].rpartition(":")[0] if endpoint.startswith("tcp://") \
        else "x"
    if endpoint.startswith("tcp://") and (host in ("", "*", "0.0.0.0", "[::]", "::")
                                          or not endpoint.rpartition(":")[2].isdigit()):
        pub.fail("advertise_request", endpoint, "must name an address and port a scheduler "
                 "can connect to (not a wildcard)")


#: Why a tcp endpoint beyond loopback needs CURVE (or ``insecure``); docs/daemon.md §6.1.
EXPOSED_WHY = ("binds tcp beyond loopback without CURVE: any host that reaches it can make "
               "the agent hold unbounded memory (docs/daemon.md §6.1)")


def _is_loopback_tcp(endpoint: str) -> bool:
    """Whether a ``tcp://`` bind address is loopback only (127.0.0.0/8, ::1, localhost).

    Wildcards (``*``, ``0.0.0.0``, ``::``), interface names, host names and every other
    address count as beyond loopback.
    """
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def exposed_endpoints(pub: PublisherConfig) -> list[str]:
    """The stream and request endpoints that bind tcp beyond loopback.

    Without CURVE they let any host that reaches them make the agent hold memory libzmq
    does not bound (a multipart message that never ends, the subscription trie), so they
    need ``[curve] enabled`` or an explicit ``publisher.insecure``. ipc:// is guarded by
    filesystem permissions and inproc:// by the process.
    """
    return [ep for ep in (*pub.endpoints, *pub.request_endpoints)
            if ep.startswith("tcp://") and not _is_loopback_tcp(ep)]


_LOG_LEVELS = ("debug", "info", "warning", "error")
_STRATEGIES = ("spread", "pack")
#: ``[resources] host_tasks_conflict``: which intruders conflict (hostagent.guests.intruders)
HOST_TASKS_CONFLICT_MODES = ("pinned", "all", "off")


class _Reader:
    """Typed access to one TOML table that names the file and key in every error."""

    def __init__(self, source: str, table: str, data: Any) -> None:
        self.source, self.table = source, table
        if not isinstance(data, dict):
            self.fail("", data, "must be a table")
        self.data: dict[str, Any] = data

    def fail(self, key: str, value: Any, why: str) -> None:
        where = f"{self.table}.{key}" if key else f"[{self.table}]"
        raise ConfigError(f"{self.source}: {where} = {value!r}: {why}")

    def check_keys(self, cls: type) -> None:
        known = {f.name for f in fields(cls)}
        for key in self.data:
            if key not in known:
                known_list = ", ".join(sorted(known))
                self.fail(key, self.data[key], f"unknown option (known: {known_list})")

    def get(self, key: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(key, value, f"must be {_kind_name(kind)}")
        if not isinstance(value, kind):
            self.fail(key, value, f"must be {_kind_name(kind)}")
        return value

    def number(self, key: str, default: float, *, minimum: float, exclusive: bool = False) -> float:
        value = float(self.get(key, default, (int, float)))
        if value < minimum or (exclusive and value == minimum):
            op = ">" if exclusive else ">="
            self.fail(key, self.data.get(key), f"must be {op} {minimum:g}")
        return value

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.get(key, default, int)
        if value < minimum:
            self.fail(key, value, f"must be >= {minimum}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, default, str)
        if value not in choices:
            self.fail(key, value, f"must be one of {', '.join(choices)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list(default), list)
        if not all(isinstance(v, str) and v for v in value):
            self.fail(key, value, "must be a list of non-empty strings")
        return tuple(value)

    def cpus(self, key: str) -> tuple[int, ...] | None:
        if key not in self.data:
            return None
        value = self.get(key, "", str)
        try:
            return parse_cpulist(value)
        except ValueError:
            self.fail(key, value, "must be a CPU list such as \"2-23,26-47\"")
        raise AssertionError  # unreachable


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _search_steps(r: _Reader) -> int:
    value = r.integer("search_steps", STEP_BUDGET, minimum=1)
    if value > MAX_SEARCH_STEPS:
        r.fail("search_steps", value, f"must be at most {MAX_SEARCH_STEPS}")
    return value


def _default_ttl(r: _Reader) -> float:
    value = float(r.get("default_ttl_seconds", DEFAULT_TTL_SECONDS, (int, float)))
    if not MIN_TTL_SECONDS <= value <= MAX_TTL_SECONDS:  # nan too
        r.fail("default_ttl_seconds", r.data.get("default_ttl_seconds"),
               f"must be between {MIN_TTL_SECONDS:g} and {MAX_TTL_SECONDS:g} seconds")
    return value


def _thread_check_seconds(r: _Reader) -> float | None:
    key = "thread_check_seconds"
    if key not in r.data:
        return None
    value = float(r.get(key, 0.0, (int, float)))
    if value != 0 and not MIN_THREAD_CHECK_SECONDS <= value <= MAX_THREAD_CHECK_SECONDS:
        r.fail(key, r.data[key], f"must be 0 (off) or between {MIN_THREAD_CHECK_SECONDS:g} "
               f"and {MAX_THREAD_CHECK_SECONDS:g} seconds")
    return value


def thread_check_period(lv: LibvirtConfig) -> float:
    """Seconds between two checks of the guests' threads and the host's intruders (0 =
    off): ``thread_check_seconds`` when set, else ``DEFAULT_THREAD_CHECK_SECONDS`` for
    ``qemu…`` URIs and off for the others (``test:///`` has no QEMU processes)."""
    if lv.thread_check_seconds is not None:
        return lv.thread_check_seconds
    return DEFAULT_THREAD_CHECK_SECONDS if lv.uri.startswith("qemu") else 0.0


def _resources(r: _Reader) -> ResourcesConfig:
    r.check_keys(ResourcesConfig)
    dedicated = r.cpus("dedicated_cpus")
    shared = r.cpus("shared_cpus")
    if dedicated and shared:
        overlap = sorted(set(dedicated) & set(shared))
        if overlap:
            r.fail("shared_cpus", format_cpulist(shared),
                   f"overlaps dedicated_cpus on CPUs {format_cpulist(overlap)}; "
                   "a thread is either dedicated or shared")
    raw_mem = r.get("reserved_memory_kib", 0, (int, dict))
    reserved_mem: Mapping[int, int] | int
    if isinstance(raw_mem, int):
        if raw_mem < 0:
            r.fail("reserved_memory_kib", raw_mem, "must be >= 0")
        reserved_mem = raw_mem
    else:
        per_cell: dict[int, int] = {}
        for k, v in raw_mem.items():
            if not k.isdigit() or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                r.fail("reserved_memory_kib", raw_mem,
                       'must be an integer or a table of cell id to KiB, e.g. {"0" = 524288}')
            per_cell[int(k)] = v
        reserved_mem = per_cell
    pages: list[ReservedHugepages] = []
    for item in r.get("reserved_hugepages", [], list):
        ok = (isinstance(item, dict) and set(item) == {"cell", "size_kib", "count"}
              and all(isinstance(item[k], int) and not isinstance(item[k], bool)
                      and item[k] >= 0 for k in item) and item.get("size_kib", 0) > 0)
        if not ok:
            r.fail("reserved_hugepages", item,
                   "each entry must be {cell = N, size_kib = N, count = N} with N >= 0")
        pages.append(ReservedHugepages(item["cell"], item["size_kib"], item["count"]))
    return ResourcesConfig(
        dedicated_cpus=dedicated,
        shared_cpus=shared,
        reserved_memory_kib=reserved_mem,
        reserved_hugepages=tuple(pages),
        cpu_allocation_ratio=r.number("cpu_allocation_ratio", 4.0, minimum=0, exclusive=True),
        ram_allocation_ratio=r.number("ram_allocation_ratio", 1.0, minimum=0, exclusive=True),
        host_tasks_conflict=r.choice("host_tasks_conflict", "pinned",
                                     HOST_TASKS_CONFLICT_MODES),
    )


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` → (IP address, port).

    The host must be an IP address (a name is not resolved: what is bound, and whether
    it is loopback, must not depend on a resolver); port 0 lets the kernel choose.
    ``ValueError`` says what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError('must be HOST:PORT such as "127.0.0.1:9464" or "[::1]:9464"')
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ValueError('an IPv6 address goes in brackets, e.g. "[::1]:9464"')
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the host {host!r} must be an IP address such as 127.0.0.1 or "
                         "[::1] (names are not resolved)") from None
    if bracketed and ip.version != 6:
        raise ValueError(f"brackets are for IPv6 addresses, not {host!r}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"the port {port_text!r} must be a number 0-65535")
    return str(ip), int(port_text)


def _metrics(r: _Reader) -> MetricsConfig:
    listen = r.get("listen", "", str)
    allow_remote = r.get("allow_remote", False, bool)
    if listen:
        try:
            host, _port = parse_listen(listen)
        except ValueError as exc:
            r.fail("listen", listen, str(exc))
            raise AssertionError from None  # unreachable: fail raises
        if not allow_remote and not ipaddress.ip_address(host).is_loopback:
            r.fail("listen", listen,
                   "not a loopback address, and the metrics endpoint has no authentication "
                   "or TLS: set metrics.allow_remote = true to serve it to other hosts")
    return MetricsConfig(listen=listen, allow_remote=allow_remote)


def _vcpu_groups(r: _Reader) -> ResctrlConfig:
    from hostagent.errors import RequestError
    from hostagent.resctrl_fs import group_dir_name

    r.check_keys(ResctrlConfig)
    items = r.get("vcpu_groups", [], list)
    if len(items) > MAX_VCPU_GROUPS:
        r.fail("vcpu_groups", f"<{len(items)} entries>", f"at most {MAX_VCPU_GROUPS} entries")
    out: list[VcpuGroupBinding] = []
    owner: dict[tuple[str, str], str] = {}
    keys = {"group", "guest", "vcpus", "emulator"}
    for item in items:
        hint = ('each entry must be {group = "rt1", guest = "NAME", vcpus = "0-1"} '
                "and/or emulator = true")
        if not isinstance(item, dict) or not set(item) <= keys or \
                not isinstance(item.get("group"), str) or \
                not isinstance(item.get("guest"), str) or not item["guest"] or \
                not isinstance(item.get("vcpus", ""), str) or \
                not isinstance(item.get("emulator", False), bool):
            r.fail("vcpu_groups", item, hint)
        try:
            group_dir_name(item["group"])
        except RequestError as exc:
            r.fail("vcpu_groups", item, str(exc))
        try:
            vcpus = parse_cpulist(item["vcpus"]) if item.get("vcpus") else ()
        except ValueError as exc:
            r.fail("vcpu_groups", item, f"vcpus: {exc}")
            raise AssertionError from None  # unreachable
        emulator = item.get("emulator", False)
        if not vcpus and not emulator:
            r.fail("vcpu_groups", item, hint)
        group = group_dir_name(item["group"])
        for thread in [f"vCPU {v}" for v in vcpus] + (["emulator"] if emulator else []):
            other = owner.setdefault((item["guest"], thread), group)
            if other != group:
                r.fail("vcpu_groups", item, f"the {thread} thread of {item['guest']} is "
                       f"already in group {other} (a thread is in one group only)")
        out.append(VcpuGroupBinding(group, item["guest"], vcpus, emulator))
    return ResctrlConfig(vcpu_groups=tuple(out))


def _forward_to(pub: _Reader, curve_enabled: bool, insecure: bool) -> tuple[str, ...]:
    """``[publisher] forward_to``: endpoints, not with CURVE, loopback unless insecure."""
    forward_to = pub.strings("forward_to", ())
    for ep in forward_to:
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            pub.fail("forward_to", ep, "endpoints must start with tcp://, ipc:// or inproc://")
    if forward_to and curve_enabled:
        pub.fail("forward_to", list(forward_to), "cannot be used with [curve] enabled (the "
                 "agent's stream is a CURVE server with its own key; list the agent in the "
                 "forwarder's upstream instead)")
    if not insecure:
        for ep in exposed_endpoints(PublisherConfig(endpoints=forward_to,
                                                    request_endpoints=())):
            pub.fail("forward_to", list(forward_to), f"{ep} is tcp beyond loopback without "
                     "CURVE (snapshots in clear text, subscriptions from anyone who answers "
                     "there); set publisher.insecure = true to accept that")
    return forward_to


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a parsed TOML document (or an equivalent dict) into a ``Config``."""
    known = {f.name for f in fields(Config)} - {"source"}
    for table in data:
        if table not in known:
            raise ConfigError(
                f"{source}: unknown table [{table}] (known: {', '.join(sorted(known))})"
            )

    def reader(name: str, cls: type) -> _Reader:
        r = _Reader(source, name, data.get(name, {}))
        if cls is not ResourcesConfig:
            r.check_keys(cls)
        return r

    h = reader("host", HostConfig)
    p = reader("probe", ProbeConfig)
    lv = reader("libvirt", LibvirtConfig)
    pub = reader("publisher", PublisherConfig)
    cv = reader("curve", CurveConfig)
    ag = reader("agent", AgentConfig)
    ft = reader("fit", FitConfig)
    mt = reader("metrics", MetricsConfig)
    cl = reader("claims", ClaimsConfig)
    endpoints = pub.strings("endpoints", PublisherConfig.endpoints)
    requests = pub.strings("request_endpoints", PublisherConfig.request_endpoints)
    for key, eps in (("endpoints", endpoints), ("request_endpoints", requests)):
        for ep in eps:
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                pub.fail(key, ep, "endpoints must start with tcp://, ipc:// or inproc://")
    advertise = pub.get("advertise_request", "", str)
    if advertise:
        _check_advertised(pub, advertise)
    curve_enabled = cv.get("enabled", False, bool)
    insecure = pub.get("insecure", False, bool)
    forward_to = _forward_to(pub, curve_enabled, insecure)
    if not curve_enabled and not insecure:
        for key, eps in (("endpoints", endpoints), ("request_endpoints", requests)):
            for ep in exposed_endpoints(PublisherConfig(endpoints=eps, request_endpoints=())):
                pub.fail(key, list(eps), f"{ep} {EXPOSED_WHY}; set [curve] enabled = true, "
                         "or publisher.insecure = true to accept that")
    cfg = Config(
        host=HostConfig(name=h.get("name", "", str)),
        probe=ProbeConfig(
            sysfs_root=(sysfs_root := p.get("sysfs_root", DEFAULT_SYSFS_ROOT, str)),
            resctrl_root=p.get("resctrl_root", default_resctrl_root(sysfs_root), str),
            hugepage_poll_seconds=p.number("hugepage_poll_seconds", 5.0, minimum=0,
                                           exclusive=True),
            udev=p.get("udev", True, bool),
        ),
        libvirt=LibvirtConfig(
            uri=lv.get("uri", "qemu:///system", str),
            resync_seconds=lv.number("resync_seconds", 60.0, minimum=0, exclusive=True),
            reconnect_max_seconds=lv.number("reconnect_max_seconds", 30.0, minimum=0,
                                            exclusive=True),
            call_timeout_seconds=lv.number("call_timeout_seconds", 10.0, minimum=0,
                                           exclusive=True),
            demo_guests=lv.get("demo_guests", False, bool),
            thread_check_seconds=_thread_check_seconds(lv),
        ),
        resources=_resources(_Reader(source, "resources", data.get("resources", {}))),
        publisher=PublisherConfig(
            endpoints=endpoints,
            request_endpoints=requests,
            coalesce_ms=pub.number("coalesce_ms", 50.0, minimum=0),
            heartbeat_seconds=pub.number("heartbeat_seconds", 1.0, minimum=0, exclusive=True),
            send_hwm=pub.integer("send_hwm", 100, minimum=1),
            max_message_bytes=pub.integer("max_message_bytes", 1 << 20, minimum=1024),
            insecure=insecure,
            forward_to=forward_to,
            advertise_request=advertise,
        ),
        curve=CurveConfig(
            enabled=curve_enabled,
            server_secret_key=cv.get("server_secret_key", CurveConfig.server_secret_key, str),
            allowed_clients_dir=cv.get("allowed_clients_dir", CurveConfig.allowed_clients_dir,
                                       str),
            claimants_dir=cv.get("claimants_dir", "", str),
        ),
        agent=AgentConfig(
            runtime_dir=ag.get("runtime_dir", "/run/hostagent", str),
            log_level=ag.choice("log_level", "info", _LOG_LEVELS),
        ),
        fit=FitConfig(cell_strategy=ft.choice("cell_strategy", "spread", _STRATEGIES),
                      search_steps=_search_steps(ft)),
        claims=ClaimsConfig(default_ttl_seconds=_default_ttl(cl)),
        metrics=_metrics(mt),
        resctrl=_vcpu_groups(_Reader(source, "resctrl", data.get("resctrl", {}))),
        source=source,
    )
    if cfg.resctrl.vcpu_groups and thread_check_period(cfg.libvirt) == 0:
        _Reader(source, "resctrl", data.get("resctrl", {})).fail(
            "vcpu_groups", f"<{len(cfg.resctrl.vcpu_groups)} entries>",
            f"the bindings follow the guests' threads that the thread check finds, and "
            f"that check is off for libvirt.uri = {cfg.libvirt.uri!r} "
            "(libvirt.thread_check_seconds = 0, or unset for a URI that is not qemu); set "
            "libvirt.thread_check_seconds above 0")
    return cfg


def config_path(given: str | None) -> str | None:
    """The config file a command reads: ``given`` (``--config``), else the default path
    (``$HOSTAGENT_DEFAULT_CONFIG``, else ``DEFAULT_PATH``) when that file exists, else
    ``None`` (the built-in defaults). ``run``, ``watch``, ``show`` and ``snapshot`` all
    follow this rule, so a one-shot command sees the daemon's configuration."""
    if given is not None:
        return given
    default = os.environ.get(DEFAULT_PATH_ENV) or DEFAULT_PATH
    return default if os.path.exists(default) else None


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; ``None`` gives the defaults.

    An empty (or whitespace-only) file is refused: a truncated file is an accident, and
    reading it as "every option at its default" would switch a running agent to another
    libvirt, sysfs root and CPU split. A file with only comments is the defaults.
    """
    if path is None:
        return Config()
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not text.strip():
        raise ConfigError(f"{path}: the config file is empty (a truncated file?); "
                          "write at least one comment to run on the defaults")
    try:
        data = tomllib.loads(text.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, str(path))


def resolve_resources(cfg: ResourcesConfig, topo: HostTopology) -> dict[str, Any]:
    """The effective resource config for one host: the snapshot's ``config`` part.

    Defaults: no dedicated CPUs; shared = online, non-isolated CPUs not dedicated.
    Explicit sets are kept as written (the tracker reports pins to offline or unknown
    CPUs as conflicts). ``reserved_memory_kib`` becomes a per-cell map.
    """
    online = [c.id for c in topo.cpus if c.online]
    dedicated = list(cfg.dedicated_cpus or ())
    if cfg.shared_cpus is None:
        taken = set(dedicated)
        shared = [c.id for c in topo.cpus if c.online and not c.isolated and c.id not in taken]
    else:
        shared = list(cfg.shared_cpus)
    if isinstance(cfg.reserved_memory_kib, int):
        reserved_mem = {str(c.id): cfg.reserved_memory_kib for c in topo.cells}
    else:
        reserved_mem = {str(c.id): cfg.reserved_memory_kib.get(c.id, 0) for c in topo.cells}
    return {
        "dedicated_cpus": sorted(dedicated),
        "shared_cpus": sorted(shared),
        "online_cpus": sorted(online),
        "reserved_memory_kib": reserved_mem,
        "reserved_hugepages": [
            {"cell": r.cell, "size_kib": r.size_kib, "count": r.count}
            for r in cfg.reserved_hugepages
        ],
        "cpu_allocation_ratio": cfg.cpu_allocation_ratio,
        "ram_allocation_ratio": cfg.ram_allocation_ratio,
    }
