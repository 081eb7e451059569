"""The writer lock: a second writer is refused naming the holder, stale locks are taken over,
readers never need it and ``--overwrite`` never deletes a store that a live run holds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.errors import StoreBusyError
from hrdv2_dask.io.lock import LOCK_NAME, WriterLock

_HOLD = textwrap.dedent(
    """
    import sys, time
    from hrdv2_dask.io.lock import WriterLock
    lock = WriterLock(sys.argv[1], command="hrdv2 features held.npy " + sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture()
def holder(tmp_path):
    """Start a real second process that holds the lock of a store; yield (store, process)."""
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


def _extract(store, client, **options):
    img = np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        return hd.extract(
            img,
            store,
            backbone=hd.MeanPool(14, 14),
            tile=112,
            dtype="float32",
            shifts=(1,),
            progress=False,
            client=client,
            **options,
        )


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, holder):
    store = tmp_path / "s.zarr"
    proc = holder(store)
    with pytest.raises(StoreBusyError) as err:
        WriterLock(store).acquire()
    msg = str(err.value)
    assert "\n" not in msg and f"pid {proc.pid} on host {socket.gethostname()}" in msg
    assert "command 'hrdv2 features held.npy" in msg and "since 20" in msg
    # the holder's lock is untouched
    assert json.loads((store / LOCK_NAME).read_text())["pid"] == proc.pid


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, holder, caplog):
    store = tmp_path / "s.zarr"
    proc = holder(store)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level("WARNING", logger="hrdv2_dask.io.lock"), WriterLock(store) as lock:
        assert lock.read()["pid"] == os.getpid()
    assert f"its process {proc.pid} on {socket.gethostname()} is gone" in caplog.text
    assert not (store / LOCK_NAME).exists()  # released


def _foreign_lock(store, age_s: float) -> None:
    store.mkdir()
    holder = {"host": "elsewhere", "pid": 1, "user": "u", "started": "T", "command": "c"}
    (store / LOCK_NAME).write_text(json.dumps({**holder, "time": time.time() - age_s}))


def test_a_lock_from_another_host_is_taken_over_only_when_old(tmp_path, caplog):
    young, old = tmp_path / "young.zarr", tmp_path / "old.zarr"
    _foreign_lock(young, 60)
    _foreign_lock(old, 7200)
    with pytest.raises(StoreBusyError, match="pid 1 on host elsewhere"):
        WriterLock(young, stale_after_s=3600).acquire()
    with (
        caplog.at_level("WARNING", logger="hrdv2_dask.io.lock"),
        WriterLock(old, stale_after_s=3600),
    ):
        pass
    assert "held from another host (elsewhere)" in caplog.text
    assert not (old / LOCK_NAME).exists() and old.is_dir()  # not our folder: kept


def test_overwrite_never_deletes_a_store_that_a_live_run_holds(
    tmp_path, holder, capsys, local_client
):
    store = tmp_path / "s.zarr"
    before = _extract(store, local_client).values
    assert not (store / LOCK_NAME).exists()  # released at the end
    proc = holder(store)
    with pytest.raises(StoreBusyError):
        _extract(store, local_client, overwrite=True, out_stride=2)
    # the CLI: one line, exit 2, before any cluster starts
    np.save(tmp_path / "img.npy", np.zeros((120, 150, 3), np.uint8))
    tiny = ["--model-option", "embed_dim=64", "--model-option", "depth=1"]
    tiny += ["--model-option", "num_heads=4", "--weights", "random"]
    argv = ["features", str(tmp_path / "img.npy"), str(store), *tiny, "--overwrite", "--quiet"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("hrdv2: error: Store ") and f"pid {proc.pid}" in err
    # readers never need the lock, and the store is intact
    np.testing.assert_array_equal(hd.open_features(store).values, before)


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch, local_client):
    from hrdv2_dask.pipeline import extraction

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(extraction, "_execute", fail)
    store = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="planted"):
        _extract(store, local_client)
    assert not (store / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("code", "words"), [(30, "the file system is read-only"), (13, "permission denied")]
)
def test_a_store_whose_lock_cannot_be_made_is_one_line(code, words, tmp_path, monkeypatch):
    from hrdv2_dask.errors import StoreWriteError

    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreWriteError) as err:
        WriterLock(store).acquire()
    msg = str(err.value)
    assert msg.startswith(f"Cannot write feature store {str(store)!r}: {words}") and "\n" not in msg
    assert not store.exists()  # the folder it made is removed again
