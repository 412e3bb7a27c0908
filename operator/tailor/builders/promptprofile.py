"""PromptProfile children: one immutable ConfigMap per revision, and template checks.

A revision is identified by the sha256 of the profile's wire form; a new hash means a new
revision number and a new ConfigMap ``<name>-r<N>``; older ones beyond the history limit
are deleted by the controller.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jinja2 import TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import ValidationError

from tailor.api.common import Resources, SecretKeyRef
from tailor.api.promptprofile import (
    POOL_MAX,
    FewShotExample,
    PromptProfileSpec,
    render_profile_data,
)
from tailor.api.records import InvalidRecords, json_records
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import EvalTarget, PromptTestRun
from tailor.builders.common import (
    Manifest,
    Mounts,
    Parent,
    Program,
    Workload,
    batch_workload,
    child_name,
    metadata,
    reporter,
    workload_paths,
)

HISTORY = 10
PROFILE_KEY = "profile.json"
KNOWN_VARIABLES = {"question", "context"}
REVISION_BYTES = 1000 * 1000
"""Largest revision published (a ConfigMap holds 1 MiB in all)."""
POOL_FIELD = "spec.fewShotSelection.poolFrom"


def pool_example(record: Any) -> dict[str, Any] | None:
    """A few-shot example from one pool record: {user, assistant}, {prompt, completion}, or
    a chat record's last user turn and the assistant turn after it; None: none of these."""
    if not isinstance(record, dict):
        return None
    if "user" in record and "assistant" in record:
        return {"user": record["user"], "assistant": record["assistant"]}
    if "prompt" in record and "completion" in record:
        return {"user": record["prompt"], "assistant": record["completion"]}
    turns = record.get("messages")
    if isinstance(turns, list):
        for i in range(len(turns) - 2, -1, -1):
            user, answer = turns[i], turns[i + 1]
            if (
                isinstance(user, dict)
                and isinstance(answer, dict)
                and (user.get("role"), answer.get("role")) == ("user", "assistant")
            ):
                return {"user": user.get("content"), "assistant": answer.get("content")}
    return None


def resolve_pool(
    spec: PromptProfileSpec, config_map: dict[str, Any] | None, namespace: str
) -> tuple[PromptProfileSpec, list[str]]:
    """The spec with ``fewShotSelection.poolFrom`` replaced by the examples it names (what
    a revision publishes), and the problems, each naming the field and the fix."""
    selection = spec.few_shot_selection
    if selection is None or selection.pool_from is None:
        return spec, []
    ref = selection.pool_from
    where = f"ConfigMap {ref.name} key {ref.key}"  # records are named {where}:line
    if config_map is None:
        return spec, [
            f"{POOL_FIELD}.name: ConfigMap {ref.name} does not exist in {namespace}; create "
            "it or name one that does"
        ]
    data = config_map.get("data") or {}
    if ref.key not in data:
        keys = ", ".join(sorted(data)) or "none"
        return spec, [f"{POOL_FIELD}.key: ConfigMap {ref.name} has no key {ref.key} (keys: {keys})"]
    try:
        records = json_records(str(data[ref.key]), where)
    except InvalidRecords as exc:
        return spec, [f"{POOL_FIELD}: {exc.message}"]
    pool: list[FewShotExample] = []
    for at, record in records:
        example = pool_example(record)
        if example is None:
            return spec, [
                f"{POOL_FIELD}: {at}: a record needs user and assistant (or prompt "
                "and completion, or messages with a user turn then an assistant turn)"
            ]
        try:
            pool.append(FewShotExample.model_validate(example))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            return spec, [f"{POOL_FIELD}: {at}: {field}: {first['msg']}"]
    if not pool or len(pool) > POOL_MAX:
        return spec, [
            f"{POOL_FIELD}: {where} holds {len(pool)} examples; a pool holds 1 to {POOL_MAX}"
        ]
    if selection.k > len(pool):
        return spec, [
            f"spec.fewShotSelection.k: {selection.k} is larger than the pool ({len(pool)} "
            f"examples in {where}); lower k or add examples"
        ]
    resolved = spec.model_copy(
        update={
            "few_shot_selection": selection.model_copy(update={"pool": pool, "pool_from": None})
        }
    )
    size = len(json.dumps(render_profile_data(resolved), indent=1, sort_keys=True).encode())
    if size > REVISION_BYTES:
        return spec, [
            f"{POOL_FIELD}: with the {len(pool)} examples of {where} the revision is "
            f"{size} bytes, more than a ConfigMap holds ({REVISION_BYTES}); use fewer or "
            "shorter examples"
        ]
    return resolved, []


def profile_hash(spec: PromptProfileSpec) -> str:
    """sha256 of the revision's content (tests and pin are not part of it)."""
    blob = json.dumps(render_profile_data(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cases_hash(spec: PromptProfileSpec) -> str | None:
    """Short sha256 of what the tests run (cases, deployment, adapter); None without tests."""
    if spec.tests is None:
        return None
    wire = spec.tests.model_dump(mode="json", by_alias=True, exclude={"gate"})
    blob = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tests_job_name(parent: Parent, revision: int, digest: str) -> str:
    return child_name(parent, f"test-r{revision}-{digest[:6]}")


def build_prompt_tests(
    spec: PromptProfileSpec,
    parent: Parent,
    settings: OperatorSettings,
    revision: int,
    target: EvalTarget,
    api_key: SecretKeyRef | None,
    test_key: SecretKeyRef | None = None,
) -> Workload:
    """The Job that runs one revision's test cases against the deployment."""
    assert spec.tests is not None
    digest = cases_hash(spec) or ""
    name = tests_job_name(parent, revision, digest)
    rbac_name = child_name(parent, "tests")
    run = PromptTestRun(
        owner=parent.owner(),
        paths=workload_paths(settings, parent.namespace),
        reporter=reporter(settings),
        spec=spec,
        revision=revision,
        cases_hash=digest,
        target=target,
        api_key_secret_ref=api_key,
        test_key_secret_ref=test_key,
    )
    return batch_workload(
        parent,
        settings,
        name=name,
        component="prompt-tests",
        module=Program.PROMPT_TESTS,
        run=run,
        resources=Resources(cpu="200m", memory="256Mi"),
        mounts=Mounts().add_secret(api_key).add_secret(test_key),
        rbac_name=rbac_name,
        plural="promptprofiles",
        backoff_limit=1,
    )


def template_errors(spec: PromptProfileSpec) -> list[str]:
    """Problems with the template: syntax errors (with line) and undefined variables."""
    env = SandboxedEnvironment()
    try:
        parsed = env.parse(spec.template)
    except TemplateSyntaxError as exc:
        return [f"spec.template: line {exc.lineno}: {exc.message}"]
    unknown = meta.find_undeclared_variables(parsed) - KNOWN_VARIABLES - set(spec.variables)
    return [
        f"spec.template: variable {name!r} is neither question, context nor in spec.variables; "
        "add a default under spec.variables"
        for name in sorted(unknown)
    ]


def revision_config_map_name(parent: Parent, revision: int) -> str:
    return child_name(parent, f"r{revision}")


def build_revision(spec: PromptProfileSpec, parent: Parent, revision: int) -> Manifest:
    """The immutable ConfigMap of one revision."""
    meta_ = metadata(parent, revision_config_map_name(parent, revision), "prompt")
    meta_["annotations"] = {
        "tailor.dev/revision": str(revision),
        "tailor.dev/hash": profile_hash(spec),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta_,
        "immutable": True,
        "data": {PROFILE_KEY: json.dumps(render_profile_data(spec), indent=1, sort_keys=True)},
    }
