from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from agents.rollout.env_pool import WORKER_FAILED, EnvFactory, RayEnvPool, SerialEnvPool, StepResult
from envs.base import check_info
from tests.agents.toy_env import MazeEnv, solve

FACTORY = functools.partial(MazeEnv, depth=3)


@pytest.fixture(params=["serial", "ray"])
def pool(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")
        p = RayEnvPool(FACTORY, 5, envs_per_actor=2)
    else:
        p = SerialEnvPool(FACTORY, 5)
    yield p
    p.close()


def test_reset_same_seed_same_game_and_order(pool):
    out = pool.reset([4, 0, 2], [7, 7, 11])
    games = [info["game"] for _, info in out]
    assert games[0] == games[1]
    assert out[0][0] == out[1][0]
    assert len(out) == 3
    for _, info in out:
        check_info(info)
    # same seed again gives the same game; indices are independent envs
    again = pool.reset([1], [11])
    assert again[0][1]["game"] == games[2]


def test_step_solves_the_maze(pool):
    ((_, info),) = pool.reset([3], [5])
    plan = solve(info["game"])
    for k, action in enumerate(plan):
        (res,) = pool.step([3], [action])
        assert isinstance(res, StepResult)
        check_info(res.info)
        assert res.terminated == (k == len(plan) - 1)
    assert res.reward == 1.0 and res.info["won"]


def test_invalid_action_keeps_schema(pool):
    pool.reset([0, 1], [1, 2])
    res = pool.step([1, 0], ["fly away", "wait"])
    assert res[0].obs == "Nothing happens." and not res[0].info["action_valid"]
    assert res[1].info["action_valid"] and res[1].info["anchor"] == "You stand at junction 0."


def test_bad_calls_raise_clear_errors(pool):
    with pytest.raises(IndexError, match="out of range"):
        pool.reset([5], [0])
    with pytest.raises(ValueError, match="repeat"):
        pool.step([1, 1], ["wait", "wait"])
    with pytest.raises(ValueError, match="2 env indices but 1 actions"):
        pool.step([0, 1], ["wait"])


def test_ray_pool_steps_actors_in_parallel_processes(ray_session):
    with RayEnvPool(FACTORY, 4, envs_per_actor=2) as p:
        p.reset([0, 1, 2, 3], [0, 0, 0, 0])
        res = p.step([0, 1, 2, 3], ["wait"] * 4)
        pids = [r.info["pid"] for r in res]
        assert pids[0] == pids[1] != pids[2] == pids[3] != os.getpid()


def test_env_factory_builds_a_registered_env():
    from envs import registry

    if "maze-test" not in registry.registered():
        registry.register("maze-test", "tests.agents.toy_env:MazeEnv")
    factory = EnvFactory("maze-test", {"depth": 2})
    assert factory().depth == 2
    with SerialEnvPool(factory, 1) as p:
        ((_, info),) = p.reset([0], [3])
        assert len(info["game"]) == len("maze-") + 2


def _wait_until_dead(actor, timeout: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


@pytest.mark.parametrize("how", ["ray.kill", "os.kill"])
def test_killed_actor_truncates_its_episodes_and_is_replaced(ray_session, how):
    import ray

    p = RayEnvPool(FACTORY, 4, envs_per_actor=2)
    try:
        p.reset([0, 1, 2, 3], [9, 9, 9, 9])
        first = p.step([0, 1, 2, 3], ["wait"] * 4)
        victim = p.actors[0]
        if how == "ray.kill":
            ray.kill(victim, no_restart=True)
        else:
            os.kill(first[0].info["pid"], signal.SIGKILL)
        _wait_until_dead(victim)  # both kills are asynchronous: let Ray see the death first
        res = p.step([0, 2, 3], ["wait"] * 3)
        assert res[0].truncated and res[0].info[WORKER_FAILED] and res[0].reward == 0.0
        check_info(res[0].info)
        assert not res[0].info["action_valid"] and res[0].info["subtask"] == "maze"
        assert not res[1].truncated and WORKER_FAILED not in res[1].info  # the rollout goes on
        assert p.restarts == 1 and p.actors[0] is not victim
        # env 1 shared the dead actor: its episode is lost too, until reset
        assert p.step([1], ["wait"])[0].info[WORKER_FAILED]
        out = p.reset([0, 1], [9, 9])
        assert out[0][1]["game"] == first[0].info["game"]
        after = p.step([0, 1, 2], ["wait"] * 3)
        assert not any(r.truncated for r in after)
        assert after[0].info["pid"] != first[0].info["pid"]
    finally:
        p.close()
