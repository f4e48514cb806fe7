"""Shared helpers for the tests against the real libvirtd (``qemu:///system``) that live
outside tests/test_real_libvirt.py (whose ``Guest``, ``guest_xml`` and ``_unreachable_reason``
they reuse).

- ``require_libvirtd()``: fail when ``CI=true`` and ``qemu:///system`` cannot be reached,
  skip with the reason elsewhere (the rule of tests/test_real_libvirt.py), and silence
  libvirt's stderr error printer.
"""

from __future__ import annotations

import os

import pytest
from test_real_libvirt import _unreachable_reason


def require_libvirtd() -> None:
    """Fail (CI=true) or skip (elsewhere) unless the real libvirtd answers."""
    reason = _unreachable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the real hypervisor is unavailable: {reason}")
        pytest.skip(reason)
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
