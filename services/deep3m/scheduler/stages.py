"""Stage plans: the tasks of one stage as a formula, and the task computed from it.

A stage plan is a *formula* — the block grid, the z-ranges, the member list —
so a million-block stage is a few numbers, and task ``n`` is computed on
demand with a deterministic id ``<stage>/<block id>`` (``predict/b0-1-2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from deep3m.core.errors import InvalidArgumentError
from deep3m.core.geometry import Block, BlockPlan, Box

LAYOUTS = ("blocks", "zranges", "members", "shards", "single")


@dataclass(frozen=True)
class StageDef:
    """One stage of a job kind: its name and the worker role that runs its tasks."""

    name: str
    role: str


@dataclass(frozen=True)
class TaskSpec:
    """One task, computed from its stage plan."""

    number: int
    id: str
    block: Block | None = None
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """The tasks of one stage as a formula. ``layout`` selects the formula:

    - ``blocks``: ``params`` volume_shape, block_shape, halo → one task per core block;
    - ``zranges``: volume_shape, slices → one task per z-range (whole y, x);
    - ``members``: members → one task per ensemble member;
    - ``shards``: shards → one task per part ``k`` of ``shards`` (params shard, shards);
    - ``single``: one task.
    """

    index: int
    name: str
    role: str
    layout: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InvalidArgumentError(f"unknown stage layout {self.layout!r}", field="layout")

    # Cached: a lease or completion computes one task, and must not redo the grid.
    @cached_property
    def block_plan(self) -> BlockPlan:
        return BlockPlan(
            tuple(self.params["volume_shape"]),
            tuple(self.params["block_shape"]),
            tuple(self.params["halo"]),
        )

    @cached_property
    def _grid(self) -> tuple[int, ...]:
        return tuple(int(g) for g in self.block_plan.grid_shape)

    @cached_property
    def n_tasks(self) -> int:
        if self.layout == "blocks":
            return len(self.block_plan)
        if self.layout == "zranges":
            return -(-int(self.params["volume_shape"][0]) // int(self.params["slices"]))
        if self.layout == "members":
            return len(self.params["members"])
        if self.layout == "shards":
            return int(self.params["shards"])
        return 1

    def task(self, n: int) -> TaskSpec:
        if not 0 <= n < self.n_tasks:
            raise InvalidArgumentError(
                f"task number {n} outside 0..{self.n_tasks - 1} of stage {self.name!r}",
                field="task",
            )
        if self.layout == "blocks":
            _, gy, gx = self._grid
            block = self.block_plan.block_at((n // (gy * gx), (n // gx) % gy, n % gx))
            return TaskSpec(n, f"{self.name}/{block.id}", block)
        if self.layout == "zranges":
            shape = [int(s) for s in self.params["volume_shape"]]
            slices = int(self.params["slices"])
            z0, z1 = n * slices, min((n + 1) * slices, shape[0])
            core = Box((z0, 0, 0), (z1, shape[1], shape[2]))
            block = Block((n, 0, 0), core, core)
            return TaskSpec(
                n, f"{self.name}/{block.id}", block, {"z_start": str(z0), "z_stop": str(z1)}
            )
        if self.layout == "members":
            member = str(self.params["members"][n])
            return TaskSpec(n, f"{self.name}/{member}", None, {"member": member})
        if self.layout == "shards":
            shards = str(int(self.params["shards"]))
            return TaskSpec(
                n, f"{self.name}/{n}-of-{shards}", None, {"shard": str(n), "shards": shards}
            )
        return TaskSpec(0, f"{self.name}/0")

    def task_id(self, n: int) -> str:
        """``task(n).id`` without computing the task (completions only need the id)."""
        if not 0 <= n < self.n_tasks:
            return self.task(n).id  # raises, naming the range
        if self.layout == "blocks":
            _, gy, gx = self._grid
            return f"{self.name}/b{n // (gy * gx)}-{(n // gx) % gy}-{n % gx}"
        if self.layout == "zranges":
            return f"{self.name}/b{n}-0-0"
        return self.task(n).id

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "role": self.role,
            "layout": self.layout,
            "params": dict(self.params),
            "n_tasks": self.n_tasks,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StagePlan:
        try:
            return cls(
                int(data["index"]),
                str(data["name"]),
                str(data["role"]),
                str(data["layout"]),
                dict(data.get("params", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"invalid stage plan {data!r}: {exc}", field="stage"
            ) from exc
