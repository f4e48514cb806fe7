"""The agent's ``[resctrl] vcpu_groups`` with a real libvirtd and a real TCG guest: the
guest's real vCPU thread ids go into the reserved group's ``tasks`` (a resctrl COPY of
fixture ``xeon-2s-cat``: ``probe.resctrl_root`` points there, ``/sys`` is this machine's),
again with the new ids when the guest restarts, and are forgotten when it stops (a
kernel drops an exited thread from its group by itself; a plain file keeps the old ids,
so the test checks the ids it expects are there, and the agent's state).

Fails in CI / skips elsewhere without libvirtd, as tests/test_real_libvirt.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import DaemonProc, config_text
from real_libvirt import require_libvirtd
from test_real_libvirt import (
    GUEST_TIMEOUT_SECONDS,
    REACH_TIMEOUT_SECONDS,
    URI,
    Guest,
    _debug_dump,
    _host_cpus,
)
from test_resctrl_fs import tree

from hostagent.guests.threads import find_qemu_pid, read_threads
from hostagent.resctrl_fs import reserve


def _vcpu_tids(g: Guest) -> dict[int, int]:
    pid = find_qemu_pid(g.dom.UUIDString())
    threads = read_threads(pid) if pid is not None else None
    return {t.vcpu: t.tid for t in threads or () if t.vcpu is not None}


def _listed(tasks: Path) -> set[int]:
    """The tids a group's ``tasks`` lists (none before the first write, on a copy)."""
    return {int(t) for t in tasks.read_text().split()} if tasks.exists() else set()


def _wait(what: str, check: Any, agent: DaemonProc) -> Any:
    deadline = time.monotonic() + GUEST_TIMEOUT_SECONDS
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}; log:\n{agent.log_text()[-3000:]}"
        time.sleep(0.1)


def _state(agent: DaemonProc, group: str) -> dict[str, Any]:
    return next(s for s in _debug_dump(agent)["vcpu_groups"] if s["group"] == group)


def test_agent_keeps_a_guests_vcpu_threads_in_their_group_across_a_restart(tmp_path):
    """One agent and one guest started twice (two TCG boots, ~2-7 s each here): the
    behaviour is the restart."""
    require_libvirtd()
    import libvirt

    resctrl, sysfs = tree(tmp_path, "xeon-2s-cat")
    reserve(resctrl, sysfs, "rt1", "type=both,size=2304k,cache-id=1")
    tasks = Path(resctrl, "hostagent-rt1", "tasks")
    cpus = _host_cpus()
    conn = libvirt.open(URI)
    g = Guest.__new__(Guest)  # its name is needed in the config before it starts
    from test_real_libvirt import GUEST_PREFIX, guest_xml

    g.name = f"{GUEST_PREFIX}vg-{tmp_path.name[-8:]}-{time.monotonic_ns() % 10**6}"
    g.xml = guest_xml(g.name, {0: cpus[0], 1: cpus[-1]}, f"{cpus[0]}-{cpus[-1]}")
    extra = (f'\n[resctrl]\nvcpu_groups = [{{ group = "rt1", guest = "{g.name}", '
             f'vcpus = "0-1" }}, {{ group = "absent", guest = "{g.name}", emulator = true }}]\n')
    d = DaemonProc(start=False)
    try:
        d.uri, d.sysfs = URI, Path("/sys")
        text = config_text(d.dir, d.sysfs, URI, dedicated=",".join(map(str, cpus)),
                           extra=extra)
        d.config.write_text(text.replace('resctrl_root = "/sys/fs/resctrl"',
                                         f'resctrl_root = "{resctrl}"'))
        d.start()
        d.wait_notify("READY=1", timeout=REACH_TIMEOUT_SECONDS)
        st = _state(d, "hostagent-rt1")
        assert (st["state"], st["tids"], st["vcpus"]) == ("guest not running", {}, [0, 1])
        try:
            g.dom = conn.createXML(g.xml, 0)
            first = _wait("vCPU threads", lambda: len(_vcpu_tids(g)) == 2 and _vcpu_tids(g),
                          d)
            _wait("the vCPU tids in the group's tasks",
                  lambda: set(first.values()) <= _listed(tasks),
                  d)
            # the log says when it is done (cheaper than a debug dump per poll)
            _wait("applied in the log", lambda: "in group hostagent-rt1" in d.log_text()
                  and f"{g.name}, group hostagent-absent: " in d.log_text(), d)
            st = _state(d, "hostagent-rt1")
            assert st["state"] == "applied"
            assert st["tids"] == {f"vCPU {v} of {g.name}": t for v, t in first.items()}
            absent = _state(d, "hostagent-absent")
            assert absent["state"] == "error"
            assert absent["error"].endswith("hostagent-absent: no such group; reserve it "
                                            "first ('hostagent resctrl reserve "
                                            "hostagent-absent SPEC'); no thread was moved")
            g.destroy()
            _wait("the stop in the log",
                  lambda: f"vcpu_groups: guest {g.name} stopped: its threads" in d.log_text(), d)
            assert _state(d, "hostagent-rt1")["tids"] == {}
            assert not any(Path(f"/proc/{t}").exists() for t in first.values())
            g.dom = conn.createXML(g.xml, 0)  # the same guest again: new thread ids
            second = _wait("vCPU threads", lambda: len(_vcpu_tids(g)) == 2 and _vcpu_tids(g),
                           d)
            assert set(second.values()).isdisjoint(first.values())
            _wait("the new vCPU tids in the group's tasks",
                  lambda: set(second.values()) <= _listed(tasks),
                  d)
        finally:
            g.close()
        log = d.log_text()
        assert f"vcpu_groups: guest {g.name}, group hostagent-absent: " in log
        assert d.stop() == 0, d.log_text()
    finally:
        d.close()
        conn.close()


@pytest.mark.parametrize("entry, message", [
    ('{ group = "a/b", guest = "g", vcpus = "0" }', "group name 'a/b': must not contain '/'"),
    ('{ group = "rt1", guest = "g" }', "each entry must be"),
    ('{ group = "rt1", guest = "g", vcpus = "1-0" }', "vcpus: not a CPU list"),
    ('{ group = "rt1", guest = "g", vcpus = "0", cpus = "1" }', "each entry must be"),
])
def test_bad_vcpu_groups_entries_are_refused_naming_the_key(tmp_path, entry, message):
    from hostagent.config import load_config
    from hostagent.errors import ConfigError

    path = tmp_path / "h.toml"
    path.write_text(f"[resctrl]\nvcpu_groups = [{entry}]\n")
    with pytest.raises(ConfigError, match=r"resctrl\.vcpu_groups = .*" + message.replace(
            "(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_one_thread_in_two_groups_is_refused(tmp_path):
    from hostagent.config import load_config
    from hostagent.errors import ConfigError

    path = tmp_path / "h.toml"
    path.write_text('[resctrl]\nvcpu_groups = [{ group = "a", guest = "g", vcpus = "0-1" },'
                    ' { group = "b", guest = "g", vcpus = "1" }]\n')
    with pytest.raises(ConfigError, match="the vCPU 1 thread of g is already in group "
                       r"hostagent-a \(a thread is in one group only\)"):
        load_config(path)
