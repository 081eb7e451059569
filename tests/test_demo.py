"""The demo runs end to end (small, random weights, marked) and writes real pictures."""

from __future__ import annotations

import json
import warnings

import numpy as np
from PIL import Image

import hrdv2_dask as hd
from hrdv2_dask.demo import make_sample_image, run_demo


def test_sample_image_has_structure():
    img = make_sample_image(256, cells=6)
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8
    assert img.std() > 20


def test_demo_end_to_end(tmp_path, local_client):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        summary = run_demo(
            tmp_path,
            size=224,
            weights="random",
            client=local_client,
            progress=False,
            model_options=dict(embed_dim=64, depth=2, num_heads=4),
        )
    assert summary["random_weights"] is True
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    feats = hd.open_features(summary["features"])
    assert feats.shape == (64, 56, 56) and feats.attrs["random_weights"] is True
    pca = np.asarray(Image.open(tmp_path / "pca.png").convert("RGB"))
    assert pca.shape == (56, 56, 3) and pca.std() > 1
    clusters = np.asarray(Image.open(tmp_path / "clusters.png").convert("RGB"))
    assert clusters.shape == (56, 56, 3) and len(np.unique(clusters.reshape(-1, 3), axis=0)) > 1
    assert (tmp_path / "pca.ome.zarr").is_dir() and (tmp_path / "clusters.zarr").is_dir()
    sample = np.asarray(Image.open(tmp_path / "sample.png"))
    assert sample.shape == (224, 224, 3) and sample.std() > 1
