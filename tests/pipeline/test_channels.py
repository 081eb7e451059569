"""Images of more than 4 channels: ``channels`` picks up to three (R, G, B in that order), one
option for Python, the CLI and YAML; without it the run fails in one line listing them."""

from __future__ import annotations

import numpy as np
import pytest

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.config import FeatureSettings
from hrdv2_dask.io.collection import read_members
from hrdv2_dask.io.readers import open_image


@pytest.fixture(scope="module")
def client(local_client):
    return local_client


def _kw(client, **extra):
    return dict(
        backbone=hd.MeanPool(), tile=140, dtype="float32", client=client, progress=False, **extra
    )


def _five(seed: int = 0) -> np.ndarray:
    """A (5, 150, 160) uint16 CYX image, each channel its own pattern and range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:160]
    planes = [(np.sin(xx / (5 + c)) + np.cos(yy / (3 + c)) + 2) * 1000 * (c + 1) for c in range(5)]
    return (np.stack(planes) + rng.integers(0, 300, (5, 150, 160))).astype(np.uint16)


def test_open_image_picks_channels_in_order():
    img = _five()
    data, meta = open_image(img, "CYX", channels=(4, 0, 2))
    assert np.array_equal(data.compute(), np.moveaxis(img[[4, 0, 2]], 0, -1))
    assert meta.channels == (4, 0, 2) and meta.shape == (150, 160, 3)
    assert meta.to_dict()["channels"] == [4, 0, 2]
    assert "channels" not in open_image(img, "CYX")[1].to_dict()  # other stores unchanged
    two, meta = open_image(img, "CYX", channels=(3, 1))
    assert meta.shape[2] == 3 and not two[..., 2].any().compute()  # B is zero
    for bad, what in [((5,), "channel 5 does not exist"), ((1, 1), "picked twice")]:
        with pytest.raises(hd.InputError, match=what) as err:
            open_image(img, "CYX", channels=bad)
        assert "0, 1, 2, 3, 4" in str(err.value) and "\n" not in str(err.value)


def test_the_option_is_one_definition():
    assert FeatureSettings(channels=[0, 2, 4]).channels == (0, 2, 4)
    assert FeatureSettings.from_dict({"channels": [1]}).channels == (1,)
    for bad in ([0, 1, 2, 3], [], [2, 2], [-1]):
        with pytest.raises(hd.ConfigError, match="channels"):
            FeatureSettings(channels=bad)


def test_more_than_four_channels_need_channels(tmp_path, client, capsys):
    img = _five()
    np.save(tmp_path / "five.npy", img)
    with pytest.raises(hd.InputError) as err:
        hd.extract(img, tmp_path / "a.zarr", axes="CYX", **_kw(client))
    msg = str(err.value)
    assert "5 channels (0, 1, 2, 3, 4)" in msg and "--channels" in msg and "\n" not in msg
    assert not (tmp_path / "a.zarr").exists()  # refused before anything is written

    picked = hd.extract(img, tmp_path / "p.zarr", axes="CYX", channels=(0, 2, 4), **_kw(client))
    rgb = np.ascontiguousarray(np.moveaxis(img[[0, 2, 4]], 0, -1))
    ref = hd.extract(rgb, tmp_path / "rgb.zarr", **_kw(client))
    assert np.array_equal(picked.values, ref.values)
    assert picked.attrs["channels"] == [0, 2, 4] and picked.attrs["source"]["channels"] == [0, 2, 4]
    assert "channels" not in ref.attrs
    with pytest.raises(hd.StoreError, match="channels"):  # other channels: other settings
        hd.extract(img, tmp_path / "p.zarr", axes="CYX", channels=(1, 2, 4), **_kw(client))

    # the command line: one line and exit 2 without --channels; the same values with it
    cli = ["--weights", "random", "--model-option", "depth=1", "--tile", "140", "--quiet"]
    cli += ["--dtype", "float32", "--device", "cpu", "--scheduler", client.scheduler.address]
    out = str(tmp_path / "cli.zarr")
    assert main(["features", str(tmp_path / "five.npy"), out, "--axes", "CYX", *cli]) == 2
    err_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "5 channels (0, 1, 2, 3, 4)" in err_line
    argv = ["features", str(tmp_path / "five.npy"), out, "--axes", "CYX", "--channels", "0,2,4"]
    with pytest.warns(hd.RandomWeightsWarning):
        assert main([*argv, *cli]) == 0
        np.save(tmp_path / "rgb.npy", rgb)
        assert main(["features", str(tmp_path / "rgb.npy"), str(tmp_path / "r.zarr"), *cli]) == 0
    assert np.array_equal(hd.open_features(out).values, hd.open_features(tmp_path / "r.zarr"))


def test_a_five_channel_member_fails_alone(tmp_path, client):
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "five.npy", _five())
    np.save(folder / "rgb.npy", _five(1)[:3])
    hd.extract_collection(folder, tmp_path / "c.zarr", axes="CYX", **_kw(client))
    rows = {r["key"]: r for r in read_members(tmp_path / "c.zarr")}
    assert rows["rgb"]["status"] == "done" and rows["five"]["status"] == "failed"
    assert "5 channels (0, 1, 2, 3, 4)" in rows["five"]["error"]
    tree = hd.extract_collection(
        folder, tmp_path / "d.zarr", channels=(2, 1, 0), axes="CYX", **_kw(client)
    )
    assert sorted(tree.children) == ["five", "rgb"]
    assert tree.attrs["settings"]["channels"] == [2, 1, 0]
