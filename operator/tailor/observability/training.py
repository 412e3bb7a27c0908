"""Prometheus metrics of the fine-tuning workload (``tailor.workloads.training.trainer``).

The trainer serves them on its run's ``metricsPort`` so a Prometheus scraping the pod sees
loss, evaluation loss, throughput, progress and GPU memory while a FineTuneJob runs. Every
series is labelled with the owner's ``namespace`` and ``name``, the labels the operator's
own metrics use for a resource.
"""

from __future__ import annotations

from prometheus_client import Gauge

from tailor.observability.exposition import serve

LABELS = ("namespace", "name")

TRAIN_LOSS = Gauge("tailor_train_loss", "Recent training loss (mean of recent steps).", LABELS)
TRAIN_EVAL_LOSS = Gauge("tailor_train_eval_loss", "Last evaluation loss.", LABELS)
TRAIN_TOKENS_PER_SECOND = Gauge(
    "tailor_train_tokens_per_second", "Training throughput in input tokens per second.", LABELS
)
TRAIN_STEP = Gauge("tailor_train_step", "Optimizer steps done.", LABELS)
TRAIN_TOTAL_STEPS = Gauge("tailor_train_total_steps", "Optimizer steps in the run.", LABELS)
TRAIN_GPU_MEMORY_BYTES = Gauge(
    "tailor_train_gpu_memory_bytes", "Peak GPU memory allocated by the trainer (CUDA).", LABELS
)


class TrainingMetrics:
    """The trainer's gauges bound to one run's owner (namespace, name)."""

    def __init__(self, namespace: str, name: str):
        labels = {"namespace": namespace, "name": name}
        self.loss = TRAIN_LOSS.labels(**labels)
        self.eval_loss = TRAIN_EVAL_LOSS.labels(**labels)
        self.tokens_per_second = TRAIN_TOKENS_PER_SECOND.labels(**labels)
        self.step = TRAIN_STEP.labels(**labels)
        self.total_steps = TRAIN_TOTAL_STEPS.labels(**labels)
        self.gpu_memory_bytes = TRAIN_GPU_MEMORY_BYTES.labels(**labels)


def serve_metrics(port: int) -> None:
    """Expose the default registry on ``port`` (a daemon thread that ends with the process)."""
    serve(port)
