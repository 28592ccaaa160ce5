"""Test-wide settings: one torch thread unless ``OMP_NUM_THREADS`` asks for more (2-core machines
slow down badly under contention; a run with 2 threads sums in another order, which the float
comparisons must tolerate: tests/numerics.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0] or 1)))
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA
