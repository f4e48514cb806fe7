"""Domain XML parsing: every element the tracker reads, libvirt's units and CPU-set
syntax, and errors that name the element and the bad value."""

from __future__ import annotations

import pytest

from hostagent.guests.source import GuestRecord, read_guest, record_from_xml
from hostagent.guests.xml import (
    CacheMonitor,
    CacheRequest,
    DomainXMLError,
    GuestCell,
    HugePage,
    MemNode,
    parse_cpuset,
    parse_domain,
)

UUID = "11111111-2222-3333-4444-555555555555"

FULL = f"""<domain type='kvm' id='7'>
  <name>rt1</name>
  <uuid>{UUID.upper()}</uuid>
  <memory unit='GiB'>4</memory>
  <currentMemory unit='MiB'>3072</currentMemory>
  <memoryBacking><hugepages>
    <page size='1' unit='G' nodeset='0'/>
    <page size='2048' nodeset='1'/>
  </hugepages></memoryBacking>
  <vcpu placement='static' cpuset='0-1' current='3'>4</vcpu>
  <iothreads>2</iothreads>
  <cputune>
    <vcpupin vcpu='0' cpuset='2'/>
    <vcpupin vcpu='1' cpuset='26'/>
    <vcpupin vcpu='2' cpuset='3,^4'/>
    <vcpupin vcpu='3' cpuset='27'/>
    <emulatorpin cpuset='0-1'/>
    <iothreadpin iothread='1' cpuset='0'/>
    <iothreadpin iothread='2' cpuset='1'/>
    <vcpusched vcpus='0-1' scheduler='fifo' priority='1'/>
    <cachetune vcpus='2-3' id='vcpus_2-3'>
      <cache id='0' level='3' type='code' size='2' unit='MiB'/>
      <cache id='0' level='3' type='data' size='2048'/>
      <monitor level='3' vcpus='2'/>
    </cachetune>
    <cachetune vcpus='0'><monitor level='3' vcpus='0'/></cachetune>
    <memorytune vcpus='2-3'><node id='0' bandwidth='60'/><node id='1' bandwidth='40'/></memorytune>
  </cputune>
  <numatune>
    <memory mode='interleave' nodeset='0-1'/>
    <memnode cellid='0' mode='strict' nodeset='0'/>
    <memnode cellid='1' mode='preferred' nodeset='1'/>
  </numatune>
  <cpu mode='host-passthrough'>
    <topology sockets='2' dies='1' cores='2' threads='1'/>
    <numa>
      <cell id='0' cpus='0-1' memory='2' unit='GiB'/>
      <cell id='1' cpus='2-3' memory='1048576'/>
    </numa>
  </cpu>
  <devices>
    <memory model='dimm'><target><size unit='MiB'>1024</size><node>1</node></target></memory>
  </devices>
</domain>"""


def test_full_domain_parses_every_placement_element():
    s = parse_domain(FULL)
    assert (s.name, s.uuid, s.domain_id) == ("rt1", UUID, 7)
    assert (s.vcpus, s.current_vcpus, s.vcpu_placement, s.cpuset) == (4, 3, "static", (0, 1))
    assert s.vcpupin == {0: (2,), 1: (26,), 2: (3,), 3: (27,)}
    assert s.emulatorpin == (0, 1)
    assert s.iothreads == 2 and s.iothreadpin == {1: (0,), 2: (1,)}
    assert [(v.vcpus, v.scheduler, v.priority) for v in s.vcpusched] == [((0, 1), "fifo", 1)]
    ct, mon_only = s.cachetunes
    assert ct.vcpus == (2, 3) and ct.alloc_id == "vcpus_2-3"
    assert ct.caches == (CacheRequest(0, 3, "code", 2 << 20), CacheRequest(0, 3, "data", 2 << 20))
    assert ct.monitors == (CacheMonitor(3, (2,)),)
    assert mon_only.caches == () and mon_only.alloc_id == "vcpus_0"
    (mt,) = s.memorytunes
    assert mt.nodes == ((0, 60), (1, 40)) and mt.alloc_id == "vcpus_2-3"
    assert s.numatune is not None
    assert (s.numatune.mode, s.numatune.nodeset) == ("interleave", (0, 1))
    assert s.numatune.memnodes == (MemNode(0, "strict", (0,)), MemNode(1, "preferred", (1,)))
    assert s.topology is not None and (s.topology.sockets, s.topology.cores) == (2, 2)
    # the dimm (1 GiB on guest node 1) adds to guest cell 1
    assert s.cells == (GuestCell(0, (0, 1), 2097152), GuestCell(1, (2, 3), 2097152))
    assert (s.memory_kib, s.current_memory_kib) == (4194304, 3145728)
    assert s.hugepages and s.pages == (HugePage(1048576, (0,)), HugePage(2048, (1,)))
    assert s.page_size_for_cell(0) == (True, 1048576)
    assert s.page_size_for_cell(1) == (True, 2048)
    assert s.vcpu_affinity(2) == (3,)


def test_defaults_minimal_domain():
    s = parse_domain(f"<domain><name>x</name><uuid>{UUID}</uuid></domain>")
    assert (s.vcpus, s.memory_kib, s.cells, s.domain_id, s.hugepages) == (1, 0, (), None, False)
    assert s.vcpu_affinity(0) is None and s.emulator_affinity() is None
    assert s.page_size_for_cell(0) == (False, None)


def test_hugepages_without_page_means_host_default_size():
    s = parse_domain(f"<domain><name>x</name><uuid>{UUID}</uuid><memory>1024</memory>"
                     "<memoryBacking><hugepages/></memoryBacking></domain>")
    assert s.hugepages and s.pages == ()
    assert s.page_size_for_cell(0) == (True, None)


def test_emulator_defaults_to_vcpu_cpuset_and_inactive_id_is_none():
    s = parse_domain(f"<domain id='-1'><name>x</name><uuid>{UUID}</uuid>"
                     "<vcpu cpuset='4-5'>2</vcpu></domain>")
    assert s.domain_id is None
    assert s.emulator_affinity() == (4, 5) and s.vcpu_affinity(1) == (4, 5)


@pytest.mark.parametrize(
    "memory, expected_kib",
    [
        ("<memory>2048</memory>", 2048),
        ("<memory unit='KiB'>2048</memory>", 2048),
        ("<memory unit='k'>2048</memory>", 2048),
        ("<memory unit='M'>2</memory>", 2048),
        ("<memory unit='mib'>2</memory>", 2048),
        ("<memory unit='G'>1</memory>", 1048576),
        ("<memory unit='TiB'>1</memory>", 1 << 30),
        ("<memory unit='MB'>1</memory>", 977),  # 10^6 bytes, rounded up to KiB
        ("<memory unit='KB'>1024</memory>", 1000),
        ("<memory unit='bytes'>1025</memory>", 2),
        ("<memory unit='b'>1024</memory>", 1),
    ],
)
def test_scaled_units(memory, expected_kib):
    s = parse_domain(f"<domain><name>x</name><uuid>{UUID}</uuid>{memory}</domain>")
    assert s.memory_kib == expected_kib


def test_cpuset_syntax():
    assert parse_cpuset("1-4,^3, 6") == (1, 2, 4, 6)
    assert parse_cpuset(" 0 ") == (0,)
    for bad, why in [("", "empty"), ("1-x", "bad element"), ("5-3", "backwards"),
                     ("0,^0", "empty"), ("0-99999", "maximum"), ("1,,2", "bad element")]:
        with pytest.raises(ValueError, match=why):
            parse_cpuset(bad)


def _dom(body: str, name: str = "g1") -> str:
    return f"<domain><name>{name}</name><uuid>{UUID}</uuid>{body}</domain>"


@pytest.mark.parametrize(
    "xml, needles",
    [
        ("<domain><name>x</name", ["not well-formed XML"]),
        ("<network><name>x</name></network>", ["root element is not <domain>", "network"]),
        (f"<domain><uuid>{UUID}</uuid></domain>", ["name: missing domain name"]),
        ("<domain><name>x</name><uuid>nope</uuid></domain>", ["'x'", "uuid", "nope"]),
        (_dom("<memory unit='XB'>4</memory>"), ["'g1'", "memory/@unit", "'XB'"]),
        (_dom("<memory unit='KiB'>-4</memory>"), ["memory", "'-4'"]),
        (_dom("<memory>four</memory>"), ["memory", "'four'"]),
        (_dom("<vcpu>two</vcpu>"), ["vcpu", "'two'"]),
        (_dom("<vcpu current='3'>2</vcpu>"), ["vcpu/@current", "3"]),
        (_dom("<vcpu cpuset='0-x'>2</vcpu>"), ["vcpu/@cpuset", "'0-x'"]),
        (_dom("<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='1-x'/></cputune>"),
         ["cputune/vcpupin[@vcpu='0']/@cpuset", "not a CPU set", "'1-x'"]),
        (_dom("<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='5-3'/></cputune>"),
         ["vcpupin[@vcpu='0']/@cpuset", "backwards", "'5-3'"]),
        (_dom("<vcpu>2</vcpu><cputune><vcpupin vcpu='2' cpuset='1'/></cputune>"),
         ["vcpupin[@vcpu='2']/@vcpu", "vCPU 2 does not exist"]),
        (_dom("<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='1'/>"
              "<vcpupin vcpu='0' cpuset='2'/></cputune>"), ["duplicate vcpupin"]),
        (_dom("<cputune><vcpupin cpuset='1'/></cputune>"),
         ["cputune/vcpupin/@vcpu", "missing attribute"]),
        (_dom("<cputune><emulatorpin cpuset=''/></cputune>"),
         ["cputune/emulatorpin/@cpuset", "empty"]),
        (_dom("<iothreads>1</iothreads><cputune><iothreadpin iothread='2' cpuset='1'/>"
              "</cputune>"), ["iothreadpin[@iothread='2']", "does not exist"]),
        (_dom("<cputune><vcpusched vcpus='0' scheduler='fast'/></cputune>"),
         ["vcpusched/@scheduler", "'fast'"]),
        (_dom("<cputune><cachetune vcpus='0'><cache id='0' level='3' type='all' size='1'/>"
              "</cachetune></cputune>"), ["cachetune[1]/cache/@type", "'all'"]),
        (_dom("<cputune><cachetune vcpus='0'><cache id='0' level='3' type='both' size='1' "
              "unit='MiBs'/></cachetune></cputune>"), ["cachetune[1]/cache/@unit", "'MiBs'"]),
        (_dom("<cputune><cachetune vcpus='0'><cache level='3' type='both' size='1'/>"
              "</cachetune></cputune>"), ["cachetune[1]/cache/@id", "missing"]),
        (_dom("<vcpu>2</vcpu><cputune><cachetune vcpus='1-3'><cache id='0' level='3' "
              "type='both' size='1'/></cachetune></cputune>"),
         ["cachetune[1]/@vcpus", "vCPU 2 does not exist"]),
        (_dom("<cputune><memorytune vcpus='0'><node id='0'/></memorytune></cputune>"),
         ["memorytune[1]/node/@bandwidth", "missing"]),
        (_dom("<numatune><memory mode='wide' nodeset='0'/></numatune>"),
         ["numatune/memory/@mode", "'wide'"]),
        (_dom("<numatune><memory nodeset='0-'/></numatune>"),
         ["numatune/memory/@nodeset", "'0-'"]),
        (_dom("<vcpu>2</vcpu><numatune><memnode cellid='3' nodeset='0'/></numatune>"
              "<cpu><numa><cell id='0' cpus='0-1' memory='1024'/></numa></cpu>"),
         ["memnode[@cellid='3']/@cellid", "no such guest cell"]),
        (_dom("<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-1' memory='1'/>"
              "<cell id='1' cpus='1' memory='1'/></numa></cpu>"),
         ["cpu/numa/cell[@id='1']/@cpus", "already in guest cell 0"]),
        (_dom("<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-1' memory='1' unit='GB2'/>"
              "</numa></cpu>"), ["cpu/numa/cell[@id='0']/@unit", "'GB2'"]),
        (_dom("<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-1'/></numa></cpu>"),
         ["cpu/numa/cell[@id='0']/@memory", "missing"]),
        (_dom("<memoryBacking><hugepages><page size='0'/></hugepages></memoryBacking>"),
         ["memoryBacking/hugepages/page[1]/@size", "must be > 0"]),
        (_dom("<memoryBacking><hugepages><page size='2' unit='Q'/></hugepages>"
              "</memoryBacking>"), ["hugepages/page[1]/@unit", "'Q'"]),
        (_dom("<cpu><topology sockets='0' cores='1' threads='1'/></cpu>"),
         ["cpu/topology/@sockets", "must be >= 1"]),
    ],
)
def test_errors_name_the_element_and_value(xml, needles):
    with pytest.raises(DomainXMLError) as info:
        parse_domain(xml)
    text = str(info.value)
    for needle in needles:
        assert needle in text, text


class FakeDomain:
    """Shaped like libvirt.virDomain for the calls read_guest makes."""

    def __init__(self, xml: str, active: bool = True, state: int = 1):
        self.xml, self.active, self._state, self.xml_reads = xml, active, state, 0

    def UUIDString(self):  # noqa: N802 - libvirt's name
        return UUID.upper()

    def name(self):
        return "g1"

    def state(self):
        return [self._state, 0]

    def isActive(self):  # noqa: N802
        return 1 if self.active else 0

    def XMLDesc(self, flags=0):  # noqa: N802
        self.xml_reads += 1
        return self.xml


def test_read_guest_never_raises_for_bad_xml():
    rec = read_guest(FakeDomain(_dom("<memory unit='XB'>1</memory>"), state=3))
    assert isinstance(rec, GuestRecord)
    assert (rec.uuid, rec.name, rec.state, rec.active, rec.spec) == (UUID, "g1", "paused",
                                                                    True, None)
    assert rec.error and "memory/@unit" in rec.error and "'XB'" in rec.error


def test_read_guest_inactive_reads_no_xml():
    dom = FakeDomain("<not-even-xml", active=False, state=5)
    rec = read_guest(dom)
    assert (rec.active, rec.state, rec.spec, rec.error, dom.xml_reads) == (
        False, "shutoff", None, None, 0)


def test_record_from_xml_ok():
    rec = record_from_xml(_dom("<vcpu>3</vcpu>"), uuid=UUID, name="g1")
    assert rec.error is None and rec.spec is not None and rec.spec.vcpus == 3


def test_pci_passthrough_addresses():
    s = parse_domain(_dom(
        "<devices>"
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        "<address domain='0x0000' bus='0xaf' slot='0x01' function='0x1'/></source></hostdev>"
        "<interface type='hostdev'><source><address type='pci' domain='0x0000' bus='0xaf' "
        "slot='0x01' function='0x2'/></source></interface>"
        "<interface type='network'><source network='default'/></interface>"
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>"
        "</devices>"))
    assert s.hostdevs == ("0000:af:01.1", "0000:af:01.2")
    with pytest.raises(DomainXMLError, match=r"devices/hostdev\[1\]/source/address/@bus"):
        parse_domain(_dom("<devices><hostdev type='pci'><source><address domain='0' "
                          "bus='zz' slot='1' function='0'/></source></hostdev></devices>"))


# --------------------------------------------------------------------------- fit metadata

NS = "https://hostagent.dev/xmlns/fit/1"


def _meta(inner: str, prefix: str = "hostagent") -> str:
    return (f"<metadata><{prefix}:fit xmlns:{prefix}='{NS}'>{inner}</{prefix}:fit>"
            "</metadata>")


def test_fit_metadata_namespace_is_the_one_the_fit_writes():
    from hostagent.fit.libvirt_xml import METADATA_NS
    from hostagent.guests.xml import FIT_METADATA_NS

    assert FIT_METADATA_NS == METADATA_NS == NS


def test_idle_cpus_from_fit_metadata():
    s = parse_domain(_dom(_meta("<hostagent:idle cpus='26-27,9'/>")))
    assert s.idle_cpus == (9, 26, 27)
    # matched by namespace URI: libvirt may print another prefix; several idle elements add
    s = parse_domain(_dom(_meta("<x:idle cpus='3'/><x:idle cpus='1-2,^2'/>", prefix="x")))
    assert s.idle_cpus == (1, 3)
    # other metadata, or an idle element in another namespace, is not ours
    s = parse_domain(_dom("<metadata><other:fit xmlns:other='https://example.org/x'>"
                          "<other:idle cpus='5'/></other:fit><idle cpus='6'/></metadata>"))
    assert s.idle_cpus == ()
    assert parse_domain(_dom("")).idle_cpus == ()


def test_the_fit_fragment_parses_back():
    from hostagent.fit.libvirt_xml import fragments

    placement = {"cells": [{"guest_cell": 0, "host_cell": 0, "vcpus": [0, 1],
                            "pinning": {"0": 2, "1": 3}, "shared_vcpus": [],
                            "shared_cpus": [], "memory_mib": 512, "page_size_kib": 4,
                            "reserved_cpus": [26, 27]}],
                 "emulator_cpus": [2, 3], "topology": {"sockets": 2, "cores": 1,
                                                       "threads": 1}}
    x = fragments(vcpus=2, placement=placement)
    s = parse_domain(_dom(x["vcpu"] + x["cputune"] + x["metadata"]))
    assert s.idle_cpus == (26, 27) and s.vcpupin == {0: (2,), 1: (3,)}


@pytest.mark.parametrize(
    "inner, needles",
    [
        ("<hostagent:idle cpus='2-x'/>",
         ["'g1'", "metadata/hostagent:fit/hostagent:idle[1]/@cpus", "not a CPU set", "'2-x'"]),
        ("<hostagent:idle cpus='4'/><hostagent:idle cpus='9-3'/>",
         ["hostagent:idle[2]/@cpus", "backwards", "'9-3'"]),
        ("<hostagent:idle cpus=''/>", ["hostagent:idle[1]/@cpus", "empty"]),
        ("<hostagent:idle/>", ["hostagent:idle[1]/@cpus", "missing attribute"]),
        ("<hostagent:idle cpus='0-20000'/>", ["hostagent:idle[1]/@cpus", "maximum"]),
    ],
)
def test_bad_fit_metadata_names_the_element_and_value(inner, needles):
    with pytest.raises(DomainXMLError) as info:
        parse_domain(_dom(_meta(inner)))
    text = str(info.value)
    for needle in needles:
        assert needle in text, text
