"""Helpers shared by the suites: environment record, backbones, view sets, timing, memory,
isolated runs and the JSON/Markdown outputs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

import hrdv2_dask as hd
from hrdv2_dask.tiling import TileGrid

__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "BackboneSpec",
    "Column",
    "can_reset_peak_rss",
    "ProcessTreeSampler",
    "environment",
    "environment_line",
    "grid_of",
    "markdown_table",
    "parse_int_list",
    "parse_model_options",
    "peak_rss_bytes",
    "quiet_random_weights",
    "reset_peak_rss",
    "rss_bytes",
    "run_isolated",
    "synchronize",
    "time_calls",
    "view_set",
    "write_results",
]

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = "random weights: numbers show the pipeline, not DINOv2 quality"

_VERSIONED = (
    "torch",
    "timm",
    "dask",
    "distributed",
    "zarr",
    "numpy",
    "xarray",
    "scikit-learn",
    "scikit-image",
    "scipy",
    "hrdv2-dask",
)

# ------------------------------------------------------------------ views

# Number of views -> (label, builder). 68 needs flips() twice: combine(shifts((1, 2)), flips())
# alone gives 17 x {identity, flip x, flip y} = 51 views; the 4th mirror image (flip x and y,
# i.e. a half turn) comes from composing two flips.
_VIEW_SETS: dict[int, tuple[str, Callable[[], hd.TransformSet]]] = {
    1: ("identity", hd.TransformSet),
    5: ("von Neumann 1 px", lambda: hd.shifts(1, "von_neumann")),
    9: ("Moore 1 px", hd.shifts),
    17: ("Moore 1–2 px", lambda: hd.shifts((1, 2))),
    51: ("Moore 1–2 px × {id, flip x, flip y}", lambda: hd.combine(hd.shifts((1, 2)), hd.flips())),
    68: (
        "Moore 1–2 px × {id, flip x, flip y, flip xy}",
        lambda: hd.combine(hd.shifts((1, 2)), hd.flips(), hd.flips()),
    ),
}


def view_set(n_views: int) -> tuple[str, hd.TransformSet]:
    """The transform set with ``n_views`` views and its label.

    >>> label, ts = view_set(68)
    >>> len(ts), label
    (68, 'Moore 1–2 px × {id, flip x, flip y, flip xy}')
    """
    if n_views not in _VIEW_SETS:
        raise ValueError(f"views must be one of {sorted(_VIEW_SETS)}, got {n_views!r}.")
    label, build = _VIEW_SETS[n_views]
    ts = build()
    if len(ts) != n_views:  # pragma: no cover - guards the table above against library changes
        raise RuntimeError(f"{label} gives {len(ts)} views, not {n_views}.")
    return label, ts


# ------------------------------------------------------------------ parsing


def parse_int_list(text: str) -> list[int]:
    """``"1,9, 17"`` → ``[1, 9, 17]``.

    >>> parse_int_list("224, 518")
    [224, 518]
    """
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(
            f"expected comma-separated integers such as 1,9,17; got {text!r}."
        ) from err


def parse_model_options(text: str | None) -> dict[str, Any]:
    """``"embed_dim=64,depth=2,qkv_bias=false"`` → keyword arguments for ``timm.create_model``.

    >>> parse_model_options("embed_dim=64,depth=2,init_values=1e-5,qkv_bias=false")
    {'embed_dim': 64, 'depth': 2, 'init_values': 1e-05, 'qkv_bias': False}
    """
    options: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"model option {item!r} is not KEY=VALUE.")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                with contextlib.suppress(ValueError):
                    value = cast(value)
                    break
        options[key.strip()] = value
    return options


# ------------------------------------------------------------------ backbones


@dataclass(frozen=True)
class BackboneSpec:
    """How to build the benchmarked backbone, picklable so that subprocesses build the same.

    Parameters
    ----------
    model : str
        Model name for :func:`hrdv2_dask.load_backbone`.
    weights : str, optional
        Checkpoint path; ``None`` means random weights (speed does not depend on the values).
    stride : int, optional
        Patch-embedding stride (the stride trick).
    device : str
        ``"cpu"`` or ``"cuda"``.
    model_options : tuple of (str, value)
        Extra ``timm.create_model`` arguments (e.g. a tiny model for tests).
    seed : int
        Seed of the random initialisation.
    precision : str
        ``auto``, ``fp32`` or ``bf16``: the backbone's arithmetic, as ``precision`` of
        :func:`hrdv2_dask.extract`.
    """

    model: str = "vit_small_patch14_dinov2"
    weights: str | None = None
    stride: int | None = None
    device: str = "cpu"
    model_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    seed: int = 0
    precision: str = "auto"

    @property
    def resolved_precision(self) -> str:
        """``"fp32"`` or ``"bf16"``: what :attr:`precision` means on :attr:`device` here."""
        from hrdv2_dask.precision import resolve_precision

        return resolve_precision(self.precision, self.device)

    @property
    def random_weights(self) -> bool:
        return self.weights is None

    @property
    def weights_label(self) -> str:
        return "random" if self.random_weights else str(self.weights)

    def describe(self) -> str:
        """``model`` plus its overrides and stride, for table captions."""
        extras = [f"{k}={v}" for k, v in self.model_options]
        if self.stride is not None:
            extras.append(f"stride={self.stride}")
        return f"`{self.model}`" + (f" ({', '.join(extras)})" if extras else "")

    def build(self) -> hd.Backbone:
        """Load the backbone (random weights seeded, their warning silenced: outputs say so)."""
        torch.manual_seed(self.seed)
        with quiet_random_weights():
            return hd.load_backbone(
                self.model,
                weights=self.weights or "random",
                stride=self.stride,
                device=self.device,
                **dict(self.model_options),
            )


# ------------------------------------------------------------------ environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    """Commit of the checkout the benchmarks run from (with ``+dirty`` if modified), if any."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str, *, weights: str = "random") -> dict[str, Any]:
    """Date, machine, device and package versions, recorded with every result."""
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": _cpu_model(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _VERSIONED},
        "commit": _git_commit(),
        "weights": weights,
        "random_weights": weights == "random",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------ timing


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU), so that wall-clock times are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], *, repeats: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, synchronised on the device."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ memory


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def can_reset_peak_rss() -> bool:
    """Whether :func:`reset_peak_rss` works here (Linux), checked without resetting anything."""
    return os.access("/proc/self/clear_refs", os.W_OK)


def reset_peak_rss() -> bool:
    """Reset the peak RSS of this process to its current RSS (Linux); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak RSS of this process since start or since the last :func:`reset_peak_rss`."""
    with contextlib.suppress(OSError, AttributeError):
        found = re.search(r"VmHWM:\s+(\d+)\s*kB", Path("/proc/self/status").read_text())
        if found:
            return int(found.group(1)) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_isolated(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call ``fn(**kwargs)`` in a fresh Python process (spawned) and return its result.

    ``fn`` must be importable (a module-level function); the child starts with none of this
    process's memory, so its peak RSS is the measured call's own.
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, **kwargs).result()


class ProcessTreeSampler:
    """Sample the summed RSS of this process and its children (Dask workers) in a thread.

    Use as a context manager; ``peak_rss`` is the largest sum seen (sampled, so a spike shorter
    than ``interval_s`` can be missed). On CUDA, ``peak_device`` is the largest device-wide
    memory in use (all processes, from ``torch.cuda.mem_get_info``) minus the use at start.
    """

    def __init__(self, *, interval_s: float = 0.1, device: str = "cpu") -> None:
        self.interval_s = interval_s
        self.device = device
        self.peak_rss = 0
        self.peak_device: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._device_base = 0

    def _device_used(self) -> int:
        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        return total - free

    def _sample(self) -> None:
        proc = psutil.Process()
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, total)
        if self.peak_device is not None:
            self.peak_device = max(self.peak_device, self._device_used() - self._device_base)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> ProcessTreeSampler:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            self._device_base = self._device_used()
            self.peak_device = 0
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def grid_of(attrs: Mapping[str, Any]) -> TileGrid:
    """The window grid of a feature store, from the attrs of :func:`hrdv2_dask.open_features`."""
    return TileGrid(
        image_shape=tuple(attrs["source_shape"][:2]),
        tile_px=attrs["tile_px"],
        overlap_px=attrs["overlap_px"],
        margin_px=attrs["margin_px"],
        out_stride=attrs["out_stride"],
    )


# ------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class Column:
    """One Markdown column: row key, header and format (``"{:.3f}"``...); None shows as "–"."""

    key: str
    header: str
    fmt: str = "{}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts).

    >>> print(markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "b": None}],
    ...                      [Column("a", "n"), Column("b", "s", "{:.2f}")]))
    | n | s |
    | --- | --- |
    | 1 | 0.50 |
    | 2 | – |
    """
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c.key)
            cells.append("–" if value is None else c.fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_line(env: Mapping[str, Any], *, speed_only: bool = False) -> str:
    """One Markdown line summarising :func:`environment` for the top of a table.

    ``speed_only``: the suite measures time and memory, which do not depend on the weights.
    """
    v = env["versions"]
    device = env["device_name"] if env["device"].startswith("cuda") else f"CPU {env['cpu']}"
    line = (
        f"{env['date'][:10]}, {device}, {env['cores']} cores, {env['memory_gib']} GiB; "
        f"Python {env['python']}, torch {v['torch']} ({env['torch_threads']} threads), "
        f"timm {v['timm']}, dask/distributed {v['dask']}/{v['distributed']}, zarr {v['zarr']}, "
        f"numpy {v['numpy']}, hrdv2-dask {v['hrdv2-dask']} ({env.get('commit') or 'no git'}); "
        f"weights: {env['weights']}."
    )
    if env.get("random_weights"):
        if speed_only:
            line += " Random weights: time and memory do not depend on their values."
        else:
            line += f" **{RANDOM_WEIGHTS_NOTE}.**"
    return line


def write_results(
    out_dir: str | os.PathLike, suite: str, result: Mapping[str, Any], markdown: str
) -> tuple[Path, Path]:
    """Write ``OUT/SUITE.json`` and ``OUT/SUITE.md``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{suite}.json", out / f"{suite}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


class _DropRandomWeights(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "RANDOM WEIGHTS" not in record.getMessage().upper()


@contextlib.contextmanager
def quiet_random_weights() -> Iterator[None]:
    """Silence the library's random-weights warnings: the suites' outputs say it themselves."""
    drop = _DropRandomWeights()
    loggers = [
        logging.getLogger(n) for n in ("hrdv2_dask.pipeline.extraction", "hrdv2_dask.backbones")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        for lg in loggers:
            lg.addFilter(drop)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(drop)
