"""Per-vCPU cache reservations in a fit, through the reservations planner (placeholder)."""

from __future__ import annotations

from typing import Any

from hostagent.fit.cellfit import CellFit
from hostagent.fit.host import HostCell, HostView
from hostagent.fit.request import FitRequest


def cell_check(view: HostView, req: FitRequest, cf: CellFit) -> list[str]:
    return []


def core_orders(
    view: HostView, req: FitRequest, host: HostCell
) -> list[tuple[tuple[int, ...], ...]]:
    return []


def plan_all(
    view: HostView, req: FitRequest, chosen: list[CellFit]
) -> tuple[list[dict[str, Any]], list[str]]:
    return [], ["cache reservations are not supported yet"]
