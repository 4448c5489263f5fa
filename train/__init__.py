"""The DeepSpeed training job: config, process group, data, checkpoints, loop."""
