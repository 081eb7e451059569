"""The napari reader: layer types, placement on the source pixel grid, laziness, values.

The reader builds plain layer-data tuples, so all but the last test run without napari; the
viewer test needs napari, pytest-qt and a display (``xvfb-run``) and skips without them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from synthetic_stores import write_collection, write_store  # noqa: E402

from hrdv2_dask.analysis import fit_kmeans, fit_pca, pca_rgb, similarity  # noqa: E402
from hrdv2_dask.analysis.kmeans import write_clusters  # noqa: E402
from hrdv2_dask.analysis.pca import write_pca  # noqa: E402
from hrdv2_dask.errors import StoreError  # noqa: E402
from hrdv2_dask.io import outputs  # noqa: E402
from hrdv2_dask.io.store import open_features  # noqa: E402
from hrdv2_dask.napari import _reader  # noqa: E402
from hrdv2_dask.napari._reader import (  # noqa: E402
    grid_placement,
    napari_get_reader,
    napari_get_stack_reader,
    path_kind,
    read_path,
)


def _no_compute(*args, **kwargs):
    raise AssertionError("the reader computed something while opening")


def _values(rng, shape=(6, 10, 12)):
    return rng.normal(size=shape).astype(np.float32)


def _read(path):
    reader = napari_get_reader(str(path))
    assert reader is not None, path
    with dask.config.set(scheduler=_no_compute):  # opening computes nothing
        return reader(str(path))


def _cells_cover_source_pixels(kwargs, shape, stride):
    """Data pixel i (centred at translate + i*scale, napari's convention) spans source pixels
    [i*s, (i+1)*s): its edges in world units are i*s - 1/2 and (i+1)*s - 1/2."""
    scale, translate = np.asarray(kwargs["scale"][-2:]), np.asarray(kwargs["translate"][-2:])
    for axis in (0, 1):
        i = np.arange(shape[axis], dtype=np.float64)
        centre = translate[axis] + i * scale[axis]
        np.testing.assert_array_equal(centre - scale[axis] / 2, i * stride - 0.5)
        np.testing.assert_array_equal(centre + scale[axis] / 2, (i + 1) * stride - 0.5)


def test_grid_placement_is_the_stores_coordinates():
    assert grid_placement([1.5, 5.5, 9.5], [1.5, 5.5]) == ((4.0, 4.0), (1.5, 1.5))
    assert grid_placement([0.0, 1.0], [0.0]) == ((1.0, 1.0), (0.0, 0.0))  # stride 1
    assert grid_placement([3.0], [3.0]) == ((7.0, 7.0), (3.0, 3.0))  # one cell, stride 7
    assert grid_placement([3.0], [3.0, 10.0], stride=7) == ((7.0, 7.0), (3.0, 3.0))


@pytest.mark.parametrize("stride", [1, 4, 7])
def test_feature_store_opens_as_a_lazy_mean_image_on_the_source_grid(tmp_path, stride):
    values = _values(np.random.default_rng(stride))
    store = write_store(tmp_path / "f.zarr", values, out_stride=stride)
    assert path_kind(store) == "features"
    [(data, kwargs, kind)] = _read(store)
    assert kind == "image"
    assert isinstance(data, dask.array.Array) and data.shape == values.shape[1:]
    assert kwargs["name"] == "f.zarr: mean of 6 features"
    assert kwargs["scale"] == (float(stride),) * 2
    feats = open_features(store)
    assert kwargs["translate"] == (float(feats.y[0]), float(feats.x[0])) == ((stride - 1) / 2,) * 2
    _cells_cover_source_pixels(kwargs, data.shape, stride)
    np.testing.assert_allclose(np.asarray(data), values.mean(axis=0), rtol=1e-6, atol=1e-6)


def test_feature_store_opens_over_its_source_image(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    store = write_store(tmp_path / "f.zarr", _values(rng, (5, 10, 12)), out_stride=4, image=image)
    [(src, skw, skind), (_, fkw, _)] = _read(store)
    assert skind == "image" and skw["rgb"] is True and skw["name"] == "f.zarr: source f.zarr.npy"
    assert "scale" not in skw and "translate" not in skw  # source pixels are the world units
    np.testing.assert_array_equal(np.asarray(src), image)
    _cells_cover_source_pixels(fkw, (10, 12), 4)
    (tmp_path / "f.zarr.npy").unlink()  # a source that moved away: the features alone
    assert [k["name"] for _, k, _ in _read(store)] == ["f.zarr: mean of 5 features"]


def test_extracted_store_sits_on_its_source_pixels(tmp_path, local_client):
    """A real run (MeanPool, stride 7): its output cells tile the source image exactly."""
    import hrdv2_dask as hd

    rng = np.random.default_rng(8)
    image = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((14, 14, 1))).astype(np.uint8)
    np.save(tmp_path / "img.npy", image)
    hd.extract(
        tmp_path / "img.npy",
        tmp_path / "f.zarr",
        backbone=hd.MeanPool(14, 7),
        out_stride=7,
        tile=140,
        dtype="float32",
        client=local_client,
        progress=False,
    )
    [(src, _, _), (data, kwargs, _)] = _read(tmp_path / "f.zarr")
    assert kwargs["scale"] == (7.0, 7.0) and kwargs["translate"] == (3.0, 3.0)
    _cells_cover_source_pixels(kwargs, data.shape, 7)
    np.testing.assert_array_equal(np.asarray(src), image)
    assert data.shape == (12, 16) and (12 * 7, 16 * 7) == image.shape[:2]


def test_collection_opens_each_member_as_its_own_layer(tmp_path):
    rng = np.random.default_rng(1)
    members = {"a": _values(rng, (4, 8, 8)), "b": _values(rng, (4, 6, 10))}
    store = write_collection(tmp_path / "c.zarr", members, out_stride=2)
    assert path_kind(store) == "collection"
    layers = _read(store)
    assert [k["name"] for _, k, _ in layers] == ["a: mean of 4 features", "b: mean of 4 features"]
    image = rng.integers(0, 255, (12, 20), dtype=np.uint8)
    with_source = write_collection(tmp_path / "s.zarr", members, out_stride=2, images={"b": image})
    shown = _read(with_source)  # member b's source, below its features
    assert [k["name"] for _, k, _ in shown][1:] == ["b: source b.npy", "b: mean of 4 features"]
    np.testing.assert_array_equal(np.asarray(shown[1][0]), image)
    assert [k["name"] for _, k, _ in layers] == ["a: mean of 4 features", "b: mean of 4 features"]
    for (data, kwargs, kind), values in zip(layers, members.values(), strict=True):
        assert kind == "image" and kwargs["scale"] == (2.0, 2.0)
        assert kwargs["translate"] == (0.5, 0.5)
        np.testing.assert_allclose(np.asarray(data), values.mean(axis=0), rtol=1e-6, atol=1e-6)


def test_collection_opens_as_a_stack_when_members_share_a_grid(tmp_path):
    rng = np.random.default_rng(4)
    members = {"a": _values(rng, (4, 8, 10)), "b": _values(rng, (4, 8, 10))}
    store = write_collection(tmp_path / "c.zarr", members, out_stride=2)
    reader = napari_get_stack_reader(str(store))
    with dask.config.set(scheduler=_no_compute):
        [(data, kwargs, kind)] = reader(str(store))
    assert kind == "image" and data.shape == (2, 8, 10)
    assert kwargs["scale"] == (1.0, 2.0, 2.0) and kwargs["translate"] == (0.0, 0.5, 0.5)
    assert kwargs["metadata"]["members"] == ["a", "b"]
    expected = np.stack([v.mean(axis=0) for v in members.values()])
    np.testing.assert_allclose(np.asarray(data), expected, rtol=1e-6, atol=1e-6)
    assert napari_get_stack_reader(str(tmp_path / "c.zarr" / "a")) is None  # a member alone


def test_collection_of_other_grids_is_not_stacked(tmp_path):
    rng = np.random.default_rng(5)
    members = {"a": _values(rng, (4, 8, 10)), "b": _values(rng, (4, 6, 10))}
    store = write_collection(tmp_path / "c.zarr", members)
    with pytest.raises(StoreError, match=r"member 'b' is \(6, 10\) output cells.*separate layers"):
        napari_get_stack_reader(str(store))(str(store))


@pytest.fixture
def outputs_of_one_store(tmp_path):
    store = write_store(
        tmp_path / "f.zarr", _values(np.random.default_rng(2), (6, 20, 24)), out_stride=4
    )
    feats = open_features(store)
    model = fit_pca(feats, components=3, n_samples=300)
    write_pca(model, feats, tmp_path / "pca")
    write_clusters(fit_kmeans(feats, k=3, n_samples=300), feats, tmp_path / "km")
    outputs.write_array(similarity(feats, points=[(2, 3)]), tmp_path / "sim" / "similarity.zarr")
    return tmp_path, feats, model


def test_pca_opens_as_rgb_the_colours_of_pca_rgb(outputs_of_one_store):
    root, feats, model = outputs_of_one_store
    expected = pca_rgb(feats, model).values
    for name in ("pca/pca.zarr", "pca/pca.ome.zarr"):
        [(data, kwargs, kind)] = _read(root / name)
        assert kind == "image" and kwargs["rgb"] is True, name
        assert kwargs["scale"] == (4.0, 4.0) and kwargs["translate"] == (1.5, 1.5), name
        assert data.dtype == np.uint8 and data.shape == (20, 24, 3)
        np.testing.assert_array_equal(np.asarray(data), expected)


def test_pca_pyramid_opens_multiscale(outputs_of_one_store):
    root, feats, model = outputs_of_one_store
    outputs.write_ome_pyramid(
        pca_rgb(feats, model), root / "pca" / "pca.ome.zarr", levels=2, overwrite=True
    )
    [(levels, kwargs, kind)] = _read(root / "pca" / "pca.ome.zarr")
    assert kwargs["multiscale"] is True and [lv.shape for lv in levels] == [
        (20, 24, 3),
        (10, 12, 3),
    ]
    assert kwargs["scale"] == (4.0, 4.0)


def test_pyramid_without_pca_zarr_is_named_as_placed_on_output_cells(
    outputs_of_one_store, tmp_path
):
    root, feats, model = outputs_of_one_store
    outputs.write_ome_pyramid(pca_rgb(feats, model), tmp_path / "alone" / "pca.ome.zarr")
    [(_, kwargs, _)] = _read(tmp_path / "alone" / "pca.ome.zarr")
    assert kwargs["name"].endswith("(output cells)") and "scale" not in kwargs


def test_labels_and_similarity(outputs_of_one_store):
    root, feats, _ = outputs_of_one_store
    [(labels, kwargs, kind)] = _read(root / "km" / "clusters.zarr")
    assert kind == "labels" and np.issubdtype(labels.dtype, np.integer)
    assert kwargs["scale"] == (4.0, 4.0) and kwargs["translate"] == (1.5, 1.5)
    assert set(np.unique(np.asarray(labels))) <= {0, 1, 2}
    [(sim, kwargs, kind)] = _read(root / "sim" / "similarity.zarr")
    assert kind == "image" and kwargs["colormap"] == "inferno"
    assert kwargs["scale"] == (4.0, 4.0) and kwargs["translate"] == (1.5, 1.5)
    assert float(np.asarray(sim)[2, 3]) == pytest.approx(1.0, abs=1e-3)  # the query point


def test_big_layers_open_as_lazy_pyramids(tmp_path, monkeypatch):
    monkeypatch.setattr(_reader, "MULTISCALE_PX", 5)
    rng = np.random.default_rng(7)
    values = _values(rng, (3, 21, 12))
    [(levels, kwargs, kind)] = _read(write_store(tmp_path / "f.zarr", values, out_stride=2))
    assert kwargs["multiscale"] is True and kwargs["scale"] == (2.0, 2.0)
    assert [lv.shape for lv in levels] == [(21, 12), (10, 6), (5, 3)]
    mean = values.mean(axis=0)
    level1 = mean[:20].reshape(10, 2, 6, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(np.asarray(levels[1]), level1, rtol=1e-5, atol=1e-6)
    labels = rng.integers(0, 5, (21, 12)).astype(np.uint8)
    lab = _reader.pyramid(dask.array.from_array(labels, chunks=8), labels=True)
    np.testing.assert_array_equal(np.asarray(lab[1]), labels[::2, ::2])  # labels, not means
    rgb = _reader.pyramid(dask.array.from_array(np.full((21, 12, 3), 7, np.uint8), chunks=8))
    assert [lv.shape for lv in rgb] == [(21, 12, 3), (10, 6, 3), (5, 3, 3)]
    assert rgb[2].dtype == np.uint8 and (np.asarray(rgb[2]) == 7).all()


def test_an_array_with_a_leading_axis_opens_as_a_stack_on_the_grid(outputs_of_one_store):
    root, feats, _ = outputs_of_one_store
    proba = feats.isel(feature=slice(0, 2)).rename(feature="class")
    outputs.write_array(proba, root / "seg" / "probabilities.zarr", name="probability")
    [(data, kwargs, kind)] = _read(root / "seg" / "probabilities.zarr")
    assert kind == "image" and data.shape == (2, 20, 24)
    assert kwargs["scale"] == (1.0, 4.0, 4.0) and kwargs["translate"] == (0.0, 1.5, 1.5)


def test_an_unfinished_store_is_refused_in_one_line(tmp_path):
    import zarr

    from hrdv2_dask.errors import IncompleteStoreError

    store = write_store(tmp_path / "f.zarr", _values(np.random.default_rng(9)))
    root = zarr.open_group(store, mode="r+")  # as a run killed before it finished leaves it
    meta = dict(root.attrs["hrdv2"])
    root.attrs["hrdv2"] = {**meta, "complete": False}
    with pytest.raises(IncompleteStoreError, match="incomplete.*Rerun the same command"):
        _read(store)


def test_other_paths_are_not_ours(tmp_path, outputs_of_one_store):
    root, _, _ = outputs_of_one_store
    (tmp_path / "plain").mkdir()
    (tmp_path / "a.txt").write_text("x")
    xr.DataArray(np.zeros((3, 4)), dims=("y", "x"), name="v").to_zarr(tmp_path / "nocoords.zarr")
    ome = root / "pca" / "pca.ome.zarr" / ".zattrs"
    other = tmp_path / "other.ome.zarr"
    shutil.copytree(root / "pca" / "pca.ome.zarr", other)
    attrs = json.loads(ome.read_text())
    attrs["multiscales"][0]["metadata"]["method"] = "another tool"
    (other / ".zattrs").write_text(json.dumps(attrs))
    paths = [tmp_path / "plain", tmp_path / "a.txt", tmp_path / "missing", root / "pca"]
    for path in (*paths, tmp_path / "nocoords.zarr", other):
        assert napari_get_reader(str(path)) is None
    assert napari_get_reader([str(root / "f.zarr")] * 2) is None
    with pytest.raises(StoreError, match="not a feature store"):
        read_path(tmp_path / "plain")


def test_viewer_opens_a_store_with_the_plugin(outputs_of_one_store, plugin_viewer):
    root, _, _ = outputs_of_one_store
    viewer = plugin_viewer
    viewer.open(str(root / "f.zarr"), plugin="hrdv2-dask")
    viewer.open(str(root / "pca" / "pca.zarr"), plugin="hrdv2-dask")
    viewer.open(str(root / "km" / "clusters.zarr"), plugin="hrdv2-dask")
    names = [layer.name for layer in viewer.layers]
    assert names == ["f.zarr: mean of 6 features", "pca/pca.zarr (RGB)", "km/clusters.zarr"]
    feats, pca, labels = viewer.layers
    assert type(labels).__name__ == "Labels" and pca.rgb
    for layer in viewer.layers:
        np.testing.assert_array_equal(layer.scale, [4.0, 4.0])
        np.testing.assert_array_equal(layer.translate, [1.5, 1.5])
    # source pixel (9, 13) lies in output cell (2, 3): napari maps it there
    np.testing.assert_array_equal(np.round(feats.world_to_data((9, 13))), [2, 3])

    rng = np.random.default_rng(6)
    coll = write_collection(root / "c.zarr", {k: _values(rng, (3, 8, 8)) for k in "ab"})
    viewer.layers.clear()
    viewer.open(str(coll), plugin="hrdv2-dask")  # the first reader: one layer per member
    assert [layer.name for layer in viewer.layers] == [f"{k}: mean of 3 features" for k in "ab"]
    viewer.layers.clear()
    viewer.open(str(coll), plugin="hrdv2-dask.get_stack_reader")
    [stack] = viewer.layers
    assert stack.data.shape == (2, 8, 8) and stack.name == "c.zarr: 2 members, mean of 3 features"


# ------------------------------------------------------------------ physical units


def _with_pixel_size(store, size=(0.5, 0.25), unit="micrometer"):
    """The store as if its source file had recorded a pixel size."""
    import zarr

    root = zarr.open_group(store, mode="r+")
    meta = dict(root.attrs["hrdv2"])
    source = {**meta["provenance"]["source"], "pixel_size": list(size), "unit": unit}
    root.attrs["hrdv2"] = {**meta, "provenance": {**meta["provenance"], "source": source}}
    return store


@pytest.fixture
def physical_store(tmp_path):
    rng = np.random.default_rng(11)
    image = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    store = write_store(tmp_path / "f.zarr", _values(rng, (5, 10, 12)), out_stride=4, image=image)
    return _with_pixel_size(store)


def test_layers_are_in_pixels_by_default_and_record_the_pixel_size(physical_store, monkeypatch):
    monkeypatch.delenv(_reader.UNITS_ENV, raising=False)
    [(_, skw, _), (_, fkw, _)] = _read(physical_store)
    assert "scale" not in skw and "units" not in fkw
    assert fkw["scale"] == (4.0, 4.0) and fkw["translate"] == (1.5, 1.5)
    for kw in (skw, fkw):
        assert kw["metadata"]["pixel_size"] == [0.5, 0.25]
        assert kw["metadata"]["unit"] == "micrometer"


def test_physical_units_scale_the_source_and_its_features_alike(physical_store):
    reader = _reader.napari_get_physical_reader(str(physical_store))
    assert reader is not None
    [(src, skw, _), (data, fkw, _)] = reader(str(physical_store))
    assert skw["scale"] == (0.5, 0.25) and skw["translate"] == (0.0, 0.0)
    assert fkw["scale"] == (2.0, 1.0) and fkw["translate"] == (0.75, 0.375)
    assert fkw["units"] == skw["units"] == ("micrometer", "micrometer")
    # output cell i still spans source pixels [4i, 4i + 4): edges (4i - 1/2) * p in world units
    for axis, p in enumerate((0.5, 0.25)):
        i = np.arange(data.shape[axis], dtype=np.float64)
        centre = fkw["translate"][axis] + i * fkw["scale"][axis]
        np.testing.assert_allclose(centre - fkw["scale"][axis] / 2, (4 * i - 0.5) * p)
        j = np.arange(src.shape[axis], dtype=np.float64)  # source pixel j: centred at j * p
        np.testing.assert_allclose(skw["translate"][axis] + j * skw["scale"][axis], j * p)
    feats = open_features(physical_store)
    np.testing.assert_allclose(fkw["translate"], (feats.y_phys[0], feats.x_phys[0]))


def test_physical_units_reach_every_derived_output(physical_store, monkeypatch):
    root = physical_store.parent
    feats = open_features(physical_store)
    write_pca(fit_pca(feats, components=3, n_samples=100), feats, root / "pca")
    outputs.write_array(similarity(feats, points=[(2, 3)]), root / "sim" / "similarity.zarr")
    write_clusters(fit_kmeans(feats, k=2, n_samples=100), feats, root / "km")
    paths = ["pca/pca.zarr", "pca/pca.ome.zarr", "sim/similarity.zarr", "km/clusters.zarr"]
    monkeypatch.setenv(_reader.UNITS_ENV, "physical")  # the default readers, switched
    for name in paths:
        assert _reader.has_pixel_size(root / name), name
        [(_, kwargs, _)] = _read(root / name)
        assert kwargs["scale"] == (2.0, 1.0) and kwargs["translate"] == (0.75, 0.375), name
        assert kwargs["units"] == ("micrometer", "micrometer"), name
    monkeypatch.setenv(_reader.UNITS_ENV, "pixel")
    assert _read(root / "sim" / "similarity.zarr")[0][1]["scale"] == (4.0, 4.0)


def test_physical_reader_declines_stores_without_a_pixel_size(tmp_path):
    store = write_store(tmp_path / "f.zarr", _values(np.random.default_rng(12)), out_stride=2)
    assert not _reader.has_pixel_size(store)
    assert _reader.napari_get_physical_reader(str(store)) is None  # no reader choice to make
    assert napari_get_reader(str(store)) is not None
    coll = write_collection(tmp_path / "c.zarr", {"a": _values(np.random.default_rng(1))})
    assert not _reader.has_pixel_size(coll)
    _with_pixel_size(coll / "a")
    assert _reader.has_pixel_size(coll)
    [(_, kwargs, _)] = read_path(coll, physical=True)
    assert kwargs["scale"] == (0.5, 0.25) and kwargs["units"] == ("micrometer", "micrometer")


def test_viewer_places_layers_in_physical_units(physical_store, plugin_viewer):
    viewer = plugin_viewer
    viewer.open(str(physical_store), plugin="hrdv2-dask.get_physical_reader")
    source, feats = viewer.layers
    np.testing.assert_array_equal(feats.scale, [2.0, 1.0])
    np.testing.assert_array_equal(source.scale, [0.5, 0.25])
    assert [str(u) for u in feats.units] == ["micrometer", "micrometer"]
    # 9.5 µm, 3.3 µm is source pixel (19, 13), in output cell (4, 3)
    np.testing.assert_array_equal(np.round(feats.world_to_data((9.5, 3.3))), [4, 3])
    np.testing.assert_array_equal(np.round(source.world_to_data((9.5, 3.3))), [19, 13])


# ------------------------------------------------------------------ gigapixel stores


def test_coarse_levels_that_would_read_too_much_are_transparent_placeholders(tmp_path, monkeypatch):
    """A level whose screenful reads more than VIEW_BYTES is NaN (drawn at once, transparent);
    contrast limits come from one chunk, not from napari's look at a placeholder."""
    monkeypatch.setattr(_reader, "MULTISCALE_PX", 5)
    cell_bytes = 3 * 4  # 3 float32 features a cell
    monkeypatch.setattr(_reader, "VIEW_BYTES", _reader.SCREEN_CELLS * 4 * cell_bytes)
    values = _values(np.random.default_rng(13), (3, 21, 12))
    [(levels, kwargs, _)] = _read(write_store(tmp_path / "f.zarr", values, chunk=8))
    assert [lv.shape for lv in levels] == [(21, 12), (10, 6), (5, 3)]
    assert type(levels[0]).__name__ == "LazyLevel"  # reads only the region napari asks for
    np.testing.assert_allclose(levels[0][3:9, 2], values.mean(axis=0)[3:9, 2], rtol=1e-5)
    assert kwargs["metadata"]["bytes_per_cell"] == cell_bytes
    assert kwargs["metadata"]["placeholder_levels"] == 2
    mean = values.mean(axis=0)
    np.testing.assert_allclose(
        np.asarray(levels[1]), mean[:20].reshape(10, 2, 6, 2).mean(axis=(1, 3)), rtol=1e-5
    )
    assert np.isnan(np.asarray(levels[2])).all()
    centre = mean[8:16, 0:8]  # the chunk holding the centre cell (10, 6)
    np.testing.assert_allclose(
        kwargs["contrast_limits"], np.percentile(centre, [0.5, 99.5]), rtol=1e-5
    )
    assert _reader.placeholder_from(3, cell_bytes) == 2
    monkeypatch.setattr(_reader, "PLACEHOLDER_PX", 2)  # free levels go on down to a screen
    [(levels, _, _)] = _read(tmp_path / "f.zarr")
    assert [lv.shape for lv in levels] == [(21, 12), (10, 6), (5, 3), (2, 1)]
    assert np.isnan(np.asarray(levels[3])).all()
    labels = dask.array.from_array(np.ones((21, 12), np.int32), chunks=8)
    lab = _reader.pyramid(labels, labels=True, cell_bytes=64)  # labels: 0, no NaN
    assert [int(np.asarray(lv).max()) for lv in lab] == [1, 0, 0, 0]


def test_source_opens_with_its_files_own_pyramid(tmp_path, monkeypatch):
    import zarr

    monkeypatch.setattr(_reader, "MULTISCALE_PX", 16)
    rng = np.random.default_rng(14)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    ome = outputs.write_ome_pyramid(
        xr.DataArray(image, dims=("y", "x", "c")), tmp_path / "src.ome.zarr", levels=3, chunk_px=16
    )
    store = write_store(tmp_path / "f.zarr", _values(rng, (4, 10, 12)), out_stride=4, image=image)
    root = zarr.open_group(store, mode="r+")
    meta = dict(root.attrs["hrdv2"])
    source = {**meta["provenance"]["source"], "path": str(ome), "format": "ome-zarr"}
    root.attrs["hrdv2"] = {**meta, "provenance": {**meta["provenance"], "source": source}}
    [(levels, skw, _), _] = _read(store)
    assert skw["multiscale"] is True and skw["rgb"] is True and "scale" not in skw
    assert [lv.shape for lv in levels] == [(40, 48, 3), (20, 24, 3), (10, 12, 3)]
    np.testing.assert_array_equal(np.asarray(levels[0]), image)
    np.testing.assert_array_equal(
        np.asarray(levels[1]), np.asarray(zarr.open_array(ome / "1")).transpose(1, 2, 0)
    )


def test_feature_mean_keeps_chunk_means_for_regions_seen_again():
    from hrdv2_dask.napari._feature_levels import ChunkResults, lazy_levels

    values = _values(np.random.default_rng(15), (3, 40, 40))
    features = dask.array.from_array(values, chunks=(3, 10, 10))
    means = ChunkResults.of_features(features, capacity_bytes=6 * 10 * 10 * 4)  # 6 chunks
    level0, level1 = lazy_levels(means, 2)
    np.testing.assert_allclose(level0[5:15, 12:28], values.mean(axis=0)[5:15, 12:28], rtol=1e-6)
    assert means.computed == 4  # rows 5:15 and cols 12:28 touch 2 x 2 chunks
    mean = values.mean(axis=0)
    with dask.config.set(scheduler=_no_compute):  # seen before, at either level: no reading
        np.testing.assert_allclose(level0[5:15, 12:28], mean[5:15, 12:28], rtol=1e-6)
        coarse = mean[6:14, 12:28].reshape(4, 2, 8, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(level1[3:7, 6:14], coarse, rtol=1e-5)
    level0[30:40, :]  # 4 more chunks: the 2 least recently used of the first 4 go
    assert means.computed == 8 and len(means._kept) == 6
    level0[5:15, 12:28]
    assert means.computed == 10


def test_a_store_below_the_pyramid_size_whose_overview_reads_too_much_gets_placeholders(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_reader, "PLACEHOLDER_PX", 8)
    values = _values(np.random.default_rng(16), (3, 30, 20))
    store = write_store(tmp_path / "f.zarr", values, chunk=8)
    [(data, _, _)] = _read(store)
    assert isinstance(data, dask.array.Array)  # light: one layer, read whole
    monkeypatch.setattr(_reader, "VIEW_BYTES", _reader.SCREEN_CELLS * 3 * 4)  # level 0 only
    [(levels, kwargs, _)] = _read(store)
    assert [lv.shape for lv in levels] == [(30, 20), (15, 10), (7, 5)]
    assert kwargs["metadata"]["placeholder_levels"] == 1
    np.testing.assert_allclose(levels[0][:, :], values.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.isnan(levels[1][:, :]).all() and np.isnan(levels[2][:, :]).all()
