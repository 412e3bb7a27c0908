"""The private-address and plain-http switches are the cluster admin's, not the user's
(docs/security.md, "Egress"), against the real API server with the operator running.

Before, a user set ``allowPrivateAddresses: true`` on a KnowledgeBase source pointing at the
cloud metadata service (or any in-cluster service) and read the answer back through RAG. Now
the operator refuses such a spec before any pod unless the admin's policy (Helm
workloads.egress) allows it; with ``allowedHosts`` set, every URL must name one of them."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tailor.api import KINDS, parse_spec
from tailor.api.base import TailorModel
from tailor.api.settings import EgressPolicy
from tailor.controllers.egress import refused_egress
from tailor.devcluster.kube import Kube
from tests.cluster.helpers import EXAMPLES, bare_deployment, get, wait_for

pytestmark = pytest.mark.cluster

METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def knowledge_base(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tailor.dev/v1alpha1",
        "kind": "KnowledgeBase",
        "metadata": {"name": "docs"},
        "spec": {"sources": [source], "embedding": {"model": {"builtin": "minilm-l6-v2"}}},
    }


def test_a_user_cannot_grant_itself_private_addresses(kube: Kube, ns: str) -> None:
    source = {"url": METADATA, "allowPrivateAddresses": True, "allowInsecureHttp": True}
    kube.apply(knowledge_base(source), "-n", ns)

    def refused() -> Any:
        status = get(kube, ns, "kb", "docs").get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        return ready if ready.get("reason") == "EgressNotAllowed" else None

    ready = wait_for("the spec to be refused", refused, timeout=60, interval=0.3)
    assert ready["message"].startswith("spec.sources[0].allowPrivateAddresses:")
    assert "workloads.egress.allowPrivateAddresses" in ready["message"]
    assert kube.get_json("jobs,pods", "-n", ns)["items"] == []  # nothing was started


def test_the_admins_policy_narrows_and_allows() -> None:
    def body(**source: Any) -> TailorModel:
        return parse_spec(KINDS["KnowledgeBase"], knowledge_base(source)["spec"])

    open_policy = EgressPolicy(allow_private_addresses=True, allow_insecure_http=True)
    assert refused_egress(body(url=METADATA, allowPrivateAddresses=True,
                               allowInsecureHttp=True), open_policy) is None  # fmt: skip
    insecure = refused_egress(body(url="http://docs.example.com/a", allowInsecureHttp=True),
                              EgressPolicy())  # fmt: skip
    assert insecure and insecure.startswith("spec.sources[0].allowInsecureHttp:")
    hosts = EgressPolicy(allowed_hosts=["docs.example.com", ".corp.example"])
    assert refused_egress(body(url="https://docs.example.com/a"), hosts) is None
    assert refused_egress(body(url="https://wiki.corp.example/a"), hosts) is None
    elsewhere = refused_egress(body(url="https://evil.example.net/a"), hosts)
    assert elsewhere and elsewhere.startswith("spec.sources[0].url: host evil.example.net")
    assert refused_egress(body(url="https://corp.example.evil.net/"), hosts)  # not a suffix
    raft = yaml.safe_load((EXAMPLES / "raftjob.yaml").read_text())
    raft["spec"]["questions"] = {"generate": {"teacher": {
        "url": "https://api.evil.example.net/v1", "model": "m"}}}  # fmt: skip
    teacher = refused_egress(parse_spec(KINDS["RAFTJob"], raft["spec"]), hosts)
    assert teacher and teacher.startswith(
        "spec.questions.generate.teacher.url: host api.evil.example.net"
    )


def test_a_deployment_admits_only_its_namespace_unless_its_spec_names_more(
    kube: Kube, ns: str
) -> None:
    """The other direction: who may reach a server. Each ModelDeployment gets a
    NetworkPolicy; by default its API port admits pods of its own namespace only, so a pod
    of another namespace cannot call it (enforced by the cluster's network plugin: the dev
    cluster has none, so the object the API server stores is what is checked here)."""
    md = bare_deployment(replicas=0, adapters=[])
    kube.apply(md, "-n", ns)
    name = md["metadata"]["name"]
    policy = wait_for(
        "the NetworkPolicy",
        lambda: kube.get_json("networkpolicies", "-n", ns)["items"],
        timeout=60,
        interval=0.3,
    )[0]
    # the policy is applied before the Deployment it governs: wait for that one too
    deployment = wait_for(
        "the Deployment",
        lambda: kube.get_json("deploy", "-n", ns)["items"],
        timeout=60,
        interval=0.3,
    )[0]
    assert deployment["metadata"]["name"] == name
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pods.items()  # it selects the server's pods
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    api, *rest = policy["spec"]["ingress"]
    assert api["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert api["from"] == [{"podSelector": {}}]  # this namespace's pods, no other namespace
    assert all(rule.get("from") for rule in rest)  # no rule admits every source

    md["spec"]["network"] = {"allowFrom": [{"namespace": "apps", "podLabels": {"app": "web"}}]}
    kube.apply(md, "-n", ns)

    def widened() -> Any:
        items = kube.get_json("networkpolicies", "-n", ns)["items"]
        return items[0]["spec"]["ingress"][0]["from"] if items else None

    seen = wait_for(
        "the policy to follow the spec",
        lambda: (f := widened()) != api["from"] and f,
        timeout=60,
        interval=0.3,
    )
    assert seen == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}},
            "podSelector": {"matchLabels": {"app": "web"}},
        }
    ]
