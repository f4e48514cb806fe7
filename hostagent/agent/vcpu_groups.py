"""The agent's ``[resctrl] vcpu_groups``: keep running guests' vCPU (or emulator) threads
in their resctrl groups.

After each guest-thread check whose result changed (a guest started, restarted with new
thread ids, stopped; ``hostagent.agent.libvirt_watch``), ``VcpuGroups.apply`` runs on a
thread of the loop's executor (kernel reads and writes, never on the loop): for each
binding whose guest runs, the threads it names are moved into the group with
``hostagent.resctrl_tasks.attach_threads`` (lock, schemata checked first, one tid per
write, roll back on failure) unless exactly those tids were already put there. A guest
that stops needs no write: its threads exited, and the kernel drops an exited task from
its group; the binding's tids are forgotten (``guest not running``) and the next start
puts the new tids in. A failed apply (the group was not reserved yet, the lock was busy,
a thread exited mid-apply) is logged once per distinct message and tried again after
``RETRY_SECONDS`` or at the next change. ``state()`` is the debug dump's ``vcpu_groups``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from hostagent.config import VcpuGroupBinding
from hostagent.errors import HostagentError
from hostagent.guests.threads import GuestThread

log = logging.getLogger("hostagent.resctrl")

RETRY_SECONDS = 10.0  # a failed binding is tried again this often (or at the next change)
LOCK_TIMEOUT_SECONDS = 2.0  # the agent's wait for the resctrl lock, per apply


class VcpuGroups:
    """The bindings and what was last done for each (``state()``)."""

    def __init__(self, resctrl_root: str, bindings: tuple[VcpuGroupBinding, ...]) -> None:
        self.resctrl_root = resctrl_root
        self.bindings = bindings
        self._lock = threading.Lock()  # apply() runs on executor threads, one at a time
        self._state: list[dict[str, Any]] = [
            {"group": b.group, "guest": b.guest, "vcpus": list(b.vcpus),
             "emulator": b.emulator, "state": "guest not running", "tids": {},
             "error": None, "changed": None} for b in bindings]

    @property
    def failed(self) -> bool:
        return any(s["state"] == "error" for s in self._state)

    def state(self) -> list[dict[str, Any]]:
        return [dict(s, tids=dict(s["tids"])) for s in self._state]

    def apply(self, names: Mapping[str, str], checked: Mapping[str, Mapping[str, Any]]) -> None:
        """One pass over every binding. ``names``: running guests' uuid → name;
        ``checked``: the last thread check (uuid → ``{"pid", "threads"}``)."""
        from hostagent.resctrl_tasks import attach_threads, select_threads

        with self._lock:
            for b, st in zip(self.bindings, self._state, strict=True):
                uuid = next((u for u, n in names.items() if b.guest in (n, u)), None)
                found = checked.get(uuid) if uuid is not None else None
                if found is None or found.get("pid") is None:
                    gone = st["tids"]
                    self._set(st, "guest not running", {}, None)
                    if gone:
                        log.info("vcpu_groups: guest %s stopped: its threads %s left group "
                                 "%s with it", b.guest, _tids(gone), b.group)
                    continue
                threads = [GuestThread(t["tid"], t["name"], tuple(t["cpus"]), t["vcpu"],
                                       t["emulator"]) for t in found["threads"]]
                try:
                    targets = select_threads(names[uuid], threads, b.vcpus, b.emulator)
                    want = {t.label: t.tid for t in targets}
                    if st["state"] == "applied" and st["tids"] == want:
                        continue
                    done = attach_threads(self.resctrl_root, b.group, targets,
                                          pid=found["pid"],
                                          lock_timeout=LOCK_TIMEOUT_SECONDS)
                except HostagentError as exc:
                    if st["error"] != str(exc):
                        log.warning("vcpu_groups: guest %s, group %s: %s; tried again in "
                                    "%.0f s or at the next guest change", names[uuid],
                                    b.group, exc, RETRY_SECONDS)
                    self._set(st, "error", {}, str(exc))
                    continue
                self._set(st, "applied", want, None)  # before the log line tests wait on
                log.info("vcpu_groups: guest %s: %s in group %s", names[uuid],
                         ", ".join(f"{t.label} tid {t.tid}" for t in targets), done.group)

    @staticmethod
    def _set(st: dict[str, Any], state: str, tids: dict[str, int], error: str | None) -> None:
        if (st["state"], st["tids"], st["error"]) != (state, tids, error):
            st.update(state=state, tids=tids, error=error, changed=time.time())


def _tids(tids: Mapping[str, int]) -> str:
    return ", ".join(str(t) for t in tids.values())
