"""The runtime of a training job: launcher environment and collectives, device, DeepSpeed engine,
checkpoints, EMA, run tracking and the scheduler's signals. It sits above the library subpackages
(models, diffusion, sampling, convert) and below the tasks, the loop and the commands."""
