"""Bad overrides fail before any work, with a message naming the key; the CLIs print it alone.

``BAD_OVERRIDES`` is the table of the bad overrides a user can type: each must raise a
:class:`ConfigError` whose message names the key, from :func:`build_run_config` or
:func:`agents.run.preflight.preflight`, that is before a model loads or an env pool starts. The
``before`` column records what each one did before these checks existed (``clear``: a clear error
before any work; ``late``: an error only after work had started; ``unclear``: an error that did not
name the key or the fix; ``silent``: accepted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.config import ConfigError, build_run_config
from agents.generation.models import resolve_model
from agents.run.preflight import (
    EXIT_CONFIG_ERROR,
    RAY_CONNECT_TIMEOUT_S,
    check_ray,
    check_renamed,
    preflight,
)
from agents.run.runtime import pick_device
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"

# (overrides, a fragment the message must contain, what it did before)
BAD_OVERRIDES: list[tuple[tuple[str, ...], str, str]] = [
    (("trainer.micro_batch_size=5",), "trainer.micro_batch_size", "clear"),
    (("rollout.pool=threads",), "rollout.pool", "clear"),
    (("+trainer.learning_rate=1",), "trainer.learning_rate", "clear"),
    (("algorithm.clip_low=2",), "clip_low", "clear"),
    (("protocol.name=nope",), "protocol.name", "clear"),
    (("algorithm.preset=ppo",), "algorithm.preset", "clear"),
    (("model.dtype=int8",), "model.dtype", "clear"),
    (("rollout.temperature=0",), "rollout.temperature", "clear"),
    (("trainer.iterations=0",), "trainer.iterations", "clear"),
    (("trainer.keep=0",), "trainer.keep", "clear"),
    (("trainer.device=tpu",), "trainer.device", "clear"),
    (("rollout.num_groups=0",), "rollout.num_groups", "clear"),
    (("rollout.max_turns=0",), "rollout.max_turns", "clear"),
    (("rollout.num_workers=0",), "rollout.num_workers", "clear"),
    (("protocol.gamma=2",), "gamma", "clear"),
    (("protocol.mode=median",), "mode", "clear"),
    (("curriculum.name=random_walk",), "curriculum", "clear"),
    (("env.eval_kwargs.split=valid_unknown",), "env.eval_kwargs", "late"),
    (("rollout.group_size=abc",), "rollout.group_size", "unclear"),
    (("trainer.lr=-1e-5",), "trainer.lr", "unclear"),
    (
        ("rollout.max_new_tokens=100000", "trainer.max_length=200000"),
        "rollout.max_new_tokens",
        "unclear",
    ),  # noqa: E501
    (("+trainer.learnrate=1",), "'lr'", "unclear"),  # the hint lists the learner keys too
    (("model.name=nobody/absent-model",), "model.name", "unclear"),
    (("trainer.eval_episodes=-3",), "trainer.eval_episodes", "silent"),
    (("trainer.save_every=-1",), "trainer.save_every", "silent"),
    (("trainer.eval_every=-2",), "trainer.eval_every", "silent"),
    (("rollout.history_window=-5",), "rollout.history_window", "silent"),
    (("trainer.max_length=16",), "trainer.max_length", "silent"),
    (("rollout.group_size=1",), "rollout.group_size", "silent"),
    # beyond the first probe
    (("env.kwargs.split=valid_unknown",), "env.kwargs", "late"),
    (("env=math", "rollout.group_size=1"), "rollout.group_size", "silent"),
    (("rollout.top_p=0",), "rollout.top_p", "silent"),
    (("rollout.step_timeout_s=0",), "rollout.step_timeout_s", "silent"),
    (("trainer.grad_clip=-1",), "trainer.grad_clip", "silent"),
    (("trainer.warmup_steps=-3",), "trainer.warmup_steps", "silent"),
    (("rollout.constrained=maybe",), "rollout.constrained", "unclear"),
    (("env.prompt=nonexistent",), "env.prompt", "late"),
    (("env=math", "+env.kwargs.verify_max_jobs=0"), "env.kwargs", "silent"),
    # found by bench/probes.py
    (("resume=maybe",), "resume='maybe' must be true or false", "silent"),
    (("model.lora.r=4", "model.lora.target_modules=[x]"), "model.lora.target_modules", "late"),
    (("rollout.guided=4",), "rollout.guided", "clear"),  # the whole group of 4 guided
    # the probes of issue 26
    (("trainer.seed=-1",), "trainer.seed=-1 is out of range", "late"),
    (("trainer.seed=10000000000000000000000",), "trainer.seed=", "late"),
    (("curriculum=fixed", "curriculum.tasks=[abc]"), "curriculum.tasks=['abc']", "unclear"),
    (("rollout.pool=ray", "rollout.ray_address=127.0.0.1:1"), "rollout.ray_address", "late"),
    (("rollout.pool=ray", "rollout.ray_address=nowhere"), "rollout.ray_address", "late"),
    # later settings
    (("trainer.bc_lr=0",), "trainer.bc_lr", "new"),
    (("trainer.bc_lr=fast",), "trainer.bc_lr", "new"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model-cache")
    resolve_model("tiny", cache_dir=path)
    return path


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face cache and no hub: a hub id is unavailable at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _tree(cache: Path, *overrides: str) -> dict:
    base = ["model=tiny", f"model.cache_dir={cache}", "run_dir=/tmp/never-written"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[*base, *overrides])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return container


def test_the_table_holds_the_first_probe() -> None:
    first = BAD_OVERRIDES[:29]
    counts = {k: sum(b == k for _, _, b in first) for k in ("clear", "late", "unclear", "silent")}
    assert counts == {"clear": 17, "late": 1, "unclear": 5, "silent": 6}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [(o, f) for o, f, _ in BAD_OVERRIDES],
    ids=[" ".join(o) for o, _, _ in BAD_OVERRIDES],
)
def test_bad_override_fails_before_any_work_naming_the_key(
    cache: Path, offline_hub: None, overrides: tuple[str, ...], fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        preflight(build_run_config(_tree(cache, *overrides)))
    assert fragment in str(caught.value), str(caught.value)
    assert not Path("/tmp/never-written").exists()


def test_a_dead_ray_address_fails_within_the_connect_timeout(cache: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"rollout.ray_address='127.0.0.1:1'.*ray start --head"):
        check_ray(
            build_run_config(_tree(cache, "rollout.pool=ray", "rollout.ray_address=127.0.0.1:1"))
        )
    assert time.monotonic() - start < RAY_CONNECT_TIMEOUT_S + 1


def test_a_port_that_is_not_ray_is_refused_and_a_real_ray_cluster_passes(cache: Path) -> None:
    import http.server
    import tempfile
    import threading

    ray = pytest.importorskip("ray")
    from agents.rollout.env_pool import init_ray

    def check(address: str) -> None:
        check_ray(
            build_run_config(_tree(cache, "rollout.pool=ray", f"rollout.ray_address={address}"))
        )

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:  # an HTTP server accepts the connection: Ray's client would wait there for minutes
        with pytest.raises(ConfigError, match="does not answer as a Ray cluster"):
            check(f"127.0.0.1:{web.server_port}")
    finally:
        web.shutdown()
    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=1, temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short paths
    try:
        check(ray.get_runtime_context().gcs_address)  # the GCS answers as a gRPC server
    finally:
        if started:
            ray.shutdown()


def test_cuda_without_a_gpu_names_the_key_and_the_fix(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = build_run_config(_tree(cache, "trainer.device=cuda"))
    with pytest.raises(ConfigError, match=r"trainer.device=cuda .*use trainer.device=auto"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="trainer.device=cuda"):
        pick_device("cuda")  # the runtime's own check, for code that skips the preflight


def test_the_defaults_pass(cache: Path) -> None:
    for overrides in ([], ["env=math"], ["rollout.pool=ray"]):
        preflight(build_run_config(_tree(cache, *overrides)))


def test_the_math_recipe_passes_with_its_data(
    cache: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOLDERPO_MATH_DATA", str(shared_data / "math"))
    preflight(build_run_config(_tree(cache, "experiment=holderpo_math")), model=False)


def test_a_type_error_names_the_key_and_an_example(cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"rollout.group_size='abc' must be int .*group_size=4"):
        build_run_config(_tree(cache, "rollout.group_size=abc"))


def test_a_group_protocol_needs_two_rollouts_per_group(cache: Path) -> None:
    with pytest.raises(ConfigError, match="protocol=gigpo .* rollout.group_size >= 2"):
        build_run_config(_tree(cache, "rollout.group_size=1"))


# ------------------------------------------------------------------------ the CLIs (subprocesses)


def _cli(module: str, args: list[str], cache: Path, tmp_path: Path, **env: str) -> tuple:
    run_dir = tmp_path / "run"
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HOLDERPO_CACHE": str(cache),
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        **env,
    }
    environ.pop("HYDRA_FULL_ERROR", None)
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", module, "model=tiny", *args, f"run_dir={run_dir}"],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, run_dir


def _written(run_dir: Path) -> list[str]:
    """What the run wrote into its folder, besides the composed config Hydra saves first."""
    if not run_dir.exists():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (".hydra", "train.log"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["rollout.group_size=abc"], "rollout.group_size='abc' must be int"),
        (["env.eval_kwargs.split=valid_unknown"], "env.eval_kwargs"),
        (["model.name=nobody/absent-model"], "model.name='nobody/absent-model' is not available"),
        (["experiment=nope"], "experiment='nope' is unknown"),  # Hydra skips an optional group
        (["debug=maybe"], "debug='maybe' must be true or false"),
        (["trainer.device=cuda"], "trainer.device=cuda but torch sees no CUDA device"),
        (["trainer.seed=-1"], "trainer.seed=-1 is out of range"),
    ],
)
def test_train_cli_prints_the_message_alone_and_exits_2(
    cache: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    proc, run_dir = _cli("agents.train", args, cache, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-3000:]
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    assert _written(run_dir) == []  # nothing was started (Hydra's own .hydra/ aside)


def test_debug_true_shows_the_traceback(cache: Path, tmp_path: Path) -> None:
    proc, run_dir = _cli(
        "agents.train", ["trainer.eval_episodes=-3", "debug=true"], cache, tmp_path
    )
    assert proc.returncode not in (0, EXIT_CONFIG_ERROR)
    assert "trainer.eval_episodes must be >= 1" in proc.stderr
    assert "Traceback" in proc.stderr or "HYDRA_FULL_ERROR" in proc.stderr
    assert _written(run_dir) == []


def test_a_renamed_key_names_its_new_key(cache: Path) -> None:
    with pytest.raises(ConfigError, match="rollout.max_steps is now rollout.max_turns"):
        build_run_config(_tree(cache, "+rollout.max_steps=2"))  # a config file's old key too
    for arg in ("rollout.max_steps=2", "+rollout.max_steps=2", "++rollout.max_steps=2"):
        with pytest.raises(ConfigError, match="renamed rollout.max_turns .*rollout.max_turns=2"):
            check_renamed([arg])
    with pytest.raises(ConfigError, match="use rollout.max_turns=<value>"):
        check_renamed(["~rollout.max_steps"])
    check_renamed(["env.kwargs.max_steps=10", "--cfg", "job", "-m", "rollout.max_turns=2"])


@pytest.mark.parametrize(
    ("module", "args", "fragment"),
    [
        ("agents.train", ["rollout.max_steps=2"], "use rollout.max_turns=2"),
        ("agents.evaluate", ["policy=expert", "max_steps=3"], "use trainer.eval_max_turns=3"),
        ("agents.evaluate", ["policy=expert", "max_turns=3"], "use trainer.eval_max_turns=3"),
    ],
)
def test_a_renamed_key_on_the_command_line_names_the_new_key(
    cache: Path, tmp_path: Path, module: str, args: list[str], fragment: str
) -> None:
    proc, run_dir = _cli(module, args, cache, tmp_path)  # Hydra alone: "not in struct"
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-3000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert _written(run_dir) == []


def test_evaluate_cli_checks_its_request_and_the_split_first(cache: Path, tmp_path: Path) -> None:
    proc, _ = _cli("agents.evaluate", ["policy=expert", "episodes=-3"], cache, tmp_path)
    assert proc.returncode == EXIT_CONFIG_ERROR and "episodes must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc, _ = _cli("agents.evaluate", ["policy=expert", "split=valid_unknown"], cache, tmp_path)
    assert proc.returncode == EXIT_CONFIG_ERROR and "env.eval_kwargs" in proc.stderr
    assert "Traceback" not in proc.stderr
