"""What every workload program's ``main`` shares: reading ``--spec FILE``, logging, and one exit
policy (exit code and termination message for the operator)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tailor.api.base import describe_errors
from tailor.workloads.errors import RetryableError, WorkloadError

log = logging.getLogger("tailor.workloads")

RunT = TypeVar("RunT", bound=BaseModel)


def spec_path(argv: list[str] | None = None) -> Path:
    """The ``--spec FILE`` of the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, help="JSON spec file written by a builder")
    return Path(parser.parse_args(argv).spec)


def read_spec(model: type[RunT], argv: list[str] | None = None) -> RunT:
    """Parse ``--spec FILE`` from the command line and load the run spec model."""
    return model.model_validate_json(spec_path(argv).read_text())


def setup_logging() -> None:
    """Readable one-line logs on stderr (level from TAILOR_LOG_LEVEL, default INFO)."""
    logging.basicConfig(
        level=os.environ.get("TAILOR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def termination_log_path() -> str | None:
    """Where a failing workload explains itself: Kubernetes provides /dev/termination-log
    in every container; the local runtime sets TAILOR_TERMINATION_LOG to a file of its own.
    Elsewhere (a workload run by hand) there is none."""
    path = os.environ.get("TAILOR_TERMINATION_LOG")
    if path:
        return path
    return "/dev/termination-log" if os.path.exists("/dev/termination-log") else None


def write_termination_message(reason: str, message: str, **extra: Any) -> None:
    """Record ``{"reason", "message", **extra}`` for the operator, which reads it into a
    condition on failure and, on success, takes the workload's report from it (the
    trainer's verified artifact, the evaluator's scores); best effort (never raises)."""
    path = termination_log_path()
    if path is None:
        return
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"reason": reason, "message": message[-3000:], **extra}, fh)
    except OSError:
        pass


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2, else v1).

    torch sizes its thread pool by the node's cores, not the pod's CPU limit: a pod limited
    to 4 CPUs on a 64-core node would run 64 threads, which CFS throttling then stalls.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota: float | None = None
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = limit_us / period_us if limit_us > 0 else None
        except (OSError, ValueError):
            quota = None
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def limit_cpu_threads(threads: int | None = None) -> None:
    """Size torch's thread pool by :func:`cpu_budget` (or ``threads``); an explicit
    ``OMP_NUM_THREADS`` wins. Every program that runs torch calls this first. (With busy
    neighbours, ``OMP_WAIT_POLICY=PASSIVE`` in the pod's environment also helps: spinning
    OpenMP threads made a shared 2-core node 5x slower in our measurements.)"""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch  # only programs that run models call this; the kernel itself needs no torch

    torch.set_num_threads(threads or cpu_budget())


def run_main(
    run_type: type[RunT],
    work: Callable[[RunT], object],
    argv: list[str] | None,
    failure_reason: str = "InternalError",
) -> int:
    """The body of every workload's ``main``, the one exit policy: read ``--spec FILE`` as
    ``run_type``, call ``work`` and turn failures into an exit code and a termination message
    for the operator: 2 for a user error (bad spec, bad data: retrying cannot help, the Job
    fails at once), 1 for anything else (the Job's backoff retries it), reported with
    ``failure_reason``. ``work`` writes the success message itself when it has a report."""
    setup_logging()
    try:
        run = read_spec(run_type, argv)
    except ValidationError as exc:
        message = "; ".join(describe_errors(exc))
        log.error("invalid spec file: %s", message)
        write_termination_message("InvalidSpec", message)
        return 2
    except OSError as exc:
        log.error("cannot read the spec file: %s", exc)
        write_termination_message("InvalidSpec", str(exc))
        return 2
    try:
        work(run)
    except RetryableError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination_message(exc.reason, exc.message)
        return 1
    except WorkloadError as exc:
        log.error("%s: %s", exc.reason, exc.message)
        write_termination_message(exc.reason, exc.message)
        return 2
    except Exception as exc:
        log.exception("%s failed", run_type.__name__)
        write_termination_message(failure_reason, f"{type(exc).__name__}: {exc}")
        return 1
    return 0
