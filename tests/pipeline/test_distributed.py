"""Beyond the embedded cluster: a real scheduler and workers, dead workers, GPU placement,
unreachable schedulers, version checks and the cuda/slurm deployments."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import Client, get_task_stream

import hrdv2_dask as hd
from hrdv2_dask.cli import main
from hrdv2_dask.pipeline.cluster import (
    WORKER_ENVIRON,
    ClusterError,
    MissingExtraError,
    check_versions,
    cluster_client,
    package_versions,
    slurm_cluster_kwargs,
    task_resources,
    version_mismatches,
    worker_environ,
)
from hrdv2_dask.workflows import SlurmSettings, Workflow, run_workflow

ROOT = Path(__file__).resolve().parents[2]
TINY_OPTIONS = {"embed_dim": 64, "depth": 2, "num_heads": 4}
TINY = tuple(f"{k}={v}" for k, v in TINY_OPTIONS.items())


@pytest.fixture(scope="module")
def image_npy(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:200, 0:260]
    img[..., 0] = ((np.sin(xx / 13.0) + np.cos(yy / 19.0)) * 60 + 128).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "img.npy"
    np.save(path, img)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_random_dinov2) -> Path:
    """The tiny DINOv2 as a checkpoint file: every process loads exactly the same model."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    sd = {k: v.contiguous() for k, v in tiny_random_dinov2.model.state_dict().items()}
    save_file(sd, str(path))
    return path


def _features_args(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    options = [a for kv in TINY for a in ("--model-option", kv)]
    return [
        "features",
        str(src),
        str(out),
        "--weights",
        str(weights),
        *options,
        "--tile",
        "140",
        "--out-stride",
        "2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def _env() -> dict[str, str]:
    """The worktree first on PYTHONPATH, so that workers import this copy of hrdv2_dask."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def dask_cluster(folder: Path, workers: dict[str, list[str]]):
    """``dask scheduler`` and one ``dask worker`` per entry as processes on 127.0.0.1.

    Yields an observer client (closed, and every process stopped, on exit).
    """
    scheduler_file = folder / "scheduler.json"
    common = dict(env=_env(), start_new_session=True, stdout=subprocess.DEVNULL)
    procs = []
    try:
        log = open(folder / "scheduler.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0"]
                + ["--scheduler-file", str(scheduler_file), "--no-dashboard"],
                stderr=log,
                **common,
            )
        )
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        for name, extra in workers.items():
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dask", "worker", "--scheduler-file"]
                    + [str(scheduler_file), "--host", "127.0.0.1", "--nthreads", "1"]
                    + ["--nworkers", "1", "--no-dashboard", "--name", name, *extra],
                    stderr=open(folder / f"{name}.log", "w"),  # noqa: SIM115
                    **common,
                )
            )
        with Client(scheduler_file=str(scheduler_file), timeout="60s") as observer:
            observer.wait_for_workers(len(workers), timeout=120)
            yield observer
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _names(observer: Client) -> dict[str, str]:
    return {a: w["name"] for a, w in observer.scheduler_info(n_workers=-1)["workers"].items()}


def test_external_cluster_equals_embedded_and_gpu_tasks_stay_on_gpu_workers(
    image_npy, tiny_weights, tmp_path
):
    embedded = tmp_path / "embedded.zarr"
    assert main(_features_args(image_npy, embedded, tiny_weights, "--workers", "1")) == 0
    workers = {
        "gpu": ["--resources", "GPU=1", "--preload", "hrdv2_dask.preload"],
        "plain": [],  # no GPU resource: must never get a block task
    }
    external = tmp_path / "external.zarr"
    with dask_cluster(tmp_path, workers) as observer:
        address = observer.scheduler.address
        with get_task_stream(client=observer) as stream:
            code = main(_features_args(image_npy, external, tiny_weights, "--scheduler", address))
        names = _names(observer)
        # live progress: the block tasks reported their windows as worker events
        progress = [
            ev for t, ev in observer.get_events().items() if t.startswith("hrdv2-progress-")
        ]

        def cached_models() -> int:
            from hrdv2_dask.pipeline import workers

            return len(workers._MODELS)

        def torch_threads() -> tuple[int, str | None]:
            import torch

            return torch.get_num_threads(), os.environ.get("HRDV2_THREADS")

        models = {names[a]: n for a, n in observer.run(cached_models).items()}
        gpu = next(a for a, n in names.items() if n == "gpu")
        threads = observer.submit(torch_threads, workers=[gpu], pure=False).result()
    assert code == 0
    assert models == {"gpu": 1, "plain": 0}  # the warm-up plugin skipped the plain worker too
    # Its nanny set OMP_NUM_THREADS=1; the preload gave torch the process's cores (a CPU worker:
    # no CUDA here), in the task thread that ran the blocks.
    assert threads == (len(os.sched_getaffinity(0)), str(len(os.sched_getaffinity(0))))
    blocks = [t for t in stream.data if str(t["key"]).startswith("hrdv2-block-")]
    assert len(blocks) == 6  # 2 x 3 blocks
    assert {names[t["worker"]] for t in blocks} == {"gpu"}
    assert len(progress) == 1 and len(progress[0]) > len(blocks)  # per window, not per block
    a = zarr.open_group(embedded, mode="r")["features"][...]
    b = zarr.open_group(external, mode="r")["features"][...]
    assert np.isfinite(a).all()
    assert np.array_equal(a, b)


def test_backbone_plugin_warms_only_workers_that_can_run_the_tasks():
    import asyncio
    from types import SimpleNamespace

    from hrdv2_dask.pipeline.workers import BackbonePlugin, BackboneRecipe, worker_backbone

    built = []

    def factory():
        built.append(1)
        return hd.MeanPool()

    recipe = BackboneRecipe(factory=factory, factory_token=f"plugin-test-{time.time()}")
    plugin = BackbonePlugin(recipe, resources={"GPU": 1})

    def worker(resources):
        return SimpleNamespace(name="w", state=SimpleNamespace(total_resources=resources))

    asyncio.run(plugin.setup(worker({})))
    assert built == []
    asyncio.run(plugin.setup(worker({"GPU": 1})))
    assert built == [1]
    assert isinstance(worker_backbone(recipe), hd.MeanPool) and built == [1]  # cached


def _slow_meanpool(delay_s: float):
    """A MeanPool that sleeps in every call (its class travels by value to the workers)."""

    class SlowMeanPool(hd.MeanPool):
        def forward(self, x):
            time.sleep(delay_s)
            return super().forward(x)

    return SlowMeanPool()


def test_killed_worker_is_replaced_and_the_store_completes(image_npy, tmp_path, local_client):
    src = np.load(image_npy)
    store = tmp_path / "killed.zarr"
    kw = dict(tile=140, dtype="float32", block=1, progress=False)
    gpu = ["--resources", "GPU=1", "--preload", "hrdv2_dask.preload"]
    workers = {"a": gpu, "b": gpu}
    with dask_cluster(tmp_path, workers) as observer:
        victim = _pids(observer)["a"]
        seen: dict[str, int] = {}

        def kill_after_first_block() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.05)
                try:
                    done = zarr.open_group(store, mode="r")["_run"]["done"][...]
                except Exception:  # noqa: BLE001 - store not created yet
                    continue
                if done.sum() >= 1:
                    seen["done"], seen["total"] = int(done.sum()), done.size
                    os.kill(victim, signal.SIGKILL)
                    return

        killer = threading.Thread(target=kill_after_first_block, daemon=True)
        killer.start()
        out = hd.extract(
            src, store, backbone=_slow_meanpool(0.03), scheduler=observer.scheduler.address, **kw
        )
        killer.join(timeout=5)
        observer.wait_for_workers(2, timeout=60)  # the nanny started a new worker "a"
        assert victim not in _pids(observer).values()
    assert seen and seen["done"] < seen["total"]  # killed mid-run
    full = hd.extract(
        src, tmp_path / "full.zarr", backbone=hd.MeanPool(), client=local_client, **kw
    )
    assert np.array_equal(out.values, full.values)


def test_a_task_that_keeps_killing_workers_is_a_clear_error(image_npy, tmp_path):
    import dask

    class Crashing(hd.MeanPool):
        def forward(self, x):
            os._exit(1)  # e.g. the kernel's OOM killer

    src = np.load(image_npy)[:100, :100]
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(ClusterError, match=r"workers died .* lower --batch-size"):
            hd.extract(src, tmp_path / "c.zarr", backbone=Crashing(), tile=140, progress=False)


def _pids(observer: Client) -> dict[str, int]:
    names = _names(observer)
    return {names[a]: pid for a, pid in observer.run(os.getpid).items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_line_and_quick(image_npy, tmp_path):
    address = f"tcp://127.0.0.1:{_free_port()}"
    args = _features_args(image_npy, tmp_path / "o.zarr", Path("random"), "--scheduler", address)
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "hrdv2_dask.cli", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("hrdv2: error:")]
    assert res.returncode == 2, res.stderr
    assert elapsed < 30
    assert errors == [lines[-1]] and "Traceback" not in res.stderr
    assert errors[0].startswith(f"hrdv2: error: Cannot reach the Dask scheduler at {address!r}")
    assert not (tmp_path / "o.zarr").exists()  # nothing written before the cluster is up


class _FakeClient:
    """The two ``distributed.Client`` calls the checks make, with canned answers."""

    def __init__(self, workers: dict, versions: dict | None = None) -> None:
        self.workers, self.versions = workers, versions

    def scheduler_info(self, n_workers: int = -1) -> dict:
        return {"workers": self.workers}

    def run(self, fn):
        if isinstance(self.versions, Exception):
            raise self.versions
        return self.versions


def test_version_mismatch_names_package_versions_worker_and_fix():
    mine = package_versions()
    assert set(mine) == {"hrdv2-dask", "torch", "timm", "dask", "distributed", "zarr", "numpy"}
    assert mine["hrdv2-dask"] == hd.__version__ and all(mine.values())
    same = {"tcp://10.0.0.2:40000": dict(mine), "tcp://10.0.0.3:40000": dict(mine)}
    check_versions(_FakeClient({}, same), scheduler="tcp://s:8786")  # equal: passes
    other = {**same, "tcp://10.0.0.3:40000": {**mine, "zarr": "2.18.0", "timm": None}}
    assert version_mismatches(mine, other) == [
        f"timm: client {mine['timm']}, worker tcp://10.0.0.3:40000 None",
        f"zarr: client {mine['zarr']}, worker tcp://10.0.0.3:40000 2.18.0",
    ]
    with pytest.raises(ClusterError, match=r"zarr: client .*, worker tcp://10.0.0.3:40000 2\.18"):
        check_versions(_FakeClient({}, other), scheduler="tcp://s:8786")
    broken = ModuleNotFoundError("No module named 'hrdv2_dask'")
    with pytest.raises(ClusterError, match="Install hrdv2-dask"):
        check_versions(_FakeClient({}, broken), scheduler="tcp://s:8786")


def test_torch_builds_for_cpu_and_cuda_are_one_release():
    client = {"torch": "2.4.0+cpu"}
    assert version_mismatches(client, {"w": {"torch": "2.4.0+cu121"}}) == []
    many = {f"w{i}": {"torch": "2.3.1"} for i in range(3)}
    assert version_mismatches(client, many) == [
        "torch: client 2.4.0+cpu, worker w0 2.3.1 (and 2 more workers)"
    ]


@pytest.mark.parametrize(
    "resources, device, expected",
    [
        ([{}, {}], "cpu", None),
        ([{}, {}], "auto", None),
        ([{"GPU": 1}, {}], "cpu", {"GPU": 1}),  # GPU workers get the tasks, the others none
        ([{"GPU": 1}], "auto", {"GPU": 1}),
        ([], "cuda", {"GPU": 1}),  # no workers yet (SLURM jobs pending): wait for GPU ones
    ],
)
def test_task_resources(resources, device, expected):
    workers = {f"tcp://w{i}:1": {"resources": r} for i, r in enumerate(resources)}
    assert task_resources(_FakeClient(workers), device) == expected


def test_cuda_device_without_gpu_workers_is_an_error_not_a_hang():
    workers = {"tcp://w0:1": {"resources": {}}, "tcp://w1:1": {"resources": {}}}
    with pytest.raises(ClusterError, match="--resources GPU=1"):
        task_resources(_FakeClient(workers), "cuda")


def test_cuda_cluster_without_dask_cuda_says_how_to_install():
    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed")
    with pytest.raises(MissingExtraError, match=r'pip install "hrdv2-dask\[cuda\]"'):
        with cluster_client(cluster="cuda", device="auto"):
            pass
    assert issubclass(MissingExtraError, ImportError)


def test_workflow_cluster_kind_reaches_the_deployment(image_npy, tmp_path):
    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed")
    wf = Workflow.from_dict(
        {
            "input": str(image_npy),
            "output_dir": str(tmp_path / "out"),
            "features": {"weights": "random", "model_options": dict(TINY_OPTIONS)},
            "cluster": {"kind": "cuda"},
        }
    )
    with pytest.raises(MissingExtraError, match=r"hrdv2-dask\[cuda\]"):
        run_workflow(wf, progress=False)
    assert not (tmp_path / "out" / "features.zarr").exists()  # refused before any work


def test_scheduler_and_started_cluster_exclude_each_other(image_npy, tmp_path, capsys):
    code = main(
        _features_args(image_npy, tmp_path / "o.zarr", Path("random"))
        + ["--scheduler", "tcp://127.0.0.1:1", "--cluster", "cuda"]
    )
    assert code == 2
    assert "excludes cluster.kind: cuda" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_slurm_off_a_login_node_says_where_to_run():
    pytest.importorskip("dask_jobqueue")
    if shutil.which("sbatch") is not None:
        pytest.skip("sbatch is available here")
    with pytest.raises(ClusterError, match="sbatch.*SLURM login node"):
        with cluster_client(cluster="slurm", slurm=SlurmSettings(memory="4GB")):
            pass


def test_slurm_settings_become_a_job_script():
    settings = SlurmSettings(
        queue="gpu",
        account="lab",
        walltime="02:00:00",
        cores=8,
        memory="64GB",
        job_extra=["--constraint=a100"],
        local_directory="/scratch",
    )
    kw = slurm_cluster_kwargs(settings)
    assert kw["processes"] == 1 and kw["cores"] == 1 and kw["job_cpu"] == 8
    assert kw["job_extra_directives"] == ["--constraint=a100", "--gres=gpu:1"]
    assert kw["worker_extra_args"] == [
        "--preload",
        "hrdv2_dask.preload",
        "--resources",
        "GPU=1",
    ]
    assert "python" not in kw  # unset: dask-jobqueue's default (this interpreter)
    cpu = slurm_cluster_kwargs(SlurmSettings(gpus_per_job=0))
    assert cpu["job_extra_directives"] == [] and "--resources" not in cpu["worker_extra_args"]
    jobqueue = pytest.importorskip("dask_jobqueue")
    with jobqueue.SLURMCluster(
        **kw, scheduler_options={"host": "127.0.0.1", "dashboard_address": None}
    ) as cluster:
        script = cluster.job_script()
    for line in [
        "#SBATCH -p gpu",
        "#SBATCH -A lab",
        "#SBATCH -t 02:00:00",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=60G",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --constraint=a100",
    ]:
        assert line in script, (line, script)
    assert "--nthreads 1" in script and "--resources GPU=1" in script
    assert "--preload hrdv2_dask.preload" in script and "--local-directory /scratch" in script
    assert "export MALLOC_MMAP_THRESHOLD_=33554432" in script


def test_started_workers_get_the_allocator_setting(monkeypatch):
    """Dask's nannies freeze glibc's mmap threshold (see WORKER_ENVIRON); ours restores it,
    and a value from the environment wins."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with cluster_client(None, workers=1, device="cpu") as c:
        seen = c.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    assert list(seen.values()) == [WORKER_ENVIRON["MALLOC_MMAP_THRESHOLD_"]]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert worker_environ() == {"MALLOC_MMAP_THRESHOLD_": "1048576"}


@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_worker_count_is_checked_once_for_every_deployment(cluster):
    with pytest.raises(hd.ConfigError, match="workers must be an integer >= 1"):
        with cluster_client(cluster=cluster, workers=0):
            pass
