"""Training: the learner (one or many ranks), the process group and FSDP, LoRA, checkpoints."""
