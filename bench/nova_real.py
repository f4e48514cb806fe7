"""The real Nova as a peer for bench/fit.py and bench/nova_diff.py.

Nova (``pip install nova``, the ``bench-nova`` extra) drags in eventlet, oslo.* and a
hundred more packages, so it usually lives in a venv of its own. This module has two
halves:

- **ours** (imported by the benches, stdlib only): ``host_doc(snapshot)`` turns a
  schema-v1 snapshot into the plain data of Nova's ``NUMATopology`` the way Nova's libvirt
  driver builds it from the same host (``cpuset`` = shared threads, ``pcpuset`` =
  dedicated threads, sibling sets cut to those threads, pinned threads, raw cell memory,
  small pages = the memory outside hugepage pools); ``NovaWorker`` runs this file as a
  worker under an interpreter that has Nova (``--nova-python`` / ``HOSTAGENT_NOVA_PYTHON``,
  else this interpreter if it can import ``nova``); ``find_nova_python`` says which one,
  or why none.
- **the worker** (``python nova_real.py``, run by ``NovaWorker``): reads one JSON request
  per line, builds ``objects.NUMATopology`` from the host document, the flavor with
  ``objects.Flavor`` and the image with ``objects.ImageMeta.from_dict``, asks Nova's own
  ``numa_get_constraints`` for the guest's ``InstanceNUMATopology`` and calls
  ``nova.virt.hardware.numa_fit_instance_to_host`` (the scheduler's
  ``NUMATopologyFilter`` call, with ``NUMATopologyLimits`` from the host's ratios),
  in-process. It answers one JSON line: whether it fits, the chosen cells and pinning,
  Nova's error for an invalid request, and the median time of the call alone (objects
  built and the guest topology cloned outside the timed part, as the filter clones it).
  A call given a ``timeout`` runs in a thread while ``itertools.permutations`` is counted;
  when it is still running at the timeout the worker reports the permutations and CPU
  seconds so far and exits (the enumeration cannot be stopped from outside).

Nothing of Nova is copied here: the worker only imports and calls it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_NOVA_PYTHON = "HOSTAGENT_NOVA_PYTHON"
INSTALL_HINT = (
    "install it into a venv of its own: python3 -m venv /tmp/nova-venv && "
    "/tmp/nova-venv/bin/pip install nova (or `pip install '.[bench-nova]'`), then "
    "--nova-python /tmp/nova-venv/bin/python or HOSTAGENT_NOVA_PYTHON"
)

# ----------------------------------------------------------------------------- ours


def host_doc(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Nova's view of the snapshot's host, as plain data (see the module doc).

    Guest memory counts on a cell whatever its page size (Nova's ``memory_usage``);
    threads a guest holds (vCPU, emulator, kept idle) are ``pinned_cpus``; Nova has no
    per-cell reserved memory, so the snapshot's ``reserved_memory_kib`` is left out.
    """
    topo, cfg, usage = snapshot["topology"], snapshot["config"], snapshot["usage"]
    online = {c["id"] for c in topo["cpus"] if c["online"]}
    dedicated = set(cfg.get("dedicated_cpus") or []) & online
    shared = set(cfg.get("shared_cpus") or []) & online
    taken = {t["cpu"] for t in usage.get("threads") or []
             if t.get("guest") is not None or t.get("emulator") or t.get("held_by")}
    siblings = {c["id"]: set(c["siblings"]) for c in topo["cpus"]}
    socket = {c["id"]: c["socket"] for c in topo["cpus"]}
    ucells = {c["id"]: c for c in usage.get("cells") or []}
    cells = []
    for cell in topo["cells"]:
        members = set(cell["cpus"]) & online
        configured = members & (dedicated | shared)
        sets: list[list[int]] = []
        for cpu in sorted(configured):
            s = sorted(siblings.get(cpu, {cpu}) & configured)
            if s not in sets:
                sets.append(s)
        uc = ucells.get(cell["id"], {})
        pools = cell.get("hugepages") or []
        huge_kib = sum(p["size_kib"] * p["total"] for p in pools)
        used = {h["size_kib"]: h for h in uc.get("hugepages") or []}
        pages = [{"size_kb": 4, "total": (cell["memory_kib"] - huge_kib) // 4,
                  "used": int(uc.get("memory_used_kib", 0)) // 4, "reserved": 0}]
        huge_used_mib = 0
        for p in pools:
            u = used.get(p["size_kib"], {})
            n_used = int(u.get("used", 0))
            huge_used_mib += n_used * p["size_kib"] // 1024
            pages.append({"size_kb": p["size_kib"], "total": p["total"], "used": n_used,
                          "reserved": int(u.get("reserved", 0))})
        sockets = {socket[c] for c in members}
        cells.append({
            "id": cell["id"],
            "cpuset": sorted(members & shared),
            "pcpuset": sorted(members & dedicated),
            "pinned_cpus": sorted(members & dedicated & taken),
            "siblings": sets,
            "memory": cell["memory_kib"] // 1024,
            "memory_usage": int(uc.get("memory_used_kib", 0)) // 1024 + huge_used_mib,
            "cpu_usage": int(uc.get("shared_vcpus", 0)),
            "mempages": pages,
            "socket": sockets.pop() if len(sockets) == 1 else None,
        })
    return {"cells": cells, "cpu_allocation_ratio": float(cfg.get("cpu_allocation_ratio", 4.0)),
            "ram_allocation_ratio": float(cfg.get("ram_allocation_ratio", 1.0))}


def find_nova_python(arg: str | None) -> tuple[str | None, str]:
    """(an interpreter that can import nova, how it was found) or (None, why not)."""
    cands = [(arg, "--nova-python"), (os.environ.get(ENV_NOVA_PYTHON), ENV_NOVA_PYTHON),
             (sys.executable, "this interpreter")]
    for path, how in cands:
        if not path:
            continue
        try:
            out = subprocess.run([path, "-c", "import nova.virt.hardware, nova; "
                                  "from importlib.metadata import version; "
                                  "print(version('nova'))"],
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            if how != "this interpreter":
                return None, f"{how} {path}: {exc}"
            continue
        if out.returncode == 0:
            return path, f"nova {out.stdout.strip()} ({how}: {path})"
        if how != "this interpreter":
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"{how} {path} cannot import nova: {last}"
    return None, "nova is not installed here; " + INSTALL_HINT


class NovaWorker:
    """This file run as a worker under ``python``; ``ask`` sends one request, returns
    the answer (``{"died": ...}`` if the worker stopped: a timed-out call ends it)."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the worker needs nothing of ours
        return subprocess.Popen(
            [self.python, "-W", "ignore", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env)

    def ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            return {"died": "the nova worker exited without an answer"}
        answer = json.loads(line)
        if answer.get("timed_out"):
            self.close()
        return answer

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None


# ----------------------------------------------------------------------------- worker


class _Nova:
    """Nova's modules, imported in the worker only."""

    def __init__(self) -> None:
        import itertools

        from nova import exception, objects
        from nova.virt import hardware

        objects.register_all()
        self.itertools, self.exception, self.objects, self.hardware = (
            itertools, exception, objects, hardware)

    def host(self, h: Mapping[str, Any]) -> Any:
        o = self.objects
        return o.NUMATopology(cells=[o.NUMACell(
            id=c["id"], cpuset=set(c["cpuset"]), pcpuset=set(c["pcpuset"]),
            memory=c["memory"], cpu_usage=c["cpu_usage"], memory_usage=c["memory_usage"],
            pinned_cpus=set(c["pinned_cpus"]), siblings=[set(s) for s in c["siblings"]],
            mempages=[o.NUMAPagesTopology(**p) for p in c["mempages"]],
            network_metadata=o.NetworkMetadata(physnets=set(), tunneled=False),
            socket=c["socket"]) for c in h["cells"]])

    def limits(self, h: Mapping[str, Any]) -> Any:
        o = self.objects
        return o.NUMATopologyLimits(
            cpu_allocation_ratio=h["cpu_allocation_ratio"],
            ram_allocation_ratio=h["ram_allocation_ratio"],
            network_metadata=o.NetworkMetadata(physnets=set(), tunneled=False))

    def constraints(self, req: Mapping[str, Any]) -> Any:
        """Nova's guest NUMA topology for the request (None: the guest floats)."""
        o = self.objects
        flavor = o.Flavor(vcpus=req["vcpus"], memory_mb=req["memory_mb"],
                          extra_specs=dict(req.get("extra_specs") or {}))
        image = o.ImageMeta.from_dict({"properties": dict(req.get("image_properties") or {})})
        return self.hardware.numa_get_constraints(flavor, image)


def _result(fitted: Any) -> dict[str, Any]:
    if fitted is None:
        return {"fits": False, "cells": None}
    return {"fits": True, "cells": [
        {"host_cell": c.id, "pinning": {str(k): v for k, v in (c.cpu_pinning or {}).items()},
         "reserved": sorted(c.cpuset_reserved or ()), "pagesize": c.pagesize,
         "dedicated_vcpus": sorted(c.pcpuset), "shared_vcpus": sorted(c.cpuset)}
        for c in fitted.cells]}


def _cpu_median(call: Any, reps: int, rounds: int) -> float:
    """CPU seconds of ``call()``: the median of ``reps`` calls, the least of ``rounds``
    such medians (bench/fit.py measures hostagent the same way)."""
    import statistics
    import time

    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            t = time.process_time()
            call()
            times.append(time.process_time() - t)
        best = min(best, statistics.median(times))
    return best


def _timed_out_run(nova: _Nova, call: Any, timeout: float) -> dict[str, Any]:
    """``call()`` in a thread with ``itertools.permutations`` counted; what it had done
    when ``timeout`` seconds passed, or its answer."""
    import threading
    import time

    class Counting:
        count = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(nova.itertools, name)

        def permutations(self, items: Any, r: int) -> Any:
            for perm in nova.itertools.permutations(items, r):
                Counting.count += 1
                yield perm

    nova.hardware.itertools = Counting()
    box: dict[str, Any] = {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    worker = threading.Thread(target=lambda: box.update(out=call()), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return {"timed_out": True, "permutations": Counting.count,
                "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}
    nova.hardware.itertools = nova.itertools
    out = _result(box["out"])
    out.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0,
               permutations=Counting.count)
    return out


def _fresh(nova: _Nova, host: Any, inst: Any, limits: Any) -> dict[str, Any]:
    """Nova's cell check (``_numa_fit_instance_cell``) on every permutation of host cells
    in id order, each on a fresh clone of the guest topology and without the fit/no-fit
    caches: Nova's rules without the state its search carries from one host cell to the
    next (bench/nova_diff.py tells its bugs from real differences with it)."""
    isolate = inst.emulator_threads_isolated
    for perm in nova.itertools.permutations(host.cells, len(inst.cells)):
        cells = inst.obj_clone().cells
        got = []
        for i, (hc, ic) in enumerate(zip(perm, cells, strict=True)):
            try:
                fitted = nova.hardware._numa_fit_instance_cell(
                    hc, ic, limits, 1 if isolate and i == 0 else 0)
            except nova.exception.MemoryPageSizeNotSupported:
                fitted = None
            if fitted is None:
                break
            got.append(fitted)
        else:
            return _result(nova.objects.InstanceNUMATopology(cells=got))
    return _result(None)


def _answer(nova: _Nova, msg: Mapping[str, Any]) -> dict[str, Any]:
    host, limits = nova.host(msg["host"]), nova.limits(msg["host"])
    try:
        inst = nova.constraints(msg["request"])
    except (nova.exception.NovaException, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if inst is None:
        return {"floating": True}

    def call() -> Any:  # the filter clones the guest topology before each call, so do we
        return nova.hardware.numa_fit_instance_to_host(host, inst.obj_clone(), None,
                                                       limits=limits)

    if msg.get("timeout"):
        return _timed_out_run(nova, call, float(msg["timeout"]))
    if msg.get("fresh"):
        return _fresh(nova, host, inst, limits)
    out = _result(call())
    if msg.get("reps"):
        clones: list[Any] = []

        def timed() -> Any:  # the clone is made outside the timed call
            return nova.hardware.numa_fit_instance_to_host(host, clones.pop(), None,
                                                           limits=limits)

        reps, rounds = int(msg["reps"]), int(msg.get("rounds", 1))
        clones.extend(inst.obj_clone() for _ in range(reps * rounds))
        out["seconds"] = _cpu_median(timed, reps, rounds)
    return out


def _serve() -> None:  # pragma: no cover - runs under the nova interpreter
    nova = _Nova()
    for line in sys.stdin:
        answer = _answer(nova, json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if answer.get("timed_out"):
            os._exit(0)  # the enumeration is still running in its thread


if __name__ == "__main__":
    _serve()
