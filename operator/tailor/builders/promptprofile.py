"""PromptProfile children: one immutable ConfigMap per revision, and template checks.

A revision is identified by the sha256 of the profile's wire form; a new hash means a new
revision number and a new ConfigMap ``<name>-r<N>``; older ones beyond the history limit
are deleted by the controller.
"""

from __future__ import annotations

import hashlib
import json

from jinja2 import TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from tailor.api.common import Resources, SecretKeyRef
from tailor.api.promptprofile import PromptProfileSpec, render_profile_data
from tailor.api.settings import OperatorSettings
from tailor.api.workloads import EvalTarget, PromptTestRun
from tailor.builders.common import (
    Manifest,
    Mounts,
    Parent,
    Workload,
    batch_job,
    child_name,
    metadata,
    pod_security_context,
    reporter,
    reporter_rbac,
    spec_config_map,
    volumes_and_mounts,
    workload_container,
    workload_paths,
)

HISTORY = 10
PROFILE_KEY = "profile.json"
KNOWN_VARIABLES = {"question", "context"}


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
) -> Workload:
    """The Job that runs one revision's test cases against the deployment."""
    assert spec.tests is not None
    digest = cases_hash(spec) or ""
    name = tests_job_name(parent, revision, digest)
    rbac_name = child_name(parent, "tests")
    run = PromptTestRun(
        owner=parent.owner(),
        paths=workload_paths(settings),
        reporter=reporter(settings),
        spec=spec,
        revision=revision,
        cases_hash=digest,
        target=target,
        api_key_secret_ref=api_key,
    )
    resources = Resources(cpu="200m", memory="256Mi")
    volumes, volume_mounts = volumes_and_mounts(settings, Mounts().add_secret(api_key), name)
    pod = {
        "serviceAccountName": rbac_name,
        "securityContext": pod_security_context(settings),
        "containers": [
            workload_container(settings, "prompt-tests", "prompt_tests", resources, volume_mounts)
        ],
        "volumes": volumes,
    }
    manifests = [
        spec_config_map(parent, name, "prompt-tests", run),
        *reporter_rbac(parent, rbac_name, "prompt-tests", "promptprofiles"),
        batch_job(parent, name, "prompt-tests", pod, backoff_limit=1),
    ]
    return Workload(name=name, module="prompt_tests", run=run, manifests=manifests, backoff_limit=1)


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
