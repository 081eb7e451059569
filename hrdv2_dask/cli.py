"""Command line: ``hrdv2 features``, ``hrdv2 info``, ``hrdv2 demo``.

Each subcommand parses its arguments, builds the options and calls one public function. Errors
that hrdv2_dask raises on purpose end the program with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .errors import Hrdv2Error

log = logging.getLogger("hrdv2_dask")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def _transforms(args):
    from .transforms import combine, flips, shifts

    sets = [shifts(args.shifts, args.neighbourhood, args.boundary, patch_size=_patch(args.model))]
    if args.flips:
        sets.append(flips())
    return combine(*sets)


def _patch(model: str) -> int:
    return 16 if "dinov3" in model or "patch16" in model else 14


def _features(args) -> int:
    from .extract import extract

    out = extract(
        args.input,
        args.output,
        backbone=args.model,
        weights=args.weights,
        transforms=_transforms(args),
        tile=args.tile,
        overlap=args.overlap,
        out_stride=args.out_stride,
        dtype=args.dtype,
        stride=args.stride,
        device=args.device,
        workers=args.workers,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"{args.output}: {dict(out.sizes)} {out.dtype}")
    return 0


def _info(args) -> int:
    from .io.store import open_features

    arr = open_features(args.store)
    print(
        json.dumps(
            {"dims": dict(arr.sizes), "dtype": str(arr.dtype), **arr.attrs}, indent=2, default=str
        )
    )
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out_dir, size=args.size, weights=args.weights, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrdv2", description="High-resolution DINOv2 features for images of any size."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("features", help="compute a feature store from an image")
    f.add_argument("input", help="image: Zarr, OME-Zarr, TIFF/OME-TIFF/SVS, PNG, JPEG or .npy")
    f.add_argument("output", help="output Zarr store (created or resumed)")
    f.add_argument("--model", default="dinov2_vits14", help="hub or timm model name")
    f.add_argument("--weights", default=None, help="checkpoint path, or 'random' (testing only)")
    f.add_argument("--shifts", type=_ints, default=(1,), help="shift magnitudes in px, e.g. 1,2")
    f.add_argument("--neighbourhood", choices=["moore", "von_neumann"], default="moore")
    f.add_argument("--boundary", choices=["reflect", "periodic"], default="reflect")
    f.add_argument("--flips", action="store_true", help="add horizontal and vertical flips")
    f.add_argument("--stride", type=int, default=None, help="patch-embedding stride (stride trick)")
    f.add_argument("--tile", type=int, default=518, help="window size in px")
    f.add_argument("--overlap", type=int, default=None, help="window overlap in px")
    f.add_argument("--out-stride", type=int, default=1, help="pixels per output cell")
    f.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    f.add_argument("--device", default="auto", help="auto, cpu or cuda")
    f.add_argument("--workers", type=int, default=None, help="local worker processes")
    f.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    f.add_argument("--batch-size", type=int, default=None, help="images per backbone call")
    f.add_argument(
        "--overwrite", action="store_true", help="replace a store made with other settings"
    )
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_features)

    i = sub.add_parser("info", help="describe a feature store")
    i.add_argument("store")
    i.set_defaults(func=_info)

    d = sub.add_parser("demo", help="build a sample image and extract its features")
    d.add_argument("out_dir", nargs="?", default="hrdv2-demo")
    d.add_argument("--size", type=int, default=2048, help="side of the sample image in px")
    d.add_argument("--weights", default=None, help="checkpoint path (default: caches, then random)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import distributed  # noqa: F401 - configures its loggers on import; quiet them afterwards

    for noisy in ("distributed", "tornado", "asyncio", "tifffile"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except Hrdv2Error as err:
        print(f"hrdv2: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hrdv2: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
