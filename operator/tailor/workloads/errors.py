"""The two kinds of failure a workload program reports: one the user can fix, one a retry may fix."""

from __future__ import annotations


class WorkloadError(Exception):
    """A failure the user can fix (bad data, missing file); reported as the reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class RetryableError(WorkloadError):
    """A failure that another attempt may not have (a store or endpoint unreachable): the
    workload exits 1 so the Job's backoff retries it, with the reason for the operator."""
