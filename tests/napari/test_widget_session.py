"""The dock widget's session logic (no napari, no Qt): geometry, results, models, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from synthetic_stores import write_collection, write_store  # noqa: E402

from hrdv2_dask.errors import InputError  # noqa: E402
from hrdv2_dask.napari import _session  # noqa: E402
from hrdv2_dask.napari._reader import read_path  # noqa: E402
from hrdv2_dask.napari._session import Grid, Session, with_progress  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def planted(size: int = 112, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of two textures (a bright striped square planted in dark noise) and its
    truth mask (1 = background, 2 = square)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(70, 12, (size, size, 3))
    truth = np.ones((size, size), np.uint8)
    lo, hi = size // 4, 3 * size // 4
    truth[lo:hi, lo:hi] = 2
    stripes = 40 * (np.arange(size) // 3 % 2)[None, :, None]
    square = rng.normal(170, 12, (size, size, 3)) + stripes
    image = np.where(truth[..., None] == 2, square, image)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _cells_values(rng, shape=(5, 20, 24)):
    return rng.normal(size=shape).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    return write_store(
        tmp_path / "f.zarr", _cells_values(np.random.default_rng(0)), out_stride=4, chunk=8
    )


def test_clicked_point_lies_in_the_cell_the_reader_places_there(store):
    session = Session(store)
    [(_, kwargs, _)] = read_path(store)  # the features layer (no source image)
    assert session.grid.scale == kwargs["scale"] and session.grid.translate == kwargs["translate"]
    # napari shows data pixel i at translate + i*scale: its centre and both edges map to i
    for i, j in [(0, 0), (7, 11), (19, 23)]:
        centre = np.asarray(kwargs["translate"]) + np.asarray([i, j]) * np.asarray(kwargs["scale"])
        for offset in (-1.99, 0.0, 1.99):
            assert session.grid.cells([centre + offset]).tolist() == [[i, j]]
    # a source pixel p lies in cell p // out_stride
    pixels = np.array([[0, 0], [3, 4], [9, 13], [79, 95]])
    np.testing.assert_array_equal(session.grid.cells(pixels), pixels // 4)
    with pytest.raises(InputError, match=r"outside the features \(20x24 cells"):
        session.grid.cells([[80, 0]])
    with pytest.raises(InputError, match="points layer is empty"):
        session.grid.cells(np.zeros((0, 2)))


def test_similarity_at_the_clicked_cell_is_one_and_lazy(store):
    session = Session(store)
    result = session.similarity([[9, 13]])  # cell (2, 3)
    assert result.info == {"points": [[2, 3]]}
    assert result.data.chunks is not None  # lazy
    values = result.data.values
    assert values[2, 3] == pytest.approx(1.0, abs=1e-6)
    feats = session.features.values
    q = feats[:, 2, 3]
    cos = np.einsum("f,fyx->yx", q, feats) / (np.linalg.norm(q) * np.linalg.norm(feats, axis=0))
    np.testing.assert_allclose(values, cos, atol=1e-5)


def test_window_is_the_view_subsampled_to_the_screen():
    g = Grid((1000, 800), (4.0, 4.0), (1.5, 1.5))
    assert g.window((0, 0), (4000, 3200), (250, 200)) == (slice(0, 1000, 4), slice(0, 800, 4))
    assert g.window((-500, -500), (-10, -10), (100, 100)) is None  # off the image
    rows, cols = g.window((398, 398), (402, 402), (1000, 1000))
    assert (rows, cols) == (slice(99, 101, 1), slice(99, 101, 1))
    scale, translate = g.placement(slice(8, 100, 4), slice(0, 800, 4))
    assert scale == (16.0, 16.0) and translate == (1.5 + 8 * 4, 1.5)


def test_view_equals_the_same_cells_of_the_full_result(store):
    session = Session(store)
    result = session.clusters(k=3, n_samples=400)
    window = session.grid.window((10.0, 20.0), (70.0, 90.0), (6, 6))
    rows, cols = window
    assert rows.step == cols.step == 3
    view, place = session.view(result, window)
    full, full_place = session.full(result)
    np.testing.assert_array_equal(view, full[rows, cols])
    assert full_place == {"scale": (4.0, 4.0), "translate": (1.5, 1.5)}
    # placed where the reader would put those cells: shown pixel k is grid cell start + k*step
    k = np.arange(view.shape[0])
    centres = np.asarray(place["translate"][0]) + k * place["scale"][0]
    np.testing.assert_array_equal(centres, 1.5 + (rows.start + k * rows.step) * 4.0)


@pytest.mark.parametrize("kind", ["similarity", "segmentation", "pca", "clusters"])
def test_a_big_full_result_is_lazy_levels_computing_only_the_chunks_shown(
    planted_store, kind, monkeypatch
):
    """Above IN_MEMORY_BYTES the whole result is pyramid levels: a region equals the same
    cells of the eager result and computes only its chunks; labels levels subsample."""
    from hrdv2_dask.napari import _reader

    path, _, truth = planted_store  # 16 x 16 cells, chunks of 8
    monkeypatch.setattr(_session, "IN_MEMORY_BYTES", 100)
    monkeypatch.setattr(_reader, "PLACEHOLDER_PX", 4)  # levels of 16, 8, 4 cells a side
    monkeypatch.setattr(_reader, "VIEW_BYTES", 2**62)  # level 1 real too (else a placeholder)
    session = Session(path)
    result = {
        "similarity": lambda: session.similarity([[50.0, 50.0]]),
        "segmentation": lambda: session.segment(scribbles_of(truth)),
        "pca": lambda: session.pca(n_samples=200),
        "clusters": lambda: session.clusters(k=3, n_samples=200),
    }[kind]()
    eager = np.asarray(result.data.values)
    assert session.lazy(result)
    levels, place = session.full(result)
    assert place == {"scale": (7.0, 7.0), "translate": (3.0, 3.0)}
    assert [lv.shape[:2] for lv in levels] == [(16, 16), (8, 8), (4, 4)]
    assert [lv.placeholder for lv in levels] == [False, False, True]  # the coarsest always
    assert result.chunks.computed == 0  # nothing computed before napari asks
    edges = [np.cumsum((0, *c)) for c in result.data.data.chunks[:2]]
    assert len(edges[0]) > 3 and len(edges[1]) > 3  # several chunks a side

    def touched(y0, y1, x0, x1):
        rows = {j for j in range(len(edges[0]) - 1) if edges[0][j] < y1 and edges[0][j + 1] > y0}
        cols = {i for i in range(len(edges[1]) - 1) if edges[1][i] < x1 and edges[1][i + 1] > x0}
        return len(rows) * len(cols)

    region = levels[0][3:7, 9:13]
    assert result.chunks.computed == touched(3, 7, 9, 13) < touched(0, 16, 0, 16)
    if kind == "pca":  # with an alpha channel (0 in placeholder levels)
        assert region.shape == (4, 4, 4) and (region[..., 3] == 255).all()
        region = region[..., :3]
    np.testing.assert_array_equal(region, eager[3:7, 9:13])
    whole = np.asarray(levels[0])
    np.testing.assert_array_equal(whole[..., :3] if kind == "pca" else whole, eager)
    assert result.chunks.computed == touched(0, 16, 0, 16)
    coarse = np.asarray(levels[1])
    assert result.chunks.computed == touched(0, 16, 0, 16)  # from the kept chunks
    if result.labels:
        np.testing.assert_array_equal(coarse, eager[::2, ::2])
    elif kind == "similarity":
        np.testing.assert_allclose(coarse, eager.reshape(8, 2, 8, 2).mean(axis=(1, 3)), rtol=1e-6)
    monkeypatch.setattr(_reader, "VIEW_BYTES", 1)
    fresh = Session(path).full(result)[0]
    assert fresh[1].placeholder and not fresh[0].placeholder
    fill = fresh[1][:, :]
    assert (np.isnan(fill) if kind == "similarity" else fill == 0).all()


def test_a_view_at_full_resolution_fills_the_lazy_levels_chunks(planted_store, monkeypatch):
    path, _, _ = planted_store
    monkeypatch.setattr(_session, "IN_MEMORY_BYTES", 100)
    session = Session(path)
    result = session.pca(n_samples=200)
    levels, _ = session.full(result)
    window = session.grid.window((0.0, 0.0), (40.0, 40.0), (100, 100))  # cells 0:6, step 1
    view, _ = session.view(result, window)
    assert view.shape == (6, 6, 3)
    n = result.chunks.computed
    assert 0 < n < len(result.data.data.chunks[0]) * len(result.data.data.chunks[1])
    np.testing.assert_array_equal(view, result.data.values[:6, :6])
    np.testing.assert_array_equal(levels[0][0:6, 0:6, :3], view)
    assert result.chunks.computed == n  # napari's read of the view: nothing more


def test_scribbles_on_source_pixels_on_cells_and_on_a_bigger_layer():
    g = Grid((4, 5), (2.0, 2.0), (0.5, 0.5))
    lab = np.zeros((8, 10), np.uint8)
    lab[2, 3], lab[5, 9] = 1, 2
    rows, cols, crop = g.scribbles(lab, (1, 1), (0, 0))
    assert (rows, cols) == (slice(1, 3), slice(1, 5))
    np.testing.assert_array_equal(crop, lab[2:6, 2:10])
    on_cells = np.zeros((4, 5), np.int32)
    on_cells[3, 0], on_cells[1, 2] = 2, 1
    rows, cols, crop = g.scribbles(on_cells, (2, 2), (0.5, 0.5))
    assert (rows, cols) == (slice(1, 4), slice(0, 3)) and crop.tolist() == [
        [0, 0, 1],
        [0, 0, 0],
        [2, 0, 0],
    ]
    # a layer starting 3 pixels before the grid, 2 after (napari's own new labels layer)
    bigger = np.zeros((13, 15), np.uint8)
    bigger[3 + 2, 3 + 3], bigger[3 + 5, 3 + 9] = 1, 2
    bigger[0, 0] = 1  # outside the grid: ignored
    rows, cols, crop = g.scribbles(bigger, (1, 1), (-3, -3))
    np.testing.assert_array_equal(crop, lab[2:6, 2:10])
    with pytest.raises(InputError, match="not on the features' pixel grid"):
        g.scribbles(lab, (1, 1), (0.5, 0))
    with pytest.raises(InputError, match="not on the features' pixel grid"):
        g.scribbles(lab, (0.75, 1), (0, 0))
    with pytest.raises(InputError, match="has no label on the image"):
        g.scribbles(np.zeros((8, 10), np.uint8), (1, 1), (0, 0))
    shape, scale, translate = g.scribbles_layer(2)
    assert shape == (8, 10) and scale == (1.0, 1.0) and translate == (0.0, 0.0)
    rows, cols, _ = g.scribbles(lab, scale, translate)
    assert (rows, cols) == (slice(1, 3), slice(1, 5))  # the new layer is on the lattice
    assert g.scribbles_layer(2, max_pixels=39) == ((4, 5), (2.0, 2.0), (0.5, 0.5))
    # physical units (2.5 um per source pixel): the layer is still on the source pixels
    phys = Grid((4, 5), (5.0, 5.0), (2.5, 2.5))
    assert phys.scribbles_layer(2) == ((8, 10), (2.5, 2.5), (1.25, 1.25))


def test_a_gigapixel_grid_gets_a_scribbles_layer_around_the_view_that_trains_alike():
    """Above max_pixels cells the layer covers the view grown by its size (not 625 MB of
    zeros); strokes on it give the cells and labels the same strokes give on a whole layer."""
    g = Grid((300, 400), (4.0, 4.0), (1.5, 1.5))
    view = (slice(100, 120), slice(200, 230))
    shape, scale, translate = g.scribbles_layer(4, max_pixels=100_000, around=view)
    assert shape == (60 * 4, 90 * 4) and scale == (1.0, 1.0)  # 60 x 90 cells, source pixels
    assert translate == (80 * 4.0, 170 * 4.0)  # cell 80's first source pixel
    full_shape, full_scale, full_translate = g.scribbles_layer(4, max_pixels=10**9)
    assert full_shape == (1200, 1600) and full_translate == (0.0, 0.0)
    whole, crop = np.zeros(full_shape, np.uint8), np.zeros(shape, np.uint8)
    for label, (y, x) in ((1, (410, 810)), (2, (470, 900))):  # world = source pixels here
        whole[y : y + 5, x : x + 9] = label
        cy, cx = y - int(translate[0]), x - int(translate[1])
        crop[cy : cy + 5, cx : cx + 9] = label
    r1, c1, l1 = g.scribbles(whole, full_scale, full_translate)
    r2, c2, l2 = g.scribbles(crop, scale, translate)
    assert (r1, c1) == (r2, c2) == (slice(102, 119), slice(202, 228))
    np.testing.assert_array_equal(l1, l2)


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """MeanPool features (stride 7) of the planted two-texture image, extracted for real."""
    from distributed import Client, LocalCluster

    import hrdv2_dask as hd

    root = tmp_path_factory.mktemp("planted")
    image, truth = planted()
    np.save(root / "img.npy", image)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        hd.extract(
            root / "img.npy",
            root / "f.zarr",
            backbone=hd.MeanPool(14, 7),
            out_stride=7,
            tile=112,
            dtype="float32",
            client=client,
            progress=False,
        )
    return root / "f.zarr", image, truth


def scribbles_of(truth: np.ndarray) -> np.ndarray:
    """Two strokes per class, well inside each texture (source pixels)."""
    lab = np.zeros_like(truth)
    lab[8:12, 10:100] = 1
    lab[96:104, 10:100] = 1
    lab[40:44, 35:75] = 2
    lab[66:70, 35:75] = 2
    assert (truth[lab > 0] == lab[lab > 0]).all()
    return lab


def test_painted_pixels_are_predicted_right_on_a_planted_image(planted_store):
    path, image, truth = planted_store
    session = Session(path)
    lab = scribbles_of(truth)
    result = session.segment(lab, method="random_forest")
    seg = result.data.values
    assert seg.shape == (16, 16) and set(np.unique(seg)) <= {1, 2}
    cells = session.grid.cells(np.argwhere(lab > 0))
    np.testing.assert_array_equal(seg[cells[:, 0], cells[:, 1]], lab[lab > 0])
    # and the rest of the image: the cells wholly inside one texture
    inner = truth[::7, ::7]
    block = truth.reshape(16, 7, 16, 7)
    pure = (block == block[:, :1, :, :1]).all(axis=(1, 3))
    assert (seg[pure] == inner[pure]).mean() >= 0.95
    assert result.info["train_accuracy"] == 1.0
    # the view (the model run on every 2nd cell only) is those cells of the whole
    window = session.grid.window((0.0, 0.0), (111.0, 111.0), (8, 8))
    assert window == (slice(0, 16, 2), slice(0, 16, 2))
    np.testing.assert_array_equal(session.view(result, window)[0], seg[::2, ::2])


def test_saved_model_applied_by_the_cli_gives_the_same_labels(planted_store, tmp_path):
    path, _, truth = planted_store
    session = Session(path)
    result = session.segment(scribbles_of(truth))
    model = session.save_model("segmentation", tmp_path / "model")
    assert {p.name for p in model.iterdir()} == {"model.json", "arrays.npz", "estimator.skops"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hrdv2_dask.cli",
            "apply",
            str(model),
            str(path),
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    cli = xr.open_zarr(tmp_path / "a" / "segmentation.zarr", consolidated=False)["labels"]
    np.testing.assert_array_equal(cli.values, result.data.values)
    # and the widget's Apply of the same folder
    again = Session(path).apply(model)
    assert again.kind == "segmentation"
    np.testing.assert_array_equal(again.data.values, result.data.values)


def test_export_writes_the_clis_files_with_progress(planted_store, tmp_path):
    path, _, truth = planted_store
    session = Session(path)
    session.segment(scribbles_of(truth))
    steps = list(with_progress(lambda: session.export("segmentation", tmp_path / "out")))
    assert steps[-1][0] == "done"
    counts = steps[:-1]
    assert counts and counts[-1][0] == counts[-1][1] > 0  # every task counted by the end
    assert all(d <= t for d, t in counts)
    labels = xr.open_zarr(tmp_path / "out" / "segmentation.zarr", consolidated=False)["labels"]
    np.testing.assert_array_equal(labels.values, session.result("segmentation").data.values)
    assert (tmp_path / "out" / "segmentation.png").is_file()
    assert labels.attrs["labels"] == "napari scribbles"
    session.similarity([[50, 50]])
    out = session.export("similarity", tmp_path / "sim")
    assert {Path(p).name for p in out["similarity"]} == {"similarity.zarr", "similarity.png"}
    sim = xr.open_zarr(tmp_path / "sim" / "similarity.zarr", consolidated=False)["similarity"]
    assert float(sim.values[7, 7]) == pytest.approx(1.0, abs=1e-3)
    assert json.loads(json.dumps(sim.attrs["query_points"])) == [[7, 7]]


def test_errors_are_one_line_and_say_what_to_do(store, tmp_path):
    session = Session(store)
    with pytest.raises(InputError, match="No segmentation yet; press Train"):
        session.result("segmentation")
    session.similarity([[0, 0]])
    with pytest.raises(InputError, match="has no model to save"):
        session.save_model("similarity", tmp_path / "m")
    lab = np.zeros((80, 96), np.uint8)
    lab[:8, :8] = 1
    with pytest.raises(InputError, match="two classes"):
        session.segment(lab)
    coll = write_collection(
        tmp_path / "c.zarr", {"a": _cells_values(np.random.default_rng(1), (3, 8, 8))}
    )
    with pytest.raises(InputError, match=r"collection of 1 members; pick one: .*c.zarr/a"):
        Session(coll)
    assert Session(coll / "a").grid.shape == (8, 8)  # a member opens
    try:
        Session(tmp_path / "missing.zarr")
    except Exception as err:  # noqa: BLE001
        assert "\n" not in _session.one_line(err)


def test_any_feature_count_filterbank_included(tmp_path, local_client):
    import hrdv2_dask as hd
    from hrdv2_dask.filterbank import FilterBank

    image, truth = planted(64, seed=3)
    hd.extract(
        image,
        tmp_path / "fb.zarr",
        # the module itself, not the name "filterbank": loading by name imports timm, whose
        # triton import crashes a process that has drawn a napari viewer (the viewer tests)
        backbone=FilterBank(sigma_max=2),
        tile=64,
        dtype="float32",
        precision="fp32",
        client=local_client,
        progress=False,
    )
    session = Session(tmp_path / "fb.zarr")
    n_feat = session.features.sizes["feature"]
    assert n_feat not in (3, 384) and session.grid.scale == (1.0, 1.0)
    sim = session.similarity([[5, 5]]).data.values
    assert sim[5, 5] == pytest.approx(1.0, abs=1e-5)
    lab = np.zeros_like(truth)
    lab[2:6, 2:60], lab[24:40, 24:40] = 1, 2
    seg = session.segment(lab, method="logistic").data.values
    assert (seg[lab > 0] == lab[lab > 0]).all()
    assert session.pca(n_samples=500).data.shape == (64, 64, 3)
    assert set(np.unique(session.clusters(k=2, n_samples=500).data.values)) == {0, 1}
