"""Command line: ``hrdv2 features|info|pca|cluster|similarity|segment|run|demo``.

Each subcommand parses its arguments, builds the options and calls one public function. Errors
that hrdv2_dask raises on purpose end the program with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .cluster import CLUSTERS
from .errors import Hrdv2Error

log = logging.getLogger("hrdv2_dask")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as YAML (``depth=2`` is an int, ``x=true`` a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=2), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}: {err}") from err


def _transforms(args):
    from .workflows import FeatureSettings

    return FeatureSettings(
        model=args.model,
        shifts=args.shifts,
        neighbourhood=args.neighbourhood,
        boundary=args.boundary,
        flips=args.flips,
    ).transforms()


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
        cluster=args.cluster,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        components=args.components,
        mask=args.mask,
        debias=args.debias,
        model_options=dict(args.model_option),
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


def _analysis(kind: str, options: dict, store: str, out: str) -> int:
    from pathlib import Path

    from .io.store import open_features
    from .workflows import AnalysisStep, run_analysis

    step = AnalysisStep.from_dict({kind: options}, "command line")
    Path(out).mkdir(parents=True, exist_ok=True)
    result = run_analysis(step, open_features(store), Path(out))
    print(json.dumps(result, indent=2, default=str))
    return 0


def _pca(args) -> int:
    return _analysis(
        "pca",
        {"components": args.components, "foreground": args.foreground, "seed": args.seed},
        args.store,
        args.out,
    )


def _cluster(args) -> int:
    return _analysis("cluster", {"k": args.k, "seed": args.seed}, args.store, args.out)


def _similarity(args) -> int:
    if bool(args.point) == bool(args.box):
        from .errors import ConfigError

        raise ConfigError(
            "give --point Y,X (one or more) or --box Y0,X0,Y1,X1, not both or neither."
        )
    opts = {"points": [list(p) for p in args.point]} if args.point else {"box": list(args.box)}
    return _analysis("similarity", opts, args.store, args.out)


def _segment(args) -> int:
    return _analysis(
        "segment",
        {
            "labels": args.labels,
            "method": args.method,
            "holdout": args.holdout,
            "proba": args.proba,
            "seed": args.seed,
        },
        args.store,
        args.out,
    )


def _run(args) -> int:
    from .workflows import run_workflow

    summary = run_workflow(args.workflow, progress=not args.quiet)
    print(json.dumps(summary["analyses"], indent=2, default=str))
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
    f.add_argument(
        "--model-option",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to timm.create_model, repeatable (e.g. depth=2 for a small test model)",
    )
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
    f.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (local), GPUs (cuda) or SLURM jobs (slurm)",
    )
    f.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="local",
        help="cluster to start: embedded (default), one worker per GPU (needs hrdv2-dask[cuda]) "
        "or SLURM jobs (needs hrdv2-dask[hpc]; settings from the Dask config)",
    )
    f.add_argument(
        "--scheduler",
        default=None,
        help="address of an existing Dask scheduler (instead of --cluster)",
    )
    f.add_argument("--batch-size", type=int, default=None, help="images per backbone call")
    f.add_argument(
        "--overwrite", action="store_true", help="replace a store made with other settings"
    )
    f.add_argument(
        "--components",
        type=int,
        default=None,
        help="keep K PCA channels (fitted on sample windows, projected on the workers)",
    )
    f.add_argument(
        "--mask",
        default=None,
        help="skip background windows: 'auto' (bright background, e.g. slides), 'auto-dark', "
        "or a mask image of the whole image at any scale (non-zero = foreground); "
        "skipped cells are NaN",
    )
    f.add_argument(
        "--debias",
        type=int,
        default=0,
        metavar="N",
        help="estimate the backbone's positional artefact over N windows and subtract it",
    )
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_features)

    a = sub.add_parser("pca", help="PCA picture (OME-Zarr pyramid + PNG) of a feature store")
    a.add_argument("store")
    a.add_argument("out", help="output folder")
    a.add_argument("--components", type=int, default=3)
    a.add_argument("--foreground", action="store_true", help="two-step PCA without background")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_pca)

    c = sub.add_parser("cluster", help="k-means labels of a feature store")
    c.add_argument("store")
    c.add_argument("out", help="output folder")
    c.add_argument("-k", type=int, default=6)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cluster)

    m = sub.add_parser("similarity", help="cosine similarity to query pixels")
    m.add_argument("store")
    m.add_argument("out", help="output folder")
    m.add_argument("--point", type=_ints, action="append", default=[], help="Y,X (output cells)")
    m.add_argument("--box", type=_ints, default=None, help="Y0,X0,Y1,X1 (output cells)")
    m.set_defaults(func=_similarity)

    g = sub.add_parser("segment", help="segmentation from sparse scribble labels")
    g.add_argument("store")
    g.add_argument("labels", help="label image (PNG/TIFF/Zarr), 0 = unlabelled")
    g.add_argument("out", help="output folder")
    g.add_argument("--method", choices=["random_forest", "logistic"], default="random_forest")
    g.add_argument("--holdout", type=float, default=0.2)
    g.add_argument("--proba", action="store_true", help="also write per-class probabilities")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_segment)

    r = sub.add_parser("run", help="run a workflow YAML file")
    r.add_argument("workflow")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run)

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
        force=True,  # bind to the current stderr on every call (main() is also used as a library)
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
