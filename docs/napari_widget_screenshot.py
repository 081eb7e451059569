"""Make docs/napari_widget.png: the dock widget after a scripted session on a real micrograph.

Filter-bank features (stride 1) of a crop of ``sofc.jpg``; a query point -> similarity;
scribbles of two classes (particles, background) -> Train + segment; the segmentation over the
source. Run headless from the repository root (needs the ``napari`` extra and the micrographs
of ../shared/data)::

    xvfb-run -a -s "-screen 0 1400x1000x24" python docs/napari_widget_screenshot.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import napari
import npe2
import numpy as np
from dask.distributed import Client
from napari.utils.colormaps import DirectLabelColormap
from PIL import Image
from qtpy.QtWidgets import QApplication
from scipy import ndimage

import hrdv2_dask as hd
from hrdv2_dask.filterbank import FilterBank
from hrdv2_dask.masking import otsu_threshold
from hrdv2_dask.napari._widget import Hrdv2Widget

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "micrographs" / "sofc.jpg"


def scribbles(image: np.ndarray) -> np.ndarray:
    """Short strokes well inside each phase (1 = background, 2 = particles), as a user draws
    them: rows of a few pixels where a strongly eroded Otsu mask is one phase."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 4)
    bright = smooth > otsu_threshold(smooth.ravel())
    lab = np.zeros(image.shape, np.uint8)
    rng = np.random.default_rng(1)
    for value, mask in ((1, ~bright), (2, bright)):
        inner = ndimage.binary_erosion(mask, iterations=12)
        ys, xs = np.nonzero(inner)
        for i in rng.choice(len(ys), 7, replace=False):
            y, x = ys[i], xs[i]
            run = inner[y, x : x + 70]
            n = int(np.argmin(run)) if not run.all() else len(run)
            lab[y - 4 : y + 5, x : x + max(n, 10)] = value
    return lab


def wait(widget: Hrdv2Widget, timeout_s: float = 300) -> None:
    t0 = time.time()
    while widget.busy and time.time() - t0 < timeout_s:
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()
    if widget.last_error:
        raise RuntimeError(widget.last_error)


def fit_view(viewer: napari.Viewer, shape: tuple[int, int]) -> None:
    """Fill the canvas with the image (reset_view of a hidden window sees an old size)."""
    QApplication.processEvents()
    h, w = viewer.canvas.size
    camera = viewer.scene.camera
    camera.center = (shape[0] / 2 - 0.5, shape[1] / 2 - 0.5)
    camera.zoom = 0.97 * min(h / shape[0], w / shape[1])
    QApplication.processEvents()


def save(viewer: napari.Viewer, out: Path) -> None:
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(shot[..., :3]).quantize(128).save(out, optimize=True)


def main(out: Path = REPO / "docs" / "napari_widget.png") -> None:
    work = Path(tempfile.mkdtemp())
    os.chdir(work)  # the widget shows the paths as typed: short ones
    image = np.asarray(Image.open(SOURCE).convert("L"))[:448, :640]
    np.save(work / "sofc.npy", image)
    with Client(processes=False, n_workers=1, threads_per_worker=2) as client:
        hd.extract(
            "sofc.npy",
            "sofc.zarr",
            backbone=FilterBank(sigma_max=8),  # by name, timm (and triton) would load
            tile=224,
            dtype="float32",
            precision="fp32",
            client=client,
            progress=False,
        )
    pm = npe2.PluginManager.instance()
    if "hrdv2-dask" not in pm._manifests:  # a checkout not installed with its entry point
        pm.register(npe2.PluginManifest.from_file(REPO / "hrdv2_dask" / "napari.yaml"))
    viewer = napari.Viewer(show=True)  # under xvfb: the canvas has its real size
    widget = Hrdv2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="HR-Dv2 analysis", area="right")
    viewer.window.resize(1560, 900)
    widget.store_path.setText("sofc.zarr")
    widget.open_store()
    viewer.reset_view()

    widget.new_points()
    viewer.layers["query points"].add([[230.0, 190.0]])  # on a particle
    wait(widget)
    widget.new_scribbles()
    viewer.layers["scribbles"].data = scribbles(image)
    widget.run_segment()
    wait(widget)

    for layer in viewer.layers:
        if layer.metadata.get("hrdv2_kind") == "features":
            layer.visible = False
    viewer.layers["sofc.zarr: similarity"].visible = False
    viewer.layers["sofc.zarr: segmentation"].opacity = 0.4
    viewer.layers.move(viewer.layers.index("scribbles"), len(viewer.layers))  # on top
    viewer.layers.move(viewer.layers.index("query points"), len(viewer.layers))
    viewer.layers["query points"].size = 16
    viewer.layers["query points"].border_color = "white"
    viewer.layers["scribbles"].colormap = DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "yellow", 2: "magenta"}
    )
    viewer.layers.selection.active = viewer.layers["sofc.zarr: segmentation"]
    widget.model_path.setText("sofc-model/")
    widget.export_path.setText("sofc-segmentation/")
    fit_view(viewer, image.shape)
    save(viewer, out)
    # the similarity map to the query point, for the README's how-to
    viewer.layers["sofc.zarr: segmentation"].visible = False
    viewer.layers["scribbles"].visible = False
    viewer.layers["sofc.zarr: similarity"].visible = True
    viewer.layers.selection.active = viewer.layers["sofc.zarr: similarity"]
    widget.status.setText("similarity to the mean of 1 cell(s)")
    QApplication.processEvents()
    save(viewer, out.with_name(out.stem + "_similarity.png"))
    viewer.close()


if __name__ == "__main__":
    main()
