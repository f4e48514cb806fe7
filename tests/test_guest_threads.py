"""``hostagent.guests.threads`` on a tree shaped like ``/proc`` (races and bad input).

The real thing (a QEMU guest's threads re-pinned behind libvirt's back) is in
``tests/test_real_libvirt.py``; here the tree is built in ``tmp_path`` with the files the
module reads (``comm``, ``cmdline``, ``task/<tid>/comm``, ``task/<tid>/status``).
"""

from __future__ import annotations

from pathlib import Path

from hostagent.guests import threads as threads_mod
from hostagent.guests.threads import (
    MAX_GUEST_THREADS,
    GuestThread,
    affinity_drift,
    find_qemu_pid,
    read_threads,
)
from hostagent.guests.xml import parse_domain

UUID = "0b7e2a4c-1111-2222-3333-444455556666"


def make_process(proc: Path, pid: int, comm: str, args: list[str],
                 threads: dict[int, tuple[str, str]]) -> None:
    d = proc / str(pid)
    (d / "task").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    for tid, (name, cpus) in threads.items():
        t = d / "task" / str(tid)
        t.mkdir()
        (t / "comm").write_text(name + "\n")
        (t / "status").write_text(f"Name:\t{name}\nCpus_allowed:\t3\n"
                                  f"Cpus_allowed_list:\t{cpus}\n")


def qemu(proc: Path, pid: int = 100, uuid: str = UUID, **threads: tuple[str, str]) -> None:
    ts = {pid: ("qemu-system-x86", "0-1"), pid + 1: ("qemu-system-x86", "0-1"),
          pid + 2: ("IO mon_iothread", "0-1"), pid + 3: ("CPU 0/TCG", "0"),
          pid + 4: ("CPU 1/TCG", "1")}
    make_process(proc, pid, "qemu-system-x86",
                 ["/usr/bin/qemu-system-x86_64", "-name", "guest=g", "-uuid", uuid], ts)


SPEC = parse_domain(f"""<domain type='qemu'><name>g</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory><vcpu placement='static'>2</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/>
  <emulatorpin cpuset='0-1'/></cputune></domain>""")


def test_the_guest_qemu_is_found_by_its_uuid_among_other_processes(tmp_path):
    make_process(tmp_path, 1, "init", ["/sbin/init", "-uuid", UUID], {1: ("init", "0-1")})
    qemu(tmp_path, 100, uuid="ffffffff-0000-0000-0000-000000000000")
    qemu(tmp_path, 200)
    (tmp_path / "self").mkdir()
    assert find_qemu_pid(UUID, proc=tmp_path) == 200
    assert find_qemu_pid(UUID.upper(), proc=tmp_path) == 200
    assert find_qemu_pid(UUID, proc=tmp_path, hint=100) == 200  # a stale hint: scanned
    assert find_qemu_pid(UUID, proc=tmp_path, hint=200) == 200
    assert find_qemu_pid("nope", proc=tmp_path) is None
    assert find_qemu_pid(UUID, proc=tmp_path / "missing") is None


def test_threads_are_classified_and_their_affinity_read(tmp_path):
    qemu(tmp_path)
    threads = read_threads(100, proc=tmp_path)
    assert threads == [
        GuestThread(100, "qemu-system-x86", (0, 1), None, True),
        GuestThread(101, "qemu-system-x86", (0, 1), None, True),
        GuestThread(102, "IO mon_iothread", (0, 1), None, True),
        GuestThread(103, "CPU 0/TCG", (0,), 0, False),
        GuestThread(104, "CPU 1/TCG", (1,), 1, False),
    ]
    assert affinity_drift(SPEC, threads) == []
    assert threads[3].as_dict() == {"tid": 103, "name": "CPU 0/TCG", "vcpu": 0,
                                    "emulator": False, "cpus": [0]}


def test_a_repinned_vcpu_and_emulator_are_drift_iothreads_and_kernel_threads_are_not(
        tmp_path):
    qemu(tmp_path)
    task = tmp_path / "100" / "task"
    (task / "103" / "status").write_text("Cpus_allowed_list:\t0-1\n")
    (task / "101" / "status").write_text("Cpus_allowed_list:\t1\n")
    for tid, name in ((110, "IO iothread1"), (111, "kvm-nx-lpage-re")):
        (task / str(tid)).mkdir()
        (task / str(tid) / "comm").write_text(name + "\n")
        (task / str(tid) / "status").write_text("Cpus_allowed_list:\t1\n")
    drift = affinity_drift(SPEC, read_threads(100, proc=tmp_path))
    assert drift == [
        {"tid": 101, "name": "qemu-system-x86", "vcpu": None, "declared": [0, 1],
         "actual": [1]},
        {"tid": 103, "name": "CPU 0/TCG", "vcpu": 0, "declared": [0], "actual": [0, 1]},
    ]


def test_races_a_vanished_process_or_thread_is_no_error_and_no_drift(tmp_path):
    assert read_threads(100, proc=tmp_path) is None  # the process is gone
    qemu(tmp_path)
    (tmp_path / "100" / "task" / "103" / "status").unlink()  # exited after the listing
    (tmp_path / "100" / "task" / "104" / "comm").unlink()
    threads = read_threads(100, proc=tmp_path)
    assert [t.tid for t in threads] == [100, 101, 102]
    assert affinity_drift(SPEC, threads) == []


def test_bad_input_garbage_status_is_skipped_and_the_thread_count_is_bounded(tmp_path,
                                                                           monkeypatch):
    qemu(tmp_path)
    (tmp_path / "100" / "task" / "103" / "status").write_text("Cpus_allowed_list:\tzz\n")
    assert [t.tid for t in read_threads(100, proc=tmp_path)] == [100, 101, 102, 104]
    assert MAX_GUEST_THREADS >= 1024
    monkeypatch.setattr(threads_mod, "MAX_GUEST_THREADS", 8)  # the same rule, a small tree
    many = {1000 + i: ("qemu-system-x86", "0") for i in range(13)}
    make_process(tmp_path, 1000, "qemu-system-x86", ["qemu"], many)
    assert [t.tid for t in read_threads(1000, proc=tmp_path)] == list(range(1000, 1008))


def test_nothing_is_declared_nothing_drifts(tmp_path):
    qemu(tmp_path)
    unpinned = parse_domain(f"""<domain type='qemu'><name>g</name><uuid>{UUID}</uuid>
      <memory unit='MiB'>64</memory><vcpu>2</vcpu></domain>""")
    (tmp_path / "100" / "task" / "103" / "status").write_text("Cpus_allowed_list:\t1\n")
    assert affinity_drift(unpinned, read_threads(100, proc=tmp_path)) == []


def test_tracker_adds_threads_and_drift_conflicts_as_data_and_clears_them():
    from libvirt_helpers import probe_fixture

    from hostagent.agent.libvirt_watch import THREAD_CHECK_SECONDS, LibvirtWatcher
    from hostagent.guests.xml import GuestRecord
    from hostagent.tracker import UsageTracker

    tracker = UsageTracker(probe_fixture("xeon-2s-cat"), {"dedicated_cpus": "2-11"})
    tracker.update(GuestRecord(UUID, "g", "running", True, SPEC))
    plain = tracker.usage()
    assert "threads" not in plain["guests"][0]
    threads = [GuestThread(103, "CPU 0/TCG", (0, 1), 0, False).as_dict()]
    drift = [{"tid": 103, "name": "CPU 0/TCG", "vcpu": 0, "declared": [0], "actual": [0, 1]}]
    tracker.set_threads({UUID: {"pid": 100, "threads": threads, "drift": drift},
                         "gone-uuid": {"pid": None, "threads": [], "drift": []}})
    usage = tracker.usage()
    assert usage["guests"][0]["threads"] == threads and usage["guests"][0]["pid"] == 100
    [c] = [c for c in usage["conflicts"] if c["kind"] == "affinity_drift"]
    assert c == {"kind": "affinity_drift", "guests": [UUID], "vcpu": 0, "tid": 103,
                 "declared": [0], "actual": [0, 1],
                 "detail": "g: vCPU 0 (tid 103) runs on 0-1, the XML says 0"}
    assert "threads" not in plain["guests"][0]  # the earlier usage was not modified
    tracker.set_threads({UUID: {"pid": 100, "threads": threads, "drift": []}})
    assert not [c for c in tracker.usage()["conflicts"] if c["kind"] == "affinity_drift"]
    assert LibvirtWatcher("qemu:///system", lambda: None).thread_check_seconds == \
        THREAD_CHECK_SECONDS
    assert LibvirtWatcher("test:///default", lambda: None).thread_check_seconds == 0
