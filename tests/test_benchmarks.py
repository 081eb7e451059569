"""The benchmark suite: pure metrics, reference recipes, and one smoke run of ``core``."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hrdv2_dask as hd

# benchmarks/ is not installed: make it importable under the `pytest` script too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import SUITES  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402
from benchmarks.common import (  # noqa: E402
    BackboneSpec,
    parse_model_options,
    run_isolated,
    view_set,
)
from benchmarks.core import naive_features, probe_memory  # noqa: E402
from benchmarks.metrics import (  # noqa: E402
    boundary_fscore,
    miou_hungarian,
    periodic_power,
    relative_l2,
    seam_ratio,
)
from benchmarks.quality import DEFAULT_TEXTURES, run_quality, texture_mosaic  # noqa: E402
from benchmarks.seams import (  # noqa: E402
    run_seams,
    window_metrics,
)
from benchmarks.seams import to_markdown as seams_markdown  # noqa: E402

TINY = "embed_dim=64,depth=2,num_heads=4"


@pytest.mark.parametrize(
    "name",
    [
        "metrics",
        "common",
        "core",
        "e2e",
        "seams",
        "quality",
        "profile",
        "collection",
        "napari",
        "napari_store",
        "__main__",
    ],
)
def test_doctests(name):
    module = importlib.import_module(f"benchmarks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ------------------------------------------------------------------ segmentation metrics


def _stripes(edge: int, size: int = 40) -> np.ndarray:
    lab = np.zeros((size, size), np.int64)
    lab[:, edge:] = 1
    lab[edge:, : size // 4] = 2
    return lab


def test_miou_is_one_for_permuted_labels():
    truth = _stripes(20)
    permuted = np.array([7, 3, 5])[truth]
    assert miou_hungarian(permuted, truth) == 1.0


def test_miou_penalises_merged_and_missing_classes():
    truth = _stripes(20)
    merged = np.where(truth == 2, 0, truth)  # one cluster too few
    score = miou_hungarian(merged, truth)
    assert 0 < score < 1
    assert miou_hungarian(np.zeros_like(truth), truth) < 0.5


def test_miou_matches_one_to_one():
    # Class 1's best cluster is cluster 0, which class 0 needs more: one-to-one matching gives
    # class 1 cluster 1 instead (IoU 0.6, 0.25, 2/3).
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    assert miou_hungarian(pred, truth) == pytest.approx((0.6 + 0.25 + 2 / 3) / 3)


def test_boundary_fscore_identical_and_shifted():
    truth = _stripes(20)
    assert boundary_fscore(truth, truth) == 1.0
    assert boundary_fscore(_stripes(21), truth, tolerance_px=2) == 1.0
    assert boundary_fscore(_stripes(25), truth, tolerance_px=2) < 1.0
    assert boundary_fscore(_stripes(25), truth, tolerance_px=5) == 1.0


def test_boundary_fscore_without_boundaries():
    flat = np.zeros((10, 10), int)
    assert boundary_fscore(flat, flat) == 1.0
    assert boundary_fscore(flat, _stripes(5, 10)) == 0.0


# ------------------------------------------------------------------ tiling metrics


def test_periodic_power_sinusoid_at_tile_frequency_is_high():
    rng = np.random.default_rng(1)
    period = 20
    noise = rng.normal(size=(16, 120, 140))
    y, x = np.mgrid[0:120, 0:140]
    pattern = np.cos(2 * np.pi * x / period) + np.cos(2 * np.pi * y / period)
    assert periodic_power(noise + 2 * pattern, period) > 10


def test_periodic_power_of_noise_is_about_one():
    rng = np.random.default_rng(2)
    assert periodic_power(rng.normal(size=(32, 128, 160)), 16) == pytest.approx(1.0, abs=0.1)


def test_periodic_power_of_a_repeated_window_pattern():
    rng = np.random.default_rng(3)
    period = 16
    window = rng.normal(size=(8, period, period))
    tiled = np.tile(window, (1, 6, 7)) + rng.normal(size=(8, 96, 112))
    assert periodic_power(tiled, period) > 3
    # The same pattern at another period is not at the tile stride.
    assert periodic_power(tiled, 13) < 2


def test_periodic_power_needs_two_periods():
    with pytest.raises(ValueError, match="fewer than 2 periods"):
        periodic_power(np.zeros((2, 30, 30)), 16)


def test_seam_ratio_of_a_step_at_a_boundary():
    rng = np.random.default_rng(4)
    f = rng.normal(scale=0.1, size=(4, 50, 60))
    assert seam_ratio(f, boundaries_x=[30], boundaries_y=[25]) == pytest.approx(1.0, abs=0.2)
    f[:, :, 30:] += 1.0
    assert seam_ratio(f, boundaries_x=[30]) > 3
    assert seam_ratio(f, boundaries_x=[30], boundaries_y=[25]) > 1.5


def test_relative_l2():
    a = np.ones((2, 3, 4))
    assert relative_l2(a, a) == 0.0
    assert relative_l2(1.1 * a, a) == pytest.approx(0.1)


def test_window_metrics_keys():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(4, 40, 40))
    m = window_metrics(f, period=10, reference=f, border=2)
    assert set(m) == {"seam_ratio", "periodic_power", "rel_l2_vs_whole"}
    assert m["rel_l2_vs_whole"] == 0.0
    assert window_metrics(f, period=10)["rel_l2_vs_whole"] is None


class _PositionalBias(hd.MeanPool):
    """MeanPool plus a fixed pattern per token position: a pure positional artefact."""

    def __init__(self, amplitude: float) -> None:
        super().__init__(14, 14)
        g = torch.Generator().manual_seed(0)
        self.bias = amplitude * torch.randn(3, 128, 128, generator=g)
        self.name = f"positional_bias_{amplitude}"

    def forward(self, x):
        f = super().forward(x)
        return f + self.bias[:, : f.shape[-2], : f.shape[-1]]


def _seams(tmp_path, amplitude: float) -> dict:
    import tifffile

    rng = np.random.default_rng(0)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rng.normal(128, 20, (336, 420)).clip(0, 255).astype(np.uint8))
    return run_seams(
        spec=BackboneSpec(),
        image_path=path,
        n_views=9,
        tile=224,
        out_stride=4,
        debias=[16],
        backbone=_PositionalBias(amplitude),
    )


def test_seams_suite_sees_a_positional_artefact(tmp_path):
    clean = {r["run"]: r for r in _seams(tmp_path, 0.0)["rows"]}
    biased = {r["run"]: r for r in _seams(tmp_path, 0.5)["rows"]}
    # MeanPool is local: tiled equals whole, and nothing repeats with the windows.
    assert clean["tiled"]["rel_l2_vs_whole"] < 1e-3
    assert clean["tiled"]["periodic_power"] < 1.3
    # The same pattern in every window repeats at the window stride; the whole run has it once.
    assert biased["tiled"]["rel_l2_vs_whole"] > 0.1
    assert biased["tiled"]["periodic_power"] > 1.5
    assert biased["whole"]["periodic_power"] < 1.3
    # debias estimates the per-position pattern over 16 windows and removes it
    debiased = biased["tiled + debias 16"]
    assert debiased["periodic_power"] < 1.3


def test_seams_suite_without_its_image(tmp_path):
    result = run_seams(
        spec=BackboneSpec(),
        image_path=tmp_path / "missing.tif",
        n_views=1,
        tile=224,
        out_stride=4,
        debias=[],
    )
    assert "not found" in result["skipped"] and result["rows"] == []
    assert "not found" in seams_markdown(result)


# ------------------------------------------------------------------ recipes and inputs


@pytest.mark.parametrize("n", [1, 5, 9, 17, 51, 68])
def test_view_sets(n):
    _, ts = view_set(n)
    assert len(ts) == n and ts.max_shift_px <= 2


def test_naive_recipe_matches_highres_features_with_meanpool():
    """The naive reference is the same maths (stride = patch size), just stacked and slow."""
    mp = hd.MeanPool(14, 14)
    x = torch.randn(1, 3, 70, 84)
    for n in (9, 68):
        _, ts = view_set(n)
        naive = naive_features(x, mp, ts, batch_size=4)
        ours = hd.highres_features(x, mp, ts)[0]
        band = 21 + ts.max_shift_px
        inner = (slice(None), slice(band, -band), slice(band, -band))
        assert naive.shape == ours.shape
        torch.testing.assert_close(naive[inner], ours[inner], atol=1e-5, rtol=1e-5)


def test_texture_mosaic_layout():
    image, labels = texture_mosaic(96, textures=DEFAULT_TEXTURES, cells=6, seed=1)
    again, labels2 = texture_mosaic(96, textures=DEFAULT_TEXTURES, cells=6, seed=1)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert labels.shape == (96, 96)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, labels2)
    with pytest.raises(ValueError, match="cells=2"):
        run_quality(spec=None, size=32, textures=DEFAULT_TEXTURES, cells=2)


def test_every_suite_has_the_entry_points():
    for name in SUITES:
        module = importlib.import_module(f"benchmarks.{name}")
        for attr in ("add_arguments", "run", "to_markdown"):
            assert callable(getattr(module, attr)), f"{name}.{attr}"


# ------------------------------------------------------------------ smoke run


def test_core_smoke(tmp_path, capsys):
    """The cheapest suite end to end with a tiny random DINOv2 (memory probes tested below)."""
    t0 = time.perf_counter()
    argv = ["core", "--sizes", "56", "--views", "1,5", "--repeats", "1", "--device", "cpu"]
    assert main([*argv, "--model-options", TINY, "--no-memory", "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - t0 < 20
    result = json.loads((tmp_path / "core.json").read_text())
    env = result["environment"]
    for key in ("date", "cpu", "cores", "device", "python", "versions", "weights"):
        assert key in env
    assert env["random_weights"] is True
    assert {"torch", "timm", "dask", "distributed", "zarr", "numpy"} <= set(env["versions"])
    assert [(r["size"], r["views"]) for r in result["rows"]] == [(56, 1), (56, 5)]
    for row in result["rows"]:
        for key in ("backbone_s", "ensemble_s", "ratio", "ensemble_mps", "naive_s", "naive_ratio"):
            assert row[key] > 0, key
    md = (tmp_path / "core.md").read_text()
    assert "| 56 | 5 |" in md and "Random weights" in md and "target ratio" in md
    assert "highres_features" in capsys.readouterr().out


def test_core_records_the_precision_it_ran(tmp_path):
    argv = ["core", "--sizes", "28", "--views", "1", "--repeats", "1", "--device", "cpu"]
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = [*argv, "--model-options", TINY, "--no-memory", "--precision", precision]
        assert main([*args, "--out", str(out)]) == 0
        result = json.loads((out / "core.json").read_text())
        assert result["settings"]["precision"] == precision
        assert f"cpu, {precision})" in (out / "core.md").read_text()


def test_fidelity_smoke(tmp_path):
    """bf16 moves tokens and HR features by about bf16's rounding, not more, and not zero; the
    checkpoint it writes is official-format and loads through the official path."""
    argv = ["fidelity", "--sizes", "56x70", "--model-options", TINY, "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "fidelity.json").read_text())
    (row,) = result["rows"]
    assert row["size"] == "56×70"
    for key in ("tokens_rel_l2", "hr_rel_l2"):
        assert 1e-4 < row[key] < 5e-2, (key, row[key])
    assert row["hr_rel_l2"] <= row["tokens_rel_l2"] * 1.5  # averaging views does not amplify it
    assert 0.99 < row["hr_cos_min"] <= 1.0
    sd = torch.load(tmp_path / "work" / "official_random.pth")
    assert "mask_token" in sd and 0.4 < float(sd["blocks.0.ls1.gamma"].mean()) < 0.6
    assert "bf16 autocast against fp32" in (tmp_path / "fidelity.md").read_text()


def test_fidelity_compare_against_numpy():
    from benchmarks.fidelity import compare

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, 6, generator=g)
    b = a + 0.01 * torch.randn(8, 5, 6, generator=g)
    got = compare(a, b)
    an, bn = a.double().numpy().reshape(8, -1), b.double().numpy().reshape(8, -1)
    assert got["rel_l2"] == pytest.approx(np.linalg.norm(bn - an) / np.linalg.norm(an))
    cos = (an * bn).sum(0) / np.linalg.norm(an, axis=0) / np.linalg.norm(bn, axis=0)
    assert got["cos_min"] == pytest.approx(cos.min())
    assert got["cos_mean"] == pytest.approx(cos.mean())


@pytest.mark.slow  # two embedded clusters and a `hrdv2 features` process: ~45 s on 2 cores
def test_collection_smoke(tmp_path):
    """``collection --quick``: the same windows in the collection and the one image, a loop."""
    argv = ["collection", "--quick", "--device", "cpu", "--model-options", TINY]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "collection.json").read_text())
    runs = [r["run"] for r in result["rows"]]
    assert runs[0].startswith("extract_collection, 4 images") and runs[1].startswith("extract,")
    assert result["windows_equal"] and result["rows"][0]["windows"] == result["rows"][1]["windows"]
    assert result["throughput_ratio"] > 0 and result["loop_speedup"] > 0
    assert "shell loop" in runs[2] and "Throughput" in (tmp_path / "collection.md").read_text()


def test_profile_smoke(tmp_path):
    """The worker-side profile of a tiny embedded run: the task thread's samples are in
    ``run_block``, most of them in the backbone and the resample below it."""
    argv = ["profile", "--size", "600", "--device", "cpu", "--model-options", TINY]
    assert main([*argv, "--min-share", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    share = {r["function"]: r["cumulative"] for r in result["rows"]}
    assert result["samples"] > 10
    assert share["hrdv2_dask/pipeline/graph.py:run_block"] > 0.5
    assert share["hrdv2_dask/ensemble.py:highres_features"] > 0.2
    assert not (tmp_path / "work" / "profile_store.zarr").exists()
    assert "run_block" in (tmp_path / "profile.md").read_text()


def test_memory_probe_in_process():
    """At 518² a 64-channel map is 69 MB (mmap-sized, so RSS really grows): the naive recipe
    holds about 2n + 2 maps, the ensemble one or two."""
    spec = BackboneSpec(model_options=tuple(parse_model_options(TINY).items()))
    peaks = probe_memory(spec, size=518, n_views=5, methods=["ensemble", "naive"], batch_size=4)
    assert set(peaks) == {"ensemble", "naive"}
    assert all(p["device_bytes"] is None for p in peaks.values())
    map_bytes = 64 * 518 * 518 * 4
    assert peaks["naive"]["host_bytes"] > 6 * map_bytes
    assert peaks["naive"]["host_bytes"] > 3 * peaks["ensemble"]["host_bytes"]


def test_run_isolated_uses_a_fresh_process():
    assert run_isolated(os.getpid) != os.getpid()


def test_retrieval_smoke(tmp_path):
    """``retrieval --quick``: one build row and the flat and IVF-PQ latency rows."""
    pytest.importorskip("faiss")
    assert main(["retrieval", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "retrieval.json").read_text())
    assert result["build"]["regions"] == 256 and result["build"]["regions_per_s"] > 0
    assert [r["kind"] for r in result["rows"]] == ["flat", "ivfpq"]
    assert result["rows"][0]["recall"] == 1.0 and 0 <= result["rows"][1]["recall"] <= 1
    assert "faiss-cpu" in (tmp_path / "retrieval.md").read_text()
    assert not (tmp_path / "work" / "bench_index").exists()


def test_gigapixel_store_opens_like_a_real_one(tmp_path):
    """The napari suite's synthetic store: a real store's metadata and chunk grid, few files."""
    from benchmarks.napari_store import chunk_variant, variant_values, write_gigapixel_store

    recipe = write_gigapixel_store(
        tmp_path / "g.zarr", source_px=2400, out_stride=4, dim=4, chunk=32, pixel_size=0.5
    )
    assert recipe["cells"] == 600 and recipe["chunks"] == 19**2
    feats = hd.open_features(tmp_path / "g.zarr")
    assert feats.shape == (4, 600, 600) and feats.data.chunks[1][0] == 32
    assert float(feats.y_phys[1]) == pytest.approx(5.5 * 0.5)
    for j, i in ((0, 0), (3, 5), (7, 7)):  # a chunk's values are its variant's
        v = chunk_variant(j, i, 8)
        got = feats.data[:, j * 32 : j * 32 + 26, i * 32 : i * 32 + 26].compute()
        want = variant_values(v, dim=4, chunk=32, variants=8)[:, :26, :26]
        np.testing.assert_array_equal(got, want)
    files = list((tmp_path / "g.zarr" / "features").rglob("*"))
    inodes = {f.stat().st_ino for f in files if f.is_file() and f.name != "zarr.json"}
    assert len(inodes) == 8  # 361 chunks, 8 distinct files
    source = feats.attrs["source"]
    image, meta = hd.open_image(source["path"], level=1)  # its source: an OME-Zarr pyramid
    assert image.shape == (1200, 1200, 3) and image.dtype == np.uint8
    assert source["pixel_size"] == [0.5, 0.5] and source["shape"] == [2400, 2400, 3]


@pytest.mark.slow  # two napari viewers under Xvfb: ~80 s on 2 cores
def test_napari_smoke(tmp_path):
    """``napari --quick``: every action of both slicing modes, the widget's included, is
    measured and drawn."""
    pytest.importorskip("napari", exc_type=ImportError)
    if not os.environ.get("DISPLAY"):
        pytest.skip("no display: run under xvfb-run")
    assert main(["napari", "--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "napari.json").read_text())
    assert [s["mode"] for s in result["sessions"]] == ["sync", "async"]
    for session in result["sessions"]:
        names = [r["action"] for r in session["rows"]]
        assert names[:3] == ["redraw, empty viewer (baseline)", "open", "full view"]
        assert len(names) == 16 and session["canvas"][0] > 0  # 8 viewer, 8 widget actions
        assert names[8] == "widget: open" and names[-2:] == ["train + segment", "PCA"]
        for row in session["rows"]:
            assert not row["timed_out"] and row["max_ms"] > 0 and row["beats"] > 0, row
            assert row["p99_ms"] <= row["max_ms"]
            assert row.get("widget_error") is None, row
        click = session["rows"][names.index("similarity: click a point")]
        assert len(click["add_ms"]) == 1  # the lazy layer (the view only filled its chunks)
    assert "longest stall" in (tmp_path / "napari.md").read_text()
