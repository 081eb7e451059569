"""The gigapixel pipeline: tiled = whole, determinism, seams, resume, laziness, bad input."""

from __future__ import annotations

import shutil
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client, LocalCluster

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.tiling import plan_tiles, read_window

TINY = dict(embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def client(local_client):
    return local_client


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    # some structure on top of the noise so seams would show
    yy, xx = np.mgrid[0:700, 0:900]
    img[..., 0] = ((np.sin(xx / 17.0) + np.cos(yy / 23.0)) * 60 + 128).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def tiny_backbone(tiny_random_dinov2):
    return tiny_random_dinov2


def _read(store) -> np.ndarray:
    return zarr.open_group(store, mode="r")["features"][...]


def test_tiled_equals_whole_with_meanpool(image, tmp_path, client):
    mp = hd.MeanPool(14, 14)
    ts = hd.shifts((1, 2))
    out = hd.extract(
        image,
        tmp_path / "f.zarr",
        backbone=mp,
        transforms=ts,
        tile=196,
        dtype="float32",
        client=client,
        progress=False,
    )
    assert out.dims == ("feature", "y", "x") and out.shape == (3, 700, 900)
    whole = hd.highres_features(hd.normalize(image), mp, ts).numpy()
    band = 21 + ts.max_shift_px  # 1.5 patches plus the largest shift
    pad_x = 910 - 900  # the whole-image run pads the right edge to a multiple of 14
    inner = (slice(None), slice(band, 700 - band), slice(band, 900 - band - pad_x))
    got = out.values[inner]
    ref = whole[inner]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_tiled_equals_whole_at_out_stride(image, tmp_path, client):
    mp = hd.MeanPool(14, 7)
    out = hd.extract(
        image[:420, :490],
        tmp_path / "f.zarr",
        backbone=mp,
        tile=182,
        out_stride=7,
        dtype="float32",
        client=client,
        progress=False,
    )
    whole = hd.highres_features(hd.normalize(image[:420, :490]), mp, out_stride=7).numpy()
    assert out.shape == whole.shape == (3, 60, 70)
    got, ref = out.values[:, 4:-4, 4:-4], whole[:, 4:-4, 4:-4]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_deterministic_across_workers_and_source_chunks(image, tmp_path, tiny_backbone):
    """Bit-identical stores, estimates included (positional artefact and PCA, made on the
    workers), with 1 or 3 worker processes and any chunking of the source."""
    src = image[:300, :400]
    kw = dict(
        backbone=tiny_backbone,
        tile=140,
        out_stride=2,
        dtype="float32",
        progress=False,
        debias=5,
        components=6,
    )
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c1,
        Client(c1) as cl,
    ):
        hd.extract(src, tmp_path / "one.zarr", client=cl, block=1, **kw)
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c3,
        Client(c3) as cl,
    ):
        hd.extract(
            da.from_array(src, chunks=(77, 91, 3)),
            tmp_path / "three.zarr",
            client=cl,
            block=1,
            **kw,
        )
    a, b = _read(tmp_path / "one.zarr"), _read(tmp_path / "three.zarr")
    assert a.shape[0] == 6 and np.isfinite(a).all()
    assert np.array_equal(a, b)
    one, three = hd.open_features(tmp_path / "one.zarr"), hd.open_features(tmp_path / "three.zarr")
    assert one.attrs["projection_components"] == three.attrs["projection_components"]


def _seam_ratio(f: np.ndarray, boundaries: list[int]) -> float:
    """Mean feature-gradient magnitude across window boundaries (x) / elsewhere."""
    g = np.linalg.norm(np.diff(f, axis=2), axis=0)  # (y, x-1): between column x and x+1
    on = np.zeros(g.shape[1], bool)
    for b in boundaries:
        on[b - 1] = True
    return float(g[:, on].mean() / g[:, ~on].mean())


def test_blending_hides_seams(image, tmp_path, tiny_backbone, client):
    src = image[:280, :560]
    ts = hd.shifts()
    grid = plan_tiles(src.shape[:2], tile_px=168, patch_px=14, stride_px=14, max_shift_px=1)
    blended = hd.extract(
        src,
        tmp_path / "b.zarr",
        backbone=tiny_backbone,
        transforms=ts,
        tile=168,
        dtype="float32",
        client=client,
        progress=False,
    ).values
    # Plain cropping: each window's core only, no blending.
    cropped = np.zeros_like(blended)
    value_range = (0.0, 255.0)
    m = grid.margin_px
    for j in range(grid.n_windows[0]):
        for i in range(grid.n_windows[1]):
            slices, (rows, cols) = read_window(
                src.shape[:2], grid.window_origin(j, i), grid.tile_px
            )
            win = src[slices][np.ix_(rows, cols)]
            f = hd.highres_features(
                hd.normalize(win, value_range=value_range), tiny_backbone, ts
            ).numpy()
            ys, xs = grid.chunk_slices(j, i)
            cropped[:, ys, xs] = f[:, m : m + ys.stop - ys.start, m : m + xs.stop - xs.start]
    bounds = [i * grid.step_px for i in range(1, grid.n_windows[1])]
    r_blend, r_crop = _seam_ratio(blended, bounds), _seam_ratio(cropped, bounds)
    print(f"seam ratio: blended {r_blend:.3f}, cropped {r_crop:.3f}")
    assert r_blend < r_crop


class _FailingMeanPool(hd.MeanPool):
    """MeanPool that fails on its n-th call (a worker dying mid-run); with ``within``, counting
    only calls made below that function (e.g. ``run_block``: after the estimates)."""

    def __init__(self, fail_at: int, within: str | None = None) -> None:
        super().__init__(14, 14)
        self.name = "meanpool_p14_s14"
        self.calls = 0
        self.fail_at = fail_at
        self.within = within

    def _counts(self) -> bool:
        frame = sys._getframe()
        while self.within and frame is not None and frame.f_code.co_name != self.within:
            frame = frame.f_back
        return frame is not None

    def forward(self, x):
        if self._counts():
            self.calls += 1  # one worker thread in the test cluster
            if self.calls == self.fail_at:
                raise RuntimeError("worker died")
        return super().forward(x)


def test_resume_after_interruption_equals_uninterrupted(image, tmp_path, client):
    src = image[:400, :500]
    kw = dict(tile=140, dtype="float32", client=client, progress=False, block=1)
    full = hd.extract(src, tmp_path / "full.zarr", backbone=hd.MeanPool(), **kw).values
    store = tmp_path / "resumed.zarr"
    with pytest.raises(RuntimeError, match="worker died"):
        hd.extract(src, store, backbone=_FailingMeanPool(fail_at=7), **kw)
    with pytest.raises(hd.IncompleteStoreError):
        hd.open_features(store)
    done = zarr.open_group(store, mode="r")["_run"]["done"][...]
    assert 0 < done.sum() < done.size
    resumed = hd.extract(src, store, backbone=hd.MeanPool(), **kw).values
    assert np.array_equal(resumed, full)


def _wait_idle(client, timeout_s: float = 60.0) -> None:
    """Until no worker runs a task (cancelled futures cannot stop a task that has started)."""
    import time

    def executing(dask_worker) -> int:
        return dask_worker.state.executing_count

    t0 = time.monotonic()
    while any(client.run(executing).values()) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.05)


def test_resume_reuses_the_saved_estimates(image, tmp_path, client):
    """An interrupted run keeps its positional artefact and PCA in the store; resuming uses
    them instead of estimating again (shown by tampering with a copy of the store)."""
    src = image[:400, :500]
    kw = dict(
        tile=140, dtype="float32", client=client, progress=False, block=1, debias=3, components=2
    )
    full = hd.extract(src, tmp_path / "full.zarr", backbone=hd.MeanPool(), **kw)
    store = tmp_path / "resumed.zarr"
    with pytest.raises(RuntimeError, match="worker died"):
        hd.extract(src, store, backbone=_FailingMeanPool(fail_at=7, within="run_block"), **kw)
    _wait_idle(client)  # a block task already running when the run failed still writes
    run = zarr.open_group(store, mode="r")["_run"]
    assert 0 < run["done"][...].sum() < run["done"].size
    assert run["token_bias"].shape == (9, 3, 10, 10)  # 9 views, 3 channels, 140 px / 14
    tampered = tmp_path / "tampered.zarr"
    shutil.copytree(store, tampered)
    zarr.open_group(tampered, mode="r+")["_run"]["token_bias"][...] = 0.0

    resumed = hd.extract(src, store, backbone=hd.MeanPool(), **kw)
    assert resumed.attrs["projection_components"] == full.attrs["projection_components"]
    assert np.array_equal(resumed.values, full.values)
    other = hd.extract(src, tampered, backbone=hd.MeanPool(), **kw)
    assert not np.array_equal(other.values, full.values)


def test_other_settings_refused_unless_overwrite(image, tmp_path, client):
    kw = dict(backbone=hd.MeanPool(), tile=140, client=client, progress=False)
    hd.extract(image[:150, :150], tmp_path / "s.zarr", **kw)
    with pytest.raises(hd.StoreError, match="out_stride"):
        hd.extract(image[:150, :150], tmp_path / "s.zarr", out_stride=2, **kw)
    out = hd.extract(image[:150, :150], tmp_path / "s.zarr", out_stride=2, overwrite=True, **kw)
    assert out.shape == (3, 75, 75)


def test_open_features_is_lazy_and_self_describing(image, tmp_path, client):
    hd.extract(
        image[:200, :300],
        tmp_path / "l.zarr",
        backbone=hd.MeanPool(),
        tile=140,
        out_stride=2,
        client=client,
        progress=False,
    )
    computes = []
    with dask.config.set(scheduler=lambda dsk, keys, **kw: computes.append(keys)):
        arr = hd.open_features(tmp_path / "l.zarr").isel(y=slice(0, 10))
    assert computes == []
    assert arr.dims == ("feature", "y", "x")
    assert isinstance(arr.data, da.Array)
    assert arr.y.values[:3].tolist() == [0.5, 2.5, 4.5]
    for key in (
        "model",
        "transforms",
        "tile_px",
        "overlap_px",
        "out_stride",
        "dtype",
        "value_range",
        "version",
    ):
        assert key in arr.attrs
    assert arr.dtype == np.float16


def test_random_weights_are_marked(image, tmp_path, client):
    with pytest.warns(hd.RandomWeightsWarning):
        out = hd.extract(
            image[:100, :100],
            tmp_path / "r.zarr",
            weights="random",
            tile=112,
            client=client,
            progress=False,
            model_options=TINY,
        )
    assert out.attrs["random_weights"] is True


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage" * 10)
    tiny = tmp_path / "tiny.npy"
    np.save(tiny, np.zeros((10, 10), np.uint8))
    five = tmp_path / "five.npy"
    np.save(five, np.zeros((2, 2, 3, 30, 30), np.uint8))
    nan = tmp_path / "nan.npy"
    a = np.random.default_rng(0).random((60, 60)).astype(np.float32)
    a[5, 5] = np.nan
    np.save(nan, a)
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 40), np.uint8))
    plain = tmp_path / "out_is_a_file"
    plain.write_text("x")
    ok = tmp_path / "ok.tif"
    tifffile.imwrite(ok, np.zeros((64, 64), np.uint8))
    return {
        "missing file": (tmp_path / "nope.tif", tmp_path / "o1.zarr"),
        "corrupt tiff": (corrupt, tmp_path / "o2.zarr"),
        "smaller than a patch": (tiny, tmp_path / "o3.zarr"),
        "5-D": (five, tmp_path / "o4.zarr"),
        "NaN pixels": (nan, tmp_path / "o5.zarr"),
        "zero-size": (empty, tmp_path / "o6.zarr"),
        "output is a file": (ok, plain),
    }


def test_bad_input_gives_one_line_and_no_complete_store(tmp_path, capsys):
    for name, (src, out) in _bad_inputs(tmp_path).items():
        code = main(
            [
                "features",
                str(src),
                str(out),
                "--weights",
                "random",
                "--device",
                "cpu",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        errors = [line for line in err.splitlines() if line.startswith("hrdv2: error:")]
        assert len(errors) == 1 and err.splitlines()[-1] == errors[0], (name, err)
        assert "Traceback" not in err, (name, err)
        if out.is_dir():
            with pytest.raises(hd.Hrdv2Error):
                hd.open_features(out)


def test_cli_features_and_info(image, tmp_path, capsys):
    import PIL.Image

    png = tmp_path / "in.png"
    PIL.Image.fromarray(image[:150, :200]).save(png)
    code = main(
        [
            "features",
            str(png),
            str(tmp_path / "cli.zarr"),
            "--weights",
            "random",
            "--tile",
            "126",
            "--out-stride",
            "2",
            "--quiet",
            "--workers",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    arr = hd.open_features(tmp_path / "cli.zarr")
    assert arr.shape == (384, 75, 100) and arr.attrs["random_weights"] is True
    assert np.isfinite(arr.values.astype(np.float32)).all()
    assert main(["info", str(tmp_path / "cli.zarr")]) == 0
    assert '"random_weights": true' in capsys.readouterr().out


_SLOW_RUN = """
import sys, time, numpy as np, hrdv2_dask as hd

class Slow(hd.MeanPool):
    def forward(self, x):
        time.sleep(0.4)
        return super().forward(x)

img = np.load(sys.argv[1])
b = Slow()
b.name = "meanpool_p14_s14"
hd.extract(img, sys.argv[2], backbone=b, tile=140, dtype="float32", block=1, progress=False,
           workers=1)
"""


def test_killed_process_resumes_to_the_same_store(image, tmp_path, client):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = image[:400, :500]
    np.save(tmp_path / "img.npy", src)
    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, str(tmp_path / "img.npy"), str(store)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                done = zarr.open_group(store, mode="r")["_run"]["done"][...]
            except Exception:  # noqa: BLE001 - store not created yet
                continue
            if done.sum() >= 2:
                break
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = zarr.open_group(store, mode="r")["_run"]["done"][...]
    assert 2 <= done.sum() < done.size
    with pytest.raises(hd.IncompleteStoreError):
        hd.open_features(store)
    kw = dict(tile=140, dtype="float32", client=client, progress=False, block=1)
    resumed = hd.extract(src, store, backbone=hd.MeanPool(), **kw).values
    full = hd.extract(src, tmp_path / "full.zarr", backbone=hd.MeanPool(), **kw).values
    assert np.array_equal(resumed, full)


def test_components_equal_projecting_full_features(image, tmp_path, tiny_backbone, client):
    """Projecting each window before blending equals projecting the blended store (linear)."""
    src = image[:300, :360]
    kw = dict(
        backbone=tiny_backbone,
        tile=140,
        out_stride=2,
        dtype="float32",
        client=client,
        progress=False,
    )
    reduced = hd.extract(src, tmp_path / "k.zarr", components=4, **kw)
    assert reduced.shape == (4, 150, 180)
    mean = np.asarray(reduced.attrs["projection_mean"], np.float32)
    comps = np.asarray(reduced.attrs["projection_components"], np.float32)
    assert comps.shape == (4, 64)
    full = hd.extract(src, tmp_path / "full.zarr", **kw).values
    projected = np.einsum("kc,chw->khw", comps, full - mean[:, None, None])
    err = np.abs(reduced.values - projected).max() / np.abs(projected).max()
    assert err < 1e-4
    # the first component carries the most variance
    var = reduced.values.reshape(4, -1).var(1)
    assert var[0] == var.max()
