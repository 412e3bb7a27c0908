"""What every workload program's ``main`` shares: reading ``--spec FILE``, logging, and one exit
policy (exit code and termination message for the operator)."""

from __future__ import annotations

import argparse
import json
import logging
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


def run_main(run_type: type[RunT], work: Callable[[RunT], object], argv: list[str] | None) -> int:
    """The body of a workload's ``main``: read ``--spec FILE`` as ``run_type``, call ``work``
    and turn failures into an exit code and a termination message for the operator:
    2 for a user error (bad spec, bad data: retrying cannot help, the Job fails at once),
    1 for anything else (the Job's backoff retries it)."""
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
        write_termination_message("InternalError", f"{type(exc).__name__}: {exc}")
        return 1
    return 0
