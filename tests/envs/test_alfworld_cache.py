"""The ALFWorld engine's disk cache: hits skip compilation (in new processes too), bad entries are
rebuilt, concurrent writers leave a valid entry, ``python -m envs.alfworld.env prepare`` fills
it."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from textworld.envs.pddl import logic as pddl_logic

import envs.alfworld.engine as engine
from envs.alfworld.engine import CACHE_ENV, DiskCache, GameCache, default_cache_dir
from envs.alfworld.env import MEMORY_CACHE, SHARED_CACHE, AlfWorldEnv

REPO_ROOT = Path(__file__).resolve().parents[2]

FRESH_PROCESS = """
import json, sys
import envs.alfworld.engine as engine
from textworld.envs.pddl import logic as pddl_logic

def refuse(*args, **kwargs):
    raise AssertionError("compiled a game that is in the disk cache")

engine.translate = refuse                  # no PDDL -> SAS translation
pddl_logic.GameLogic = refuse              # no grammar parse
from envs.alfworld.env import SHARED_CACHE, AlfWorldEnv

env = AlfWorldEnv(split="embedded", task_types=sys.argv[1].split(","))
won = []
for seed in range(env.num_tasks):
    _, info = env.reset(seed=seed)
    for command in info["expert_plan"]:
        *_, info = env.step(command)
    won.append(info["won"])
print(json.dumps({"won": won, "translations": SHARED_CACHE.translations_computed,
                  "disk_hits": SHARED_CACHE.disk_hits, "cache_dir": str(SHARED_CACHE.cache_dir)}))
"""

WRITER = """
import sys
from envs.alfworld.engine import DiskCache, GameCache
game, folder, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
compiled = GameCache(maxsize=1).get(game)
disk = DiskCache(folder)
for _ in range(rounds):
    assert disk.store(compiled.key, *compiled.to_data())
"""


def _run(args: list[str], cache_root: Path) -> str:
    env = {**os.environ, CACHE_ENV: str(cache_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def game() -> str:
    """One embedded game file."""
    env = AlfWorldEnv(split="embedded", disk_cache=False)
    yield env.games[0]
    env.close()


def _refuse_compilation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled a game that is in the disk cache")

    monkeypatch.setattr(engine, "translate", refuse)
    monkeypatch.setattr(pddl_logic, "GameLogic", refuse)


def test_disk_hit_skips_translation_and_grammar_parse(
    tmp_path: Path, game: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = GameCache(maxsize=2, cache_dir=tmp_path)
    env = AlfWorldEnv(split="embedded", cache=first)
    expected = env.reset(options={"game": game})
    env.close()
    assert first.translations_computed == 1 and first.disk_hits == 0
    _refuse_compilation(monkeypatch)
    second = GameCache(maxsize=2, cache_dir=tmp_path)
    env = AlfWorldEnv(split="embedded", cache=second)
    assert env.reset(options={"game": game}) == expected
    for command in expected[1]["expert_plan"]:
        *_, info = env.step(command)
    assert info["won"]
    assert second.translations_computed == 0 and second.disk_hits == 1
    env.close()


def test_shared_cache_is_on_disk_by_default_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "holderpo" / "alfworld"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "alfworld"
    assert SHARED_CACHE.cache_dir is not None and MEMORY_CACHE.cache_dir is None
    env = AlfWorldEnv(split="embedded", disk_cache=False)
    assert env._engine.cache is MEMORY_CACHE
    env.close()


def test_prepare_then_a_fresh_process_compiles_nothing(tmp_path: Path) -> None:
    """The real CLI fills the cache; a new interpreter then plays from it without compiling."""
    out = _run(
        ["-m", "envs.alfworld.env", "prepare", "split=embedded", "task_types=pick,look"], tmp_path
    )
    entries = list((tmp_path / "alfworld").rglob("*.json.gz"))
    assert len(entries) == 20 and "20 compiled, 0 already cached" in out
    played = json.loads(_run(["-c", FRESH_PROCESS, "pick,look"], tmp_path).splitlines()[-1])
    assert played["cache_dir"] == str(tmp_path / "alfworld")
    assert played["translations"] == 0 and played["disk_hits"] == 20
    assert all(played["won"]) and len(played["won"]) == 20
    again = _run(
        ["-m", "envs.alfworld.env", "prepare", "split=embedded", "task_types=look"], tmp_path
    )
    assert "0 compiled, 10 already cached" in again


def _gzip_of(transform: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    return lambda blob: gzip.compress(transform(gzip.decompress(blob)))


def _with_header(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def transform(text: bytes) -> bytes:
        head, _, body = text.partition(b"\n")
        header = json.loads(head)
        edit(header)
        return json.dumps(header).encode() + b"\n" + body

    return _gzip_of(transform)


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda blob: blob[: len(blob) // 2],
    "garbage": lambda blob: b"\x00not gzip at all" * 10,
    "empty": lambda blob: b"",
    "not json": _gzip_of(lambda text: b"{not json\n" + text),
    "payload edited": _gzip_of(lambda text: text.replace(b'"walkthrough":[', b'"walkthrough":[1,')),
    "other version": _with_header(lambda h: h.update(version="engine-0")),
    "other key": _with_header(lambda h: h.update(key="0" * 64)),
    "sizes lie": _with_header(lambda h: h["sizes"][0].__setitem__(1, 3)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_entry_is_rebuilt_not_trusted(tmp_path: Path, game: str, corruption: str) -> None:
    reference = GameCache(maxsize=1, cache_dir=tmp_path)
    expected = reference.get(game).to_data()
    (entry,) = (tmp_path / engine.engine_version()).iterdir()
    entry.write_bytes(CORRUPTIONS[corruption](entry.read_bytes()))
    rebuilt = GameCache(maxsize=1, cache_dir=tmp_path)
    assert rebuilt.get(game).to_data() == expected
    assert rebuilt.entries_rebuilt == 1 and rebuilt.translations_computed == 1
    reader = GameCache(maxsize=1, cache_dir=tmp_path)
    reader.get(game)
    assert reader.translations_computed == 0 and reader.disk_hits == 1  # rewritten, valid


def test_entry_with_wrong_fields_is_rebuilt(tmp_path: Path, game: str) -> None:
    """A well-formed entry (right checksum) whose fields have another layout is rebuilt."""
    cache = GameCache(maxsize=1, cache_dir=tmp_path)
    compiled = cache.get(game)
    data, texts = compiled.to_data()
    disk = DiskCache(tmp_path)
    for bad in (
        {**data, "commands": {"gotolocation a b": "go to x"}},  # a dict where a list belongs
        {k: v for k, v in data.items() if k != "facts"},
        {**data, "intro": ["text"]},
    ):
        disk.store(compiled.key, bad, texts)
        fresh = GameCache(maxsize=1, cache_dir=tmp_path)
        assert fresh.get(game).to_data() == (data, texts)
        assert fresh.entries_rebuilt == 1 and fresh.translations_computed == 1


def test_concurrent_writers_leave_a_valid_entry(tmp_path: Path, game: str) -> None:
    """Two processes rewriting one entry while this one reads it: every read is whole or absent."""
    key = GameCache(maxsize=1).get(game).key
    disk = DiskCache(tmp_path)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, game, str(tmp_path), "40"],
            cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    reads = 0
    while any(w.poll() is None for w in writers):
        if disk.load(key) is not None:  # raises ValueError on a partial or mixed entry
            reads += 1
    assert [w.wait() for w in writers] == [0, 0]
    assert disk.load(key) is not None
    assert [p.name for p in disk.folder.iterdir()] == [f"{key}.json.gz"]  # no temporary left
    reader = GameCache(maxsize=1, cache_dir=tmp_path)
    reader.get(game)
    assert reader.translations_computed == 0 and reader.disk_hits == 1


def test_unwritable_cache_warns_and_plays_on(tmp_path: Path, game: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = GameCache(maxsize=1, cache_dir=blocker)
    with pytest.warns(UserWarning, match="cannot write the ALFWorld game cache"):
        compiled = cache.get(game)
    assert compiled.intro[0].startswith("-= Welcome to TextWorld")
