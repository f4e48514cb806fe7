"""Guests as libvirt describes them: domain XML → ``GuestSpec``, and the ``GuestRecord``
that carries it (``xml``); reading domains from a libvirt connection into those records
(``source``).

``xml`` is pure (no libvirt, no I/O): the tracker and the fitter import only it.
``source`` imports nothing from libvirt at module level either, and still exports
``GuestRecord`` for its callers.
"""
