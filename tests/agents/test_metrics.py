"""The metric sinks of ``trainer.loggers``: TensorBoard, wandb, MLflow, offline in the run folder.

Each tracker's own files are read back (TensorBoard's event file, wandb's offline run log, the
MLflow file store); the trackers' tests skip, saying so, where their package is not installed
(the ``trackers`` extra).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents.run import metrics
from agents.run.metrics import LOGGERS, LoggerSpec, MetricsWriter, logger_errors, read_metrics
from tests.conftest import REPO_ROOT

ROWS = [
    {"rollout/reward_mean": 0.25, "loss/total": -0.5, "holder/p": 2.0, "eval/bad": float("nan")},
    {"rollout/reward_mean": 0.75, "loss/total": -0.25, "holder/p": 1.0, "eval/bad": float("nan")},
]
CONFIG = {"trainer": {"lr": 0.001, "seed": 3}, "env": {"name": "alfworld", "kwargs": {}}}


def _write(run_dir: Path, loggers: tuple[str, ...]) -> None:
    with MetricsWriter(run_dir, loggers=loggers, config=CONFIG) as writer:
        for i, row in enumerate(ROWS):
            writer.write(i, dict(row))


def test_jsonl_and_tensorboard_by_default(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, ("tensorboard",))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["rollout/reward_mean"] for r in rows] == [0.25, 0.75] and rows[0]["eval/bad"] is None
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "eval/bad" not in events.Tags()["scalars"]  # not finite: JSON null, no scalar
    assert [(e.step, e.value) for e in events.Scalars("loss/total")] == [(0, -0.5), (1, -0.25)]


def test_no_logger_writes_only_the_jsonl(tmp_path: Path) -> None:
    _write(tmp_path, ())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_mlflow_file_store_under_the_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install '.[trackers]')")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run-a"
    _write(run_dir, ("mlflow",))
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(metrics.MLFLOW_EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["trainer.lr"] == "0.001" and run.data.params["env.name"] == "alfworld"
    history = client.get_metric_history(run.info.run_id, "rollout/reward_mean")
    assert [(m.step, m.value) for m in history] == [(0, 0.25), (1, 0.75)]
    assert client.get_metric_history(run.info.run_id, "eval/bad") == []


def _wandb_history(run_file: Path) -> list[dict[str, object]]:
    """The history rows of a wandb offline run file (its record log: 32 KiB blocks of records,
    each a 7-byte header of crc32, length, kind (1 full, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):
            pending += chunk
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def test_wandb_offline_under_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="wandb not installed (pip install '.[trackers]')")
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write(tmp_path, ("tensorboard", "wandb"))
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # finish() returns before wandb's service process has written the records: wait for them
    # (seen holding only its 7-byte header right after finish, complete a moment later)
    deadline = time.monotonic() + 60
    while run_file.stat().st_size <= 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = _wandb_history(run_file)
    assert [(r["_step"], r["rollout/reward_mean"], r["holder/p"]) for r in rows] == [
        (0, 0.25, 2.0),
        (1, 0.75, 1.0),
    ]
    assert all("eval/bad" not in r for r in rows)
    assert list((tmp_path / "tensorboard").iterdir())  # both sinks at once


def test_unknown_or_missing_logger_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    (error,) = logger_errors(["tensorboard", "neptune"])
    assert "trainer.loggers" in error and "'neptune'" in error and "'wandb'" in error
    monkeypatch.setitem(LOGGERS, "absent", LoggerSpec(module="holderpo_no_such_tracker", open=None))  # type: ignore[arg-type]
    (error,) = logger_errors(["absent"])
    assert "not installed" in error and "holderpo-agents[trackers]" in error
    assert "twice" in logger_errors(["tensorboard", "tensorboard"])[0]
    with pytest.raises(ValueError, match="neptune"):
        MetricsWriter(Path("unused"), loggers=["neptune"])


def test_bad_logger_name_stops_the_cli_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOLDERPO_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.train",
            "model=tiny",
            "trainer.loggers=[tensorboard,tb]",
            f"run_dir={run_dir}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "configuration error: trainer.loggers has the unknown logger 'tb'" in proc.stderr
    assert not (tmp_path / "cache").exists()  # stopped before the model was built
    assert not (run_dir / "metrics.jsonl").exists()
