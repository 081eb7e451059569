"""``profile`` suite: where an end-to-end run spends its time, inside the worker processes.

Runs :func:`hrdv2_dask.extract` on the synthetic image of the ``e2e`` suite with the embedded
cluster (the CLI's path), then reads Dask's statistical profile of the worker threads
(``Client.profile()``, a stack sample every 10 ms) before the cluster closes. Reported per
function: the share of samples in which it is on the stack (cumulative) and at the top (self),
for the functions that take at least ``--min-share`` of the samples. py-spy does not follow the
spawned worker processes; this does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hrdv2_dask as hd

from .common import (
    BackboneSpec,
    Column,
    environment,
    environment_line,
    markdown_table,
    quiet_random_weights,
)
from .e2e import write_synthetic

__all__ = ["add_arguments", "flat_profile", "run", "to_markdown"]

log = logging.getLogger(__name__)


def _name(node: dict[str, Any]) -> str:
    """``path:function`` of a profile node, the path from its package on."""
    d = node.get("description") or {}
    filename = re.sub(r".*/lib/python3\.\d+/(site-packages/)?", "", str(d.get("filename", "?")))
    for package in ("hrdv2_dask/", "benchmarks/"):
        if package in filename:
            filename = package + filename.split(package)[-1]
    return f"{filename}:{d.get('name', '?')}"


def flat_profile(tree: dict[str, Any]) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total samples, and samples per function on the stack (cumulative) and on top (self).

    ``tree`` is the nested dictionary of ``distributed.Client.profile()``.

    >>> leaf = {"description": {"filename": "a.py", "name": "f"}, "count": 3, "children": {}}
    >>> root = {"description": {"filename": "m.py", "name": "g"}, "count": 5}
    >>> root["children"] = {"f": leaf}
    >>> flat_profile({"count": 5, "children": {"g": root}})
    (5, {'m.py:g': 5, 'a.py:f': 3}, {'m.py:g': 2, 'a.py:f': 3})
    """
    cumulative: dict[str, int] = {}
    self_: dict[str, int] = {}

    def walk(node: dict[str, Any], on_stack: frozenset[str]) -> None:
        name = _name(node)
        children = node.get("children") or {}
        below = sum(c["count"] for c in children.values())
        self_[name] = self_.get(name, 0) + node["count"] - below
        if name not in on_stack:  # recursion counts once
            cumulative[name] = cumulative.get(name, 0) + node["count"]
        for child in children.values():
            walk(child, on_stack | {name})

    for child in (tree.get("children") or {}).values():
        walk(child, frozenset())
    return int(tree.get("count", 0)), cumulative, self_


@contextlib.contextmanager
def _profiled_cluster(store: dict[str, Any]) -> Iterator[None]:
    """Make ``extract``'s embedded cluster hand over its profile before it closes."""
    extract_module = importlib.import_module("hrdv2_dask.pipeline.extraction")
    original = extract_module.cluster_client

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with original(*args, **kwargs) as client:
            yield client
            store["profile"] = client.profile()

    extract_module.cluster_client = spy
    try:
        yield
    finally:
        extract_module.cluster_client = original


def run_profile(
    *, spec: BackboneSpec, source: Path, out: Path, out_stride: int, min_share: float
) -> dict[str, Any]:
    """Profile one embedded ``extract`` of ``source``; the suite's JSON-able result."""
    captured: dict[str, Any] = {}
    t0 = time.perf_counter()
    with _profiled_cluster(captured), quiet_random_weights():
        hd.extract(
            source,
            out / "profile_store.zarr",
            backbone=spec.model,
            weights=spec.weights or "random",
            device=spec.device,
            workers=1,
            out_stride=out_stride,
            overwrite=True,
            progress=False,
            model_options=dict(spec.model_options),
        )
    wall = time.perf_counter() - t0
    shutil.rmtree(out / "profile_store.zarr", ignore_errors=True)
    total, cumulative, self_ = flat_profile(captured["profile"])
    rows = [
        {
            "function": name,
            "cumulative": cumulative[name] / total,
            "self": self_.get(name, 0) / total,
        }
        for name in sorted(cumulative, key=cumulative.get, reverse=True)
        if cumulative[name] / total >= min_share
    ]
    return {"wall_s": wall, "samples": total, "rows": rows}


COLUMNS = [
    Column("function", "function", "{}"),
    Column("cumulative", "on the stack", "{:.1%}"),
    Column("self", "at the top", "{:.1%}"),
]


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (
        f"### Where an end-to-end run spends its time ({result['environment']['device']})\n\n"
        f"{environment_line(result['environment'], speed_only=True)}\n"
        f"Synthetic {s['size']}×{s['size']} RGB uint8 Zarr, `{s['model']}`, 9 views, tile 518, "
        f"out_stride {s['out_stride']}, embedded cluster (1 worker); {result['samples']} samples "
        f"of the worker's task thread over {result['wall_s']:.1f} s.\n\n"
    )
    return head + markdown_table(result["rows"], COLUMNS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=1036, help="image side (default 1036)")
    parser.add_argument("--out-stride", type=int, default=1)
    parser.add_argument(
        "--min-share", type=float, default=0.01, help="smallest share of samples listed"
    )


def run(args: argparse.Namespace, spec: BackboneSpec) -> dict[str, Any]:
    work = Path(args.out) / "work"
    source = write_synthetic(work / f"synthetic_{args.size}.zarr", size=args.size)
    result = run_profile(
        spec=spec, source=source, out=work, out_stride=args.out_stride, min_share=args.min_share
    )
    result.update(
        suite="profile",
        environment=environment(spec.device, weights=spec.weights_label),
        settings={"size": args.size, "model": spec.model, "out_stride": args.out_stride},
    )
    return result
