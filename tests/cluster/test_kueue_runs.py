"""Kueue: the real Kueue (built from the module proxy) on the session cluster, with kwok's
fake GPU nodes, and FineTuneJobs in its queues through the operator.

Each test has a namespace and a ClusterQueue of 4 GPUs of its own; the module's operator
watches only these namespaces (the rest of the session cluster is other tests'). kwok keeps
each training pod running for ``RUN`` (the operator's ``podAnnotations`` setting sets kwok's
delay annotation on every pod), then completes it with the trainer's artifact report. What
is checked is the Kubernetes side: the Job is queued and admitted by Kueue (never
unsuspended by Tailor), a Job without a queue is not Kueue's, status says why a run waits,
where it stands and whether it can ever run, preemption sends a run back to the queue and
readmission restarts the same Job, and stopping Kueue leaves the cluster taking Jobs. That a
restarted trainer resumes from its newest checkpoint is the trainer's own behaviour, tested
with the real trainer in tests/workloads.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tailor.devcluster.kube import Kube, create_namespace, delete_namespace
from tailor.devcluster.kueue import Kueue
from tests.cluster.helpers import OperatorProcess, gpu_job, queued_run, wait_for

pytestmark = pytest.mark.cluster

RUN = 20  # seconds kwok keeps a training pod running


QUEUE_TESTS = 5  # the tests below that take a queue_ns


@pytest.fixture(scope="module")
def queue_namespaces(kube: Kube) -> Iterator[list[str]]:
    """One namespace per test, made up front: the operator watches exactly these."""
    names = [f"q-{i}-{secrets.token_hex(3)}" for i in range(QUEUE_TESTS)]
    for name in names:
        create_namespace(kube, name)
    yield list(names)
    for name in names:
        delete_namespace(kube, name)


@pytest.fixture(scope="module")
def queue_operator(
    kube: Kube, kueue: Kueue, queue_namespaces: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("kueue") / "operator.log"
    operator = OperatorProcess(kube, log)
    operator.namespaces = list(queue_namespaces)
    operator.env = {
        "TAILOR_POD_ANNOTATIONS": json.dumps({"pod-complete.stage.kwok.x-k8s.io/delay": f"{RUN}s"}),
        # a two-node run mounts the artifacts claim on both nodes
        "TAILOR_ARTIFACTS_ACCESS_MODE": "ReadWriteMany",
    }
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
        print(log.read_text()[-6000:])


@pytest.fixture
def queue_ns(
    kube: Kube, kueue: Kueue, queue_namespaces: list[str], queue_operator: OperatorProcess
) -> str:
    """A namespace with LocalQueue ``gpus`` of its own 4-GPU ClusterQueue (which preempts
    lower priorities), watched by the module's operator."""
    name = queue_namespaces.pop()
    kueue.gpu_queue(name, gpus=4, namespaces=[name], preempt_lower_priority=True)
    return name


def status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    return dict(kube.get_json("ftj", name, "-n", ns).get("status") or {})


def in_phase(kube: Kube, ns: str, name: str, *phases: str) -> Callable[[], Any]:
    def check() -> Any:
        found = status(kube, ns, name)
        return found if found.get("phase") in phases else None

    return check


def ready(found: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in found["conditions"] if c["type"] == "Ready")


def test_two_runs_fit_the_quota_the_third_waits_first_in_line_and_runs_when_one_ends(
    kube: Kube, queue_ns: str
) -> None:
    ns = queue_ns
    for name in ("a", "b"):
        kube.apply(queued_run(name, 2), "-n", ns)
        wait_for(f"{name} running", in_phase(kube, ns, name, "Running"))
    kube.apply(queued_run("c", 2), "-n", ns)
    # status converges as Kueue writes the Workload: its position first, then its message
    wait_for(
        "c waiting with its position and Kueue's reason",
        lambda: (
            (s := in_phase(kube, ns, "c", "Queued")())
            and s.get("queue", {}).get("position")
            and "insufficient unused quota" in ready(s)["message"]
        ),
        timeout=15,
    )
    waiting = status(kube, ns, "c")
    assert waiting["queue"]["position"] == 1  # next in line
    assert waiting["queue"]["clusterQueue"] == ns and waiting["queue"]["admitted"] is False
    cond = ready(waiting)
    assert cond["reason"] == "WaitingForQuota"
    assert (
        f"waiting for quota in ClusterQueue {ns}: needs 2 nvidia.com/gpu, quota 4, in use 4"
        in (cond["message"])
    ), cond
    assert "insufficient unused quota" in cond["message"]  # Kueue's own words follow
    # Tailor never unsuspends a queued Job; no pod exists while it waits
    assert kube.get_json("job", "c-train", "-n", ns)["spec"]["suspend"] is True
    assert kube.get_json("pods", "-n", ns, "-l", "job-name=c-train")["items"] == []
    # while the queue is full, a Job without a queue is not Kueue's: neither suspended nor held
    kube.apply(gpu_job("plain", 1, None), "-n", ns)
    wait_for("the plain Job running", lambda: job_running(kube, ns, "plain"))
    kube.kubectl("delete", "job", "plain", "-n", ns, "--wait=false")  # its GPU is the next tests'

    # a and b finish after RUN seconds: the freed quota admits c, which runs and succeeds
    wait_for("a succeeded", in_phase(kube, ns, "a", "Succeeded"), timeout=RUN + 60)
    done = wait_for("c succeeded", in_phase(kube, ns, "c", "Succeeded"), timeout=2 * RUN + 60)
    assert done["queue"]["admitted"] is True and "position" not in done["queue"]
    events = kube.get_json("events", "-n", ns, "--field-selector", "involvedObject.name=c")
    reasons = [e["reason"] for e in events["items"]]
    # one Event per phase change: Queued's carries the first reason the operator saw
    # (Kueue may not have tried the Workload yet: WaitingForKueue; the condition above
    # has the quota reason either way)
    assert {"WaitingForQuota", "WaitingForKueue"} & set(reasons), reasons
    assert "Admitted" in reasons or "Running" in reasons, reasons


def test_a_higher_priority_run_preempts_a_lower_one_which_requeues_and_runs_again(
    kube: Kube, queue_ns: str, queue_operator: OperatorProcess
) -> None:
    ns = queue_ns
    kube.apply(
        [
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
             "metadata": {"name": name}, "value": value}
            for name, value in (("low", 10), ("high", 1000))
        ]
    )  # fmt: skip
    for name in ("low-1", "low-2"):
        kube.apply(queued_run(name, 2, priorityClassName="low"), "-n", ns)
        wait_for(f"{name} running", in_phase(kube, ns, name, "Running"))
    uids = {n: kube.get_json("job", f"{n}-train", "-n", ns)["metadata"]["uid"] for n in ("low-1", "low-2")}  # fmt: skip
    kube.apply(queued_run("urgent", 2, priorityClassName="high"), "-n", ns)

    def preempted() -> str | None:
        for name in ("low-1", "low-2"):
            found = status(kube, ns, name)
            if found.get("phase") == "Queued" and ready(found)["reason"] == "Preempted":
                return name
        return None

    victim = wait_for("a low-priority run preempted", preempted, timeout=30)
    found = status(kube, ns, victim)
    assert found["queue"]["preemptions"] == 1 and found["queue"]["priority"] == 10
    assert "resumes from its newest checkpoint when readmitted" in ready(found)["message"]
    assert kube.get_json("job", f"{victim}-train", "-n", ns)["spec"]["suspend"] is True
    wait_for("urgent running", in_phase(kube, ns, "urgent", "Running"), timeout=30)

    # urgent and the other low run finish; the victim is readmitted: the same Job (same
    # checkpoint folder) runs again and succeeds
    wait_for(f"{victim} running again", in_phase(kube, ns, victim, "Running"), timeout=RUN + 60)
    assert kube.get_json("job", f"{victim}-train", "-n", ns)["metadata"]["uid"] == uids[victim]
    done = wait_for(f"{victim} succeeded", in_phase(kube, ns, victim, "Succeeded"), timeout=RUN + 60)  # fmt: skip
    assert done["queue"]["preemptions"] == 1
    metrics = queue_operator.metrics()
    assert re.search(r'tailor_operator_kueue_preemptions_total\{kind="FineTuneJob",queue="gpus"\} [1-9]', metrics)  # fmt: skip
    assert re.search(r'tailor_operator_kueue_admissions_total\{kind="FineTuneJob",queue="gpus"\} [3-9]', metrics)  # fmt: skip


def test_more_gpus_than_the_quota_can_never_be_admitted_and_a_two_node_run_is_admitted_whole(
    kube: Kube, queue_ns: str
) -> None:
    ns = queue_ns
    kube.apply(queued_run("huge", 6), "-n", ns)
    found = wait_for(
        "huge refused by the quota",
        lambda: (
            (s := in_phase(kube, ns, "huge", "Queued")())
            and ready(s)["reason"] == "ExceedsQuota"
            and s
        ),
    )
    message = ready(found)["message"]
    assert (
        message.startswith("can never be admitted") and "needs 6 nvidia.com/gpu, quota 4" in message
    )
    assert "> maximum capacity (4)" in message  # Kueue's words

    # two nodes x 2 GPUs: one Kueue pod set of 2 pods, admitted (and started) all at once,
    # or not at all while a 1-GPU run holds part of the quota
    kube.apply(queued_run("one", 1), "-n", ns)
    wait_for("one running", in_phase(kube, ns, "one", "Running"))
    two = queued_run("two-node", 2)
    two["spec"]["resources"]["nodes"] = 2
    kube.apply(two, "-n", ns)
    wait_for("two-node queued", in_phase(kube, ns, "two-node", "Queued"))
    workload = kube.get_json("workloads", "-n", ns)["items"]
    pod_sets = next(
        w["spec"]["podSets"] for w in workload
        if w["metadata"]["ownerReferences"][0]["name"] == "two-node-train"
    )  # fmt: skip
    assert [p["count"] for p in pod_sets] == [2]
    assert kube.get_json("pods", "-n", ns, "-l", "job-name=two-node-train")["items"] == []
    wait_for("two-node running", in_phase(kube, ns, "two-node", "Running"), timeout=RUN + 60)
    pods = kube.get_json("pods", "-n", ns, "-l", "job-name=two-node-train")["items"]
    assert len(pods) == 2


def test_suspend_deactivates_the_workload_and_resume_requeues_it(kube: Kube, queue_ns: str) -> None:
    ns = queue_ns
    kube.apply(queued_run("paused", 2, suspend=True), "-n", ns)
    found = wait_for("suspended before queueing", in_phase(kube, ns, "paused", "Suspended"))
    assert "spec.suspend is false" in ready(found)["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []  # nothing queued yet
    patch = ["patch", "ftj", "paused", "-n", ns, "--type=merge", "-p"]
    kube.kubectl(*patch, '{"spec":{"suspend":false}}')
    wait_for("running", in_phase(kube, ns, "paused", "Running"))
    kube.kubectl(*patch, '{"spec":{"suspend":true}}')
    wait_for("suspended in the queue", in_phase(kube, ns, "paused", "Suspended"))
    workload = kube.get_json("workloads", "-n", ns)["items"][0]
    assert workload["spec"]["active"] is False
    assert kube.get_json("job", "paused-train", "-n", ns)["spec"]["suspend"] is True
    kube.kubectl(*patch, '{"spec":{"suspend":false}}')
    wait_for("running again", in_phase(kube, ns, "paused", "Running"))


def test_a_missing_local_queue_or_priority_class_is_named_and_nothing_is_created(
    kube: Kube, queue_ns: str
) -> None:
    ns = queue_ns
    kube.apply(queued_run("lost", 1, queueName="nope"), "-n", ns)
    found = wait_for("pending", in_phase(kube, ns, "lost", "Pending"))
    assert ready(found)["reason"] == "QueueNotFound"
    assert "spec.queueName names LocalQueue 'nope'" in ready(found)["message"]
    kube.apply(queued_run("vip", 1, priorityClassName="platinum"), "-n", ns)
    found = wait_for("pending", in_phase(kube, ns, "vip", "Pending"))
    assert ready(found)["reason"] == "PriorityClassNotFound"
    assert "spec.priorityClassName" in ready(found)["message"]
    assert kube.get_json("jobs", "-n", ns)["items"] == []


def job_running(kube: Kube, ns: str, name: str) -> bool:
    pods = kube.get_json("pods", "-n", ns, "-l", f"job-name={name}")["items"]
    return any(p.get("status", {}).get("phase") == "Running" for p in pods)


def test_stopping_kueue_removes_its_webhooks_so_the_cluster_still_takes_jobs(
    kube: Kube, kueue: Kueue, namespace: str
) -> None:
    kueue.down()
    try:
        hooks = kube.get_json("mutatingwebhookconfigurations")["items"]
        assert not [h for h in hooks if h["metadata"]["name"].startswith("kueue-")]
        services = kube.get_json("apiservices")["items"]
        assert not [s for s in services if s["spec"].get("group") == "visibility.kueue.x-k8s.io"]
        kube.apply(gpu_job("after", 1, None), "-n", namespace)
        wait_for("a Job created after Kueue stopped", lambda: job_running(kube, namespace, "after"))
    finally:
        kueue.up()  # for any Kueue test that runs after this one
