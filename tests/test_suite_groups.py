"""The parallel run's groups take effect (tests/conftest.py, scripts/test).

Under ``--dist loadgroup`` pytest-xdist sends every test whose id ends in ``@<group>`` to
one worker; the id gets that suffix from the ``xdist_group`` mark that tests/conftest.py
adds. If a pytest or xdist upgrade stops that (pytest 9.2 did), the real-libvirtd tests
would run side by side with the one that restarts libvirtd: this test fails first.
"""

import pytest

pytestmark = pytest.mark.real_libvirtd


def test_a_real_libvirtd_test_is_in_its_group_under_loadgroup(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not a --dist loadgroup run (scripts/test runs one)")
    assert request.node.nodeid.endswith("@real-libvirtd"), request.node.nodeid
