"""One asyncio loop for the in-process tests of the agent and the libvirt watcher.

They share ``LOOP`` and run coroutines on it from the main thread with ``run(coro)``
(signal handlers need the main thread). libvirt's events come from its own event thread
(``hostagent.agent.libvirt_watch.ensure_event_impl``) and are posted to whichever loop runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

LOOP = asyncio.new_event_loop()


def run(coro: Any, timeout: float = 20.0) -> Any:
    asyncio.set_event_loop(LOOP)
    return LOOP.run_until_complete(asyncio.wait_for(coro, timeout))


async def until(pred: Any, timeout: float = 5.0, step: float = 0.01) -> None:
    """Let the loop run until ``pred()`` is true (AssertionError after ``timeout``)."""
    deadline = LOOP.time() + timeout
    while not pred():
        if LOOP.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(step)
