"""Leader election on a coordination.k8s.io Lease, as controller-runtime and client-go do.

Several operator replicas run; one holds the Lease and reconciles, the others wait. The
holder renews the Lease every ``retry`` seconds; a standby takes it over once it has not
been renewed for ``duration`` seconds. A holder that cannot renew within ``renew_deadline``
stops the process at once (controller-runtime's behaviour: better a restart than two
writers), and one that shuts down cleanly releases the Lease so a standby takes over
without waiting out the duration. Updates carry the Lease's resourceVersion, so two
candidates can never both win a round.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tailor.observability.operator import IS_LEADER

log = logging.getLogger("tailor.operator")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class LeaderElector:
    """Acquire, hold and release one Lease."""

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str = "tailor-operator",
        identity: str | None = None,
        duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry: float = 2.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        self.duration, self.renew_deadline, self.retry = duration, renew_deadline, retry
        self.on_lost = on_lost or (lambda: os._exit(1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round ------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this candidate holds the Lease afterwards."""
        now = _now()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "renewTime": _stamp(now),
        }
        try:
            lease = self._read()
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _stamp(now), "leaseTransitions": 0},
            }
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity") or ""
        renewed = _parse(current.get("renewTime")) or _parse(current.get("acquireTime"))
        duration = current.get("leaseDurationSeconds") or int(self.duration)
        expired = renewed is None or now >= renewed + dt.timedelta(seconds=duration)
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(current.get("leaseTransitions") or 0)
        if holder != self.identity:
            spec["acquireTime"] = _stamp(now)
            transitions += 1
        else:
            spec["acquireTime"] = _stamp(_parse(current.get("acquireTime")) or now)
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": {**spec, "leaseTransitions": transitions},
        }
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote it since we read it
                return False
            raise
        return True

    def _read(self) -> dict[str, Any]:
        lease = self.api.read_namespaced_lease(self.name, self.namespace)
        return dict(self.api.api_client.sanitize_for_serialization(lease))

    # -- the life of a candidate -----------------------------------------------------------

    def acquire(self) -> None:
        """Block until this candidate holds the Lease, then keep renewing it in a thread."""
        waited = False
        while not self._stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    break
            except (ApiException, OSError) as exc:
                log.warning("leader election: %s", exc)
            if not waited:
                log.info("standing by: Lease %s/%s is held by another replica",
                         self.namespace, self.name)  # fmt: skip
                waited = True
            self._stop.wait(self.retry)
        IS_LEADER.set(1)
        log.info("leading: acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
        self._thread = threading.Thread(target=self._renew_loop, name="tailor-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.retry):
            try:
                if self.try_acquire_or_renew():
                    last = time.monotonic()
                    continue
                reason = "another replica holds it"
            except (ApiException, OSError) as exc:
                reason = str(exc)
            if time.monotonic() - last > self.renew_deadline:
                IS_LEADER.set(0)
                log.error("lost the Lease %s/%s (%s); stopping so that one replica writes",
                          self.namespace, self.name, reason)  # fmt: skip
                self.on_lost()
                return

    def release(self) -> None:
        """Give the Lease up now (clean shutdown): a standby takes over at its next try."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.retry + 5)
        try:
            lease = self._read()
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["renewTime"] = _stamp(_now() - dt.timedelta(seconds=self.duration + 1))
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError) as exc:
            log.warning("could not release the Lease: %s", exc)
        finally:
            IS_LEADER.set(0)
