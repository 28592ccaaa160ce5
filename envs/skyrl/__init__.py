"""skyrl-gym's offline text envs as a text env (the ``skyrl`` extra)."""
