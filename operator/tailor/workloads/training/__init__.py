"""The training program (``python -m tailor.workloads.training.trainer``): the trainer, its data and
its distributed set-up."""
