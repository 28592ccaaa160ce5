"""The vLLM backend (the ``vllm`` extra, ``pip install "holderpo-agents[vllm]"``).

:class:`VLLMPolicy` runs a vLLM engine colocated with the learner on one device;
:meth:`VLLMPolicy.sync` pushes the learner's weights (a
:data:`~agents.generation.base.WeightExport`) after each update. vLLM itself is imported only when
an engine starts, so this module imports without the extra (``rollout.vllm.*`` settings are
checked everywhere). The conventions every backend keeps are in :mod:`agents.generation.base`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import torch

from agents.generation.base import ChatPolicy, WeightExport
from agents.types import Generation, SamplingParams

VLLM_INSTALL: Final = 'pip install "holderpo-agents[vllm]"'
"""The command that installs the ``vllm`` extra."""

VLLM_MODES: Final = ("colocate",)
"""Values of ``rollout.vllm.mode`` (a server mode is the next one: ``docs/scale_out.md``)."""


@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engine (``rollout.vllm.*``; used when ``rollout.backend=vllm``)."""

    mode: str = "colocate"
    """``colocate``: the engine runs in the trainer's process, on its device, and reloads the
    learner's weights in place after every update (the one mode so far; see :data:`VLLM_MODES`)."""
    gpu_memory_utilization: float = 0.4
    """Share of the GPU's memory the engine may take (weights and KV cache); the learner needs the
    rest. Unused on CPU."""
    kv_cache_gib: float | None = None
    """KV-cache size in GiB; ``None``: on GPU what ``gpu_memory_utilization`` leaves, on CPU
    1 GiB."""
    sleep: bool = True
    """Outside generation the engine sleeps (weights offloaded to CPU memory, KV cache freed), so
    that the update has the GPU; only where the platform has vLLM's sleep mode (CUDA, ROCm),
    elsewhere the engine stays awake."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs and ``torch.compile``; ``None``: yes on CPU, no on GPU."""

    def __post_init__(self) -> None:
        if self.mode not in VLLM_MODES:
            raise ValueError(
                f"rollout.vllm.mode={self.mode!r} is not available; use one of {list(VLLM_MODES)} "
                "(a server mode is planned: docs/scale_out.md)"
            )
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in "
                "(0, 1), e.g. 0.4 (the learner uses the rest of the GPU)"
            )
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(
                f"rollout.vllm.kv_cache_gib={self.kv_cache_gib} must be > 0 GiB, or null"
            )


class VLLMPolicy(ChatPolicy):
    """The vLLM backend (``vllm`` extra): a vLLM engine in this process, beside the learner.

    The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless already set), so that
    :meth:`sync` hands the learner's tensors to the engine's model without serialising them, and
    so that no engine process is spawned. Requests are token ids rendered by :func:`encode_prompt`
    (the same ids as :class:`HFPolicy`). Log-probs come from the engine in ``processed_logprobs``
    mode: ``log_softmax(logits / temperature)`` of the sampled token, which is the
    :class:`HFPolicy` quantity when ``top_p == 1`` and no constraint applies. With ``top_p < 1``
    or ``allowed``, vLLM reports the log-prob of its truncated / masked distribution (a forced
    token gets 0); the learner's recomputation is the reference there. ``allowed`` uses vLLM's
    structured outputs (a choice grammar), which admits any tokenization of an allowed string, not
    only the one :class:`~agents.generation.hf.TokenTrie` builds.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        tokenizer: Any = None,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_gib: float | None = None,
        max_context: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        sleep: bool = False,
        export: WeightExport | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """Start a vLLM engine on ``model`` (e.g. a directory from ``models.resolve_model``).

        Args:
            model: model directory or hub id.
            tokenizer: its Hugging Face tokenizer; default loaded from ``model``.
            dtype: engine dtype; default ``"bfloat16"`` on GPU and ``"float32"`` on CPU (as
                ``agents.generation.models.load_policy_model``).
            gpu_memory_utilization: share of GPU memory for the engine (the learner needs the
                rest); unused on CPU.
            kv_cache_gib: KV-cache size in GiB; default: on GPU what ``gpu_memory_utilization``
                leaves, on CPU 1 GiB.
            max_context: longest prompt + response; default the model's.
            enforce_eager: skip CUDA graphs and ``torch.compile``; default True on CPU, False on
                GPU.
            seed: engine sampling seed.
            sleep: sleep outside :meth:`generating` blocks where the platform supports it (see
                :attr:`VLLMSettings.sleep`); :attr:`sleeps` says whether it does.
            export: the learner model's weights for :meth:`sync` (default its ``state_dict``;
                LoRA and FSDP2 need theirs, see ``agents.run.runtime.weight_export``).
            **engine_kwargs: passed to ``vllm.LLM``.

        Raises:
            ImportError: when vLLM is not installed (the message names the install command).
            ValueError: on CPU, when the model's attention head size is one vLLM's CPU attention
                kernels lack (the message lists the supported sizes).
        """
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"VLLMPolicy needs vLLM: run `{VLLM_INSTALL}`") from err
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            _check_cpu_head_size(model)
        if kv_cache_gib is None and on_cpu:
            kv_cache_gib = 1.0
        if kv_cache_gib is not None:
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        self.sleeps = sleep and current_platform.is_sleep_mode_available()
        """Whether the engine sleeps outside :meth:`generating` blocks."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(
            model=os.fspath(model),
            dtype=dtype or ("float32" if on_cpu else "bfloat16"),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_context,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleeps,
            **engine_kwargs,
        )
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(os.fspath(model))
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.export: WeightExport = export or _state_dict
        self._asleep = False

    def generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """As :meth:`generate`, from already tokenized (e.g. truncated) prompts."""
        self.check_request(ids, params)
        per_prompt = allowed if allowed is not None else [None] * len(ids)
        requests = [{"prompt_token_ids": [int(t) for t in row]} for row in ids]
        sampling = [_vllm_sampling(params, a) for a in per_prompt]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [
            self._generation(row, out.outputs[0]) for row, out in zip(ids, outputs, strict=True)
        ]

    def _generation(self, prompt_ids: Sequence[int], sample: Any) -> Generation:
        """A :class:`Generation` from a vLLM ``CompletionOutput`` (one log-prob dict per token)."""
        tokens = [int(t) for t in sample.token_ids]
        logprobs = [float(step[t].logprob) for step, t in zip(sample.logprobs, tokens, strict=True)]
        return Generation(
            prompt_ids=tuple(int(t) for t in prompt_ids),
            response_ids=tuple(tokens),
            logprobs=tuple(logprobs),
            text=str(self.tokenizer.decode(tokens, skip_special_tokens=True)),
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Load the learner's weights (:attr:`export` of ``model``) into the engine."""
        self.load_weights(self.export(model).items())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full, checkpoint-named weights into the engine's model, then drop cached prefixes.

        The receiving half of the sync seam. Uses the worker's in-place ``reload_weights``
        (checkpoint names, e.g. separate q/k/v projections, are mapped onto the engine's fused
        layers, and kernel-specific weight layouts such as the CPU backend's packed GEMM weights
        are rebuilt); a sleeping engine is woken first.
        """
        self._wake()
        named = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The engine awake during the block; asleep after it when :attr:`sleeps`.

        Sleep level 1: the weights wait in CPU memory, the KV cache is freed.
        """
        self._wake()
        try:
            yield
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)
                self._asleep = True

    def close(self) -> None:
        """Shut the engine down (with the process group vLLM set up for it, if any)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """The default :data:`WeightExport`: the model's own state dict (no copy)."""
    return model.state_dict()


def _vllm_sampling(params: SamplingParams, allowed: Sequence[str] | None) -> Any:
    """The vLLM sampling parameters of one request.

    A sampled request's seed is drawn from torch's global generator, so that a run seeded per
    iteration (``agents.run.runtime.seed_everything``) samples the same responses when resumed.
    """
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(choice=list(allowed)) if allowed is not None else None
    return VllmSamplingParams(
        temperature=0.0 if params.greedy else params.temperature,
        top_p=1.0 if params.greedy else params.top_p,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop),
        include_stop_str_in_output=True,
        skip_special_tokens=False,  # stop strings see special tokens, as in HFPolicy
        logprobs=0,  # the sampled token's log-prob only
        structured_outputs=structured,
        seed=None if params.greedy else int(torch.randint(2**31 - 1, ()).item()),
    )


def _check_cpu_head_size(model: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` when vLLM's CPU attention has no kernel for the model's head size."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(os.fspath(model))
    text = getattr(config, "text_config", None) or config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(
            f"{model}: attention head size {head} is not supported by vLLM's CPU attention "
            f"(supported: {supported}); use a model with one of these sizes (for the built-in tiny "
            "model, agents.generation.models.TinyConfig(num_heads=2) gives 32) or HFPolicy"
        )
