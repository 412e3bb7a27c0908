"""The gateway's response cache: finished answers of deterministic requests (temperature 0,
or a seed), keyed by everything that decides them (see ``Server._cache_key``)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any


class ResponseCache:
    """Exact-match cache of finished responses: LRU, bounded in entries and age."""

    def __init__(self, max_entries: int, ttl_seconds: float):
        self.max_entries, self.ttl = max_entries, ttl_seconds
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if time.monotonic() - found[0] > self.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return found[1]

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
