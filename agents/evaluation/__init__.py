"""Evaluation: reports and plots of per-subtask success."""
