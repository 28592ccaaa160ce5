"""Check math answers against references in worker processes that can always be stopped.

math-verify bounds its own work with ``SIGALRM``, which works only on a process's main thread (on
other threads ``parse``/``verify`` raise, and a wrapper that catches the error scores a correct
answer 0), accepts only whole seconds (a float silently disables parsing), and cannot interrupt
long C-level work such as ``9^{9^{9^{9}}}``, which in a thread would also hold the GIL. So every
check runs here on the main thread of a worker process, with math-verify's own integer timeouts,
and the parent enforces a hard limit per item: a worker that overruns is killed and replaced, and
the item scores 0 with a reason.

A worker's memory grows with the answers it has parsed (sympy's and math-verify's caches), so a
worker is recycled after ``max_jobs`` answers or once its resident memory passes ``max_rss_mb``:
after it has returned a result, it exits and a fresh worker takes its slot; no job is lost.

Workers are fresh interpreters (``sys.executable``), as with multiprocessing's ``spawn`` start
method: never ``fork``, since Ray or torch threads may exist in the parent. Unlike ``spawn`` they do
not re-import the parent's ``__main__``, which fails for stdin scripts and breaks under some
launchers. Parent and worker talk through a socket pair wrapped as a multiprocessing
``Connection``.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Final

_READY: Final = "ready"

DEFAULT_MAX_JOBS: Final = 256
"""Answers one worker scores before it is recycled."""
DEFAULT_MAX_RSS_MB: Final = 1024.0
"""Resident memory (MiB) past which a worker is recycled after its current answer."""

Reference = str | Sequence[str]
"""One gold answer, or several equivalent spellings of it (correct when any one matches)."""


CORRECT: Final = "correct"
"""Status: the answer equals (one spelling of) the reference."""
NOT_EQUAL: Final = "not_equal"
"""Status: the answer parsed to an expression and was compared: not equal."""
UNPARSABLE: Final = "unparsable"
"""Status: math-verify found no expression in the answer (text only, or nothing)."""
TIMEOUT: Final = "timeout"
"""Status: parsing the answer or comparing it ran out of time (math-verify's limit, or the
parent's hard limit): no verdict on it."""
NO_REFERENCE: Final = "no_reference"
"""Status: the answer parsed but the reference could not be (the data's fault, not the answer's)."""
WORKER_DIED: Final = "worker_died"
"""Status: the worker process died on the answer."""

PARSED: Final = frozenset({CORRECT, NOT_EQUAL, NO_REFERENCE})
"""The statuses of an answer math-verify parsed to an expression: what ``action_valid`` and the
math env's ``format_reward`` require."""


@dataclass(frozen=True)
class VerifyResult:
    """The verdict on one answer."""

    correct: bool
    """The answer is mathematically equal to (one spelling of) the reference."""
    extracted: str
    """The answer as math-verify parsed it ("" when nothing could be parsed)."""
    reason: str
    """Why it is not correct ("" when correct): not equal, unparsable, timeout, worker died."""
    status: str
    """One of :data:`CORRECT`, :data:`NOT_EQUAL`, :data:`UNPARSABLE`, :data:`TIMEOUT`,
    :data:`NO_REFERENCE`, :data:`WORKER_DIED`."""

    @property
    def parsed(self) -> bool:
        """math-verify parsed the answer to an expression and gave a verdict (:data:`PARSED`)."""
        return self.status in PARSED


class Verifier:
    r"""A lazily started pool of worker processes scoring (answer, reference) pairs.

    Use it as a context manager or call :meth:`close` (the process-wide ones close at exit); an
    idle worker also exits when the parent's end of its socket closes.

    Example::

        with Verifier(num_workers=2, timeout_s=5) as verifier:
            verifier.score([("0.25", "\frac{1}{4}")])  # [VerifyResult(True, "0.25", "", "correct")]
    """

    def __init__(
        self,
        num_workers: int = 1,
        timeout_s: float = 5.0,
        *,
        inner_timeout_s: int | None = None,
        start_timeout_s: float = 120.0,
        max_jobs: int | None = DEFAULT_MAX_JOBS,
        max_rss_mb: float | None = DEFAULT_MAX_RSS_MB,
    ) -> None:
        """Configure the pool; no process starts before the first :meth:`score`.

        Args:
            num_workers: Worker processes (each scores one pair at a time).
            timeout_s: Hard limit per pair, enforced by the parent (seconds, > 0).
            inner_timeout_s: math-verify's own per-operation timeout, a whole number of seconds
                (default: a third of ``timeout_s``, at least 1).
            start_timeout_s: How long a new worker may take to import math-verify.
            max_jobs: Recycle a worker after this many answers (``None``: never).
            max_rss_mb: Recycle a worker whose resident memory passed this many MiB after an
                answer (``None``: never).

        Raises:
            ImportError: math-verify is not installed.
            ValueError: A setting is out of range.
        """
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math env needs math-verify: pip install '.[math]'")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if inner_timeout_s is None:
            inner_timeout_s = max(1, int(timeout_s // 3))
        if not isinstance(inner_timeout_s, int) or inner_timeout_s < 1:
            raise ValueError(
                f"inner_timeout_s must be a whole number of seconds >= 1 (math-verify ignores "
                f"other values), got {inner_timeout_s!r}"
            )
        if max_jobs is not None and max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1 or None, got {max_jobs}")
        if max_rss_mb is not None and not max_rss_mb > 0:
            raise ValueError(f"max_rss_mb must be > 0 or None, got {max_rss_mb}")
        self.num_workers = num_workers
        self.max_jobs = max_jobs
        self.max_rss_mb = max_rss_mb
        self.recycled = 0
        """Workers replaced for their job count or memory (not counting failures)."""
        self.timeout_s = float(timeout_s)
        self.inner_timeout_s = inner_timeout_s
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def score(self, pairs: Sequence[tuple[str, Reference]]) -> list[VerifyResult]:
        r"""Score each ``(answer, reference)`` pair, in order.

        Args:
            pairs: The answer as LaTeX (e.g. the content of its ``\boxed{}``) and the gold
                answer, or a sequence of equivalent gold spellings.

        Returns:
            One result per pair. A pair that overruns ``timeout_s`` scores 0 with a reason.
        """
        jobs = [(answer, _as_tuple(reference)) for answer, reference in pairs]
        with self._lock:
            if len(self._workers) < self.num_workers:
                self._start_workers()
            return self._run(jobs)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty before the first :meth:`score`)."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop every worker (idempotent); a later :meth:`score` starts new ones."""
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        return _Worker.start(self.inner_timeout_s, self.start_timeout_s)

    def _run(self, jobs: list[tuple[str, tuple[str, ...]]]) -> list[VerifyResult]:
        results: list[VerifyResult | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        while queue or any(w.job is not None for w in self._workers):
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.job is None and queue:
                    index = queue.popleft()
                    try:
                        worker.send(index, jobs[index], self.timeout_s)
                    except OSError as exc:  # the worker died while idle
                        self._replace(slot, f"verifier worker died ({exc!r})", results)
            self._collect(results)
        return [r for r in results if r is not None]

    def _collect(self, results: list[VerifyResult | None]) -> None:
        """Wait for the next message or deadline; record results and replace failed workers."""
        waiting = [w for w in self._workers if w.job is not None or not w.ready]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        ready = set(wait([w.conn for w in waiting], timeout=timeout))
        for slot, worker in enumerate(self._workers):
            if worker.conn in ready:
                outcome = worker.receive()
            elif time.monotonic() >= worker.deadline and worker in waiting:
                outcome = _overrun(worker, self.timeout_s)
            else:
                continue
            if isinstance(outcome, VerifyResult):
                job = worker.take_job()
                if job is not None:
                    results[job] = outcome
                if self._worn_out(worker):
                    self._recycle(slot)
            elif outcome is not None:
                self._replace(slot, outcome, results)

    def _worn_out(self, worker: _Worker) -> bool:
        """The idle ``worker`` has scored ``max_jobs`` answers or passed ``max_rss_mb``."""
        if self.max_jobs is not None and worker.jobs_done >= self.max_jobs:
            return True
        return self.max_rss_mb is not None and worker.rss_bytes > self.max_rss_mb * 2**20

    def _recycle(self, slot: int) -> None:
        """Stop the idle worker of ``slot`` (its result is in) and start a fresh one there."""
        self._workers[slot].stop()
        self._workers[slot] = self._spawn()
        self.recycled += 1

    def _replace(self, slot: int, reason: str, results: list[VerifyResult | None]) -> None:
        """Score the failed worker's job 0 with ``reason`` and start a fresh worker in its slot."""
        worker = self._workers[slot]
        job = worker.take_job()
        worker.stop(kill=True)
        if job is None:
            self._workers.pop(slot)  # a later score() starts a new one
            raise RuntimeError(f"math verifier worker failed to start: {reason}")
        status = TIMEOUT if reason.startswith(_OVERRUN) else WORKER_DIED
        results[job] = VerifyResult(correct=False, extracted="", reason=reason, status=status)
        self._workers[slot] = self._spawn()


_OVERRUN: Final = "verification timed out"


def _overrun(worker: _Worker, timeout_s: float) -> str:
    if worker.job is None:
        return "did not become ready in time"
    return f"{_OVERRUN} after {timeout_s:g} s (worker restarted)"


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, process: Any, conn: Connection, deadline: float) -> None:
        self.process = process
        self.conn = conn
        self.deadline = deadline
        """When the current job (or, before ready, the start) must be done."""
        self.ready = False
        self.job: int | None = None
        self.jobs_done = 0
        """Answers scored so far."""
        self.rss_bytes = 0
        """Resident memory the worker reported with its last answer."""

    @classmethod
    def start(cls, inner_timeout_s: int, start_timeout_s: float) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, str(child_fd), str(inner_timeout_s)],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
            env=_worker_environment(),
        )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        return cls(process, conn, time.monotonic() + start_timeout_s)

    def send(self, index: int, job: tuple[str, tuple[str, ...]], timeout_s: float) -> None:
        self.job = index
        self.deadline = time.monotonic() + timeout_s
        self.conn.send(job)

    def receive(self) -> VerifyResult | str | None:
        """The job's result; ``None`` for the ready message; a reason string on failure."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            return f"verifier worker died ({type(exc).__name__}, exit code {self.process.poll()})"
        if message == _READY:
            self.ready = True
            return None
        correct, extracted, reason, status, self.rss_bytes = message
        self.jobs_done += 1
        return VerifyResult(correct, extracted, reason, status)

    def take_job(self) -> int | None:
        job, self.job = self.job, None
        return job

    def stop(self, *, kill: bool = False) -> None:
        """Ask the worker to exit (or kill it at once) and reap it."""
        if not kill:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                kill = True
        try:
            self.process.wait(timeout=0 if kill else 0.5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.conn.close()


def _as_tuple(reference: Reference) -> tuple[str, ...]:
    return (reference,) if isinstance(reference, str) else tuple(reference)


_WORKER_COMMAND: Final = (
    "import sys; from envs.math.verify import _worker_main; _worker_main(sys.argv[1:])"
)


def _worker_environment() -> dict[str, str]:
    """The parent's environment, with its import path so that the worker finds this package."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _worker_main(argv: list[str]) -> None:
    """Worker loop: import math-verify, say ready, score jobs until ``None`` or EOF arrives."""
    conn = Connection(int(argv[0]))
    inner_timeout_s = int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops workers itself
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _warm_up()  # before ready, so that the first job is not timed against math-verify's imports
    conn.send(_READY)
    while (job := _receive_or_none(conn)) is not None:
        answer, references = job
        result = check_answer(answer, references, timeout_s=inner_timeout_s)
        conn.send((result.correct, result.extracted, result.reason, result.status, _rss_bytes()))


def _rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; elsewhere its peak, an upper bound)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _receive_or_none(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:  # the parent went away
        return None


def check_answer(answer: str, references: Sequence[str], *, timeout_s: int = 1) -> VerifyResult:
    r"""Compare one answer with its reference spellings using math-verify, in this process.

    Must run on a main thread (math-verify's timeouts use ``SIGALRM``); :class:`Verifier` runs it
    in worker processes with a hard outer limit.

    Args:
        answer: The answer as LaTeX, without ``\boxed{}``.
        references: Equivalent spellings of the gold answer.
        timeout_s: math-verify's per-operation timeout in whole seconds.

    Returns:
        The verdict: an answer math-verify gave up on (its parse or a comparison ran out of
        ``timeout_s``) is a :data:`TIMEOUT`, never "not equal"; one it found no expression in
        (only its text fallback) is :data:`UNPARSABLE` unless that text equals the reference's.
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    _warm_up()
    try:
        predicted = parse(_boxed(answer), parsing_timeout=timeout_s, raise_on_error=True)
    except TimeoutException:
        return _verdict(TIMEOUT, f"parsing the answer timed out after {timeout_s} s")
    except Exception:  # math-verify's own parse errors: nothing it could read
        predicted = []
    if not predicted:
        return _verdict(UNPARSABLE, "answer could not be parsed")
    extracted = str(predicted[-1])
    gold = [g for ref in references for g in _parse_reference(ref, timeout_s)]
    if not gold:
        return _verdict(NO_REFERENCE, "reference could not be parsed", extracted)
    if junk := not_an_answer(answer, references):  # math-verify would still read a value in it
        return _verdict(UNPARSABLE, junk, extracted)
    equal, timed_out = _compare(gold, predicted, timeout_s)
    if equal:
        return VerifyResult(correct=True, extracted=extracted, reason="", status=CORRECT)
    if timed_out:
        return _verdict(TIMEOUT, f"comparing with the reference timed out after {timeout_s} s")
    if all(isinstance(p, str) for p in predicted):  # math-verify's text fallback only
        return _verdict(UNPARSABLE, "no expression in the answer (text only)", extracted)
    if words := prose_words(answer):  # math-verify reads "the answer" as t*h*e*a*n*s*w*e*r
        return _verdict(UNPARSABLE, f"words, not an expression ({', '.join(words[:3])})", extracted)
    return _verdict(NOT_EQUAL, "not equal to the reference", extracted)


STRAY_SYMBOLS: Final = frozenset('@`"?#')
"""Characters no final answer holds (LaTeX math has no use for them)."""


def not_an_answer(answer: str, references: Sequence[str]) -> str:
    r"""Why ``answer`` is text math-verify would read a value in but no answer ("" if none).

    math-verify reads the last ``=`` of any string, so 100 random printable characters holding
    ``…i=1hm…`` equal a reference ``1``, and letters are symbols (``hello`` is h·e·l·l·o). Such an
    answer is :data:`UNPARSABLE` before it is compared: one with a :data:`STRAY_SYMBOLS`
    character, or with words (:func:`prose_words`) where no reference spelling has any (a text
    reference such as ``\text{Monday}`` still matches ``Monday``).
    """
    if stray := sorted(STRAY_SYMBOLS.intersection(answer)):
        return f"not an answer: holds {''.join(stray)!r}"
    if any(prose_words(r, in_text=True) for r in references):  # a text reference
        return ""
    if words := prose_words(answer):
        return f"words, not an expression ({', '.join(words[:3])})"
    return ""


_COMMAND: Final = re.compile(r"\\[a-zA-Z]+")
_TEXT_ARG: Final = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}"
)
_ENVIRONMENT: Final = re.compile(r"\\(?:begin|end)\s*\{[^{}]*\}")  # \begin{pmatrix}
_WORD: Final = re.compile(r"[a-zA-Z]{4,}")
FUNCTION_NAMES: Final = frozenset(
    {"sqrt", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "frac", "infty", "cbrt"}
)
"""Names of four or more letters a plain-text expression may hold (``sqrt(2)``)."""


def prose_words(answer: str, *, in_text: bool = False) -> list[str]:
    r"""Words of four or more letters outside LaTeX commands and ``\text{}``-like arguments.

    ``in_text``: the arguments' words count too (a reference such as ``\text{Monday}`` has one).
    math-verify parses any run of letters as a product of symbols, so ``\boxed{hello world}``
    would be a parsed (wrong) expression; an answer with such words where the reference has
    none is :data:`UNPARSABLE` (:func:`not_an_answer`). One- to three-letter names (variables,
    ``sin``, ``log``) and :data:`FUNCTION_NAMES` pass.
    """
    bare = _ENVIRONMENT.sub(" ", answer if in_text else _TEXT_ARG.sub(" ", answer))
    bare = _COMMAND.sub(" ", bare)
    return [w for w in _WORD.findall(bare) if w.lower() not in FUNCTION_NAMES]


def _verdict(status: str, reason: str, extracted: str = "") -> VerifyResult:
    return VerifyResult(correct=False, extracted=extracted, reason=reason, status=status)


def _compare(gold: Sequence[Any], predicted: Sequence[Any], timeout_s: int) -> tuple[bool, bool]:
    """(some pair is equal, some comparison timed out), as ``math_verify.verify`` compares.

    ``verify`` tries every (gold, predicted) pair and returns False for a pair whose comparison
    timed out, so "not equal" and "gave up" read the same; here each pair is compared on its own
    with ``raise_on_error=True`` and a timeout is told apart (other errors: not equal, as there).
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timed_out = False
    for g, p in itertools.product(gold, predicted):
        try:
            if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                return True, timed_out
        except TimeoutException:
            timed_out = True
        except Exception:  # noqa: S112 (a comparison error is "not equal", as in verify)
            continue
    return False, timed_out


def _parse_reference(reference: str, timeout_s: int) -> tuple[Any, ...]:
    """A gold answer, parsed once per process (the n rollouts of a group share it).

    References come from the dataset, not from the model, so they get the whole per-pair budget
    (three times math-verify's per-operation timeout; the parent's hard limit still applies):
    on a loaded machine a 1 s limit made correct answers score 0 as "reference could not be
    parsed". Empty results are not kept, so a reference that timed out is parsed again.
    """
    from math_verify import parse

    key = (reference, timeout_s)
    if key not in _REFERENCES:
        parsed = tuple(
            parse(_boxed(reference), parsing_timeout=_REFERENCE_TIMEOUT_FACTOR * timeout_s)
        )
        if not parsed:
            return parsed
        if len(_REFERENCES) >= _MAX_REFERENCES:
            _REFERENCES.pop(next(iter(_REFERENCES)))  # the oldest
        _REFERENCES[key] = parsed
    return _REFERENCES[key]


_REFERENCES: dict[tuple[str, int], tuple[Any, ...]] = {}
_MAX_REFERENCES: Final = 4096
_REFERENCE_TIMEOUT_FACTOR: Final = 3


@functools.cache
def _warm_up() -> None:
    """Parse and verify one known pair, once per process.

    math-verify imports its LaTeX and SymPy machinery on first use (about 0.2 s idle, over a
    second on a loaded machine); warming up keeps that out of the first answer's timeout.
    """
    from math_verify import parse, verify

    verify(
        parse(_boxed("1/2"), parsing_timeout=_WARM_UP_TIMEOUT_S),
        parse(_boxed("0.5"), parsing_timeout=_WARM_UP_TIMEOUT_S),
        timeout_seconds=_WARM_UP_TIMEOUT_S,
    )


_WARM_UP_TIMEOUT_S: Final = 60


def _boxed(latex: str) -> str:
    return f"\\boxed{{{latex}}}"


_SHARED: dict[tuple[float, int | None, float | None], Verifier] = {}
_SHARED_LOCK = threading.Lock()


def shared_verifier(
    timeout_s: float = 5.0,
    *,
    max_jobs: int | None = DEFAULT_MAX_JOBS,
    max_rss_mb: float | None = DEFAULT_MAX_RSS_MB,
) -> Verifier:
    """The process-wide single-worker :class:`Verifier` for these settings (closed at exit)."""
    key = (timeout_s, max_jobs, max_rss_mb)
    with _SHARED_LOCK:
        if key not in _SHARED:
            if not _SHARED:
                atexit.register(_close_shared)
            _SHARED[key] = Verifier(
                num_workers=1, timeout_s=timeout_s, max_jobs=max_jobs, max_rss_mb=max_rss_mb
            )
        return _SHARED[key]


def _close_shared() -> None:
    for verifier in _SHARED.values():
        verifier.close()
