"""The operator's watch cache and the rule for when a Tailor object's own event reconciles."""

from __future__ import annotations

from typing import Any

from tailor.controllers.children import needs_sync
from tailor.runtime.cache import WatchCache


def obj(name: str, rv: str, **extra: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "ns", "resourceVersion": rv}
    meta.update(extra.pop("meta", {}))
    return {"metadata": meta, **extra}


def test_older_resource_version_never_replaces_newer() -> None:
    cache = WatchCache()
    cache.put("Job", obj("a", "10", status={"active": 1}))
    cache.put("Job", obj("a", "9", status={}))  # a late event or an older GET
    assert cache.get("Job", "ns", "a")["status"] == {"active": 1}
    cache.put("Job", obj("a", "12", status={"succeeded": 1}))
    assert cache.get("Job", "ns", "a")["status"] == {"succeeded": 1}
    assert cache.get("Job", "other", "a") is None
    assert cache.get("FineTuneJob", "ns", "a") is None  # kinds are separate


def test_pods_are_found_by_their_job_and_forgotten_when_deleted() -> None:
    cache = WatchCache()
    for name, job in (("p1", "train"), ("p2", "train"), ("p3", "other")):
        cache.put("Pod", obj(name, "5", meta={"labels": {"job-name": job}}))
    assert [p["metadata"]["name"] for p in cache.pods_of_job("ns", "train")] == ["p1", "p2"]
    cache.delete("Pod", "ns", "p1")
    assert [p["metadata"]["name"] for p in cache.pods_of_job("ns", "train")] == ["p2"]
    cache.delete("Pod", "ns", "p2")
    assert cache.pods_of_job("ns", "train") == []
    assert len(cache) == 1


def test_own_events_reconcile_only_when_new_or_spec_unhandled() -> None:
    fresh = {"metadata": {"generation": 1}}
    handled = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}
    edited = {"metadata": {"generation": 2}, "status": {"observedGeneration": 1}}
    assert needs_sync(None, handled)  # the watch's initial listing: resume
    assert needs_sync("ADDED", handled)
    assert needs_sync("MODIFIED", fresh)  # never reconciled yet
    assert needs_sync("MODIFIED", edited)
    assert not needs_sync("MODIFIED", handled)  # a status write: ours or a progress report


def test_cached_bodies_keep_what_reconciles_read_and_drop_the_bulk() -> None:
    cache = WatchCache()
    managed = [{"manager": "kube-controller-manager", "fieldsV1": {"f:status": {}}}]
    job = obj("train", "3", meta={"managedFields": managed, "labels": {"a": "b"}})
    job.update(
        spec={"suspend": True, "template": {"spec": {"containers": [{"name": "c"}]}}},
        status={"active": 1},
    )
    cache.put("Job", job)
    cached = cache.get("Job", "ns", "train")
    assert cached["spec"] == {"suspend": True} and cached["status"] == {"active": 1}
    assert "managedFields" not in cached["metadata"] and cached["metadata"]["labels"] == {"a": "b"}
    assert job["spec"]["template"]  # the caller's body is not modified
    pod = obj("p", "4", meta={"labels": {"job-name": "train"}})
    pod.update(spec={"containers": [{"name": "c"}]}, status={"phase": "Running"})
    cache.put("Pod", pod)
    assert cache.pods_of_job("ns", "train") == [
        {"metadata": pod["metadata"], "status": {"phase": "Running"}}
    ]
    deployment = obj("d", "5")
    deployment["spec"] = {
        "replicas": 2,
        "template": {"metadata": {"annotations": {"tailor.dev/revision": "r1"}}, "spec": {}},
    }
    cache.put("Deployment", deployment)
    assert cache.get("Deployment", "ns", "d")["spec"] == {
        "replicas": 2,
        "template": {"metadata": {"annotations": {"tailor.dev/revision": "r1"}}},
    }
