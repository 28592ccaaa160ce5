"""Size and time of a SmolLM2-135M checkpoint: the earlier pickled format against the current one.

For full fine-tuning and for LoRA (``--lora-r``, q/k/v/o projections) the learner takes one real
AdamW step (so the optimizer holds its moments), then each format is written ``--repeats`` times
into a temporary folder and the median is reported:

* ``pickle``: the earlier layout, written here as it was (baseline): ``torch.save`` of the full
  state dict into ``model.pt`` and of the learner state, run state and RNG states into
  ``trainer.pt``, no manifest (the NumPy RNG state, 2.5 KB, is left out so that the baseline
  reads back with ``torch.load``'s weights-only default, as the earlier reader did not);
* ``safetensors``: :func:`agents.training.checkpoint.save` (``model.safetensors`` with only the
  trainable
  weights under LoRA, a weights-only ``trainer.pt``, a sha256 manifest, fsync and rename), and
  its :func:`agents.training.checkpoint.load` (verification included).

It also prints the bytes the default run (``trainer.iterations=3``) writes: the earlier default
saved after every iteration, the current one (``trainer.save_every=5``) after the last only.

    python -m bench.checkpoint_io [--model smollm2_135m] [--lora-r 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from agents.config import build_trainer
from agents.generation.models import load_policy_model
from agents.train import _due
from agents.training import checkpoint
from agents.training.learner import Learner, LearnerConfig
from agents.types import Step, collate
from holderpo.loss import PRESETS


def stepped_learner(model_name: str, lora_r: int) -> Learner:
    """The learner after one real update on a small random batch (AdamW moments filled)."""
    model, _ = load_policy_model(model_name, device="cpu")
    if lora_r:
        from agents.training.lora import LoraSettings, apply_lora

        model = apply_lora(model, LoraSettings(r=lora_r, alpha=2.0 * lora_r))
    learner = Learner(model, PRESETS["grpo"], LearnerConfig(mini_batch_size=2, micro_batch_size=2))
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    steps = [
        Step(
            tuple(torch.randint(10, vocab, (16,), generator=g).tolist()),
            tuple(torch.randint(10, vocab, (8,), generator=g).tolist()),
            tuple([-2.0] * 8),
            "",
            "",
            True,
            0.0,
            True,
            False,
            i,
        )
        for i in range(2)
    ]
    learner.update(collate(steps, [1.0, -1.0], pad_id=0), p=1.0)
    return learner


def save_pickle(run_dir: Path, learner: Learner, state: checkpoint.TrainingState) -> Path:
    """The earlier format (baseline): two ``torch.save`` pickles, fsync, rename."""
    final = run_dir / checkpoint.checkpoint_name(state.iteration)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=run_dir))
    torch.save(learner.model.state_dict(), tmp / "model.pt")
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    blob = {"learner": learner.state_dict(), "state": dataclasses.asdict(state), "rng": rng}
    torch.save(blob, tmp / "trainer.pt")
    for child in tmp.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def save_current(run_dir: Path, learner: Learner, state: checkpoint.TrainingState) -> Path:
    """The current format: :func:`agents.training.checkpoint.save`."""
    return checkpoint.save(
        run_dir, model=learner.model, learner_state=learner.state_dict(), state=state, keep=1
    )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(learner: Learner, repeats: int) -> dict[str, tuple[int, float, float]]:
    """Bytes, median save seconds and median load seconds of each format."""
    out = {}
    state = checkpoint.TrainingState(1, 1, 1.0)
    for name, save in (("pickle", save_pickle), ("safetensors", save_current)):
        root = Path(tempfile.mkdtemp(prefix=f"bench-ckpt-{name}-"))
        try:
            path = root / checkpoint.checkpoint_name(1)

            def write(save=save, root=root, path=path) -> None:
                shutil.rmtree(path, ignore_errors=True)
                save(root, learner, state)

            save_s = timed(write, repeats)
            if name == "pickle":

                def read(path=path) -> None:
                    learner.model.load_state_dict(torch.load(path / "model.pt"))
                    torch.load(path / "trainer.pt")

            else:

                def read(path=path) -> None:
                    checkpoint.load(path, model=learner.model)

            load_s = timed(read, repeats)
            out[name] = (folder_bytes(path), save_s, load_s)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


ROOT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "config.yaml"
"""The root config, whose ``trainer:`` block holds the default run's values."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trainer, _ = build_trainer(yaml.safe_load(ROOT_CONFIG.read_text())["trainer"])  # the defaults
    iterations = trainer.iterations
    saves_before = sum(_due(it, 1, iterations) for it in range(iterations))
    saves_now = sum(_due(it, trainer.save_every, iterations) for it in range(iterations))
    print(f"model {args.model}, median of {args.repeats} saves/loads, CPU")
    print("| training | format | size MiB | save s | load s | size ratio | save ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    totals = {}
    for label, r in (("full", 0), (f"LoRA r={args.lora_r}", args.lora_r)):
        results = measure(stepped_learner(args.model, r), args.repeats)
        base_size, base_save, _ = results["pickle"]
        for name, (size, save_s, load_s) in results.items():
            print(
                f"| {label} | {name} | {size / 2**20:,.1f} | {save_s:.2f} | {load_s:.2f} "
                f"| {size / base_size:.3f} | {save_s / base_save:.2f} |"
            )
        totals[label] = results
    full_before = totals["full"]["pickle"][0] * saves_before
    full_now = totals["full"]["safetensors"][0] * saves_now
    print(
        f"default run ({iterations} iterations, full fine-tuning): {saves_before} saves, "
        f"{full_before / 2**30:.2f} GiB written before; {saves_now} save(s), "
        f"{full_now / 2**30:.2f} GiB now (ratio {full_now / full_before:.2f})"
    )


if __name__ == "__main__":
    main()
