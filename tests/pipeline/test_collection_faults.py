"""Collections take the writer lock of single-image runs and end a fault of the store in one
line (exit 2), resumable; a member that cannot be read stays that member's failure."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
from zarr.storage import LocalStore

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.errors import StoreBusyError, StoreWriteError
from hrdv2_dask.io.collection import read_members
from hrdv2_dask.io.lock import LOCK_NAME

SHAPE = (150, 170)

_HOLD = textwrap.dedent(
    """
    import sys, time
    from hrdv2_dask.io.lock import WriterLock
    WriterLock(sys.argv[1], command="hrdv2 features imgs/ " + sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture()
def holder():
    """A real second process holding a store's writer lock."""
    procs = []

    def start(store):
        p = subprocess.Popen(
            [sys.executable, "-c", _HOLD, str(store)], stdout=subprocess.PIPE, text=True
        )
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()


def _folder(tmp_path, n: int = 3):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        np.save(folder / f"im{k}.npy", rng.integers(0, 256, SHAPE, dtype=np.uint8))
    return folder


def _kw(client, **extra):
    options = dict(backbone=hd.MeanPool(), tile=140, dtype="float32", progress=False)
    return {**options, "client": client, **extra}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, local_client):
    """An uninterrupted collection of three images."""
    root = tmp_path_factory.mktemp("ref")
    tree = hd.extract_collection(_folder(root), root / "c.zarr", **_kw(local_client))
    return {k: tree[k]["features"].values for k in tree.children}


def test_a_second_writer_is_refused_and_overwrite_deletes_nothing(
    tmp_path, holder, capsys, local_client
):
    folder, store = _folder(tmp_path), tmp_path / "c.zarr"
    hd.extract_collection(folder, store, **_kw(local_client))
    assert not (store / LOCK_NAME).exists()  # released at the end
    proc = holder(store)
    with pytest.raises(StoreBusyError, match=f"pid {proc.pid} on host "):
        hd.extract_collection(folder, store, **_kw(local_client, overwrite=True, tile=168))
    argv = ["features", str(folder), str(store), "--model", "filterbank", "--overwrite"]
    assert main([*argv, "--tile", "224", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hrdv2: error: Store {str(store)!r} is being written by another run")
    assert f"pid {proc.pid}" in err and "hrdv2 features imgs/" in err
    # the live run's store is intact: every member still done and readable
    assert [r["status"] for r in read_members(store)] == ["done"] * 3
    assert sorted(hd.open_collection(store).children) == ["im0", "im1", "im2"]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, holder, caplog, local_client):
    folder, store = _folder(tmp_path, n=2), tmp_path / "c.zarr"
    proc = holder(store)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level("WARNING", logger="hrdv2_dask.io.lock"):
        tree = hd.extract_collection(folder, store, **_kw(local_client))
    assert f"its process {proc.pid} on {socket.gethostname()} is gone" in caplog.text
    assert sorted(tree.children) == ["im0", "im1"] and not (store / LOCK_NAME).exists()


def test_no_space_mid_run_ends_it_in_one_line_and_the_rerun_completes(
    tmp_path, reference, local_client, monkeypatch
):
    folder, store = _folder(tmp_path), tmp_path / "c.zarr"
    written, original = [0], LocalStore.set

    async def set_(self, key, value):
        if "/features/c/" in f"{self.root}/{key}":  # a member's feature chunks
            written[0] += 1
            if written[0] > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{self.root}/{key}")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_)
    with pytest.raises(StoreWriteError) as err:
        hd.extract_collection(folder, store, **_kw(local_client, block=1))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"Cannot write collection store {str(store)!r}")
    assert "no space left on its device" in msg and "members done are kept" in msg
    rows = read_members(store)
    assert "failed" not in {r["status"] for r in rows}  # not the members' fault
    assert not (store / LOCK_NAME).exists()
    monkeypatch.setattr(LocalStore, "set", original)
    tree = hd.extract_collection(folder, store, **_kw(local_client, block=1))
    assert sorted(tree.children) == sorted(reference)
    for key, values in reference.items():
        np.testing.assert_array_equal(tree[key]["features"].values, values)


def test_a_corrupt_tile_of_one_member_fails_only_that_member(
    tmp_path, reference, local_client, caplog
):
    folder = _folder(tmp_path)
    img = np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)
    path = folder / "slide.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[-1], tf.pages[0].databytecounts[-1]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    with caplog.at_level("DEBUG", logger="hrdv2_dask.pipeline.collection"):
        tree = hd.extract_collection(folder, tmp_path / "c.zarr", **_kw(local_client))
    packs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("packed ")]
    assert any("slide" in p and "," in p for p in packs), packs  # it shared its task
    rows = {r["key"]: r for r in tree.attrs["members"]}
    assert rows["slide"]["status"] == "failed"
    assert "Cannot read rows " in rows["slide"]["error"] and str(path) in rows["slide"]["error"]
    assert sorted(tree.children) == sorted(reference)
    for key, values in reference.items():  # its pack's other member too
        np.testing.assert_array_equal(tree[key]["features"].values, values)
