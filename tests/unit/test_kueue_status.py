"""How a queued run's status reads Kueue's words (the cluster tests run the real Kueue)."""

from __future__ import annotations

from tailor.controllers.kueue import Quota, in_use

KUEUE_SAYS = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu "
    "in flavor h100, 2 more needed"
)


def test_use_comes_from_kueues_last_try_not_the_lagging_cluster_queue_status() -> None:
    # 4 GPUs of quota, the ClusterQueue's status still says 0 reserved; Kueue needs 2 more
    # for a 2-GPU run, so nothing is free: all 4 are in use
    assert in_use(KUEUE_SAYS, "nvidia.com/gpu", 2, Quota("team-a", 4, 0)) == 4
    # 3 GPUs asked, 2 more needed: 1 free of 8, 7 in use
    assert in_use(KUEUE_SAYS, "nvidia.com/gpu", 3, Quota("team-a", 8, 0)) == 7


def test_without_kueues_numbers_the_cluster_queue_status_counts() -> None:
    assert in_use("", "nvidia.com/gpu", 2, Quota("team-a", 4, 3)) == 3
    other = KUEUE_SAYS.replace("nvidia.com/gpu", "amd.com/gpu")
    assert in_use(other, "nvidia.com/gpu", 2, Quota("team-a", 4, 1)) == 1


def test_an_admission_the_operator_never_saw_waiting_still_records_its_wait() -> None:
    """Kueue can admit a run before the operator wrote it as Queued (no old status): the
    wait is measured from the Workload's creation, so the histogram still gets it."""
    from tailor.controllers.kueue import record
    from tailor.observability.operator import QUEUE_WAIT_SECONDS

    def waits() -> tuple[float, float]:
        samples = {
            s.name: s.value
            for metric in QUEUE_WAIT_SECONDS.collect()
            for s in metric.samples
            if s.labels.get("queue") == "unit-never-seen"
        }
        suffix = "tailor_operator_kueue_wait_seconds"
        return samples.get(f"{suffix}_count", 0.0), samples.get(f"{suffix}_sum", 0.0)

    admitted = {"name": "unit-never-seen", "admitted": True,
                "admittedAt": "2026-01-01T00:00:15Z", "waitingSince": "2026-01-01T00:00:00Z"}  # fmt: skip
    record("FineTuneJob", None, admitted)
    assert waits() == (1.0, 15.0)
    record("FineTuneJob", admitted, admitted)  # the same admission again: not counted twice
    assert waits() == (1.0, 15.0)
