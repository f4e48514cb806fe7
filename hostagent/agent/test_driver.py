"""What an agent on libvirt's ``test:///`` driver adds: the ``test-domain`` op and the demo guests.

The test driver keeps its guests inside the process that opened it, so guests for the
tests, the demo and the benchmarks can only be defined and started inside the agent.
``attach(agent)`` gives a running agent whose libvirt URI is ``test:///…`` two things,
through the agent's ordinary extension points and nothing else:

- the request op ``{op: "test-domain", action, ...}`` (define, create, start, destroy,
  undefine, list), registered on the publisher's op registry; its libvirt calls run on
  the watcher's worker thread under its time limit, like every libvirt call;
- with ``[libvirt] demo_guests = true``, a connect hook that defines the bundled demo
  guests (``hostagent.agent.demo``) on every new connection.

With any other URI the agent never calls ``attach``: a production agent answers
``unknown op`` to ``test-domain`` (docs/daemon.md §3.4).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hostagent.errors import HostagentError

if TYPE_CHECKING:
    from hostagent.agent.daemon import Agent

log = logging.getLogger("hostagent")

ACTIONS = ("define", "create", "start", "destroy", "undefine", "list")


def is_test_uri(uri: str) -> bool:
    return uri.startswith("test:///")


def attach(agent: Agent) -> None:
    """Register the ``test-domain`` op (and the demo-guest hook when configured)."""

    async def op_test_domain(req: dict[str, Any]) -> dict[str, Any]:
        return await domain_op(agent, req)

    agent.publisher.register("test-domain", op_test_domain)
    agent.connect_hooks.append(lambda conn: define_demo_guests(agent, conn))


def define_demo_guests(agent: Agent, conn: Any) -> None:
    """(the watcher's worker thread) The demo guests, when the config asks for them."""
    lv = agent.config.libvirt
    if lv.demo_guests and is_test_uri(lv.uri):
        from hostagent.agent.demo import define_demo_guests as define

        names = define(conn, agent.topo, agent.resources)
        log.info("demo guests defined: %s", ", ".join(names))


async def domain_op(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """Define/start/stop guests in the in-process ``test:///`` driver (the calls run on
    the watcher's worker thread, under its time limit)."""
    action = req.get("action")
    if action not in ACTIONS:
        raise HostagentError(f"op test-domain: action={action!r}: must be one of "
                             f"{', '.join(ACTIONS)}")
    watcher = agent.watcher
    if watcher is None or watcher.conn is None:
        raise HostagentError("op test-domain: libvirt is not connected")
    xml, name = req.get("xml"), req.get("name")
    if action in ("define", "create") and (not isinstance(xml, str) or not xml.strip()):
        raise HostagentError(f"op test-domain {action}: 'xml' must be domain XML")
    if action not in ("define", "create", "list") and (
            not isinstance(name, str) or not name):
        raise HostagentError(f"op test-domain {action}: 'name' must be a string")

    def job(conn: Any) -> dict[str, Any]:
        import libvirt

        try:
            if action == "list":
                return {"domains": [{"name": d.name(), "uuid": d.UUIDString(),
                                     "active": bool(d.isActive())}
                                    for d in conn.listAllDomains()]}
            if action in ("define", "create"):
                dom = conn.defineXML(xml) if action == "define" else conn.createXML(xml, 0)
            else:
                dom = conn.lookupByName(name)
                {"start": dom.create, "destroy": dom.destroy,
                 "undefine": dom.undefine}[action]()
            return {"name": dom.name(), "uuid": dom.UUIDString()}
        except libvirt.libvirtError as exc:
            what = f" {name!r}" if isinstance(name, str) else ""
            raise HostagentError(
                f"op test-domain {action}{what}: {exc.get_error_message()}") from None

    result: dict[str, Any] = await watcher.call(f"test-domain {action}", job)
    return result
