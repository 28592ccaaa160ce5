"""Fixtures of the agents tests: one Ray session shared by every Ray test of the run."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A quiet local Ray session on 2 CPUs, started once (~5 s) and shut down at the end."""
    ray = pytest.importorskip("ray")
    from agents.rollout.env_pool import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield
    if started:
        ray.shutdown()
