"""Planning an extraction without a cluster: pure functions of settings, image and backbone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hrdv2_dask as hd
from hrdv2_dask.config import FeatureSettings
from hrdv2_dask.pipeline.plan import (
    BackboneFacts,
    default_block,
    mask_description,
    plan_grid,
    plan_run,
    transform_set,
    with_projection,
)

VITS = BackboneFacts(name="vit_small_patch14_dinov2", patch_size=14, stride=14, channels=384)
SOURCE = {"shape": [2000, 3000, 3], "path": "slide.svs", "format": "svs"}


def _plan(features: FeatureSettings, *, facts: BackboneFacts = VITS, compute=None):
    ts = transform_set(features, facts.patch_size)
    grid = plan_grid((2000, 3000), features, facts, ts)
    return plan_run(
        features,
        backbone=facts,
        transforms=ts,
        grid=grid,
        value_range=(0.0, 255.0),
        source=SOURCE,
        store="out.zarr",
        compute=compute,
        intensity="dtype range",
    )


def test_planning_imports_no_cluster_code():
    code = (
        "import sys, hrdv2_dask.pipeline.plan; "
        "print(sorted(m for m in ('dask', 'distributed', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plan_records_what_determines_the_values():
    plan = _plan(FeatureSettings(shifts=(1, 2), flips=True, out_stride=2))
    s = plan.settings
    assert s["model"] == "vit_small_patch14_dinov2" and s["weights"] == "default"
    assert len(s["transforms"]) == 17 * 3  # (1 + 8 + 8) shifts x (identity, two flips)
    assert (s["tile_px"], s["out_stride"], s["dtype"]) == (518, 2, "float16")
    assert s["source_shape"] == [2000, 3000, 3] and s["value_range"] == [0.0, 255.0]
    assert plan.provenance["source"] == SOURCE and plan.provenance["intensity"] == "dtype range"
    assert "computed_windows" not in plan.provenance
    ny, nx = plan.grid.n_windows
    assert plan.blocks.n_blocks == (-(-ny // s["block"]), -(-nx // s["block"]))
    assert plan.shape == (384, 1000, 1500) and plan.chunks[0] == 64


def test_block_follows_the_memory_budget_unless_given():
    assert _plan(FeatureSettings()).settings["block"] == default_block(384, 440, (5, 7))
    assert _plan(FeatureSettings(block=1)).settings["block"] == 1
    # fewer channels (a PCA head) fit larger blocks
    assert default_block(16, 440, (20, 20)) >= default_block(384, 440, (20, 20))


def test_components_and_projection():
    plan = _plan(FeatureSettings(components=16))
    assert plan.out_channels == 16 and plan.blocks.channels == 384  # estimates see all
    head = hd.LinearHead.from_pca(np.zeros(384, np.float32), np.eye(16, 384, dtype=np.float32))
    projected = with_projection(plan, head)
    assert projected.blocks.channels == 16 and projected.blocks.head is head
    with pytest.raises(hd.ConfigError, match=r"components must be an integer in 1\.\.384"):
        _plan(FeatureSettings(components=385))


def test_mask_is_recorded_and_counted():
    compute = np.zeros((5, 7), bool)
    compute[:2] = True
    plan = _plan(FeatureSettings(mask=np.ones((20, 30), bool)), compute=compute)
    assert plan.settings["mask"].startswith("array 20x30 sha1:")
    assert plan.provenance["computed_windows"] == 14
    assert plan.provenance["skipped_windows"] == 21
    assert mask_description("auto") == "auto" and mask_description(None) is None


def test_too_small_and_bad_shift_are_refused_before_anything_runs():
    tiny = FeatureSettings()
    with pytest.raises(hd.InputError, match="smaller than one 14x14 patch"):
        plan_grid((10, 300), tiny, VITS, transform_set(tiny, 14), name="a.png")
    with pytest.raises(hd.ConfigError):
        transform_set(FeatureSettings(shifts=(7,)), 14)  # |d| must stay below P/2


def test_plan_is_the_same_for_the_same_inputs():
    a, b = _plan(FeatureSettings(debias=4)), _plan(FeatureSettings(debias=4))
    assert a.settings == b.settings and a.blocks == b.blocks
