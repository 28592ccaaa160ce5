"""Rollout: prompts, the multi-turn episode loop, the env worker pool and the task sampler.

Nothing here imports generation or training: the runtime hands the manager a policy.
"""
