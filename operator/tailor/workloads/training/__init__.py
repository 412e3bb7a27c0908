"""The training program (``python -m tailor.workloads.training.trainer``): the trainer's recipe and
loop, its data, model, schedule, checkpoints, artifact and distributed set-up."""
