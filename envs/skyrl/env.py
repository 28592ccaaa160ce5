"""skyrl-gym's gsm8k envs (``skyrl-gym``, the ``skyrl`` extra) as a Gymnasium text env.

``envs.make("skyrl", task="gsm8k_multi_turn")`` plays one problem per episode through skyrl-gym's
own env (``skyrl_gym.make(task, extras=...)``, then its ``init`` and ``step``), which scores each
answer. skyrl-gym's envs take their problem and ground truth from a dataset row passed at
construction; the adapter builds those rows itself from the arithmetic word problems of
``envs/skyrl/problems.py`` (``split="train"``: generation seeds ``seed_start ..
seed_start + num_problems - 1``, ``"heldout"``: as many from :data:`HELDOUT_SEED_OFFSET` on), so
nothing is downloaded.

Tasks (skyrl-gym env ids, :data:`TASKS`):

* ``gsm8k_multi_turn``: up to ``max_turns`` answers; each turn skyrl-gym scores the reply (1 for
  the right ``#### <number>``, ``0.2 / max_turns`` for a wrong one in that form, else 0) and ends
  the episode on a right answer or after the last turn, asking for another answer otherwise;
* ``gsm8k``: one answer, scored 1 or 0.

What the adapter maps: the observation is the text of skyrl-gym's new chat messages (the problem
and how to answer after ``reset``; skyrl-gym's request for another answer after a turn; ``""``
once the episode ended). The action is the whole reply. The reward is skyrl-gym's, unchanged;
``won`` is a reward of 1 (skyrl-gym's score of a right answer). ``terminated`` is skyrl-gym's
``done`` after a right answer (and after gsm8k's single answer); a multi-turn episode that ran
out of turns is ``truncated``. ``action_valid`` is whether skyrl-gym's strict answer reader finds
a ``#### <number>`` in the reply; ``admissible_actions`` is ``[]`` (any text). ``anchor`` is the
problem and the turn (skyrl-gym asks the same question on every later turn, so the observation
alone would merge the turns of a problem); ``subtask`` is the task id. ``expert_plan`` is the
generated answer, ``["#### <answer>"]`` (the generator's answer key, as ALFWorld's walkthrough
is its game's), ``[]`` once the episode ended. Extra info: ``reference``, ``extracted`` (what the
reader found, ``""`` if nothing), ``kind`` (the problem's kind) and ``turn`` (answers given).

skyrl-gym's other envs are not offered: ``aime`` and ``lcb`` score against dataset rows (``lcb``
also runs the model's code), ``text2sql`` reads SQLite databases of the SynSQL/Spider/BIRD
downloads, ``search`` and ``searchcode`` query a retrieval server over HTTP, ``rlm`` runs the
model's Python in a REPL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from envs.base import InfoKeys, TextEnv
from envs.skyrl.problems import Problem, generate

INSTALL: Final = "pip install '.[skyrl]' (or pip install skyrl-gym==0.4.0)"
"""How to install what this env needs."""

TASKS: Final = ("gsm8k_multi_turn", "gsm8k")
"""The skyrl-gym env ids the adapter plays (the multi-turn one first: the default)."""

SPLITS: Final = ("train", "heldout")
"""``split=`` values."""

HELDOUT_SEED_OFFSET: Final = 1_000_000
"""First generation seed of the held-out problems (training problems stay below it)."""

INSTRUCTION: Final = "Solve the problem. End your reply with #### and the answer, a number."
"""Put under the problem in the first observation (skyrl-gym reads the ``#### <number>``)."""


class SkyRLEnv(TextEnv):
    """skyrl-gym's gsm8k env, one per problem (``gymnasium.Env[str, str]``; module docstring)."""

    def __init__(
        self,
        task: str = TASKS[0],
        split: str = "train",
        num_problems: int = 64,
        seed_start: int = 0,
        max_turns: int = 5,
    ) -> None:
        """Create the env.

        Args:
            task: a skyrl-gym env id of :data:`TASKS`.
            split: ``train`` or ``heldout`` (disjoint generation seeds).
            num_problems: problems in the list (``reset(seed=i)`` plays ``i % num_problems``).
            seed_start: first generation seed of the split.
            max_turns: answers a ``gsm8k_multi_turn`` episode allows (skyrl-gym's own default is 5;
                ``gsm8k`` takes one).

        Raises:
            ImportError: skyrl-gym is not installed (the message says how to install it).
            ValueError: an argument is out of range (the message names the setting to change).
        """
        super().__init__()
        try:
            import skyrl_gym
            from skyrl_gym.envs.gsm8k.utils import extract_solution
        except ImportError as exc:
            raise ImportError(f"env 'skyrl' needs the skyrl-gym package: {INSTALL}") from exc
        _check_settings(task, split, num_problems, seed_start, max_turns)
        self.task = task
        self.split = split
        self.multi_turn = task == "gsm8k_multi_turn"
        self._max_turns = int(max_turns) if self.multi_turn else 1
        first = seed_start + (HELDOUT_SEED_OFFSET if split == "heldout" else 0)
        self.problems: tuple[Problem, ...] = tuple(generate(first + i) for i in range(num_problems))
        self._make: Callable[..., Any] = skyrl_gym.make
        self._extract: Callable[..., str | None] = extract_solution
        self._core: Any = None
        self._problem = self.problems[0]
        self._turn = 0
        self._done = True

    @property
    def num_tasks(self) -> int:
        """Number of problems; ``reset(seed=i)`` plays problem ``i % num_tasks``."""
        return len(self.problems)

    @property
    def task_subtasks(self) -> tuple[str, ...]:
        """Every problem's subtask: the task id."""
        return (self.task,) * len(self.problems)

    @property
    def subtasks(self) -> tuple[str, ...]:
        """The one subtask: the task id."""
        return (self.task,)

    @property
    def max_steps(self) -> int:
        """Answers an episode allows (``max_turns``; 1 for ``gsm8k``)."""
        return self._max_turns

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Start problem ``seed % num_tasks`` (or ``options["index"]``), else a random one."""
        super().reset(seed=seed)
        if options and "index" in options:
            index = int(options["index"])
        else:
            index = seed if seed is not None else int(self.np_random.integers(self.num_tasks))
        self._problem = self.problems[index % self.num_tasks]
        extras = {
            "reward_spec": {"method": "rule", "ground_truth": str(self._problem.answer)},
            "max_turns": self._max_turns,
        }
        self.close()
        self._core = self._make(self.task, env_config=None, extras=extras)
        prompt = [{"role": "user", "content": f"{self._problem.question}\n{INSTRUCTION}"}]
        messages, _ = self._core.init(prompt)
        self._turn = 0
        self._done = False
        obs = _text(messages)
        return obs, self._info(won=False, valid=True, extracted="")

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Send the reply to skyrl-gym's env; its reward, ``done`` split by why it ended."""
        if self._done:
            raise RuntimeError("SkyRLEnv.step() after the episode ended; call reset() first")
        reply = action if isinstance(action, str) else ""
        out = self._core.step(reply)
        self._turn += 1
        reward = float(out["reward"])
        done = bool(out["done"])
        won = reward >= 1.0
        terminated = done and (won or not self.multi_turn)
        self._done = done
        extracted = self._extract(reply, method="strict")
        info = self._info(won=won, valid=extracted is not None, extracted=extracted or "")
        return _text(out["observations"]), reward, terminated, done and not terminated, info

    def close(self) -> None:
        """Close skyrl-gym's env of the current problem."""
        if self._core is not None:
            self._core.close()
            self._core = None

    def _info(self, *, won: bool, valid: bool, extracted: str) -> dict[str, Any]:
        answer = f"#### {self._problem.answer}"
        return {
            InfoKeys.ADMISSIBLE_ACTIONS: [],
            InfoKeys.ANCHOR: f"{self._problem.question}\n[turn {self._turn + 1}]",
            InfoKeys.WON: bool(won),
            InfoKeys.SUBTASK: self.task,
            InfoKeys.ACTION_VALID: bool(valid),
            "expert_plan": [] if self._done else [answer],
            "reference": str(self._problem.answer),
            "extracted": extracted,
            "kind": self._problem.kind,
            "turn": self._turn,
        }


def _text(messages: Any) -> str:
    """The text of skyrl-gym's chat messages (``[{"role": ..., "content": ...}, ...]``)."""
    return "\n".join(str(m.get("content", "")) for m in messages or [] if m).strip()


def _check_settings(task: str, split: str, num: int, start: int, max_turns: int) -> None:
    if task not in TASKS:
        raise ValueError(
            f"skyrl-gym task {task!r} is not offered; env.kwargs.task=<one of {TASKS}> (the other "
            "skyrl-gym envs need dataset rows, databases, a retrieval server or run model code; "
            "envs/skyrl/env.py)"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use env.kwargs.split=<one of {SPLITS}>")
    for key, value, low in (
        ("num_problems", num, 1),
        ("seed_start", start, 0),
        ("max_turns", max_turns, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"env.kwargs.{key} must be an integer >= {low}, got {value!r}")
    if start + num > HELDOUT_SEED_OFFSET:
        raise ValueError(
            f"training problems must use generation seeds below {HELDOUT_SEED_OFFSET} (the "
            "held-out ones start there); lower env.kwargs.seed_start or num_problems"
        )
