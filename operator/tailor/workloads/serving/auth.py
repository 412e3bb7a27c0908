"""Who a request comes from, and which models it may use (a ModelDeployment's ``auth``).

``auth.apiKeySecretRef`` is a key for every model; each of ``auth.keys`` is a key for the
adapters it lists (and the base model with ``baseModel: true``): any other model is 403,
naming what the key may use, never the key. Without ``auth`` every caller is the one
anonymous caller. A caller's identity is a hash of its key: the response cache keys on it,
so one caller never gets (or times) an answer cached for another one's prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from tailor.api.modeldeployment import Auth
from tailor.api.workloads import Paths
from tailor.workloads.errors import WorkloadError
from tailor.workloads.io.sources import read_secret
from tailor.workloads.serving.protocol import APIError

log = logging.getLogger("tailor.workloads.serving.auth")


class MountedSecret:
    """A mounted Secret key, re-read when the kubelet updates the file (a rotated API key
    takes effect without a restart); stat per use, read only on change."""

    def __init__(self, ref: Any, paths: Any):
        self.ref, self.paths = ref, paths
        self.path = Path(paths.secrets) / ref.name / ref.key
        self._seen: tuple[int, int, int] | None = None
        self._value = read_secret(ref, paths)
        self._changed()

    def _changed(self) -> bool:
        """Whether the file is another one than at the last look (False mid-swap)."""
        try:
            stat = self.path.stat()  # follows the kubelet's ..data symlink
        except OSError:
            return False  # mid-swap: keep the last key
        seen, self._seen = self._seen, (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return seen is not None and seen != self._seen

    def value(self) -> str:
        if self._changed():
            try:
                self._value = read_secret(self.ref, self.paths)
                log.info("the API key Secret %s changed: using the new key", self.ref.name)
            except WorkloadError:
                pass  # removed mid-update: keep the last key
        return self._value


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``identity`` is a hash of its key ("anonymous" without
    auth); ``adapters`` and ``base_model`` what it may use (``adapters`` None: every
    model)."""

    identity: str
    adapters: frozenset[str] | None = None
    base_model: bool = True

    def may_use(self, adapter: str | None) -> bool:
        if self.adapters is None:
            return True
        return self.base_model if adapter is None else adapter in self.adapters


ANONYMOUS = Caller("anonymous")


@dataclass(frozen=True)
class _Key:
    secret: MountedSecret
    adapters: frozenset[str] | None
    base_model: bool


class Access:
    """The deployment's API keys (mounted Secrets, re-read when rotated)."""

    def __init__(self, auth: Auth | None, paths: Paths):
        self.keys: list[_Key] = []
        if auth is None:
            return
        if auth.api_key_secret_ref is not None:
            self.keys.append(_Key(MountedSecret(auth.api_key_secret_ref, paths), None, True))
        for key in auth.keys:
            secret = MountedSecret(key.secret_ref, paths)
            self.keys.append(_Key(secret, frozenset(key.adapters), key.base_model))

    def caller(self, request: Request) -> Caller:
        """The caller of a request; 401 when auth is on and its bearer key is none of ours."""
        if not self.keys:
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "bearer" and given:
            for key in self.keys:  # each compared in constant time (hmac)
                value = key.secret.value().encode()
                if hmac.compare_digest(given, value):
                    identity = hashlib.sha256(value).hexdigest()
                    return Caller(identity, key.adapters, key.base_model)
        raise APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>` with a key "
            "from the deployment's auth (apiKeySecretRef or keys).",
            code="invalid_api_key",
        )


def check_scope(caller: Caller, adapter: str | None, model: str, usable: list[str]) -> None:
    """403 when ``caller`` may not use ``model`` (its ``adapter``); ``usable`` are the
    models it may use, named in the answer (the key never is)."""
    if caller.may_use(adapter):
        return
    allowed = ", ".join(usable) or "none of the models served now"
    raise APIError(
        403,
        f"this API key may not use the model `{model}`; it may use: {allowed} (the "
        "deployment's auth.keys scope it)",
        "permission_error",
        param="model",
        code="model_not_allowed",
    )
