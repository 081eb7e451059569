"""GPU paths (bf16 autocast, fused bf16 resample, pinned uploads); skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hrdv2_dask as hd

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::hrdv2_dask.RandomWeightsWarning"),
]


def test_fused_bf16_resample_matches_the_cpu_reference():
    """The same low-res maps resampled on the GPU (bf16 GEMM) and on the CPU (fp32 gathers)."""
    mp = hd.MeanPool(14, 14)
    img = torch.randn(2, 3, 98, 126, generator=torch.Generator().manual_seed(0))
    ts = hd.combine(hd.shifts((1, 2)), hd.flips())
    ref = hd.highres_features(img, mp, ts, fused=False)
    got = hd.highres_features(img.cuda(), mp.cuda(), ts).cpu()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-2


def test_gpu_block_run_equals_cpu_run(tmp_path):
    """The pipeline on the GPU agrees with the CPU run to bf16 precision."""
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    kw = dict(
        backbone="dinov2_vits14",
        weights="random",
        model_options=dict(embed_dim=64, depth=2, num_heads=4),
        tile=140,
        dtype="float32",
        progress=False,
    )
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as c,
        Client(c) as client,
    ):
        out = {}
        for device in ("cpu", "cuda"):
            torch.manual_seed(0)  # the same random model for both runs
            store = tmp_path / f"{device}.zarr"
            out[device] = hd.extract(img, store, device=device, client=client, **kw).values
        cpu, gpu = out["cpu"], out["cuda"]
    assert np.abs(gpu - cpu).max() / np.abs(cpu).max() < 5e-2
