"""Every manifest of tests/corpus/bad is rejected by the real API server, naming its field.

Each corpus file holds ``description``, ``field`` (the path the user's error must
name, e.g. ``spec.lora.r``), ``manifest`` and optionally ``original``: when
present, ``original`` is created for real first and the case is the update to
``manifest`` (immutability rules). The check is a server-side dry run with strict field
validation, the requests ``kubectl apply --dry-run=server`` makes (a create, or an
update of the existing object), so the error is exactly what a user sees: OpenAPI schema
validation, CEL rules and strict field validation of the generated CRDs. The error must be
about the whole ``field`` path (see ``names_field``), not merely mention it. All cases
share one namespace and one API client: a namespace and a few kubectl processes per case
cost most of this module's time before.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tailor.devcluster.kube import Kube, create_namespace, delete_namespace

pytestmark = pytest.mark.cluster

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "bad"
CASES = sorted(CORPUS.glob("*.yaml"))


def in_namespace(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    metadata = {**manifest.get("metadata", {}), "namespace": namespace}
    return {**manifest, "metadata": metadata}


def names_field(message: str, field: str) -> bool:
    """Whether an API error is about exactly ``field``, as the API server words it.

    Validation errors read ``spec.lora.r: Invalid value: ...``; strict decoding
    errors read ``unknown field "spec.epochs"``. The path must be whole: ``spec.lora``
    does not match an error about ``spec.lora.r``, nor ``r`` one about ``spec.lora.r``.
    """
    return re.search(rf'(?<![\w.\]]){re.escape(field)}(?=: |")', message) is not None


@pytest.fixture(scope="module")
def custom_objects(kube: Kube) -> Iterator[client.CustomObjectsApi]:
    api_client = config.new_client_from_config(str(kube.kubeconfig))
    try:
        yield client.CustomObjectsApi(api_client)
    finally:
        api_client.close()


@pytest.fixture(scope="module")
def corpus_namespace(kube: Kube) -> Iterator[str]:
    name = f"t-bad-manifests-{secrets.token_hex(3)}"
    create_namespace(kube, name)
    yield name
    delete_namespace(kube, name)


def server_error(call: Callable[[], Any]) -> str | None:
    """The API server's message when ``call`` is refused, None when it is accepted."""
    try:
        call()
    except ApiException as exc:
        try:
            return str(json.loads(exc.body or "{}").get("message") or exc.body)
        except json.JSONDecodeError:
            return str(exc.body)
    return None


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_server_rejects_the_manifest_and_names_the_field(
    custom_objects: client.CustomObjectsApi, corpus_namespace: str, case_file: Path
) -> None:
    case = yaml.safe_load(case_file.read_text())
    assert {"description", "field", "manifest"} <= set(case) <= {
        "description", "field", "manifest", "original",
    }, f"{case_file.name}: malformed corpus case"  # fmt: skip
    manifest = in_namespace(case["manifest"], corpus_namespace)
    group, version = manifest["apiVersion"].split("/")
    where = (group, version, corpus_namespace, manifest["kind"].lower() + "s")
    strict = {"dry_run": "All", "field_validation": "Strict"}
    if "original" not in case:
        message = server_error(
            lambda: custom_objects.create_namespaced_custom_object(*where, manifest, **strict)
        )
    else:
        original = in_namespace(case["original"], corpus_namespace)
        name = original["metadata"]["name"]
        refused = server_error(
            lambda: custom_objects.create_namespaced_custom_object(*where, original)
        )
        assert refused is None, f"{case_file.name}: the original must be valid:\n{refused}"
        try:
            current = custom_objects.get_namespaced_custom_object(*where, name)
            manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            message = server_error(
                lambda: custom_objects.replace_namespaced_custom_object(
                    *where, name, manifest, **strict
                )
            )
        finally:
            custom_objects.delete_namespaced_custom_object(*where, name)
    assert message is not None, (
        f"{case_file.name}: the server accepted a bad manifest ({case['description']})"
    )
    assert names_field(message, case["field"]), (
        f"{case_file.name}: the error does not name {case['field']!r}:\n{message}"
    )
