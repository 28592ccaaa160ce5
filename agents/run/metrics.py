"""Metric sinks of a run: one JSON line per iteration and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import TracebackType


class MetricsWriter:
    """Appends ``{"iteration": i, **metrics}`` to ``metrics.jsonl`` and logs TensorBoard scalars.

    On resume the JSONL file is cut back to the iterations the checkpoint has, so a run killed
    between a log line and its checkpoint does not repeat lines. ``enabled=False`` (ranks other
    than 0) writes nothing.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate(self, iterations: int) -> None:
        """Keep only the lines of iterations ``< iterations``."""
        if not self.enabled or not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if _iteration(line) < iterations
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record one iteration's metrics."""
        if not self.enabled:
            return
        row = {"iteration": iteration, **{k: _finite(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, iteration)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """All rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _iteration(line: str) -> int:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line: drop it


def _finite(value: float) -> float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
