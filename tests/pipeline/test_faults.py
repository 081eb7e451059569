"""Faults during a run end in one line, leave the store incomplete and resumable, and the rerun
after the fix is bit-identical to an uninterrupted run: real corrupt TIFF tiles, a store that
fails after N bytes (no space, read-only, permission denied), a failing worker task."""

from __future__ import annotations

import errno
import warnings

import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.errors import (
    IncompleteStoreError,
    RunError,
    SourceReadError,
    StoreWriteError,
)
from hrdv2_dask.io import nodes
from hrdv2_dask.pipeline.faults import describe_fault


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(5)
    # taller than one 512-px source chunk: the blocks above the damaged bottom tile are read
    img = rng.integers(0, 256, (1100, 240, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:1100, 0:240]
    img[..., 0] = ((np.sin(xx / 9.0) + np.cos(yy / 13.0)) * 60 + 128).astype(np.uint8)
    return img


def _extract(source, store, client, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        return hd.extract(
            source,
            store,
            backbone=hd.MeanPool(14, 14),
            tile=168,
            overlap=84,
            shifts=(1,),
            dtype="float32",
            out_stride=4,
            client=client,
            progress=False,
            **options,
        )


@pytest.fixture(scope="module")
def reference(image, tmp_path_factory, local_client) -> np.ndarray:
    """The features of an uninterrupted run."""
    return _extract(image, tmp_path_factory.mktemp("ref") / "r.zarr", local_client).values


def _tiff(path, image) -> tuple[int, bytes]:
    """A tiled, deflate-compressed TIFF; the offset and bytes of its last tile."""
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, count = page.dataoffsets[-1], page.databytecounts[-1]
    with open(path, "rb") as f:
        f.seek(off)
        return off, f.read(count)


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _incomplete(store) -> None:
    with pytest.raises(IncompleteStoreError):
        hd.open_features(store)


def test_a_corrupt_tile_names_the_file_and_region_and_the_rerun_resumes(
    image, reference, tmp_path, local_client
):
    src, store = tmp_path / "slide.tif", tmp_path / "s.zarr"
    offset, good = _tiff(src, image)
    _overwrite(src, offset, b"\xff" * len(good))
    with pytest.raises(SourceReadError) as err:
        _extract(src, store, local_client)
    msg = str(err.value)
    assert "\n" not in msg and f"{str(src)!r}" in msg
    assert "Cannot read rows " in msg and "cols " in msg and "DeflateError" in msg
    done = zarr.open_group(store, mode="r")["_run"]["done"][...]
    assert 0 < done.sum() < done.size  # the blocks before the damaged tile are kept
    _incomplete(store)
    _overwrite(src, offset, good)  # the file repaired
    np.testing.assert_array_equal(_extract(src, store, local_client).values, reference)


class _Faulty:
    """Patch LocalStore.set and the store's own file writes (io.nodes.write_file): raise
    OSError(code) once ``limit`` bytes of matching keys (paths inside the ``.zarr`` store) are
    written (a full disk, a read-only or forbidden folder reached mid-run)."""

    def __init__(self, monkeypatch, code: int, *, limit: int = 0, match=lambda k, v: True):
        self.written, self.code, self.limit, self.match = 0, code, limit, match
        original, original_file = LocalStore.set, nodes.write_file

        def check(key: str, data: bytes, path: str) -> None:
            if self.match(key, data):
                self.written += len(data)
                if self.written > self.limit:
                    raise OSError(self.code, os.strerror(self.code), path)

        async def set_(store, key, value):
            check(key, value.to_bytes(), f"{store.root}/{key}")
            return await original(store, key, value)

        def write_file(path, data, **kw):
            check(str(path).rsplit(".zarr/", 1)[-1], data, str(path))
            return original_file(path, data, **kw)

        monkeypatch.setattr(LocalStore, "set", set_)
        monkeypatch.setattr(nodes, "write_file", write_file)

        def undo():
            monkeypatch.setattr(LocalStore, "set", original)
            monkeypatch.setattr(nodes, "write_file", original_file)

        self.undo = undo


import os  # noqa: E402 - used by _Faulty


def test_no_space_left_mid_run_says_how_much_and_the_rerun_resumes(
    image, reference, tmp_path, local_client, monkeypatch
):
    store = tmp_path / "s.zarr"
    faulty = _Faulty(
        monkeypatch, errno.ENOSPC, limit=100_000, match=lambda k, v: k.startswith("features/c")
    )
    with pytest.raises(StoreWriteError) as err:
        _extract(image, store, local_client)
    msg = str(err.value)
    assert "\n" not in msg and f"Cannot write feature store {str(store)!r}" in msg
    assert "no space left on its device" in msg and " GB free on " in msg
    assert "still writes up to" in msg and "rerun the same command to resume" in msg
    _incomplete(store)
    faulty.undo()
    np.testing.assert_array_equal(_extract(image, store, local_client).values, reference)


@pytest.mark.parametrize(
    ("code", "words"), [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")]
)
def test_a_read_only_or_forbidden_store_is_one_line(
    code, words, image, reference, tmp_path, local_client, monkeypatch
):
    store = tmp_path / "s.zarr"
    faulty = _Faulty(monkeypatch, code, match=lambda k, v: k.startswith("features/c"))
    with pytest.raises(StoreWriteError, match=words):
        _extract(image, store, local_client)
    faulty.undo()
    np.testing.assert_array_equal(_extract(image, store, local_client).values, reference)


@pytest.mark.parametrize("where", ["create", "completion"])
def test_a_fault_writing_attrs_or_the_completion_marker_is_resumable(
    where, image, reference, tmp_path, local_client, monkeypatch
):
    store = tmp_path / "s.zarr"
    if where == "create":  # the very first write: the group's attrs
        match = lambda k, v: k == "zarr.json"  # noqa: E731
    else:  # the last one: "complete": true
        match = lambda k, v: k == "zarr.json" and b'"complete": true' in v  # noqa: E731
    faulty = _Faulty(monkeypatch, errno.ENOSPC, match=match)
    with pytest.raises(StoreWriteError, match="no space left"):
        _extract(image, store, local_client)
    faulty.undo()
    if store.exists() and (store / "zarr.json").exists():
        _incomplete(store)
    np.testing.assert_array_equal(_extract(image, store, local_client).values, reference)


def test_a_failing_worker_task_relays_the_original_error(
    image, tmp_path, local_client, monkeypatch
):
    from hrdv2_dask.pipeline import graph

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (planted)")

    monkeypatch.setattr(graph, "highres_features", boom)
    store = tmp_path / "s.zarr"
    with pytest.raises(RunError) as err:
        _extract(image, store, local_client)
    msg = str(err.value)
    assert "RuntimeError: CUDA out of memory (planted)" in msg and "KilledWorker" not in msg
    assert f"{str(store)!r}" in msg and "\n" not in msg
    _incomplete(store)


def test_the_mapping_of_real_os_errors(tmp_path):
    for code, words in [
        (errno.ENOSPC, "no space left on its device"),
        (errno.EROFS, "the file system is read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "permission denied"),
    ]:
        err = OSError(code, os.strerror(code), str(tmp_path / "s.zarr" / "c"))
        msg = str(describe_fault(err, store=tmp_path / "s.zarr"))
        assert words in msg and "(" + str(tmp_path / "s.zarr" / "c") + ")" in msg
    assert isinstance(describe_fault(OSError(errno.ENOSPC, "x"), store=tmp_path), OSError)
    assert "ValueError: bad" in str(describe_fault(ValueError("bad"), store=tmp_path))


def test_the_cli_prints_one_line_and_exits_2(image, tmp_path, capsys):
    src, store = tmp_path / "slide.tif", tmp_path / "s.zarr"
    offset, good = _tiff(src, image[:150, :180].copy())
    _overwrite(src, offset, b"\xff" * len(good))
    tiny = ["--model-option", "embed_dim=32", "--model-option", "depth=1"]
    tiny += ["--model-option", "num_heads=2", "--weights", "random", "--tile", "112"]
    rc = main(["features", str(src), str(store), *tiny, "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("hrdv2: error: Cannot read rows ") and str(src) in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_damaged_mask_file_is_one_line_naming_it(image, tmp_path, local_client):
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[100:900, 40:200] = 255
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, mask, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    _overwrite(path, offset, b"\xff" * count)
    store = tmp_path / "s.zarr"
    with pytest.raises(SourceReadError) as err:
        _extract(image, store, local_client, mask=str(path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("Cannot read rows 0:1100, cols 0:240 of mask file ")
    assert str(path) in msg and "save the mask again" in msg
    assert not (store / "zarr.json").exists()  # nothing written before the plan was made


def test_after_a_fault_no_block_task_is_left_running(image, tmp_path, local_client, monkeypatch):
    """A block task fails while the next one (ready beside it) takes a while: when the error
    reaches the caller, no worker still runs a task (it would write under the next run, and its
    aborted writes print noise above the error line when the cluster closes)."""
    import threading
    import time

    from hrdv2_dask.pipeline import graph

    original, calls, lock = graph.highres_features, [0], threading.Lock()

    def planted(*args, **kwargs):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 2:
            raise RuntimeError("planted fault")
        if n > 2:
            time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(graph, "highres_features", planted)
    with pytest.raises(RunError, match="planted fault"):
        _extract(image, tmp_path / "s.zarr", local_client, block=1)
    executing = local_client.run(lambda dask_worker: dask_worker.state.executing_count)
    assert calls[0] > 2 and not any(executing.values())
