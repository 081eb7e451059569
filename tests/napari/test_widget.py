"""The dock widget in a real napari viewer: a scripted session on a planted two-texture image.

Needs napari, pytest-qt and a display (``xvfb-run -a python -m pytest tests/napari``); skips
cleanly without them. The logic behind the buttons is tested without a viewer in
``test_widget_session.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_widget_session import planted_store, scribbles_of  # noqa: E402, F401

MANIFEST = Path(__file__).resolve().parents[2] / "hrdv2_dask" / "napari.yaml"


def test_manifest_is_valid_and_declares_the_widget():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)  # validates the schema
    [widget] = manifest.contributions.widgets
    command = next(c for c in manifest.contributions.commands if c.id == widget.command)
    assert command.python_name == "hrdv2_dask.napari._widget:Hrdv2Widget"
    assert widget.display_name == "HR-Dv2 analysis"
    pytest.importorskip("qtpy", exc_type=ImportError)  # the widget's module needs a Qt binding
    manifest.validate_imports()  # `npe2 validate --imports`: every python_name imports


@pytest.fixture
def viewer_and_widget(plugin_viewer, request):
    from hrdv2_dask.napari._widget import Hrdv2Widget

    viewer = plugin_viewer
    widget = Hrdv2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="HR-Dv2 analysis")
    qtbot = request.getfixturevalue("qtbot")

    def wait(timeout_ms: int = 60_000) -> None:
        qtbot.waitUntil(lambda: not widget.busy, timeout=timeout_ms)

    return viewer, widget, wait


def test_scripted_session(planted_store, viewer_and_widget, tmp_path):  # noqa: F811
    from hrdv2_dask import cli

    path, image, truth = planted_store
    viewer, widget, wait = viewer_and_widget
    widget.store_path.setText(str(path))
    widget.open_store()
    assert widget.store_layer.currentText() == "f.zarr: mean of 3 features"
    shown = []
    show = widget._show
    widget._show = lambda *a: (shown.append((a[1].kind, np.shape(a[2]), a[3])), show(*a))

    # points -> similarity layer, on the source grid
    widget.new_points()
    viewer.layers["query points"].add([[50.0, 50.0]])  # source pixel (50, 50): cell (7, 7)
    assert widget.busy  # the click started it, off the GUI thread
    wait()
    sim = viewer.layers["f.zarr: similarity"]
    assert sim.data.shape == (16, 16) and float(sim.data[7, 7]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(sim.scale, [7, 7])
    np.testing.assert_array_equal(sim.translate, [3, 3])

    viewer.layers["query points"].add([[20.0, 90.0]])  # a second point: the map updates
    wait()
    assert float(sim.data[7, 7]) < 1 and widget.status.text().startswith(
        "similarity to the mean of 2"
    )

    # paint two classes -> Train -> segmentation, the view first, then the whole image
    camera = widget._camera()
    camera.center = (56.0, 56.0)
    camera.zoom = 8.0 * max(viewer.canvas.size) / 800  # about 100 px of 112 in view
    widget.new_scribbles()
    scribbles = viewer.layers["scribbles"]
    assert scribbles.data.shape == image.shape[:2]  # on the source pixels
    np.testing.assert_array_equal(scribbles.scale, [1, 1])
    scribbles.data = scribbles_of(truth)
    shown.clear()
    widget.run_segment()
    wait()
    assert widget.last_error is None, widget.last_error
    kinds = [s for s in shown if s[0] == "segmentation"]
    assert len(kinds) == 2 and kinds[-1][1] == (16, 16)
    first_shape, first_place = kinds[0][1], kinds[0][2]
    assert first_shape[0] < 16 or first_shape[1] < 16 or first_place["scale"][0] > 7
    seg = viewer.layers["f.zarr: segmentation"]
    assert type(seg).__name__ == "Labels" and seg.data.shape == (16, 16)
    lab = scribbles_of(truth)
    ys, xs = np.nonzero(lab)
    cells = np.array([seg.world_to_data((y, x)) for y, x in zip(ys, xs, strict=True)])
    cells = np.floor(cells + 0.5).astype(int)  # napari's data pixel i spans [i - 1/2, i + 1/2)
    np.testing.assert_array_equal(seg.data[cells[:, 0], cells[:, 1]], lab[ys, xs])
    assert "accuracy 1.000" in widget.status.text()

    # PCA and clusters
    widget.run_pca()
    wait()
    pca = viewer.layers["f.zarr: pca"]
    assert pca.rgb and pca.data.shape == (16, 16, 3) and pca.data.dtype == np.uint8
    widget.k.setValue(3)
    widget.run_clusters()
    wait()
    assert set(np.unique(viewer.layers["f.zarr: clusters"].data)) <= {0, 1, 2}

    # save the model; `hrdv2 apply` gives the layer's labels; Apply model shows them again
    widget.result_kind.setCurrentText("segmentation")
    widget.model_path.setText(str(tmp_path / "model"))
    widget.save_model()
    wait()
    assert (tmp_path / "model" / "estimator.skops").is_file()
    assert cli.main(["apply", str(tmp_path / "model"), str(path), str(tmp_path / "applied")]) == 0
    applied = xr.open_zarr(tmp_path / "applied" / "segmentation.zarr", consolidated=False)
    np.testing.assert_array_equal(applied["labels"].values, seg.data)
    before = np.array(seg.data)
    seg.data = np.zeros_like(before)
    widget.apply_model()
    wait()
    np.testing.assert_array_equal(viewer.layers["f.zarr: segmentation"].data, before)

    # export with the progress bar
    widget.export_path.setText(str(tmp_path / "out"))
    widget.export()
    wait()
    assert widget.progress.value() == 1000
    assert (tmp_path / "out" / "segmentation.zarr").is_dir()
    assert widget.status.text() == f"exported segmentation to {tmp_path / 'out'}"

    # errors: one notification line, saying what to do
    viewer.layers["query points"].data = np.zeros((0, 2))
    widget.run_similarity()
    wait()
    assert widget.last_error.startswith("The points layer is empty")
    assert "\n" not in widget.last_error
    viewer.layers["query points"].add([[500.0, 5.0]])  # updates on the click
    wait()
    assert widget.last_error.startswith("Point (y=500.0, x=5.0) is outside the features")


def test_big_results_show_as_lazy_levels_over_their_view(
    planted_store,  # noqa: F811
    viewer_and_widget,
    monkeypatch,
    request,
):
    """Above IN_MEMORY_BYTES a result is a multiscale layer of lazy levels (its chunks computed
    as napari shows them) over the in-memory view; a new result updates both in place."""
    from hrdv2_dask.napari import _session

    monkeypatch.setattr(_session, "IN_MEMORY_BYTES", 100)
    path, _, truth = planted_store
    viewer, widget, wait = viewer_and_widget
    widget.store_path.setText(str(path))
    widget.open_store()
    camera = widget._camera()
    camera.center, camera.zoom = (56.0, 56.0), 8.0 * max(viewer.canvas.size) / 800
    qtbot = request.getfixturevalue("qtbot")

    def wait_visible(layers):  # a new layer is shown on the event loop's next turn
        qtbot.waitUntil(lambda: all(ly.visible for ly in layers), timeout=5000)

    widget._view_window = lambda s: (slice(0, 16, 3), slice(0, 16, 3))  # zoomed out: step 3
    widget.new_points()
    viewer.layers["query points"].add([[50.0, 50.0]])
    wait()
    assert widget.last_error is None, widget.last_error
    lazy, view = viewer.layers["f.zarr: similarity"], viewer.layers["f.zarr: similarity (view)"]
    assert lazy.multiscale and type(lazy.data[0]).__name__ == "LazyLevel"
    assert not view.multiscale and max(view.data.shape) < 16  # every step-th cell
    wait_visible([lazy, view])
    assert viewer.layers.index(view) < viewer.layers.index(lazy)  # the view under it
    session = widget.session()
    eager = session.results["similarity"].data.values
    np.testing.assert_array_equal(np.asarray(lazy.data[0]), eager)
    np.testing.assert_allclose(np.asarray(lazy.data[0])[7, 7], 1.0, atol=1e-5)

    del widget._view_window  # zoomed in (step 1): the view fills the kept chunks
    n_layers = len(viewer.layers)
    viewer.layers["query points"].add([[20.0, 90.0]])  # updates the same two layers in place
    wait()
    wait_visible([lazy])
    assert len(viewer.layers) == n_layers and viewer.layers["f.zarr: similarity"] is lazy
    assert float(np.asarray(lazy.data[0])[7, 7]) < 1
    chunks = session.results["similarity"].chunks
    assert chunks.computed > 0  # the view filled them
    y0, x0 = (round((t - 3) / 7) for t in view.translate)  # cell (0, 0) is at 3, cells of 7
    assert tuple(view.scale) == (7, 7)  # at full resolution, updated in place
    h, w = view.data.shape
    np.testing.assert_array_equal(
        view.data, session.results["similarity"].data.values[y0 : y0 + h, x0 : x0 + w]
    )

    widget.new_scribbles()
    viewer.layers["scribbles"].data = scribbles_of(truth)
    widget.run_segment()
    wait()
    seg = viewer.layers["f.zarr: segmentation"]
    assert type(seg).__name__ == "Labels" and seg.multiscale
    np.testing.assert_array_equal(
        np.asarray(seg.data[0]), session.results["segmentation"].data.values
    )


@pytest.mark.parametrize("async_slicing", [False, True])
def test_a_big_store_under_default_slicing_says_how_to_read_in_the_background(
    planted_store,  # noqa: F811
    viewer_and_widget,
    monkeypatch,
    async_slicing,
):
    from hrdv2_dask.napari import _reader, _widget

    monkeypatch.setattr(_reader, "MULTISCALE_PX", 8)  # the planted store opens as a pyramid
    monkeypatch.setattr(_widget, "_async_slicing", lambda: async_slicing)
    _, widget, _ = viewer_and_widget
    widget.store_path.setText(str(planted_store[0]))
    widget.open_store()
    assert widget.viewer.layers[widget.store_layer.currentText()].multiscale
    assert ("NAPARI_ASYNC=1" in widget.status.text()) is not async_slicing
