"""Shared test fixtures."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MICROGRAPHS = SHARED / "data" / "micrographs"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def micrographs() -> Path:
    """The folder of real micrographs from ../shared; skips when absent (a user's clone)."""
    if not MICROGRAPHS.is_dir():
        pytest.skip(f"real micrographs not available at {MICROGRAPHS}")
    return MICROGRAPHS


@pytest.fixture(scope="session")
def tiny_random_dinov2():
    """A 2-block, 64-wide DINOv2 ViT-S/14 of the real architecture with random weights."""
    import hrdv2_dask as hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        torch.manual_seed(0)
        return hd.load_backbone(
            "dinov2_vits14", weights="random", embed_dim=64, depth=2, num_heads=4
        )


@pytest.fixture(scope="module")
def local_client():
    """An in-process Dask cluster (1 worker thread), closed after the module."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as c,
        Client(c) as client,
    ):
        yield client
