"""Tolerances for comparing two floating-point computations of the same value.

Two correct computations that add the same terms in another order (a chunked against an unchunked
matmul, a KV-cached against a full forward, another CPU's vector kernels, another thread count)
agree only to a few units in the last place (ulps) of the dtype they ran in, at the magnitude of
the terms: one float32 ulp at a log-prob of -11 is 9.5e-7, so ``atol=1e-6, rtol=0`` holds on one
machine and fails on the next. These helpers derive the tolerance from the dtype and the
magnitude instead of a fixed number. CI reruns the tests marked ``numerics`` (pyproject.toml)
with an AVX2 machine's kernels (``ATEN_CPU_CAPABILITY=avx2``) and two threads, so a comparison
tighter than its dtype fails here, not on a user's machine.
"""

from __future__ import annotations

import torch

ULPS = 16
"""Ulps two summation orders may differ by: reductions of a few hundred terms of either sign, as in
these tests' matmuls and log-softmaxes, round each partial sum (a few ulps each), with room."""


def tolerances(
    expected: torch.Tensor, dtype: torch.dtype | None = None, ulps: int = ULPS
) -> dict[str, float]:
    """``rtol``/``atol`` for :func:`torch.testing.assert_close` of a ``dtype`` computation.

    ``rtol`` is ``ulps`` machine epsilons of ``dtype`` (default: ``expected``'s); ``atol`` the same
    at the largest magnitude in ``expected``, for elements near zero whose value is the difference
    of larger terms (a gradient entry, a centred log-prob).
    """
    eps = torch.finfo(dtype or expected.dtype).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return {"rtol": ulps * eps, "atol": ulps * eps * scale}


def assert_close_in(
    dtype: torch.dtype,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    ulps: int = ULPS,
    msg: str | None = None,
) -> None:
    """``actual`` equals ``expected`` to ``ulps`` ulps of ``dtype``, the dtype both ran in (they
    may be compared after a cast to float64)."""
    torch.testing.assert_close(actual, expected, msg=msg, **tolerances(expected, dtype, ulps))
