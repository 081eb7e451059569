"""Live progress: the bar moves per window as workers report them, never past the total, with
moving rates and a final line."""

from __future__ import annotations

import logging

import numpy as np

import hrdv2_dask as hd
from hrdv2_dask.pipeline import execute
from hrdv2_dask.pipeline.progress import Progress


def test_events_and_finished_tasks_count_once_and_never_past_the_total(caplog):
    bar = Progress(None, None, total=10, desc="windows", megapixels=2.0, enabled=False)
    bar._on_event((0.0, 3))
    assert bar.n == 3
    bar.task_done(4)  # a task of 4 windows (3 of them already reported) finished
    assert bar.n == 4
    for _ in range(5):
        bar._on_event((0.0, 3))  # a rerun task reports its windows again
    assert bar.n == 10 and bar.updates[-1][1] == 10
    assert "win/s" in bar.bar.postfix and "MP/s" in bar.bar.postfix
    with caplog.at_level(logging.INFO, logger="hrdv2_dask.pipeline.progress"):
        bar.close()
    assert "windows: 10 windows in " in caplog.text and " MP/s" in caplog.text


def test_a_single_block_task_moves_the_bar_window_by_window(tmp_path, local_client, monkeypatch):
    bars: list[Progress] = []

    class Recording(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(execute, "Progress", Recording)
    img = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    hd.extract(
        img,
        tmp_path / "s.zarr",
        backbone=hd.MeanPool(14, 14),
        tile=112,
        shifts=(1,),
        out_stride=4,
        block=16,  # one block task holds every window
        client=local_client,
        progress=False,
    )
    (bar,) = [b for b in bars if b.desc == "windows"]
    assert bar.n == bar.total > 4
    # without worker events a single task would give one jump to the total
    before_end = [n for _, n in bar.updates if n < bar.total]
    assert len(before_end) >= bar.total - 2, bar.updates
    assert [n for _, n in bar.updates] == sorted({n for _, n in bar.updates})


def test_a_collection_has_one_bar_over_every_members_windows(tmp_path, local_client, monkeypatch):
    bars: list[Progress] = []

    class Recording(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(execute, "Progress", Recording)
    rng = np.random.default_rng(1)
    folder = tmp_path / "f"
    folder.mkdir()
    for k in range(3):
        np.save(folder / f"im{k}.npy", rng.integers(0, 256, (160, 200, 3), dtype=np.uint8))
    (folder / "broken.npy").write_bytes(b"not numpy")
    hd.extract_collection(
        folder,
        tmp_path / "c.zarr",
        backbone=hd.MeanPool(14, 14),
        tile=112,
        shifts=(1,),
        out_stride=4,
        block=16,  # one block task per member
        client=local_client,
        progress=False,
    )
    (bar,) = [b for b in bars if b.desc == "windows"]
    assert len(bar.topics) == 3 and bar.n == bar.total > 3 * 4
    # every member's windows move the bar, not only its task's end (3 jumps)
    assert len([n for _, n in bar.updates if n < bar.total]) >= bar.total - 6, bar.updates
    assert bar.text.endswith("members: 3/4 done, 1 failed") and "win/s" in bar.text


def test_the_status_text_follows_the_members():
    rows = [{"status": "pending"}, {"status": "pending"}]
    bar = Progress(None, None, total=4, desc="windows", enabled=False, status=lambda: str(rows))
    rows[0] = {"status": "done"}
    bar.task_done(2)
    assert "'done'" in bar.text
    rows[1] = {"status": "failed"}
    bar.task_done(0)  # no window more: the text changes all the same
    assert "'failed'" in bar.text
