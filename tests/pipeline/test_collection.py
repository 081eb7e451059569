"""Collections: stacks, folders and lists in one run; members equal single runs; failures,
resume and adding images; the DataTree; bad input."""

from __future__ import annotations

import inspect

import dask
import numpy as np
import pytest
import tifffile
import zarr

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.io.collection import read_members
from hrdv2_dask.pipeline.collection import shared_value_range
from hrdv2_dask.pipeline.members import list_members

SHAPE = (150, 170)


@pytest.fixture(scope="module")
def client(local_client):
    return local_client


def _stack(n: int = 6, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    planes = []
    for k in range(n):
        base = np.sin(xx / (7.0 + k)) + np.cos(yy / 5.0) + 2 + k  # each plane its own range
        planes.append(base * 2000 + rng.integers(0, 500, SHAPE))
    return np.stack(planes).astype(dtype)


def _kw(client, backbone=None, **extra):
    return dict(
        backbone=backbone or hd.MeanPool(),
        tile=140,
        dtype="float32",
        client=client,
        progress=False,
        **extra,
    )


class Counting(hd.MeanPool):
    """MeanPool that counts the window views it computes (in-process workers)."""

    calls = 0

    def forward(self, x):
        Counting.calls += x.shape[0]
        return super().forward(x)


@pytest.mark.parametrize("which", ["meanpool", "tiny"])
def test_stack_members_equal_single_runs(which, tmp_path, client, tiny_random_dinov2):
    stack = _stack()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZYX"})
    bb = hd.MeanPool() if which == "meanpool" else tiny_random_dinov2
    kw = _kw(client, bb, out_stride=2 if which == "tiny" else 1)
    tree = hd.extract_collection(path, tmp_path / "c.zarr", intensity="per-image", **kw)
    assert sorted(tree.children) == [f"z{k:03d}" for k in range(6)]
    ranges = set()
    for k in range(6):
        single = hd.extract(path, tmp_path / f"s{k}.zarr", plane=k, **kw)
        member = tree[f"z{k:03d}"]["features"]
        assert np.array_equal(single.values, member.values)  # bit-identical
        assert member.dims == single.dims and member.attrs == {
            **single.attrs,
            "source": member.attrs["source"],
        }
        np.testing.assert_array_equal(member.y, single.y)
        ranges.add(tuple(member.attrs["value_range"]))
    assert len(ranges) == 6  # per-image: each plane its own mapping
    assert all(r["status"] == "done" for r in tree.attrs["members"])


def test_shared_intensity_is_one_mapping(tmp_path, client):
    stack = _stack()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZYX"})
    tree = hd.extract_collection(path, tmp_path / "c.zarr", **_kw(client))  # stack: shared
    assert tree.attrs["settings"]["intensity"] == "shared"
    ranges = {tuple(tree[k]["features"].attrs["value_range"]) for k in tree.children}
    datas = [hd.open_image(path, plane=k).data for k in range(6)]
    assert ranges == {shared_value_range(datas)}
    lo, hi = ranges.pop()
    assert lo < stack[0].min() + 600 and hi > stack[-1].max() - 600  # spans all planes
    # the members equal single runs given that mapping
    single = hd.extract(path, tmp_path / "s.zarr", plane=4, value_range=(lo, hi), **_kw(client))
    assert np.array_equal(single.values, tree["z004"]["features"].values)


def _folder(tmp_path, n=3):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        np.save(folder / f"im{k}.npy", rng.integers(0, 256, SHAPE, dtype=np.uint8))
    return folder


def test_folder_with_a_corrupt_file(tmp_path, client):
    folder = _folder(tmp_path)
    (folder / "bad.tif").write_bytes(b"not a tiff at all")
    tree = hd.extract_collection(folder, tmp_path / "c.zarr", **_kw(client))
    rows = {r["key"]: r for r in tree.attrs["members"]}
    assert rows["bad"]["status"] == "failed"
    assert "Cannot read TIFF file" in rows["bad"]["error"] and "\n" not in rows["bad"]["error"]
    assert sorted(tree.children) == ["im0", "im1", "im2"]
    for k in range(3):
        single = hd.extract(folder / f"im{k}.npy", tmp_path / f"s{k}.zarr", **_kw(client))
        assert np.array_equal(single.values, tree[f"im{k}"]["features"].values)
    # a rerun leaves the failed member alone; retry_failed after the fix completes it
    tifffile.imwrite(folder / "bad.tif", np.full(SHAPE, 7, np.uint8))
    tree = hd.extract_collection(folder, tmp_path / "c.zarr", **_kw(client))
    assert "bad" not in tree.children
    tree = hd.extract_collection(folder, tmp_path / "c.zarr", retry_failed=True, **_kw(client))
    assert "bad" in tree.children and all(r["status"] == "done" for r in tree.attrs["members"])


def test_cli_exit_code_3_then_retry_failed(tmp_path, client, capsys):
    folder = _folder(tmp_path, n=2)
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "c.zarr"
    argv = ["features", str(folder), str(out), "--weights", "random", "--tile", "140"]
    argv += ["--model-option", "depth=1", "--quiet", "--device", "cpu"]
    argv += ["--scheduler", client.scheduler.address]
    assert main(argv) == 3
    text = capsys.readouterr().out
    assert "3 members, 2 done, 1 failed" in text and "failed bad" in text
    import PIL.Image

    PIL.Image.fromarray(np.zeros(SHAPE, np.uint8)).save(folder / "bad.png")
    assert main([*argv, "--retry-failed"]) == 0
    assert "3 done, 0 failed" in capsys.readouterr().out
    assert main(["info", str(out), "--table"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "key,source,shape,pixel_size,status,error,windows,seconds"
    assert [line.split(",")[0] for line in table[1:]] == ["bad", "im0", "im1"]
    assert all(",done," in line for line in table[1:])


def test_settings_no_member_can_use_fail_once_before_anything_is_written(tmp_path, client, capsys):
    folder, out = _folder(tmp_path), tmp_path / "c.zarr"
    for bad, words in [({"tile": 98}, "tile_px=98 is too small"), ({"components": 4}, "1..3")]:
        with pytest.raises(hd.ConfigError) as err:
            hd.extract_collection(folder, out, **{**_kw(client), **bad})
        assert words in str(err.value) and "\n" not in str(err.value)
        assert not out.exists()  # no root, no lock: the fixed rerun is not "other settings"
    argv = ["features", str(folder), str(out), "--weights", "random", "--tile", "98"]
    argv += ["--model-option", "depth=1", "--quiet", "--device", "cpu"]
    argv += ["--scheduler", client.scheduler.address]
    assert main(argv) == 2  # an error, once: not exit 3 with every member failed
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("hrdv2: error: tile_px=98 is too small")
    assert not out.exists()
    tree = hd.extract_collection(folder, out, **_kw(client))
    assert sorted(tree.children) == ["im0", "im1", "im2"]


def test_adding_a_file_computes_only_it(tmp_path, client):
    folder = _folder(tmp_path, n=3)
    paths = sorted(folder.glob("*.npy"))
    Counting.calls = 0
    hd.extract_collection(paths[:2], tmp_path / "c.zarr", **_kw(client, Counting()))
    first = Counting.calls
    Counting.calls = 0
    tree = hd.extract_collection(paths, tmp_path / "c.zarr", **_kw(client, Counting()))
    assert sorted(tree.children) == ["im0", "im1", "im2"]
    n_views = 9  # the default transforms: Moore shifts of 1 px plus identity
    rows = {r["key"]: r for r in tree.attrs["members"]}
    assert Counting.calls == rows["im2"]["windows"] * n_views
    assert first == (rows["im0"]["windows"] + rows["im1"]["windows"]) * n_views
    Counting.calls = 0
    hd.extract_collection(paths, tmp_path / "c.zarr", **_kw(client, Counting()))
    assert Counting.calls == 0  # complete: nothing to do
    with pytest.raises(hd.StoreError, match="other settings"):
        hd.extract_collection(paths, tmp_path / "c.zarr", **_kw(client, out_stride=2))


def test_open_collection_is_lazy_and_members_round_trip(tmp_path, client):
    folder = _folder(tmp_path, n=2)
    hd.extract_collection(folder, tmp_path / "c.zarr", **_kw(client))

    def refuse(*args, **kwargs):
        raise AssertionError("open_collection computed something")

    with dask.config.set(scheduler=refuse):
        tree = hd.open_collection(tmp_path / "c.zarr")
        assert tree["im0"]["features"].chunks is not None
    for key in ("im0", "im1"):
        fe = hd.open_features(tmp_path / "c.zarr" / key)
        got = tree[key]["features"]
        assert got.dims == ("feature", "y", "x") and fe.attrs == got.attrs
        assert np.array_equal(fe.values, got.values)
    assert tree.attrs["settings"]["intensity"] == "per-image"
    assert "intensity" in inspect.signature(hd.extract_collection).parameters


def test_list_with_a_missing_path_is_a_failed_member(tmp_path, client):
    folder = _folder(tmp_path, n=1)
    tree = hd.extract_collection(
        [folder / "im0.npy", tmp_path / "nope.png"], tmp_path / "c.zarr", **_kw(client)
    )
    rows = {r["key"]: r for r in read_members(tmp_path / "c.zarr")}
    assert rows["im0"]["status"] == "done" and rows["nope"]["status"] == "failed"
    assert "does not exist" in rows["nope"]["error"]
    assert list(tree.children) == ["im0"]


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(hd.InputError, match="holds no images"):
        list_members(tmp_path / "empty")
    with pytest.raises(hd.InputError, match="matches no file"):
        list_members(str(tmp_path / "*.tif"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,key\na.png,x\nb.png,y\nc.png,x\n")
    with pytest.raises(hd.InputError, match="rows 2 and 4 have the same key 'x'"):
        list_members(csv)
    txt = tmp_path / "list.txt"
    np.save(tmp_path / "a.npy", np.zeros(SHAPE, np.uint8))
    txt.write_text("# images\na.npy\n\nmissing.npy\n")
    members = list_members(txt)
    assert [m.key for m in members.members] == ["a", "missing"]
    assert members.members[0].error is None and "does not exist" in members.members[1].error


def test_plane_out_of_range_and_keys(tmp_path, capsys):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, _stack(3), metadata={"axes": "ZYX"}, photometric="minisblack")
    members = list_members(path)
    assert members.stack and [m.key for m in members.members] == ["z000", "z001", "z002"]
    code = main(["features", str(path), str(tmp_path / "o.zarr"), "--plane", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "plane=3 is out of range" in err and "between 0 and 2" in err
    with pytest.raises(hd.InputError, match="only Y, X and one channel axis"):
        hd.open_image(path)  # a single image's message is unchanged
    with pytest.raises(hd.ConfigError, match="extract_collection takes every plane"):
        hd.extract_collection(path, tmp_path / "c.zarr", plane=1)
    assert not (tmp_path / "c.zarr").exists()
    assert zarr is not None


_SLOW_COLLECTION = """
import sys, time, hrdv2_dask as hd

class Slow(hd.MeanPool):
    def forward(self, x):
        time.sleep(0.3)
        return super().forward(x)

b = Slow()
b.name = "meanpool_p14_s14"
hd.extract_collection(sys.argv[1], sys.argv[2], backbone=b, tile=140, dtype="float32", block=1,
                      progress=False, workers=1)
"""


def _blocks_done(store) -> int:
    total = 0
    for member in store.glob("im*"):
        try:
            total += int(zarr.open_group(member / "_run", mode="r")["done"][...].sum())
        except Exception:  # noqa: BLE001 - not created yet, or already finished
            continue
    return total


def test_killed_collection_resumes_to_the_same_stores(tmp_path, client):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = _folder(tmp_path, n=3)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_COLLECTION, str(folder), str(store)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _blocks_done(store) < 3:
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = read_members(store)
    assert not all(r["status"] == "done" for r in rows)
    kw = _kw(client, block=1)
    resumed = hd.extract_collection(folder, store, **kw)
    full = hd.extract_collection(folder, tmp_path / "full.zarr", **kw)
    assert sorted(resumed.children) == sorted(full.children) == ["im0", "im1", "im2"]
    for key in full.children:
        assert np.array_equal(resumed[key]["features"].values, full[key]["features"].values)
