"""The running agent (``hostagent run``, docs/daemon.md): everything that exists only while
the daemon runs.

- ``daemon``: the asyncio loop that owns everything (``Agent``, ``run_agent``).
- ``libvirt_watch``: libvirt events, reconnects and resyncs; ``udev_watch``: CPU, memory
  and NUMA node hotplug.
- ``claim_desk``: the ``claim``/``release``/``claims`` ops (the rules are ``hostagent.claims``).
- ``notify``: sd_notify; ``debug_dump``: the SIGUSR1 dump; ``metrics``: the Prometheus
  endpoint (off by default); ``memtrim``: RSS and giving freed heap back to the kernel.
- ``test_driver``: what an agent on libvirt's ``test:///`` adds; ``demo``: the demo runner
  (``python -m hostagent.agent.demo``, what ``scripts/demo`` runs).

What the agent reads, computes and sends lives at the top of the package: ``probe``,
``guests``, ``tracker``, ``fit``, ``claims``, ``snapshot``, ``publisher``, ``wire``.
This ``__init__`` imports nothing, so importing one module here does not start the rest.
"""
