"""Rollout throughput: batched vs one-at-a-time generation, and Ray vs serial env stepping.

Run: ``OMP_NUM_THREADS=1 python bench/rollout.py`` (options: ``--help``).

1. A rollout of ``--envs`` ALFWorld envs (``--groups`` groups) with the policy generating for all
   active envs in one batched call per turn, against the same rollout where every turn loops over
   the envs with batch-size-1 calls. Prints generated tokens/s and env steps/s of both and ratios.
2. The same envs stepped with random admissible commands by a :class:`RayEnvPool` and a
   :class:`SerialEnvPool`. Prints env steps/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.generation.hf import HFPolicy  # noqa: E402
from agents.generation.models import load_policy_model  # noqa: E402
from agents.rollout.env_pool import EnvFactory, EnvPool, RayEnvPool, SerialEnvPool, init_ray  # noqa: E402
from agents.rollout.manager import RolloutConfig, collect  # noqa: E402
from agents.rollout.prompts import load_template  # noqa: E402


class OneAtATime:
    """A policy that generates prompt by prompt with batch-size-1 calls (the baseline)."""

    def __init__(self, policy):
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.max_context = policy.max_context
        self.pad_id = policy.pad_id

    def prompt_ids(self, prompt):
        return self.policy.prompt_ids(prompt)

    def generate_ids(self, ids, params, *, allowed=None):
        out = []
        for i, row in enumerate(ids):
            one = None if allowed is None else [allowed[i]]
            out += self.policy.generate_ids([row], params, allowed=one)
        return out


def rollout_rates(policy, pool, args) -> dict[str, float]:
    config = RolloutConfig(load_template("alfworld"), max_new_tokens=args.max_new_tokens)
    size = args.envs // args.groups
    t0 = time.perf_counter()
    _, m = collect(policy, pool, args.groups, size, args.steps, config=config, seed=args.seed)
    wall = time.perf_counter() - t0
    return {
        "tokens/s": m["rollout/tokens_generated"] / m["rollout/time_generate_s"],
        "env steps/s": m["rollout/env_steps"] / wall,
        "wall s": wall,
    }


def stepping_rate(pool: EnvPool, n: int, steps: int, seed: int) -> float:
    rng = random.Random(seed)
    idx = list(range(n))
    infos = [info for _, info in pool.reset(idx, [seed] * n)]
    t0 = time.perf_counter()
    for _ in range(steps):
        actions = [rng.choice(info["admissible_actions"] or ["look"]) for info in infos]
        infos = [r.info for r in pool.step(idx, actions)]
    return n * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2_135m | a local folder")
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="turns of the rollout")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--step-rounds", type=int, default=20, help="pool.step rounds per pool")
    ap.add_argument("--envs-per-actor", type=int, default=4)
    ap.add_argument("--split", default="embedded", help="ALFWorld split (needs ALFWORLD_DATA)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model, tokenizer = load_policy_model(args.model)
    policy = HFPolicy(model, tokenizer, seed=args.seed)
    factory = EnvFactory("alfworld", {"split": args.split})
    print(
        f"model={args.model} envs={args.envs} groups={args.groups} turns={args.steps} "
        f"max_new_tokens={args.max_new_tokens} torch_threads={os.environ.get('OMP_NUM_THREADS')}"
    )

    with SerialEnvPool(factory, args.envs) as pool:
        rollout_rates(policy, pool, args)  # warm-up: game compilation, first forward passes
        batched = rollout_rates(policy, pool, args)
        single = rollout_rates(OneAtATime(policy), pool, args)
    print("\n== generation: batched (one call per turn) vs one env at a time ==")
    for name, r in (("batched", batched), ("one-at-a-time", single)):
        print(f"{name:>14}: " + "  ".join(f"{k} {v:9.1f}" for k, v in r.items()))
    for key in ("tokens/s", "env steps/s"):
        print(f"ratio batched/one-at-a-time {key}: {batched[key] / single[key]:.2f}x")

    with SerialEnvPool(factory, args.envs) as pool:
        stepping_rate(pool, args.envs, 2, args.seed)  # warm-up
        serial = stepping_rate(pool, args.envs, args.step_rounds, args.seed)
    init_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    with RayEnvPool(factory, args.envs, envs_per_actor=args.envs_per_actor) as pool:
        started = time.perf_counter() - t0
        stepping_rate(pool, args.envs, 2, args.seed)  # warm-up
        ray_rate = stepping_rate(pool, args.envs, args.step_rounds, args.seed)
    print("\n== env stepping: RayEnvPool vs SerialEnvPool (random admissible commands) ==")
    print(f"   serial: {serial:9.1f} env steps/s")
    print(
        f"      ray: {ray_rate:9.1f} env steps/s ({args.envs // args.envs_per_actor} actors x "
        f"{args.envs_per_actor} envs, {os.cpu_count()} CPUs; actors ready in {started:.1f} s)"
    )
    print(f"ratio ray/serial env steps/s: {ray_rate / serial:.2f}x")


if __name__ == "__main__":
    main()
