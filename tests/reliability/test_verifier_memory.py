"""The math verifier's worker is recycled by job count and by memory, and loses no job.

Real math-verify in real worker processes; memory is read from ``/proc`` by the test itself.
The heavy answers are polynomial powers, whose parsing grows the worker's caches by a third to half
a MiB each with the installed sympy / math-verify (a worker that is never recycled keeps growing);
48 of them grow an unbounded worker about 11 MiB, clear of the 9 MiB the test needs to see.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from envs.math.verify import Verifier  # noqa: E402

HEAVY = 48  # 24 grew it only 8.3 MiB with sympy 1.14 / math-verify 0.9


def _rss_mb(pid: int) -> float:
    statm = Path(f"/proc/{pid}/statm")
    if not statm.exists():
        pytest.skip("needs /proc to read a process's resident memory")
    return int(statm.read_text().split()[1]) * 4096 / 2**20


def _heavy(i: int) -> str:
    return f"(x+{i})^{{{120 + i}}} - (x-{i})^{{{120 + i}}}"


def test_worker_is_recycled_every_max_jobs_without_losing_a_job() -> None:
    pairs = [(f"{k}/{2 * k}", "0.5") if k % 2 else (f"{k}", str(k + 1)) for k in range(1, 11)]
    with Verifier(num_workers=1, timeout_s=20, max_jobs=3) as verifier:
        pids, results = [], []
        for pair in pairs:  # one at a time: see the worker change
            results += verifier.score([pair])
            pids += verifier.worker_pids()
        again = verifier.score(pairs)  # and in one call: recycled mid-call
    assert [r.correct for r in results] == [k % 2 == 1 for k in range(1, 11)]
    assert [r.correct for r in again] == [r.correct for r in results]
    # the worker that scored jobs 1-3 is gone right after job 3, and so on: four workers
    assert pids[0] == pids[1] != pids[2] == pids[4] != pids[5] and len(set(pids)) == 4
    assert verifier.recycled == 6  # after jobs 3, 6, 9 of each pass of ten


def _rss_over_heavy_answers(verifier: Verifier) -> list[float]:
    verifier.score([("1", "1")])
    seen = []
    for i in range(HEAVY):
        verifier.score([(_heavy(i), "x^2+1")])
        seen += [_rss_mb(pid) for pid in verifier.worker_pids()]
    return seen


def test_worker_memory_plateaus_under_max_rss_mb() -> None:
    with Verifier(num_workers=1, timeout_s=30, max_jobs=None, max_rss_mb=None) as probe:
        probe.score([("1", "1")])
        start = _rss_mb(probe.worker_pids()[0])
        unbounded = _rss_over_heavy_answers(probe)
    limit = start + 6.0
    assert max(unbounded) > limit + 3.0, (start, unbounded)  # the answers do grow the worker

    with Verifier(num_workers=1, timeout_s=30, max_jobs=None, max_rss_mb=limit) as verifier:
        bounded = _rss_over_heavy_answers(verifier)
    assert verifier.recycled >= 1
    assert max(bounded) <= limit + 3.0, (limit, bounded)  # at most one answer's growth past it
    third = HEAVY // 3
    assert max(bounded[-third:]) <= max(bounded[:third]) + 3.0, bounded  # a plateau, no trend
