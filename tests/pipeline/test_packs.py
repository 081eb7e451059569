"""Packed tasks: per-member results, a store fault ends the pack, windows left per member."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from hrdv2_dask.pipeline import packs
from hrdv2_dask.pipeline.packs import Pack, member_windows, run_pack


def test_each_member_gets_its_line_and_a_store_fault_ends_the_pack(monkeypatch):
    calls = []

    def fake(member, backbone):
        calls.append(member)
        if member == "bad":
            raise ValueError("broken\n  source")
        if member == "full":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs, "_run_member", fake)
    assert run_pack(Pack(["a", "bad", "b"]), backbone=None) == [
        None,
        "ValueError: broken source",
        None,
    ]
    with pytest.raises(OSError, match="No space"):
        run_pack(Pack(["c", "full", "d"]), backbone=None)
    assert calls == ["a", "bad", "b", "c", "full"]  # nothing after the store's fault


def test_member_windows_counts_the_blocks_not_done():
    from hrdv2_dask.pipeline.plan import BlockPlan
    from hrdv2_dask.tiling import plan_tiles
    from hrdv2_dask.transforms import TransformSet

    grid = plan_tiles((600, 400), tile_px=224, patch_px=14, stride_px=14)
    ny, nx = grid.n_windows
    plan = BlockPlan(
        grid=grid,
        block=2,
        n_blocks=(-(-ny // 2), -(-nx // 2)),
        transforms=TransformSet([]),
        value_range=(0.0, 1.0),
        channels=4,
        dtype="float32",
        batch_size=None,
        store_path="unused",
    )
    assert member_windows(plan) == ny * nx
    done = np.zeros(plan.n_blocks, bool)
    done[0, 0] = True
    assert member_windows(plan, done) == ny * nx - 4
