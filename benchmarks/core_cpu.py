"""Time highres_features against the backbone alone for ViT-S/14 on one 518×518 image.

Usage: python -m benchmarks.core_cpu [--depth 12] [--size 518] [--repeats 2]
Prints one JSON line per transform count: backbone-only seconds for the same views, ensemble
seconds, their ratio and the peak RSS growth (from a fresh subprocess, see _peak_memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings

import torch

import hrdv2_dask as hd


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = hd.load_backbone("dinov2_vits14", weights="random", depth=args.depth)
    x = torch.randn(1, 3, args.size, args.size)
    sets = {1: hd.TransformSet(), 9: hd.shifts(), 17: hd.shifts((1, 2))}
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    for n, ts in sets.items():
        views = torch.cat([t.apply(x) for t in ts])
        with torch.inference_mode():
            backbone_s = _best(lambda v=views: bb(v), args.repeats)
            ensemble_s = _best(lambda ts=ts: hd.highres_features(x, bb, ts), args.repeats)
        mem = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks._peak_memory",
                str(n),
                str(args.depth),
                str(args.size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(mem.stdout.strip().splitlines()[-1])["peak_growth"]
        print(
            json.dumps(
                {
                    **info,
                    "depth": args.depth,
                    "size": args.size,
                    "transforms": n,
                    "backbone_s": round(backbone_s, 3),
                    "ensemble_s": round(ensemble_s, 3),
                    "ratio": round(ensemble_s / backbone_s, 3),
                    "peak_rss_growth_mb": round(peak / 2**20),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
