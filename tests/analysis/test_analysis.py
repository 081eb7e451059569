"""Analysis layer: PCA, k-means, similarity, scribble segmentation and their writers."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hrdv2_dask import analysis as an
from hrdv2_dask.analysis.segment import _labels_on_grid
from hrdv2_dask.errors import ConfigError, InputError, StoreError
from hrdv2_dask.io import open_image
from hrdv2_dask.io import outputs as out

pytest.importorskip("sklearn")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _store(values: np.ndarray, chunks=(-1, 32, 32), *, stride: int = 1) -> xr.DataArray:
    """A synthetic feature store: dask-backed ``(feature, y, x)`` with pixel coordinates."""
    c, h, w = values.shape
    coords = {
        "y": np.arange(h) * stride + (stride - 1) / 2,
        "x": np.arange(w) * stride + (stride - 1) / 2,
    }
    return xr.DataArray(
        da.from_array(values, chunks=chunks),
        dims=("feature", "y", "x"),
        coords=coords,
        attrs={"out_stride": stride},
    )


@contextmanager
def counting_scheduler(max_computes: int = 0):
    """Fail when dask computes more than ``max_computes`` times (cf. xarray's helper)."""
    calls = []

    def scheduler(dsk, keys, **kwargs):
        calls.append(keys)
        if len(calls) > max_computes:
            raise RuntimeError(f"dask computed {len(calls)} times, expected <= {max_computes}")
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=scheduler):
        yield calls


def _orthonormal(c: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(c, k)))
    return q.T  # (k, c)


def _two_direction_store(seed: int = 0, shape=(96, 80), c: int = 12):
    rng = np.random.default_rng(seed)
    u, v = _orthonormal(c, 2, seed + 1)
    a = rng.normal(0, 3.0, shape)
    b = rng.normal(0, 1.0, shape)
    offset = rng.normal(size=c)
    x = (
        offset[:, None, None]
        + a[None] * u[:, None, None]
        + b[None] * v[:, None, None]
        + rng.normal(0, 0.01, (c, *shape))
    )
    return x.astype(np.float32), u, v


def _quadrants(shape=(64, 72)) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return (yy >= h // 2).astype(int) * 2 + (xx >= w // 3).astype(int)


def _best_match_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy after mapping each predicted label to its majority true label (a bijection)."""
    mapping = {}
    for p in np.unique(pred):
        vals, counts = np.unique(truth[pred == p], return_counts=True)
        mapping[p] = vals[np.argmax(counts)]
    assert len(set(mapping.values())) == len(mapping), "labels are not a permutation"
    mapped = np.vectorize(mapping.get)(pred)
    return float((mapped == truth).mean())


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _position_store(shape=(100, 90), chunks=(2, 25, 30)) -> xr.DataArray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    return _store(np.stack([yy, xx]), chunks=chunks)


def test_sample_pixels_is_seeded_uniform_and_respects_mask():
    feats = _position_store()
    a = an.sample_pixels(feats, n=500, seed=3)
    b = an.sample_pixels(feats, n=500, seed=3)
    c = an.sample_pixels(feats, n=500, seed=4)
    assert a.shape == (500, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(p) for p in a}) == 500  # without replacement
    # uniform: the mean position is the grid centre (std of the mean of 500 draws ~ 1.3 px)
    np.testing.assert_allclose(a.mean(axis=0), [49.5, 44.5], atol=6)

    mask = np.zeros((100, 90), bool)
    mask[10:20, 40:47] = True
    got = an.sample_pixels(feats, n=1000, seed=0, mask=mask)
    assert got.shape == (70, 2)  # all 70 masked pixels, no more
    assert mask[got[:, 0].astype(int), got[:, 1].astype(int)].all()
    with pytest.raises(InputError, match=r"\(100, 90\)"):
        an.sample_pixels(feats, mask=np.ones((5, 5), bool))
    with pytest.raises(InputError, match="no pixel"):
        an.sample_pixels(feats, mask=np.zeros((100, 90), bool))


def test_sample_pixels_reads_only_the_sampled_chunks_and_skips_nan():
    read = []
    lock = threading.Lock()

    def source(block, block_info=None):
        with lock:
            read.append(tuple(block_info[0]["chunk-location"][1:]))
        return block

    values = _position_store().data.compute()
    values[:, :25, :30] = np.nan  # chunk (0, 0) is all NaN
    base = da.from_array(values, chunks=(2, 25, 30)).map_blocks(source, dtype=np.float32)
    feats = xr.DataArray(base, dims=("feature", "y", "x"))
    got = an.sample_pixels(feats, n=300, seed=1, max_chunks=3)
    assert len(set(read)) <= 3  # 12 chunks in the store, 3 read
    assert np.isfinite(got).all() and len(got) <= 300
    blocks = {(int(y) // 25, int(x) // 30) for y, x in got}
    assert len(blocks) <= 3


# ---------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------


def test_pca_recovers_known_directions():
    x, u, v = _two_direction_store()
    feats = _store(x, chunks=(5, 32, 32))  # features split over chunks too
    model = an.fit_pca(feats, components=3, n_samples=5000, seed=0)
    assert model.components.shape == (3, 12)
    assert abs(model.components[0] @ u) > 0.99
    assert abs(model.components[1] @ v) > 0.99
    np.testing.assert_allclose(model.explained_variance[:2], [9.0, 1.0], rtol=0.1)
    assert model.explained_variance[2] < 1e-3
    assert model.explained_variance_ratio[:2].sum() > 0.99


def test_project_and_rgb_are_lazy_and_match_numpy():
    x, _, _ = _two_direction_store()
    feats = _store(x)
    model = an.fit_pca(feats, components=3, n_samples=3000)
    with counting_scheduler(max_computes=0):
        proj = model.project(feats)
        rgb = an.pca_rgb(feats, model)
    assert proj.dims == ("component", "y", "x") and proj.dtype == np.float32
    assert rgb.dims == ("y", "x", "rgb") and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb.x.values, feats.x.values)
    ref = np.einsum("kc,cyx->kyx", model.components, x - model.mean[:, None, None])
    np.testing.assert_allclose(proj.values, ref, atol=1e-4)
    scaled = (ref[:3] - model.lo[:, None, None]) / (model.hi - model.lo)[:, None, None]
    ref_rgb = np.rint(np.clip(scaled, 0, 1) * 255).transpose(1, 2, 0)
    assert np.abs(rgb.values.astype(int) - ref_rgb).max() <= 1
    # 1st/99th percentiles: about 2 % of pixels are saturated per channel
    assert 0.005 < (rgb.values[..., 0] == 255).mean() < 0.05


@pytest.mark.parametrize("large", [False, True])
def test_pca_foreground_masks_background_and_refits_on_the_object(large):
    rng = np.random.default_rng(0)
    c, h, w = 10, 80, 80
    u, v, bg_dir = _orthonormal(c, 3, 5)
    yy, xx = np.mgrid[:h, :w]
    if large:  # the object covers 64 % of the image: the border, not the size, decides
        fg = (yy >= 8) & (yy < 72) & (xx >= 8) & (xx < 72)
    else:
        fg = (yy - 40) ** 2 + (xx - 44) ** 2 < 22**2
    x = rng.normal(0, 0.05, (c, h, w))
    x += np.where(fg, 0.0, 6.0)[None] * bg_dir[:, None, None]  # background far along bg_dir
    x += (rng.normal(0, 2, (h, w)) * fg)[None] * u[:, None, None]
    x += (rng.normal(0, 1, (h, w)) * fg)[None] * v[:, None, None]
    feats = _store(x.astype(np.float32))
    model = an.fit_pca(feats, components=3, n_samples=4000, foreground=True)
    assert model.foreground
    assert abs(model.components[0] @ u) > 0.99 and abs(model.components[1] @ v) > 0.99
    proj = model.project(feats).values
    assert (np.isfinite(proj[0]) == fg).mean() > 0.99
    rgb = an.pca_rgb(feats, model).values
    assert (rgb[~fg] == 0).all()
    # foreground=False sees the background split as the main direction instead
    plain = an.fit_pca(feats, components=1, n_samples=4000)
    assert abs(plain.components[0] @ bg_dir) > 0.95


def test_models_round_trip_through_json():
    x, _, _ = _two_direction_store()
    feats = _store(x)
    for model in (
        an.fit_pca(feats, n_samples=2000),
        an.fit_pca(feats, n_samples=2000, foreground=True),
    ):
        back = an.PCAModel.from_dict(json.loads(json.dumps(model.to_dict())))
        for name in ("mean", "components", "explained_variance", "lo", "hi", "fg_axis"):
            a, b = getattr(model, name), getattr(back, name)
            assert (a is None and b is None) or np.array_equal(a, b)
        assert back.fg_threshold == model.fg_threshold and back.fg_above == model.fg_above
    km = an.fit_kmeans(feats, k=3, n_samples=2000)
    back = an.KMeansModel.from_dict(json.loads(json.dumps(km.to_dict())))
    np.testing.assert_array_equal(back.centres, km.centres)
    with pytest.raises(ConfigError, match="unknown keys"):
        an.PCAModel.from_dict({**model.to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="kind"):
        an.KMeansModel.from_dict(model.to_dict())


def test_pca_errors_name_the_value():
    feats = _store(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="components=5"):
        an.fit_pca(feats, components=5)
    with pytest.raises(InputError, match="dims"):
        an.fit_pca(feats.rename(feature="c"))
    model = an.fit_pca(feats, components=2, n_samples=50)
    with pytest.raises(ConfigError, match=">= 3 components"):
        an.pca_rgb(feats, model)
    with pytest.raises(InputError, match="4 features but these features have 3"):
        model.project(feats.isel(feature=slice(0, 3)))


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


def test_kmeans_finds_regions_and_is_reproducible():
    rng = np.random.default_rng(0)
    regions = _quadrants()
    centres = rng.normal(0, 10, (4, 8))
    x = centres[regions].transpose(2, 0, 1) + rng.normal(0, 0.5, (8, *regions.shape))
    feats = _store(x.astype(np.float16), chunks=(8, 20, 25))
    model = an.fit_kmeans(feats, k=4, n_samples=3000, seed=0)
    with counting_scheduler(max_computes=0):
        labels = model.predict(feats)
    assert labels.dtype == np.uint8 and labels.dims == ("y", "x")
    pred = labels.values
    assert _best_match_accuracy(pred, regions) > 0.99
    again = an.fit_kmeans(feats, k=4, n_samples=3000, seed=0)
    np.testing.assert_array_equal(again.centres, model.centres)
    np.testing.assert_array_equal(again.predict(feats).values, pred)
    # label 0 is the largest cluster
    assert np.bincount(pred.ravel()).argmax() == 0


def test_kmeans_label_dtype_and_errors():
    assert (
        an.KMeansModel(centres=np.zeros((300, 2)))
        .predict(_store(np.zeros((2, 4, 4), np.float32)))
        .dtype
        == np.uint16
    )
    feats = _store(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ConfigError, match=r"cluster\.k must be an integer >= 2 "):
        an.fit_kmeans(feats, k=1)


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------


def _cosine_ref(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return np.einsum("c,cyx->yx", q, x) / (np.linalg.norm(x, axis=0) * np.linalg.norm(q))


def test_similarity_matches_numpy_and_is_one_at_the_query():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 50, 60)).astype(np.float16)
    feats = _store(x, chunks=(16, 16, 16))
    with counting_scheduler(max_computes=0):
        sim = an.similarity(feats, points=[(7, 41)])
    assert sim.dims == ("y", "x") and sim.dtype == np.float32
    values = sim.values
    assert values[7, 41] == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(values, _cosine_ref(x, x[:, 7, 41].astype(np.float32)), atol=1e-3)

    pts = [(0, 0), (49, 59), (20, 3)]
    q = np.mean([x[:, y, xx].astype(np.float32) for y, xx in pts], axis=0)
    half = an.similarity(feats, points=pts, dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.values.astype(np.float32), _cosine_ref(x, q), atol=2e-3)

    box = an.similarity(feats, box=(10, 20, 14, 31)).values
    qb = x[:, 10:14, 20:31].astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(box, _cosine_ref(x, qb), atol=1e-3)


def test_similarity_rejects_queries_outside_the_grid():
    feats = _store(np.ones((4, 50, 60), np.float32))
    with pytest.raises(InputError, match=r"\(y=50, x=3\).*\(50, 60\)"):
        an.similarity(feats, points=[(1, 1), (50, 3)])
    with pytest.raises(InputError, match=r"\(y=-1, x=0\)"):
        an.similarity(feats, points=[(-1, 0)])
    with pytest.raises(InputError, match=r"\(50, 60\)"):
        an.similarity(feats, box=(0, 0, 51, 10))
    with pytest.raises(ConfigError, match="exactly one"):
        an.similarity(feats)
    with pytest.raises(ConfigError, match="exactly one"):
        an.similarity(feats, points=[(0, 0)], box=(0, 0, 1, 1))


# ---------------------------------------------------------------------------------------------
# Scribble segmentation
# ---------------------------------------------------------------------------------------------


def _two_regions(shape=(64, 64), c: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.where((yy - 30) ** 2 + (xx - 34) ** 2 < 18**2, 2, 1)
    means = rng.normal(0, 1, (3, c))
    means[2] = means[1] + 2.0 * rng.choice([-1, 1], c)  # |difference| = 8 sigma in 16-D
    x = means[truth].transpose(2, 0, 1) + rng.normal(0, 1.0, (c, *shape))
    return x.astype(np.float32), truth


def _scribbles(truth: np.ndarray) -> np.ndarray:
    labels = np.zeros_like(truth)
    for row in (4, 58):  # outside lines
        labels[row, 2:62] = truth[row, 2:62]
    labels[2:62, 3] = truth[2:62, 3]
    for row in (24, 36):  # lines through the object
        labels[row, 24:44] = truth[row, 24:44]
    return labels


@pytest.mark.parametrize("method", ["random_forest", "logistic"])
def test_scribble_segmentation_on_the_grid(method):
    x, truth = _two_regions()
    feats = _store(x, chunks=(16, 24, 24))
    labels = _scribbles(truth)
    seg, report = an.fit_segmenter(feats, labels, method=method, seed=0)
    assert report["classes"] == [1, 2] and report["n_labelled"] == int((labels > 0).sum())
    assert report["n_train"] + report["n_holdout"] == report["n_labelled"]
    assert report["train_accuracy"] > 0.95 and report["holdout_accuracy"] > 0.9
    with counting_scheduler(max_computes=0):
        pred = seg.predict(feats)
        proba = seg.predict(feats, proba=True)
    assert pred.dtype == np.uint8 and proba.dtype == np.float16
    assert proba.dims == ("class", "y", "x") and list(proba["class"].values) == [1, 2]
    unlabelled = labels == 0
    assert (pred.values[unlabelled] == truth[unlabelled]).mean() > 0.95
    np.testing.assert_allclose(proba.values.astype(np.float32).sum(axis=0), 1.0, atol=2e-3)


def test_scribble_segmentation_with_image_resolution_labels():
    x, truth = _two_regions(shape=(40, 40), seed=2)
    feats = _store(x, chunks=(16, 16, 16), stride=4)
    # scribbles drawn on the 4x larger (cropped) source image, 1 px wide
    image_labels = np.zeros((158, 157), np.int32)
    big_truth = np.kron(truth, np.ones((4, 4), int))[:158, :157]
    for row in (9, 45, 70, 90, 149):
        image_labels[row] = big_truth[row]
    grid = _labels_on_grid(image_labels, feats.data, 4, "mode").compute()
    assert grid.shape == (40, 40) and (grid[[2, 11, 17, 22, 37]] > 0).all()
    seg, report = an.fit_segmenter(feats, da.from_array(image_labels, chunks=60), holdout=0.25)
    assert report["n_labelled"] == 5 * 40
    pred = seg.predict(feats).values
    assert (pred[grid == 0] == truth[grid == 0]).mean() > 0.95
    # nearest neighbour keeps only rows whose centre pixel (4 i + 2) is labelled: 70 and 90
    nearest = _labels_on_grid(image_labels, feats.data, 4, "nearest").compute()
    assert sorted(np.flatnonzero(nearest.any(axis=1))) == [17, 22]


def test_segmenter_errors_name_both_shapes():
    x, truth = _two_regions(shape=(32, 32))
    feats = _store(x)
    with pytest.raises(InputError, match=r"\(30, 32\).*\(32, 32\)"):
        an.fit_segmenter(feats, np.zeros((30, 32), int))
    strided = _store(x, stride=2)
    with pytest.raises(InputError, match=r"\(70, 64\).*\(32, 32\).*out_stride 2"):
        an.fit_segmenter(strided, np.zeros((70, 64), int))
    with pytest.raises(InputError, match="two classes"):
        an.fit_segmenter(feats, (truth == 1).astype(int))
    with pytest.raises(ConfigError, match="method"):
        an.fit_segmenter(feats, truth, method="svm")
    with pytest.raises(ConfigError, match="holdout"):
        an.fit_segmenter(feats, truth, holdout=1.0)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _mean2x2(a: np.ndarray) -> np.ndarray:
    """Reference ceil-size 2x2 mean of ``(c, y, x)`` with partial edge windows."""
    c, h, w = a.shape
    out = np.zeros((c, -(-h // 2), -(-w // 2)))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = a[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(1, 2))
    return out


def test_ome_pyramid_levels_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (601, 515, 3), dtype=np.uint8)
    rgb = xr.DataArray(da.from_array(img, chunks=(100, 100, 3)), dims=("y", "x", "rgb"))
    path = out.write_ome_pyramid(rgb, tmp_path / "pca.ome.zarr", chunk_px=128)
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    (ms,) = root.attrs["multiscales"]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space"},
        {"name": "x", "type": "space"},
    ]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]  # 601 -> 301 -> 151 < 256
    scales = [d["coordinateTransformations"][0] for d in ms["datasets"]]
    assert all(s["type"] == "scale" for s in scales)
    assert [s["scale"] for s in scales] == [[1, 1, 1], [1, 2, 2], [1, 4, 4]]
    shapes = [root[d["path"]].shape for d in ms["datasets"]]
    assert shapes == [(3, 601, 515), (3, 301, 258), (3, 151, 129)]
    level0, level1, level2 = (root[str(i)][...] for i in range(3))
    np.testing.assert_array_equal(level0, img.transpose(2, 0, 1))
    np.testing.assert_array_equal(level1, np.rint(_mean2x2(level0.astype(float))))
    np.testing.assert_array_equal(level2, np.rint(_mean2x2(level1.astype(float))))
    assert root["0"].chunks == (3, 128, 128)
    assert len(root.attrs["omero"]["channels"]) == 3
    # the package's own reader opens it as (y, x, c)
    data, meta = open_image(path, level=1)
    assert meta.format == "ome-zarr" and data.shape == (301, 258, 3)
    with pytest.raises(StoreError, match="overwrite=True"):
        out.write_ome_pyramid(rgb, path)
    out.write_ome_pyramid(rgb[:100, :100], path, levels=2, overwrite=True)
    root = zarr.open_group(str(path), mode="r", zarr_format=2)
    assert [d["path"] for d in root.attrs["multiscales"][0]["datasets"]] == ["0", "1"]


def test_write_labels_and_array_round_trip(tmp_path):
    x, _, _ = _two_direction_store(shape=(50, 45))
    feats = _store(x, chunks=(12, 20, 20))
    km = an.fit_kmeans(feats, k=3, n_samples=1000)
    labels = km.predict(feats)
    path = out.write_labels(labels, tmp_path / "labels.zarr", attrs={"model": km.to_dict()})
    assert json.loads((path / "zarr.json").read_text())["zarr_format"] == 3
    back = xr.open_zarr(path, consolidated=False)["labels"]
    np.testing.assert_array_equal(back.values, labels.values)
    np.testing.assert_array_equal(back.x.values, feats.x.values)
    assert back.attrs["kind"] == "labels" and back.attrs["model"]["centres"]
    sim = an.similarity(feats, points=[(3, 4)], dtype="float16").chunk({"y": (10, 25, 15)})
    path = out.write_array(sim, tmp_path / "sim.zarr", attrs={"note": np.float32(1.5)})
    back = xr.open_zarr(path, consolidated=False)["similarity"]
    assert back.dtype == np.float16 and back.attrs["note"] == 1.5
    np.testing.assert_array_equal(back.values, sim.values)
    with pytest.raises(StoreError, match="already exists"):
        out.write_array(sim, path)
    with pytest.raises(InputError, match="integer"):
        out.write_labels(sim, tmp_path / "bad.zarr")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match="not a Zarr store"):
        out.write_array(sim, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()
    out.write_array(sim, path, overwrite=True)  # a Zarr store is replaced


def test_png_previews_have_the_right_size_and_content(tmp_path):
    x, _, _ = _two_direction_store(shape=(120, 100))
    feats = _store(x)
    rgb = an.pca_rgb(feats, an.fit_pca(feats, n_samples=2000))
    labels = an.fit_kmeans(feats, k=5, n_samples=2000).predict(feats)
    sim = an.similarity(feats, points=[(60, 50)])
    written = {
        "rgb": out.write_png(rgb, tmp_path / "rgb.png", max_side=50),
        "labels": out.write_png(labels, tmp_path / "labels.png", max_side=50),
        "sim": out.write_png(sim, tmp_path / "sim.png", max_side=50),
        "full": out.write_png(sim, tmp_path / "sub" / "full.png"),
    }
    sizes = {"rgb": (34, 40), "labels": (34, 40), "sim": (34, 40), "full": (100, 120)}
    for key, path in written.items():
        with Image.open(path) as im:
            assert im.size == sizes[key], key  # (width, height); factor ceil(120 / 50) = 3
            pixels = np.asarray(im)
        assert np.ptp(pixels) > 0, key
    colours = {tuple(c) for c in np.asarray(Image.open(written["labels"])).reshape(-1, 3)}
    assert colours <= set(out.LABEL_PALETTE) and len(colours) == 5
    # strided labels / 3x3 means
    np.testing.assert_array_equal(
        np.asarray(Image.open(written["labels"]))[1, 2], out.LABEL_PALETTE[labels.values[3, 6]]
    )
    small = np.asarray(Image.open(written["rgb"])).astype(float)
    ref = rgb.values[3:6, 3:6].reshape(9, 3).mean(axis=0)
    np.testing.assert_allclose(small[1, 1], ref, atol=0.5)
    with pytest.raises(InputError, match="channels"):
        out.write_png(an.fit_pca(feats, components=5).project(feats), tmp_path / "x.png")


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    factor=st.integers(1, 5),
    chunk=st.integers(1, 17),
)
def test_coarsen_mean_is_chunking_invariant(h, w, factor, chunk):
    a = np.random.default_rng(h * 41 + w).random((h, w, 2))
    got = out._coarsen_mean(
        da.from_array(a, chunks=(chunk, chunk, 2)), factor, axis=0, dtype=np.float64
    ).compute()
    ref = np.zeros((-(-h // factor), -(-w // factor), 2))
    for i in range(ref.shape[0]):
        for j in range(ref.shape[1]):
            window = a[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
            ref[i, j] = window.mean(axis=(0, 1))
    np.testing.assert_allclose(got, ref)
