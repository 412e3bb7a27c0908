"""Capture: the exchanges a deployment answers, and the feedback on them, kept as data to
learn from (``ModelDeployment.spec.feedback``).

Records are JSON lines of two types, ``exchange`` (what was asked, what the engine saw, what
it answered, from which sources) and ``feedback`` (a rating, a correction, judgements of the
sources), appended by a writer thread to an *open segment* on the pod's artifacts root and
published, when it reaches ``rotate.maxBytes`` or ``rotate.maxSeconds``, as one immutable
object ``feedback/<deployment>/segments/<YYYY-MM-DD>/<start-ms>-<replica>-<seq>.jsonl``:
one PUT in the bucket, one rename on the claim, so a segment is there whole or not at all.
Redaction runs in the writer before a line is written; nothing of a record goes to logs.

What a killed pod loses is its open segment (at most ``rotate``'s bytes or seconds) with
the s3 store, whose scratch is the pod's; on the claim the open segment survives and the
next replica to start publishes it (a container restart does the same with either store).
A full queue (the writer cannot keep up) drops records and counts them, rather than slow
the answers down.

The writer also prunes day folders older than ``retentionDays``, and :meth:`find` looks an
exchange up in published segments (a rating sent to another replica than the one that
answered); response ids carry their creation time (:func:`id_time`), so a lookup reads only
the segments that could hold it, and segments, being immutable, are read once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import regex

from tailor.api.modeldeployment import Feedback, Redaction
from tailor.api.workloads import feedback_folder
from tailor.observability.serving import ServingMetrics
from tailor.workloads.io.segments import (
    day_of,
    read_segment,
    segment_days,
    segment_start,
    segment_store,
)
from tailor.workloads.io.storage import Store
from tailor.workloads.serving.auth import Caller
from tailor.workloads.serving.protocol import APIError, FeedbackRequest

log = logging.getLogger("tailor.workloads.serving.capture")

MAX_REMEMBERED_RESPONSES = 100_000
"""Response ids (and ratings) a replica remembers, for joins without a lookup."""
QUEUE_RECORDS = 10_000
"""Records waiting for the writer before new ones are dropped (and counted)."""
PRUNE_EVERY_SECONDS = 3600
_ROTATE: dict[str, Any] = {"rotate": True}  # a queue item: publish the open segment
SEGMENTS_READ_CACHED = 512

EMAIL = regex.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = regex.compile(r"(?<![\w+])\+?\d(?:[\s().-]*\d){6,14}(?!\w)")
REDACT_SECONDS = 0.5
"""Most time one rule may take on one string."""


def id_time(response_id: str) -> float | None:
    """When a response id was made (seconds since the epoch), or None for an id this
    gateway did not make: ids are ``chatcmpl-``/``cmpl-`` and 32 hex digits, the first 11
    the creation time in milliseconds."""
    _, _, tail = response_id.partition("-")
    if len(tail) != 32 or not re.fullmatch(r"[0-9a-f]{32}", tail):
        return None
    return int(tail[:11], 16) / 1000


def sampled(response_id: str, rate: float) -> bool:
    """Whether an exchange is captured: the same answer on every replica, from the id."""
    if rate >= 1:
        return True
    digest = hashlib.sha256(response_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < rate


class Redactor:
    """Replaces e-mail addresses, phone numbers and the spec's patterns in every string of
    a record (keys and numbers are left alone).

    Patterns run on the ``regex`` engine with a time limit: a pattern that backtracks
    catastrophically (``(a|aa)+c`` on a long message) would otherwise hold the writer
    forever. A string whose redaction runs out of time is written as ``[REDACTED]`` whole:
    never unredacted."""

    def __init__(self, spec: Redaction):
        self.rules: list[tuple[Any, str]] = []
        if spec.emails:
            self.rules.append((EMAIL, "[EMAIL]"))
        if spec.phone_numbers:
            self.rules.append((PHONE, "[PHONE]"))
        self.rules += [(regex.compile(p), "[REDACTED]") for p in spec.patterns]
        self.timeouts = 0

    def text(self, value: str) -> str:
        try:
            for pattern, replacement in self.rules:
                value = pattern.sub(replacement, value, timeout=REDACT_SECONDS)
        except TimeoutError:
            self.timeouts += 1
            return "[REDACTED]"
        return value

    def record(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.record(v) for v in value]
        if isinstance(value, dict):
            return {k: self.record(v) for k, v in value.items()}
        return value


# -- the log ----------------------------------------------------------------------------------


class CaptureLog:
    """One replica's writer of a deployment's capture segments."""

    def __init__(
        self,
        spec: Feedback,
        deployment: str,
        root: Path,
        store: Store | None,
        replica: str,
        on_written: Callable[[str, int], None] | None = None,
    ):
        self.spec = spec
        self.folder = feedback_folder(deployment)
        self.open_dir = root / self.folder / "open"
        self.segments = segment_store(root, store)
        self.replica = re.sub(r"[^a-zA-Z0-9.]", "_", replica)[:63] or "replica"
        self.redactor = Redactor(spec.redact)
        self.on_written = on_written or (lambda what, n: None)  # ("record"|"dropped"|...)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_RECORDS)
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._seq = 0
        self._pruned = 0.0
        self._read: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()
        self._read_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.open_dir.mkdir(parents=True, exist_ok=True)
        self.recover()
        self._thread = threading.Thread(target=self._run, name="tailor-capture", daemon=True)
        self._thread.start()

    # -- the request path (the event loop): never blocks
    def append(self, record: dict[str, Any]) -> bool:
        """Queue a record for the writer; False (and counted) when the queue is full."""
        try:
            self._idle.clear()
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self.on_written("dropped", 1)
            return False

    def sampled(self, response_id: str) -> bool:
        return sampled(response_id, self.spec.sample_rate)

    def expired(self, created: float) -> bool:
        return created < time.time() - self.spec.retention_days * 86400

    # -- lifecycle
    def flush(self, timeout: float = 30) -> None:
        """Wait until every queued record is written (tests; shutdown)."""
        deadline = time.monotonic() + timeout
        while not (self._queue.empty() and self._idle.is_set()):
            if time.monotonic() > deadline:
                raise TimeoutError("the capture writer did not catch up")
            time.sleep(0.01)

    def rotate(self) -> None:
        """Publish the open segment now (after what is queued before it)."""
        self._idle.clear()
        self._queue.put(_ROTATE)
        self.flush()

    def close(self) -> None:
        """Write what is queued and publish the open segment (graceful shutdown); a second
        call does nothing."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)

    def recover(self) -> None:
        """Publish open segments no writer holds: this replica's own from before a restart,
        and any other whose last write is older than twice ``rotate.maxSeconds`` (its pod
        is gone; on the claim they are shared)."""
        stale = time.time() - 2 * self.spec.rotate.max_seconds - 60
        for path in sorted(self.open_dir.glob("*.jsonl")):
            replica = path.name.rsplit("-", 1)[0]
            try:
                mine, old = replica == self.replica, path.stat().st_mtime < stale
            except FileNotFoundError:
                continue
            if mine or old:
                self._publish(path)

    # -- the writer thread
    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1)
            except queue.Empty:
                item = {}
            if item is None or item is _ROTATE:  # close(), rotate()
                self._rotate()
                if item is None:
                    self._idle.set()
                    return
            elif item:
                try:
                    self._write(item)
                except Exception as exc:  # a full disk: count it, keep the server answering
                    self.on_written("failed", 1)
                    log.warning("a captured record could not be written: %s", exc)
            if self._queue.empty():
                self._idle.set()
            now = time.time()
            if self._file is not None and (
                now - self._opened >= self.spec.rotate.max_seconds
                or self._file.tell() >= self.spec.rotate.max_bytes
            ):
                self._rotate()
            if now - self._pruned >= PRUNE_EVERY_SECONDS:
                self._pruned = now
                try:
                    self.prune(now)
                except Exception as exc:  # the store is down: try again next hour
                    log.warning("pruning captured segments failed: %s", exc)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(self.redactor.record(record), ensure_ascii=False, separators=(",", ":"))
        if self._file is None:
            self._opened = time.time()
            self._path = self.open_dir / f"{self.replica}-{int(self._opened * 1000)}.jsonl"
            self._file = self._path.open("a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()  # in the OS's hands: a killed process loses no written line
        self.on_written("record", 1)

    def _rotate(self) -> None:
        if self._file is None or self._path is None:
            return
        self._file.close()
        path, self._file, self._path = self._path, None, None
        self._publish(path)

    def _publish(self, path: Path) -> None:
        try:
            started = int(path.stem.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            started = int(path.stat().st_mtime * 1000)
        day = datetime.fromtimestamp(started / 1000, UTC).date()
        self._seq += 1
        replica = path.name.rsplit("-", 1)[0]
        rel = f"{self.folder}/segments/{day}/{started:013d}-{replica}-{self._seq}.jsonl"
        if path.stat().st_size == 0:
            path.unlink(missing_ok=True)
            return
        for attempt in range(5):
            try:
                self.segments.publish(path, rel)
                self.on_written("segment", 1)
                return
            except FileNotFoundError:  # another replica published it first
                return
            except Exception as exc:
                log.warning("publishing capture segment %s failed (%s); retrying", rel, exc)
                time.sleep(min(2**attempt, 30))
        log.error("capture segment %s stays in %s until this replica restarts", rel, path)

    def prune(self, now: float) -> int:
        """Delete the day folders older than ``retentionDays``; returns segments deleted."""
        cutoff = datetime.fromtimestamp(now - self.spec.retention_days * 86400, UTC).date()
        old = [
            rel
            for rel in self.segments.listing(f"{self.folder}/segments")
            if (day_of(rel) or "9999") < str(cutoff)
        ]
        if old:
            self.segments.remove(old)
            log.info("pruned %d capture segments older than %s", len(old), cutoff)
        return len(old)

    # -- lookups (another replica answered)
    def find(self, response_id: str) -> dict[str, Any] | None:
        """The published exchange record of a response id, or None."""
        created = id_time(response_id)
        if created is None:
            return None
        since = created - self.spec.rotate.max_seconds - 60
        for day in segment_days(self.folder, since, time.time()):
            for rel in self.segments.listing(day):
                if segment_start(rel) < since:
                    continue
                found = self._exchanges(rel).get(response_id)
                if found is not None:
                    return found
        return None

    def _exchanges(self, rel: str) -> dict[str, dict[str, Any]]:
        with self._read_lock:
            if rel in self._read:
                self._read.move_to_end(rel)
                return self._read[rel]
        exchanges = {
            r["id"]: r for r in read_segment(self.segments.read(rel)) if r.get("type") == "exchange"
        }
        with self._read_lock:
            self._read[rel] = exchanges
            while len(self._read) > SEGMENTS_READ_CACHED:
                self._read.popitem(last=False)
        return exchanges


RECENT_RATINGS = 2000
"""Latest ratings a replica reports with their time (an AdaptationLoop's satisfaction)."""


class FeedbackDesk:
    """Ratings of responses (``POST /v1/feedback``): counted by model and prompt revision;
    with capture on, joined to the exchange they rate and kept beside it."""

    def __init__(self, capture: CaptureLog | None, metrics: ServingMetrics, revision: str):
        self.capture, self.metrics, self.revision = capture, metrics, revision
        # id -> (model, caller, the rollout's route of the answer or None)
        self.responses: OrderedDict[str, tuple[str, str, Any]] = OrderedDict()
        self.rated: OrderedDict[tuple[str, str], bool] = OrderedDict()  # (id, caller)
        self.on_rated: Callable[[Any, bool], None] | None = None
        """Told of the first rating of an answer a rollout routed (its route, up)."""
        self.ratings, self.rated_up = 0, 0  # first ratings of answers, since the start
        self.recent: deque[tuple[float, bool]] = deque(maxlen=RECENT_RATINGS)

    def remember(self, response_id: str, model: str, caller: str, route: Any = None) -> None:
        self.responses[response_id] = (model, caller, route)
        while len(self.responses) > MAX_REMEMBERED_RESPONSES:
            self.responses.popitem(last=False)

    async def rate(
        self, body: FeedbackRequest, caller: Caller, resolve_model: Callable[[str, Caller], Any]
    ) -> dict[str, Any]:
        """A rating of a response: counted by model and prompt revision; with capture on,
        kept beside the exchange it rates (joined by id: an id this deployment did not
        answer, or answered longer ago than retentionDays, is a 404)."""
        if not body.id.startswith(("chatcmpl-", "cmpl-")):
            raise APIError(
                400,
                "id must be the id of a chat.completion or text_completion",
                param="id",
                code="invalid_value",
            )
        model, owner, route = self.responses.get(body.id, (None, None, None))
        known = model is not None
        captured = False
        if self.capture is not None:
            created = id_time(body.id)
            if created is not None and self.capture.expired(created):
                raise APIError(
                    404,
                    f"response {body.id} is older than this deployment keeps exchanges "
                    f"(spec.feedback.retentionDays: {self.capture.spec.retention_days}); "
                    "it can no longer be rated",
                    param="id",
                    code="response_expired",
                )
            captured = created is not None and self.capture.sampled(body.id)
            if captured and not known:  # answered by another replica (or never)
                found = await asyncio.to_thread(self.capture.find, body.id)
                known, model = found is not None, (found or {}).get("model")
                owner = (found or {}).get("caller")
            # only the caller that asked rates an exchange: another key's rating would put
            # its words in the training data of someone else's conversation
            if not known or created is None or owner != (caller.identity or ""):
                raise APIError(
                    404,
                    f"no response {body.id} was answered by this deployment: rate the id of "
                    "a chat.completion or text_completion it returned (one answered by "
                    "another replica can be rated once its capture segment is published, "
                    f"within {self.capture.spec.rotate.max_seconds} s)",
                    param="id",
                    code="response_not_found",
                )
        if model is None and body.model is not None:
            resolve_model(body.model, caller)
            model = body.model
        model = model or "unknown"
        revision = self.revision
        self.metrics.observe_feedback(model, body.rating, revision)
        rated = (body.id, caller.identity or "")
        replaced = rated in self.rated
        if not replaced:  # one vote per answer and caller
            self.ratings += 1
            self.rated_up += int(body.rating == "up")
            self.recent.append((time.time(), body.rating == "up"))
        if route is not None and owner == (caller.identity or "") and not replaced:
            if self.on_rated is not None:  # the asker's first rating
                self.on_rated(route, body.rating == "up")
        self.rated[rated] = True
        while len(self.rated) > MAX_REMEMBERED_RESPONSES:
            self.rated.popitem(last=False)
        if self.capture is not None and captured:
            self.capture.append(
                {
                    "type": "feedback",
                    "id": body.id,
                    "time": time.time(),
                    "caller": caller.identity or "",
                    "model": model,
                    "rating": body.rating,
                    "score": body.score,
                    "correction": body.correction,
                    "comment": body.comment,
                    "sources": [s.model_dump() for s in body.sources],
                }
            )
        log.info("feedback %s on %s (%s)", body.rating, body.id, model)  # never its text
        return {
            "id": body.id,
            "object": "feedback",
            "rating": body.rating,
            "model": model,
            "known": known,
            "captured": captured,
            "replaced": replaced,
        }
