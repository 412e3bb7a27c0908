"""Children are used or deleted only when their owner reference carries the parent's uid
(docs/security.md, "Ownership"), against the real API server with the operator running.

Before, a RAFTJob took any FineTuneJob named ``<raft>-ft`` for its own training run (its
artifact became the RAFT's) and deleted any ModelDeployment named like its evaluation
server, also one a user made. Now the name collision fails the run, naming the object and
the fix, and the user's object is left as it was."""

from __future__ import annotations

from typing import Any

import pytest

from tailor.devcluster.kube import Kube
from tests.cluster.helpers import example, fine_tune, get, wait_for

pytestmark = pytest.mark.cluster


def test_a_raft_job_does_not_adopt_a_fine_tune_job_it_did_not_create(kube: Kube, ns: str) -> None:
    kube.apply(example("knowledgebase"), "-n", ns)
    theirs = fine_tune("torchhub-raft-ft", gpus=1, suspend=True)  # the RAFT child's name
    kube.apply(theirs, "-n", ns)
    before = get(kube, ns, "ftj", "torchhub-raft-ft")
    raft = example("raftjob")
    raft["spec"]["fineTune"]["resources"] = {"gpus": 1}
    kube.apply(raft, "-n", ns)

    def settled() -> Any:
        status = get(kube, ns, "raft", "torchhub-raft").get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_for("the RAFTJob to settle", settled, timeout=120, interval=0.3)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["reason"]) == ("Failed", "NameTaken"), status
    assert "FineTuneJob torchhub-raft-ft" in ready["message"]
    assert "rename or delete" in ready["message"]
    after = get(kube, ns, "ftj", "torchhub-raft-ft")
    assert after["spec"] == before["spec"]
    assert not after["metadata"].get("ownerReferences")
    assert "artifact" not in status
