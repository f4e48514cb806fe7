"""Guests as libvirt describes them: domain XML → ``GuestSpec`` (``xml``), and reading
domains from a libvirt connection into ``GuestRecord``s (``source``).

``xml`` is pure (no libvirt import); ``source`` imports nothing from libvirt at module
level either, so the tracker and the fitter can use these types without libvirt installed.
"""
