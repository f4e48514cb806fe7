"""The code's shape where it is a promise: the pure tracker does not import the libvirt
I/O module, and ``GuestRecord`` is still importable from where callers found it."""

from __future__ import annotations

import subprocess
import sys


def test_tracker_does_not_import_the_libvirt_io_module():
    code = ("import sys, hostagent.tracker, hostagent.snapshot; "
            "print(sorted(m for m in sys.modules if m.startswith('hostagent.guests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "['hostagent.guests', 'hostagent.guests.xml']"


def test_guest_record_is_one_class_importable_from_both_modules():
    from hostagent.guests import source, xml

    assert source.GuestRecord is xml.GuestRecord
    assert xml.GuestRecord.__module__ == "hostagent.guests.xml"
