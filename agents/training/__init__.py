"""Training: learner (1..N ranks), log-probs, KL reference, process group, LoRA, checkpoints."""
