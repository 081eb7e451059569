"""Run highres_features once in this process and print the peak RSS growth it caused (bytes).

Usage: python -m benchmarks._peak_memory N_TRANSFORMS [DEPTH] [SIZE]
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings

import psutil
import torch

import hrdv2_dask as hd


def main() -> None:
    n = int(sys.argv[1])
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 518
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = hd.load_backbone("dinov2_vits14", weights="random", depth=depth)
    sets = {
        1: hd.TransformSet(),
        5: hd.shifts(1, "von_neumann"),
        9: hd.shifts(),
        17: hd.shifts((1, 2)),
    }
    ts = sets[n]
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():  # warm up kernels and thread pools on a small input
        hd.highres_features(torch.randn(1, 3, 28, 28), bb, ts)
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    out = hd.highres_features(x, bb, ts)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "transforms": len(ts),
                "seconds": dt,
                "peak_growth": peak - base,
                "output_bytes": out.numel() * 4,
            }
        )
    )


if __name__ == "__main__":
    main()
