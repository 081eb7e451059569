"""Packed tasks: the whole block grids of several small images (a collection's members) in one
task.

A member of a few windows would otherwise be a graph of its own: a block task per chunk block,
a counting task per block and the halo strips passed between them through the scheduler, which
for hundreds of small images costs more than their windows. A pack computes each of its
members' blocks in the same wavefront order, with the same :func:`~.graph.run_block` and the
same strips (passed in memory), so a member's store is bit-identical to one computed by the
block graph. Each block still writes its chunks, strips and ``done`` flag, so an interrupted
run resumes a member from its blocks done.

Failures stay per member: a member that fails inside a pack is reported with its one-line
error and the pack goes on with the next one; only a fault of the output store (no space,
read-only...) ends the task, as it ends the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io.store import BlockWriter
from .faults import error_line, is_store_fault
from .graph import BlockPlan, block_windows_count, load_block_halo, run_block

__all__ = ["PACK_WINDOWS", "Pack", "PackedMember", "member_windows", "run_pack"]

#: Members of at most this many windows are packed, up to this many windows a pack: the
#: windows of one block task of a big image (4 x 4 chunks).
PACK_WINDOWS = 16


@dataclass(frozen=True)
class PackedMember:
    """What a packed task needs of one member: its plan, source, blocks done and estimates."""

    plan: BlockPlan
    source: Any
    done: np.ndarray
    token_bias: list[np.ndarray] | None = None
    topic: str | None = None  # where its windows are reported (live progress)


class Pack:
    """The members of one packed task, in order.

    A plain class, not a dataclass or a tuple: Dask passes it to the task as it is, without
    walking into every member's plan looking for its own keys.
    """

    def __init__(self, members: Sequence[PackedMember]) -> None:
        self.members = tuple(members)

    def __len__(self) -> int:
        return len(self.members)


def member_windows(plan: BlockPlan, done: np.ndarray | None = None) -> int:
    """The windows that the blocks of ``plan`` compute (those not ``done``)."""
    ny, nx = plan.n_blocks
    return sum(
        block_windows_count(plan, jb, ib)
        for jb in range(ny)
        for ib in range(nx)
        if done is None or not done[jb, ib]
    )


def _run_member(member: PackedMember, backbone: Any) -> None:
    """Every block of one member not done, in the block graph's wavefront order."""
    plan = member.plan
    writer = BlockWriter(plan.store_path)  # its arrays opened once for all its blocks
    halos: dict[tuple[int, int], dict] = {}
    for jb in range(plan.n_blocks[0]):
        for ib in range(plan.n_blocks[1]):
            if member.done[jb, ib]:
                halos[jb, ib] = load_block_halo(jb, ib, plan=plan)
                continue
            halos[jb, ib] = run_block(
                jb,
                ib,
                halos.get((jb - 1, ib)),
                halos.get((jb, ib - 1)),
                halos.get((jb - 1, ib - 1)),
                plan=plan,
                source=member.source,
                backbone=backbone,
                token_bias=member.token_bias,
                topic=member.topic,
                writer=writer,
            )
            halos.pop((jb - 1, ib - 1), None)  # no later block reads it


def run_pack(pack: Pack, *, backbone: Any) -> list[str | None]:
    """Task: compute every member of ``pack``; per member ``None`` (done) or its error line.

    Errors travel as lines, not exceptions: one that does not pickle would fail the whole
    pack. A fault of the output store is raised (every later member would meet it too).
    """
    out: list[str | None] = []
    for member in pack.members:
        try:
            _run_member(member, backbone)
        except Exception as err:  # noqa: BLE001 - one member's failure is recorded
            if is_store_fault(err):
                raise
            out.append(error_line(err))
        else:
            out.append(None)
    return out
