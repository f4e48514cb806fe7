"""Test helpers: an in-process Publisher on ipc endpoints in a tmp dir, run on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import zmq
import zmq.asyncio

from hostagent.config import PublisherConfig
from hostagent.publisher import Publisher


def run(coro, timeout: float = 20.0):
    """Run one coroutine on a fresh loop with an overall timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def pub_config(tmp: Path, **over) -> PublisherConfig:
    cfg = PublisherConfig(
        endpoints=(f"ipc://{tmp}/stream",),
        request_endpoints=(f"ipc://{tmp}/request",),
        heartbeat_seconds=0.1,
        coalesce_ms=5,
        send_hwm=100,
        max_message_bytes=256 * 1024,
    )
    return replace(cfg, **over)


@contextlib.asynccontextmanager
async def running_publisher(tmp: Path, host: str = "h1", epoch: str = "ep1", *, curve=None,
                            ctx=None, **over) -> AsyncIterator[Publisher]:
    own = ctx is None
    ctx = ctx or zmq.asyncio.Context()
    pub = Publisher(ctx, pub_config(tmp, **over), host, epoch, curve=curve)
    pub.bind()
    task = asyncio.ensure_future(pub.run())
    try:
        yield pub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pub.close()
        if own:
            ctx.destroy(linger=0)


def source(tmp: Path) -> str:
    return f"ipc://{tmp}/stream,ipc://{tmp}/request"


def snapshot_data(n: int = 0) -> dict:
    return {"schema": 1, "topology": {"cells": []}, "config": {}, "usage": {"n": n}}
