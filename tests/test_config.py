"""Config loading: the documented default file, strict validation, resolved resources."""

from pathlib import Path

import pytest

from hostagent.config import Config, config_from_dict, load_config, resolve_resources
from hostagent.errors import ConfigError
from hostagent.model import Cell, Cpu, HostTopology

ROOT = Path(__file__).resolve().parent.parent


def test_documented_default_file_equals_builtin_defaults():
    cfg = load_config(ROOT / "etc" / "hostagent.toml")
    assert cfg.source.endswith("hostagent.toml")
    assert cfg == Config(source=cfg.source)


def _topo() -> HostTopology:
    cpus = tuple(Cpu(i, i != 3, 0 if i < 4 else 1, 0, 0, 0, i, (i,), i == 1) for i in range(6))
    cells = (Cell(0, (0, 1, 2, 3), 1000, 500, {}, ()), Cell(1, (4, 5), 1000, 500, {}, ()))
    return HostTopology(cells=cells, cpus=cpus, caches=(), resctrl=None)


def test_resolve_defaults_share_online_non_isolated():
    res = resolve_resources(Config().resources, _topo())
    assert res["dedicated_cpus"] == []
    assert res["shared_cpus"] == [0, 2, 4, 5]  # 1 isolated, 3 offline
    assert res["reserved_memory_kib"] == {"0": 0, "1": 0}


def test_resolve_explicit_sets_and_per_cell_memory():
    cfg = config_from_dict({"resources": {
        "dedicated_cpus": "2,4-5", "reserved_memory_kib": {"1": 2048},
        "reserved_hugepages": [{"cell": 0, "size_kib": 2048, "count": 4}]}})
    res = resolve_resources(cfg.resources, _topo())
    assert res["dedicated_cpus"] == [2, 4, 5]
    assert res["shared_cpus"] == [0]
    assert res["reserved_memory_kib"] == {"0": 0, "1": 2048}
    assert res["reserved_hugepages"] == [{"cell": 0, "size_kib": 2048, "count": 4}]


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"resources": {"dedicated_cpus": "2-5", "shared_cpus": "0-2"}},
         "overlaps dedicated_cpus on CPUs 2"),
        ({"resources": {"dedicated_cpus": "0-"}}, "resources.dedicated_cpus = '0-'"),
        ({"resources": {"cpu_allocation_ratio": 0}}, "must be > 0"),
        ({"resources": {"reserved_memory_kib": -1}}, "must be >= 0"),
        ({"resources": {"reserved_memory_kib": {"x": 1}}}, "table of cell id"),
        ({"resources": {"reserved_hugepages": [{"cell": 0, "size_kib": 0, "count": 1}]}},
         "reserved_hugepages"),
        ({"resources": {"dedicated": "1"}}, "unknown option"),
        ({"publisher": {"endpoints": ["udp://x"]}}, "must start with tcp://"),
        ({"publisher": {"coalesce_ms": "50"}}, "must be a number"),
        ({"curve": {"enabled": "yes"}}, "must be true or false"),
        ({"agent": {"log_level": "loud"}}, "must be one of debug"),
        ({"fit": {"cell_strategy": "random"}}, "must be one of spread, pack"),
        ({"publisher": {"send_hwm": True}}, "must be an integer"),
        ({"bogus": {}}, "unknown table [bogus]"),
        ({"host": "x"}, "must be a table"),
    ],
)
def test_bad_values_name_key_and_value(doc, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, "test.toml")
    assert needle in str(err.value)
    assert str(err.value).startswith("test.toml:")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[resources\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("libvirt", [{"uri": "test:///default"},
                                     {"uri": "qemu:///system", "thread_check_seconds": 0}])
def test_vcpu_groups_need_the_thread_check(libvirt):
    """The [resctrl] vcpu_groups bindings follow the threads the thread check finds: with
    the check off they would never be applied, so the config is refused, naming why."""
    groups = {"vcpu_groups": [{"group": "rt1", "guest": "g", "vcpus": "0"}]}
    with pytest.raises(ConfigError, match=r"resctrl\.vcpu_groups = .*the thread check .* off "
                       r"for libvirt\.uri = .*set libvirt\.thread_check_seconds above 0"):
        config_from_dict({"libvirt": libvirt, "resctrl": groups})
    on = config_from_dict({"libvirt": {**libvirt, "thread_check_seconds": 5},
                           "resctrl": groups})
    assert on.resctrl.vcpu_groups[0].guest == "g"
