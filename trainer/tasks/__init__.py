"""The kinds of training job, by the name ``task=`` selects. Each implements ``trainer.tasks.base.Task``."""

from trainer.tasks.autoencoder import AutoencoderTask
from trainer.tasks.base import CheckpointExtras, MicroBatch, Task, TaskContext
from trainer.tasks.diffusion import DiffusionTask

TASKS = {"diffusion": DiffusionTask, "autoencoder": AutoencoderTask}

__all__ = ["TASKS", "AutoencoderTask", "CheckpointExtras", "DiffusionTask", "MicroBatch", "Task", "TaskContext"]
