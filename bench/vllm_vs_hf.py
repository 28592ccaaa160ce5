"""Generation throughput: VLLMPolicy against HFPolicy on the same model and prompts.

Run (in the environment that ``.ci/vllm-env`` builds):
``OMP_NUM_THREADS=1 /tmp/holderpo-vllm-venv/bin/python bench/vllm_vs_hf.py`` (options: ``--help``).

Generates ``--batch`` responses of up to ``--tokens`` tokens (sampling, temperature 1) with both
backends, a warm-up call first, and prints the engine start time, wall time and generated tokens/s
of each, and the ratio. Also prints the mean |log-prob difference| of the two backends on the vLLM
tokens (vLLM's log-probs against a transformers teacher-forced pass).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.generation.hf import HFPolicy  # noqa: E402
from agents.generation.models import load_policy_model, resolve_model  # noqa: E402
from agents.generation.vllm import VLLMPolicy  # noqa: E402
from agents.types import Generation, SamplingParams  # noqa: E402

TASKS = [
    "go to the desk and take the pen",
    "What is 12 + 7? Put the answer in \\boxed{}.",
    "open the fridge and look inside",
    "Heat an egg and put it on the table.",
    "What is the derivative of x^3?",
    "clean the apple with the sink",
    "Name three prime numbers larger than 20.",
    "put two books on the shelf",
]


def timed_generate(policy, prompts, params) -> tuple[float, list[Generation]]:
    """Wall time of one ``generate`` call after a short warm-up call."""
    policy.generate(prompts[:2], SamplingParams(max_new_tokens=4))
    start = time.perf_counter()
    gens = policy.generate(prompts, params)
    return time.perf_counter() - start, gens


def logprob_gap(model, gens: list[Generation]) -> float:
    """Mean |vLLM log-prob - transformers teacher-forced log-prob| over all generated tokens."""
    gaps = []
    for g in gens:
        ids = torch.tensor([list(g.prompt_ids) + list(g.response_ids)])  # [1, T]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
        n = len(g.prompt_ids)
        ref = logp[n - 1 : -1].gather(-1, torch.tensor(g.response_ids)[:, None]).squeeze(-1)
        gaps.append((torch.tensor(g.logprobs) - ref).abs())
    return float(torch.cat(gaps).mean())


def main() -> None:
    """Parse options, run both backends, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m", help="built-in name or model directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    path = resolve_model(args.model)
    prompts = [[{"role": "user", "content": TASKS[i % len(TASKS)]}] for i in range(args.batch)]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.tokens)

    start = time.perf_counter()
    engine = VLLMPolicy(path, dtype="float32", max_context=2048)
    start_s = time.perf_counter() - start
    vllm_s, vllm_gens = timed_generate(engine, prompts, params)

    model, tokenizer = load_policy_model(path, device="cpu")
    hf_s, hf_gens = timed_generate(HFPolicy(model, tokenizer, seed=0), prompts, params)

    vllm_tokens = sum(len(g.response_ids) for g in vllm_gens)
    hf_tokens = sum(len(g.response_ids) for g in hf_gens)
    print(f"model {path}, batch {args.batch}, up to {args.tokens} new tokens, float32, CPU")
    print(f"vLLM engine start: {start_s:.1f} s")
    print(f"vLLM: {vllm_s:.2f} s, {vllm_tokens} tokens, {vllm_tokens / vllm_s:.1f} tokens/s")
    print(f"HF:   {hf_s:.2f} s, {hf_tokens} tokens, {hf_tokens / hf_s:.1f} tokens/s")
    print(f"speed-up vLLM / HF (tokens/s): {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x")
    print(f"mean |log-prob gap| vLLM vs transformers: {logprob_gap(model, vllm_gens):.2e}")


if __name__ == "__main__":
    main()
