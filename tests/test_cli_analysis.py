"""The analysis commands on a real (tiny) feature store, and `hrdv2 run`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.demo import make_sample_image

TINY = dict(embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory, local_client):
    root = tmp_path_factory.mktemp("cli")
    img = make_sample_image(224, cells=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        hd.extract(
            img,
            root / "f.zarr",
            weights="random",
            tile=112,
            out_stride=2,
            client=local_client,
            progress=False,
            model_options=TINY,
        )
    return root / "f.zarr"


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_pca_cluster_similarity_segment(store, tmp_path, capsys):
    assert main(["pca", str(store), str(tmp_path / "pca")]) == 0
    assert _png(tmp_path / "pca" / "pca.png").shape == (112, 112, 3)
    assert main(["cluster", str(store), str(tmp_path / "k"), "-k", "3"]) == 0
    assert len(np.unique(_png(tmp_path / "k" / "clusters.png").reshape(-1, 3), axis=0)) > 1
    assert main(["similarity", str(store), str(tmp_path / "s"), "--point", "10,20"]) == 0
    assert _png(tmp_path / "s" / "similarity.png").std() > 0
    labels = np.zeros((224, 224), np.uint8)
    labels[20:24, 10:100] = 1
    labels[180:184, 100:200] = 2
    Image.fromarray(labels).save(tmp_path / "labels.png")
    code = main(["segment", str(store), str(tmp_path / "labels.png"), str(tmp_path / "seg")])
    assert code == 0
    out = capsys.readouterr().out
    assert "train_accuracy" in out and "holdout_accuracy" in out
    assert _png(tmp_path / "seg" / "segmentation.png").shape == (112, 112, 3)


def test_similarity_out_of_range_is_one_line(store, tmp_path, capsys):
    code = main(["similarity", str(store), str(tmp_path / "s"), "--point", "500,5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hrdv2: error:") and "500" in err and "\n" not in err


def test_run_workflow_file(tmp_path):
    wf = {
        "input": "sample",
        "sample_size": 160,
        "output_dir": "out",
        "features": {"weights": "random", "tile": 112, "out_stride": 4, "model_options": TINY},
        "analyses": [{"pca": {}}, {"cluster": {"k": 3}}],
    }
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        assert main(["run", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["random_weights"] is True and len(summary["analyses"]) == 2
    assert _png(tmp_path / "out" / "clusters.png").shape == (40, 40, 3)


def test_faults_while_writing_or_reading_are_one_line(store, tmp_path, capsys, monkeypatch):
    """A full disk under the results, and a damaged feature chunk: one line each, exit 2."""
    import errno
    import os
    import shutil

    from zarr.storage import LocalStore

    original = LocalStore.set

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.root}/{key}")

    monkeypatch.setattr(LocalStore, "set", full)
    assert main(["pca", str(store), str(tmp_path / "pca")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hrdv2: error: Cannot write results folder {str(tmp_path / 'pca')!r}")
    assert "no space left on its device" in err
    monkeypatch.setattr(LocalStore, "set", original)
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    chunk = next(p for p in (damaged / "features" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\xff" * 64)
    assert main(["pca", str(damaged), str(tmp_path / "pca2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hrdv2: error: Cannot read feature store {str(damaged)!r}")
    assert str(chunk) in err and "cannot be read" in err
