"""Make docs/napari_reader.png: a PCA layer (out_stride 7) opened by the plugin over its source.

Run headless from the repository root (needs the ``napari`` extra and the micrographs of
../shared/data)::

    xvfb-run -a -s "-screen 0 1280x1024x24" python docs/napari_screenshot.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import napari
import npe2
import numpy as np
from dask.distributed import Client
from PIL import Image

import hrdv2_dask as hd
from hrdv2_dask.analysis import fit_pca
from hrdv2_dask.analysis.pca import write_pca

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "micrographs" / "sofc.jpg"


def main(out: Path = REPO / "docs" / "napari_reader.png") -> None:
    work = Path(tempfile.mkdtemp())
    image = np.asarray(Image.open(SOURCE).convert("RGB"))[:448, :640]
    with Client(processes=False, n_workers=1, threads_per_worker=2) as client:
        feats = hd.extract(
            image,
            work / "f.zarr",
            backbone=hd.MeanPool(14, 7),
            out_stride=7,
            tile=224,
            dtype="float32",
            client=client,
            progress=False,
        )
        write_pca(fit_pca(feats, components=3, n_samples=5000), feats, work / "pca")
    pm = npe2.PluginManager.instance()
    if "hrdv2-dask" not in pm._manifests:  # a checkout not installed with its entry point
        pm.register(npe2.PluginManifest.from_file(REPO / "hrdv2_dask" / "napari.yaml"))
    viewer = napari.Viewer(show=False)
    viewer.add_image(image, name=f"source ({SOURCE.name})", rgb=True)
    viewer.open(str(work / "pca" / "pca.zarr"), plugin="hrdv2-dask")
    viewer.layers[-1].opacity = 0.6
    viewer.window.resize(1000, 760)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(shot[..., :3]).quantize(128).save(out, optimize=True)
    viewer.close()


if __name__ == "__main__":
    main()
