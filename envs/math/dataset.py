r"""Math problems for the math env: the embedded set, the training set and five benchmarks.

The embedded set (``envs/math/data/embedded.jsonl``, 32 problems written for this project) ships
with the package. The others are read from a data directory laid out as
``train/math_lvl3to5_8k.json`` and ``eval/jsonl_from_arrow/<benchmark>.jsonl``, given as
``data_dir`` or through the ``HOLDERPO_MATH_DATA`` environment variable.

Reference answers are normalised to text so that math-verify compares them as a person would:

* floats (AMC stores ``142.0``) become integers when integral (``"142"``);
* all-digit strings lose leading zeros (AIME ``"025"`` -> ``"25"``);
* lists (Minerva, OlympiadBench) hold equivalent spellings of one answer, not several answers: the
  first item, stripped of whitespace, is the answer and the others are kept as ``alternatives``
  (the verifier accepts any of them);
* rows with an empty answer are skipped with a warning (two rows of the training set, 5054 and
  5158, multiple-choice problems whose answer was lost); ``MathProblem.index`` stays the file row;
* math delimiters ``$`` of an answer written in math mode (``"$69$,$84$"`` -> ``"69,84"``) and
  surrounding whitespace (items may end in ``"\n"``) are removed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

_MATH_DOLLAR: Final = re.compile(r"(?<!\\)\$")
"""An unescaped ``$`` (math-mode delimiter; ``\\$`` is a currency sign and stays)."""

DATA_DIR_ENV: Final = "HOLDERPO_MATH_DATA"
"""Environment variable naming the math data directory (with ``train/`` and ``eval/``)."""

EMBEDDED: Final = "embedded"
DATASET_FILES: Final = {
    "train": "train/math_lvl3to5_8k.json",
    "aime24": "eval/jsonl_from_arrow/aime24.jsonl",
    "amc": "eval/jsonl_from_arrow/amc.jsonl",
    "math500": "eval/jsonl_from_arrow/math500.jsonl",
    "minerva": "eval/jsonl_from_arrow/minerva.jsonl",
    "olympiad_bench": "eval/jsonl_from_arrow/olympiad_bench.jsonl",
}
"""Each dataset name's file, relative to the data directory."""
DATASETS: Final = (EMBEDDED, *DATASET_FILES)
BENCHMARKS: Final = ("aime24", "amc", "math500", "minerva", "olympiad_bench")


@dataclass(frozen=True)
class MathProblem:
    """One problem with its reference answer."""

    problem: str
    """The problem statement (LaTeX in prose, no prompt template)."""
    answer: str
    """The reference answer as LaTeX text, normalised (see the module docstring)."""
    benchmark: str
    """The dataset it comes from (``embedded``, ``train`` or a benchmark name)."""
    index: int
    """Its row in that dataset."""
    alternatives: tuple[str, ...] = ()
    """Other spellings of the same answer given by the dataset (Minerva lists several)."""

    @property
    def references(self) -> tuple[str, ...]:
        """The answer followed by its alternatives: an answer equal to any one is correct."""
        return (self.answer, *self.alternatives)


def load_problems(dataset: str = EMBEDDED, data_dir: str | Path | None = None) -> list[MathProblem]:
    """Load every problem of ``dataset``, in file order.

    Args:
        dataset: ``"embedded"``, ``"train"`` or one of :data:`BENCHMARKS`.
        data_dir: The math data directory; defaults to ``$HOLDERPO_MATH_DATA``. Not needed for
            the embedded set.

    Returns:
        The problems (a fresh list; the parsed rows are cached).

    Raises:
        ValueError: Unknown dataset, or no data directory for a non-embedded dataset.
        FileNotFoundError: The dataset's file is missing under the data directory.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown math dataset {dataset!r}; choose one of {list(DATASETS)}")
    if dataset == EMBEDDED:
        return list(_load_embedded())
    path = resolve_data_dir(data_dir, dataset) / DATASET_FILES[dataset]
    if not path.is_file():
        raise FileNotFoundError(
            f"math dataset {dataset!r} expects {path}; point data_dir or ${DATA_DIR_ENV} at the "
            "folder holding train/ and eval/jsonl_from_arrow/"
        )
    return list(_load_file(dataset, path))


def resolve_data_dir(data_dir: str | Path | None, dataset: str) -> Path:
    """``data_dir``, else ``$HOLDERPO_MATH_DATA``; raises ``ValueError`` naming both when unset."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise ValueError(
            f"math dataset {dataset!r} needs a data directory: pass data_dir=... or set "
            f"{DATA_DIR_ENV} to the folder holding train/ and eval/ (or use dataset='embedded')"
        )
    return Path(chosen).expanduser()


def normalize_answer(raw: Any, allow_empty: bool = False) -> tuple[str, ...]:
    """A dataset's raw answer as normalised spellings, the main one first.

    Args:
        raw: A string, a float/int (AMC) or a list of equivalent strings (Minerva, OlympiadBench).
        allow_empty: Return ``()`` instead of raising when no spelling is left.

    Returns:
        The distinct non-empty spellings, in order.

    Raises:
        ValueError: No non-empty spelling (unless ``allow_empty``).
    """
    items = raw if isinstance(raw, list) else [raw]
    spellings = [_normalize_one(item) for item in items]
    unique = tuple(dict.fromkeys(s for s in spellings if s))
    if not unique and not allow_empty:
        raise ValueError(f"empty reference answer {raw!r}")
    return unique


def _normalize_one(item: Any) -> str:
    if isinstance(item, bool):
        raise ValueError(f"unexpected boolean answer {item!r}")
    if isinstance(item, float):
        return str(int(item)) if item.is_integer() else repr(item)
    if isinstance(item, int):
        return str(item)
    text = str(item).strip()
    if len(text) >= 2 and text[0] == text[-1] == "$" and not text.endswith("\\$"):
        text = _MATH_DOLLAR.sub("", text).strip()  # "$69$,$84$" -> "69,84"
    if text.isdigit() and text.isascii():
        text = str(int(text))
    return text


def _problem(row: dict[str, Any], problem_key: str, benchmark: str, index: int) -> MathProblem:
    answer, *alternatives = normalize_answer(row["answer"])
    return MathProblem(
        problem=row[problem_key],
        answer=answer,
        benchmark=benchmark,
        index=index,
        alternatives=tuple(alternatives),
    )


@functools.lru_cache(maxsize=1)
def _load_embedded() -> tuple[MathProblem, ...]:
    text = resources.files("envs.math").joinpath("data/embedded.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return tuple(_problem(row, "problem", EMBEDDED, i) for i, row in enumerate(rows))


@functools.lru_cache(maxsize=8)
def _load_file(dataset: str, path: Path) -> tuple[MathProblem, ...]:
    text = path.read_text("utf-8")
    if path.suffix == ".json":  # the training set: one JSON array of {prompt, answer, ...}
        rows, key = json.loads(text), "prompt"
    else:  # benchmarks: JSON lines of {problem, answer, ...}
        rows, key = [json.loads(line) for line in text.splitlines() if line.strip()], "problem"
    usable = [(i, row) for i, row in enumerate(rows) if normalize_answer(row["answer"], True)]
    if len(usable) < len(rows):
        skipped = sorted(set(range(len(rows))) - {i for i, _ in usable})
        logger.warning("%s: skipped rows %s with an empty reference answer", path, skipped)
    return tuple(_problem(row, key, dataset, i) for i, row in usable)


def load_templates() -> dict[str, str]:
    """The prompt templates (``envs/math/data/templates.json``): name -> text with ``{problem}``."""
    text = resources.files("envs.math").joinpath("data/templates.json").read_text("utf-8")
    return dict(json.loads(text))


def render(template: str, problem: str) -> str:
    """Put ``problem`` into ``template`` (plain substitution: templates contain LaTeX braces)."""
    return template.replace("{problem}", problem)
