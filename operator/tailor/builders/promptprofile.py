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

from tailor.api.promptprofile import PromptProfileSpec
from tailor.builders.common import Manifest, Parent, child_name, metadata

HISTORY = 10
PROFILE_KEY = "profile.json"
KNOWN_VARIABLES = {"question", "context"}


def profile_hash(spec: PromptProfileSpec) -> str:
    blob = json.dumps(spec.wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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
        "data": {PROFILE_KEY: json.dumps(spec.wire(), indent=1, sort_keys=True)},
    }
