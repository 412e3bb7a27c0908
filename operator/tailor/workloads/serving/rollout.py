"""A rollout inside the gateway (``spec.rollout``): which variant answers a request, and
each variant's measurements over the current step.

The operator writes the rollout's state (:class:`~tailor.api.workloads.Routing`: its id,
step and weight) into the spec file; a replica applies it in place. Requests for the
stable's model name are assigned by session: a session's bucket (a hash of the rollout id
and the session, 0..9,999) below ``weight`` x 100 is the candidate's, so a session stays on
one variant and a rising weight only moves sessions to the candidate. Measurements are kept
per step (a new routing key starts them anew) and reported on the metrics port's
``GET /adapters`` under ``rollout``, where the operator sums them over replicas and judges
the step (:mod:`tailor.controllers.rollout`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tailor.api.promptprofile import PromptProfileSpec
from tailor.api.workloads import Routing
from tailor.observability.serving import ServingMetrics
from tailor.workloads.serving.auth import Caller
from tailor.workloads.serving.prompting import PromptError, parse_profile

log = logging.getLogger("tailor.workloads.serving.rollout")

BUCKETS = 10_000
LATENCIES_KEPT = 512
"""Latest answer times kept per variant and step (the operator merges them for the p95)."""


def bucket(rollout_id: str, session: str) -> int:
    """The session's fixed place in 0..BUCKETS-1 for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}\0{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Route:
    """What a rollout decided for one request."""

    key: str
    variant: str
    """stable or candidate: the one whose answer the user gets."""
    shadow: bool = False
    """The candidate also answers a copy (shadow mode), unseen."""
    shadow_adapter: str | None = None
    profile: PromptProfileSpec | None = None
    """The answering variant's prompt profile (its promptProfileRef); None: the served one."""
    shadow_profile: PromptProfileSpec | None = None
    """The shadow copy's prompt profile, when the candidate names one."""
    knowledge_base_version: int | None = None
    """The answering variant's index version (knowledgeBaseVersion); None: the served one."""
    shadow_knowledge_base_version: int | None = None
    """The shadow copy's index version, when the candidate names one."""

    @property
    def shadow_differs(self) -> bool:
        """Whether the shadow copy needs a prompt of its own (another profile or index)."""
        return self.shadow and (
            self.shadow_profile is not self.profile
            or self.shadow_knowledge_base_version != self.knowledge_base_version
        )


@dataclass
class Book:
    """One variant's measurements over a step."""

    requests: int = 0
    errors: int = 0
    rated: int = 0
    rated_up: int = 0
    answered: int = 0
    tokens: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))
    judged: int = 0
    won: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rated": self.rated,
            "ratedUp": self.rated_up,
            "answered": self.answered,
            "tokens": self.tokens,
            "latencies": [round(s, 4) for s in self.latencies],
            "judged": self.judged,
            "won": self.won,
        }


class Rollouts:
    """The rollout a replica serves now and its per-variant books (thread-safe: handlers,
    the spec watcher and the metrics port all reach it)."""

    def __init__(self, metrics: ServingMetrics, routing: Routing | None = None):
        self.metrics = metrics
        self._lock = threading.Lock()
        self.routing: Routing | None = None
        self.profiles: dict[str, PromptProfileSpec] = {}
        self.books: dict[str, Book] = {}
        self.apply(routing)

    @property
    def key(self) -> str | None:
        routing = self.routing
        return None if routing is None else f"{routing.id}:{routing.step}:{routing.weight}"

    def apply(self, routing: Routing | None) -> None:
        """Route by ``routing`` from now on; a new key starts the measurements anew. A
        variant's profile that does not parse stops the routing (the stable answers):
        answering that variant's users with another profile would measure the wrong thing."""
        profiles: dict[str, PromptProfileSpec] = {}
        try:
            for variant, data in (routing.profiles if routing else {}).items():
                profiles[variant] = parse_profile(json.dumps(data))
        except PromptError as exc:
            log.error("rollout %s not routed: a variant's profile is invalid: %s", routing, exc)
            routing = None
        with self._lock:
            old = self.key
            self.routing, self.profiles = routing, profiles
            if self.key != old:
                self.books = {"stable": Book(), "candidate": Book()}
        self.metrics.set_rollout_weight(routing.weight if routing else 0)

    def session(self, headers: Mapping[str, str], user: str | None, caller: Caller) -> str:
        """The request's session under the rollout's sticky rule (a random one when the
        request names none: it is assigned alone)."""
        routing = self.routing
        if routing is None:
            return ""
        sticky = routing.rollout.sticky
        if sticky.by == "session":
            named = headers.get(sticky.header) or user
            if named:
                return f"session:{named}"
        if (caller.identity and caller.identity != "anonymous") or sticky.by == "apiKey":
            return f"key:{caller.identity}"
        return f"random:{secrets.token_hex(8)}"

    def assign(
        self, adapter: str | None, session: str, served: list[str]
    ) -> tuple[str | None, Route | None]:
        """(the adapter that answers, the route) of a request for ``adapter``; requests for
        anything but the stable's model are not the rollout's (route None), nor are any
        while this replica does not serve the candidate yet (it is loading)."""
        with self._lock:
            routing, key, profiles = self.routing, self.key, self.profiles
        if routing is None or key is None or adapter != routing.rollout.stable.adapter:
            return adapter, None
        rollout = routing.rollout
        candidate = rollout.candidate.adapter
        if candidate is not None and candidate not in served:
            return adapter, None
        chosen = bucket(routing.id, session) < routing.weight * (BUCKETS // 100)
        promoted = routing.step >= len(rollout.steps)
        versions = {
            "stable": rollout.stable.knowledge_base_version,
            "candidate": rollout.candidate.knowledge_base_version,
        }
        if rollout.mode == "canary" or promoted:
            variant = "candidate" if chosen else "stable"
            route = Route(
                key,
                variant,
                profile=profiles.get(variant),
                knowledge_base_version=versions[variant],
            )
            return (candidate if chosen else adapter), route
        return adapter, Route(
            key,
            "stable",
            shadow=chosen,
            shadow_adapter=candidate,
            profile=profiles.get("stable"),
            shadow_profile=profiles.get("candidate"),
            knowledge_base_version=versions["stable"],
            shadow_knowledge_base_version=versions["candidate"],
        )

    def _book(self, key: str, variant: str) -> Book | None:
        """The book of ``variant`` if ``key`` is still the current step's."""
        return self.books.get(variant) if key == self.key else None

    def answered(self, route: Route, variant: str, ok: bool, seconds: float, tokens: int) -> None:
        """An answer (or a failure) of ``variant`` for a request routed by ``route``."""
        self.metrics.observe_rollout(variant, "ok" if ok else "error", seconds if ok else None)
        with self._lock:
            book = self._book(route.key, variant)
            if book is None:
                return
            book.requests += 1
            if not ok:
                book.errors += 1
                return
            book.answered += 1
            book.tokens += tokens
            book.latencies.append(seconds)

    def skipped(self) -> None:
        """A shadow copy not asked: the server was busy (users come first)."""
        self.metrics.observe_rollout("candidate", "skipped", None)

    def rated(self, route: Route, up: bool) -> None:
        """A user's rating of an answer routed by ``route``."""
        self.metrics.observe_rollout_rating(route.variant, "up" if up else "down")
        with self._lock:
            book = self._book(route.key, route.variant)
            if book is not None:
                book.rated += 1
                book.rated_up += int(up)

    def judged(self, route: Route, score: float) -> None:
        """The judge's verdict on a shadow pair: 1 the candidate's answer won, 0 lost."""
        outcome = {1.0: "won", 0.0: "lost"}.get(score, "tie")
        self.metrics.observe_rollout_judged(outcome)
        with self._lock:
            book = self._book(route.key, "candidate")
            if book is not None:
                book.judged += 1
                book.won += score

    def report(self) -> dict[str, Any] | None:
        """What the operator reads (``GET /adapters``, ``rollout``)."""
        with self._lock:
            if self.routing is None:
                return None
            return {
                "key": self.key,
                "variants": {name: book.report() for name, book in self.books.items()},
            }
