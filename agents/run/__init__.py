"""The runtime: the one place that wires generation, rollout and training.

Also the Hydra glue, the metric writers and the checks run on a config before any work.
"""
