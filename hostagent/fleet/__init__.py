"""The scheduler side: a fleet index fed by many agents' streams, placement over it, and
place-and-claim (docs/fleet.md).

    from hostagent.fleet import Fleet, feed, place_and_claim
    from hostagent.subscriber import Subscriber
    fleet = Fleet()
    with Subscriber(sources) as sub:
        feed(sub, fleet, timeout=1.0)                  # apply what arrived
        best = fleet.place(request, count=3, weigher="pack")
        got = place_and_claim(fleet, request, subscriber=sub)

Modules: ``summary`` (host shapes, summaries, the prefilter), ``weighers``, ``index``
(``Fleet``), ``feeding`` (``feed``), ``claiming`` (``place_and_claim``).
"""

from hostagent.fleet.claiming import Claimed, place_and_claim
from hostagent.fleet.feeding import feed
from hostagent.fleet.index import Candidate, Fleet
from hostagent.fleet.summary import HostSummary
from hostagent.fleet.weighers import DEFAULT_WEIGHER, WEIGHERS, parse_weigher

__all__ = ["DEFAULT_WEIGHER", "WEIGHERS", "Candidate", "Claimed", "Fleet", "HostSummary",
           "feed", "parse_weigher", "place_and_claim"]
