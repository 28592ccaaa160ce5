"""Generate the embedded ALFWorld games of ``envs/alfworld/data`` (a training and a held-out split).

Each game is a ``game.tw-pddl`` file in ALFWorld's format, written from scratch here: the PDDL
domain and text grammar are the ones the alfworld wheel ships (``alfworld/data/alfred.pddl`` and
``alfred.twl2``), the goal formula and the task sentence come from alfworld's goal library
(``alfworld.gen.goal_library``), and the problem (objects, receptacles, locations, initial facts) is
a small room described by a :class:`Room`. The walkthrough is the fast_downward planner's plan from
the initial state, replayed to a win before the file is written.

The rooms: :data:`FIXED_ROOMS` (two per subtask, written by hand) open the training split; the rest
are drawn by :func:`draw_rooms` from a seeded RNG over alfworld's tables (scene types allowed for a
task type, the object types each receptacle type holds, which objects heat / cool / clean), so that
every room has one goal ``(task type, object, receptacle)`` of its own. The held-out split's goals
are drawn after the training split's and never repeat one, so no held-out game shares its task (nor,
hence, its room) with a training game.

Regenerate with ``python -m envs.alfworld.embedded [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import alfworld
import alfworld.gen.constants as constants
import alfworld.gen.goal_library as goal_library

from envs.alfworld.engine import Engine, GameCache
from envs.alfworld.env import (
    EMBEDDED_DIR,
    EMBEDDED_HELDOUT,
    EMBEDDED_SPLITS,
    EMBEDDED_TRAIN,
    GAME_FILE,
    TASK_TYPES,
)

_WHEEL_DATA = Path(alfworld.__file__).resolve().parent / "data"

SEED: Final = 0
"""Seed of the RNG that draws the generated rooms."""

PER_SUBTASK: Final = {EMBEDDED_TRAIN: 10, EMBEDDED_HELDOUT: 5}
"""Games per subtask of each split (the training split's count includes :data:`FIXED_ROOMS`)."""

MAX_WALKTHROUGH: Final = 10
"""Longest walkthrough a generated game may have (pick_two's two round trips through openables)."""

LOOK: Final = "look_at_obj_in_light"
PICK_TWO: Final = "pick_two_obj_and_place"
LAMP: Final = "DeskLamp"
"""The lamp of the look games (it stands on one of :data:`LAMP_HOLDERS`)."""
LAMP_HOLDERS: Final = ("Desk", "Dresser", "SideTable")

TOOLS: Final = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
"""Receptacle type the domain's clean / heat / cool action needs."""

NEEDS: Final = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
"""Task type -> the ``constants.VAL_ACTION_OBJECTS`` class its object must belong to."""

SCENE_RECEPTACLES: Final = {
    "Kitchen": (
        "Cabinet",
        "CounterTop",
        "DiningTable",
        "Drawer",
        "Fridge",
        "GarbageCan",
        "Microwave",
        "Shelf",
        "SideTable",
        "SinkBasin",
    ),
    "Bathroom": (
        "BathtubBasin",
        "Cabinet",
        "CounterTop",
        "Drawer",
        "GarbageCan",
        "Shelf",
        "SinkBasin",
        "Toilet",
    ),
    "Bedroom": ("ArmChair", "Bed", "Desk", "Drawer", "Dresser", "GarbageCan", "Safe", "Shelf"),
    "LivingRoom": (
        "ArmChair",
        "Cabinet",
        "CoffeeTable",
        "Drawer",
        "Dresser",
        "Ottoman",
        "Shelf",
        "SideTable",
        "Sofa",
    ),
}
"""Receptacle types of each scene type of ``constants.GOALS_VALID`` (alfworld's own are static)."""

_EXCLUDED_OBJECTS: Final = {"Box", "ButterKnife", "Knife", LAMP, "FloorLamp"}
"""Kept out of the rooms: a box is a movable-receptacle task, a knife adds slicing."""

_NO_GOAL: Final = {"BathtubBasin", "SinkBasin"}
"""Receptacle types no ALFWorld task puts things in."""


@dataclass(frozen=True)
class Room:
    """One small ALFWorld room and its task."""

    task_type: str
    """ALFWorld task type, e.g. ``pick_heat_then_place_in_recep``."""
    target: str
    """Object type to act on (``Apple``)."""
    parent: str
    """Receptacle type where it must end (``Fridge``); for ``look`` the lamp type (``DeskLamp``)."""
    receptacles: tuple[str, ...]
    """Receptacle types in the room, one instance each, in location order (``SinkBasin``...)."""
    objects: tuple[tuple[str, str], ...]
    """(object type, receptacle type it starts in)."""
    name: str = "1"
    """Distinguishes the rooms of one task (the folder suffix)."""


FIXED_ROOMS: tuple[Room, ...] = (
    Room(
        "pick_and_place_simple",
        "Mug",
        "Shelf",
        ("CounterTop", "Shelf", "Drawer"),
        (("Mug", "CounterTop"), ("Pen", "Drawer")),
        name="1",
    ),
    Room(
        "pick_and_place_simple",
        "Book",
        "Bed",
        ("Desk", "Bed", "Dresser"),
        (("Book", "Desk"), ("CellPhone", "Dresser")),
        name="2",
    ),
    Room(
        LOOK,
        "Book",
        LAMP,
        ("Desk", "Bed", "SideTable"),
        (("Book", "Bed"), (LAMP, "Desk")),
        name="1",
    ),
    Room(
        LOOK,
        "CD",
        LAMP,
        ("SideTable", "Drawer", "Shelf"),
        (("CD", "Drawer"), (LAMP, "SideTable")),
        name="2",
    ),
    Room(
        "pick_clean_then_place_in_recep",
        "Plate",
        "Cabinet",
        ("CounterTop", "SinkBasin", "Cabinet"),
        (("Plate", "CounterTop"), ("Apple", "CounterTop")),
        name="1",
    ),
    Room(
        "pick_clean_then_place_in_recep",
        "Cloth",
        "Shelf",
        ("Toilet", "SinkBasin", "Shelf"),
        (("Cloth", "Toilet"), ("SoapBar", "Shelf")),
        name="2",
    ),
    Room(
        "pick_heat_then_place_in_recep",
        "Apple",
        "CounterTop",
        ("CounterTop", "Microwave", "DiningTable"),
        (("Apple", "DiningTable"), ("Cup", "CounterTop")),
        name="1",
    ),
    Room(
        "pick_heat_then_place_in_recep",
        "Potato",
        "DiningTable",
        ("Fridge", "Microwave", "DiningTable"),
        (("Potato", "Fridge"), ("Egg", "DiningTable")),
        name="2",
    ),
    Room(
        "pick_cool_then_place_in_recep",
        "Tomato",
        "CounterTop",
        ("CounterTop", "Fridge", "SinkBasin"),
        (("Tomato", "CounterTop"), ("Bowl", "CounterTop")),
        name="1",
    ),
    Room(
        "pick_cool_then_place_in_recep",
        "Cup",
        "Cabinet",
        ("Cabinet", "Fridge", "DiningTable"),
        (("Cup", "DiningTable"), ("Bowl", "Cabinet")),
        name="2",
    ),
    Room(
        PICK_TWO,
        "CD",
        "Shelf",
        ("Desk", "Shelf", "Drawer"),
        (("CD", "Desk"), ("CD", "Drawer"), ("Pencil", "Desk")),
        name="1",
    ),
    Room(
        PICK_TWO,
        "SoapBar",
        "Cabinet",
        ("CounterTop", "Cabinet", "Toilet"),
        (("SoapBar", "CounterTop"), ("SoapBar", "Toilet")),
        name="2",
    ),
)
"""Two hand-written rooms per subtask; the first games of the training split."""


# --------------------------------------------------------------------------------------------------
# Drawing rooms
# --------------------------------------------------------------------------------------------------


def holds(receptacle: str, obj: str) -> bool:
    """Whether alfworld lets ``obj`` be in ``receptacle`` (``constants.VAL_RECEPTACLE_OBJECTS``)."""
    if obj == LAMP:
        return receptacle in LAMP_HOLDERS
    return obj in constants.VAL_RECEPTACLE_OBJECTS.get(receptacle, ())


def _movable(pool: tuple[str, ...]) -> list[str]:
    """Object types that can start in some receptacle of ``pool`` (sorted)."""
    found = {o for r in pool for o in constants.VAL_RECEPTACLE_OBJECTS.get(r, ())}
    return sorted(o for o in found if "Sliced" not in o and o not in _EXCLUDED_OBJECTS)


def goals_of(task_type: str) -> dict[tuple[str, str], list[str]]:
    """Every (object, receptacle or lamp) goal of ``task_type`` -> the scenes that can host it.

    A scene hosts a goal when it has the task's tool, a receptacle (or lamp holder) for the goal and
    another receptacle where the object can start.
    """
    goals: dict[tuple[str, str], list[str]] = {}
    for scene in sorted(constants.GOALS_VALID[task_type]):
        pool = SCENE_RECEPTACLES[scene]
        tool = TOOLS.get(task_type)
        if tool is not None and tool not in pool:
            continue
        need = NEEDS.get(task_type)
        for obj in _movable(pool):
            if need is not None and obj not in constants.VAL_ACTION_OBJECTS[need]:
                continue
            if task_type == LOOK:
                ends = [LAMP] if any(r in LAMP_HOLDERS for r in pool) else []
            else:
                ends = [r for r in pool if r != tool and r not in _NO_GOAL and holds(r, obj)]
            for end in ends:
                finals = LAMP_HOLDERS if end == LAMP else (end,)
                if any(holds(r, obj) and r not in finals for r in pool):
                    goals.setdefault((obj, end), []).append(scene)
    return goals


def _pick_goals(
    candidates: list[tuple[str, str]], taken: list[tuple[str, str]], n: int
) -> list[tuple[str, str]]:
    """``n`` goals of ``candidates`` not in ``taken``, the least used objects/receptacles first."""
    chosen: list[tuple[str, str]] = []
    for _ in range(n):
        used_obj = Counter(o for o, _ in [*taken, *chosen])
        used_end = Counter(e for _, e in [*taken, *chosen])
        left = [g for g in candidates if g not in taken and g not in chosen]
        if not left:
            raise RuntimeError(f"only {len(chosen)} new goals left of {len(candidates)}")
        chosen.append(min(left, key=lambda g: (used_obj[g[0]], used_end[g[1]])))
    return chosen


def draw_room(
    task_type: str, goal: tuple[str, str], scene: str, rng: random.Random, name: str
) -> Room:
    """A room of ``scene`` for ``goal``: 3-4 receptacles and 2-4 objects (the goal's and others)."""
    obj, end = goal
    pool = SCENE_RECEPTACLES[scene]
    if task_type == LOOK:
        end_rec = rng.choice([r for r in pool if r in LAMP_HOLDERS])
    else:
        end_rec = end
    required = [end_rec, *([TOOLS[task_type]] if task_type in TOOLS else [])]
    start = rng.choice([r for r in pool if holds(r, obj) and r != end_rec])
    receptacles = list(dict.fromkeys([*required, start]))
    extra = [r for r in pool if r not in receptacles]
    rng.shuffle(extra)
    size = max(3, len(receptacles) + rng.randint(0, 1))
    receptacles = receptacles + extra[: max(size - len(receptacles), 0)]
    rng.shuffle(receptacles)
    objects = [(obj, start)]
    if task_type == PICK_TWO:
        objects.append((obj, rng.choice([r for r in receptacles if holds(r, obj) and r != end])))
    if task_type == LOOK:
        objects.append((LAMP, end_rec))
    others = [o for o in _movable(tuple(receptacles)) if o != obj]
    count = rng.randint(1, 3) if len(objects) == 1 else rng.randint(0, 1)
    for other in rng.sample(others, count):
        objects.append((other, rng.choice([r for r in receptacles if holds(r, other)])))
    return Room(task_type, obj, end, tuple(receptacles), tuple(objects), name=name)


def draw_rooms(seed: int = SEED) -> dict[str, tuple[Room, ...]]:
    """The rooms of each split: :data:`FIXED_ROOMS` then drawn rooms, ordered by task type."""
    rng = random.Random(seed)
    splits: dict[str, list[Room]] = {split: [] for split in PER_SUBTASK}
    for task_type in TASK_TYPES:
        goals = goals_of(task_type)
        candidates = sorted(goals)
        rng.shuffle(candidates)
        fixed = [r for r in FIXED_ROOMS if r.task_type == task_type]
        taken = [(r.target, r.parent) for r in fixed]
        splits[EMBEDDED_TRAIN] += fixed
        for split, per_subtask in PER_SUBTASK.items():
            new = _pick_goals(
                candidates, taken, per_subtask - (len(fixed) if split == EMBEDDED_TRAIN else 0)
            )
            for goal in new:
                scene = rng.choice(goals[goal])
                name = str(len(taken) + 1)
                splits[split].append(draw_room(task_type, goal, scene, rng, name))
                taken.append(goal)
    return {split: tuple(rooms) for split, rooms in splits.items()}


# --------------------------------------------------------------------------------------------------
# Writing games
# --------------------------------------------------------------------------------------------------


def _id(kind: str, index: int) -> str:
    """An ALFRED-style mangled id (``Mug_bar__plus_01``); the demangler numbers them by type."""
    return f"{kind}_bar__plus_{index:02d}"


def _receptacle_id(kind: str, index: int) -> str:
    """ALFRED names a sink basin after its sink (``Sink_bar__plus_02_bar_SinkBasin``)."""
    return _id("Sink", index) + "_bar_SinkBasin" if kind == "SinkBasin" else _id(kind, index)


def problem(room: Room) -> str:
    """The PDDL problem of ``room`` (facts as alfworld's games state them)."""
    rtypes = sorted(constants.RECEPTACLES - set(constants.MOVABLE_RECEPTACLES))
    otypes = sorted(constants.OBJECTS_SET - set(rtypes))
    recs = {r: _receptacle_id(r, i + 1) for i, r in enumerate(room.receptacles)}
    locs = {r: f"loc_bar_{i + 1}_bar_0_bar_0_bar_30" for i, r in enumerate(room.receptacles)}
    start = "loc_bar_0_bar_0_bar_0_bar_30"
    objs = [(_id(t, 10 + i), t, r) for i, (t, r) in enumerate(room.objects)]
    kinds = sorted({t for t, _ in room.objects})
    init = [f"(atLocation agent1 {start})"]
    for r, rid in recs.items():
        init += [f"(receptacleType {rid} {r}Type)", f"(receptacleAtLocation {rid} {locs[r]})"]
        init += [f"(canContain {r}Type {t}Type)" for t in kinds if t != LAMP and holds(r, t)]
        init += [f"(openable {rid})"] * (r in constants.OPENABLE_CLASS_SET)
    # the domain's predicates are the object classes of VAL_ACTION_OBJECTS, lower-cased (heatable)
    properties = {c.lower(): types for c, types in constants.VAL_ACTION_OBJECTS.items()}
    properties["isReceptacleObject"] = set(constants.MOVABLE_RECEPTACLES)
    for oid, t, r in objs:
        init += [
            f"(objectType {oid} {t}Type)",
            f"(inReceptacle {oid} {recs[r]})",
            f"(objectAtLocation {oid} {locs[r]})",
        ]
        init += [f"(pickupable {oid})"] * (t != LAMP)
        init += [f"({p} {oid})" for p, types in properties.items() if t in types]
    objects = [
        "agent1 - agent",
        *(f"{t} - object" for t in otypes),
        *(f"{t}Type - otype" for t in otypes),
        *(f"{t}Type - rtype" for t in rtypes),
        *(f"{oid} - object" for oid, _, _ in objs),
        *(f"{rid} - receptacle" for rid in recs.values()),
        *(f"{loc} - location" for loc in [*locs.values(), start]),
    ]
    fill = {"obj": room.target, "recep": room.parent, "toggle": room.parent, "mrecep": ""}
    goal = goal_library.gdict[room.task_type]["pddl"].replace("#", "-").format(**fill)
    return (
        f"(define (problem embedded_{room.task_type}_{room.name})\n(:domain alfred)\n(:objects\n  "
        + "\n  ".join(objects)
        + "\n)\n(:init\n  "
        + "\n  ".join(init)
        + "\n)\n"
        + goal
    )


def task_sentence(room: Room) -> str:
    """The task text, from the first template of alfworld's goal library."""
    template = goal_library.gdict[room.task_type]["templates"][0]
    return template.format(
        obj=room.target.lower(), recep=room.parent.lower(), toggle=room.parent.lower(), mrecep=""
    )


def folder_name(room: Room) -> str:
    """ALFWorld-style folder: ``<task_type>-<Object>-None-<Receptacle>-embedded<n>``."""
    return f"{room.task_type}-{room.target}-None-{room.parent}-embedded{room.name}"


def build(room: Room, engine: Engine, scratch: Path) -> dict[str, object]:
    """The game file content of ``room``, with a planner walkthrough checked to win."""
    game = {
        "pddl_domain": (_WHEEL_DATA / "alfred.pddl").read_text(),
        "grammar": (_WHEEL_DATA / "alfred.twl2")
        .read_text()
        .replace("UNKNOWN GOAL", task_sentence(room)),
        "pddl_problem": problem(room),
        "solvable": True,
        "walkthrough": [],
    }
    path = scratch / f"{folder_name(room)}.json"
    path.write_text(json.dumps(game))
    if engine.reset(path).won:
        raise RuntimeError(f"embedded room {folder_name(room)} is won before any action")
    plan = engine.replan()
    if not plan or len(plan) > MAX_WALKTHROUGH:
        raise RuntimeError(f"the planner's plan for {folder_name(room)} is {plan!r}")
    engine.reset(path)
    for command in plan:
        if not engine.step(command).valid:
            raise RuntimeError(f"plan command {command!r} inadmissible in {folder_name(room)}")
    if not engine.won:
        raise RuntimeError(f"the planner's walkthrough does not win {folder_name(room)}")
    game["walkthrough"] = plan
    return game


def game_text(game: dict[str, object]) -> str:
    """The bytes of a ``game.tw-pddl`` file (what :func:`generate` writes)."""
    return json.dumps(game, indent=1) + "\n"


def generate(out: Path = EMBEDDED_DIR, seed: int = SEED) -> list[Path]:
    """Write every room of :func:`draw_rooms` under ``out/<split folder>``; returns the files.

    Each split folder is emptied first, so no game of an earlier generation stays behind.
    """
    engine = Engine(GameCache(maxsize=2))
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for split, rooms in draw_rooms(seed).items():
            root = out / EMBEDDED_SPLITS[split]
            shutil.rmtree(root, ignore_errors=True)
            for room in rooms:
                folder = root / folder_name(room)
                folder.mkdir(parents=True)
                (folder / GAME_FILE).write_text(game_text(build(room, engine, Path(tmp))))
                written.append(folder / GAME_FILE)
    engine.close()
    return written


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR, help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the drawn rooms")
    args = parser.parse_args()
    for path in generate(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
