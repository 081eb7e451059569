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

from .config import ClusterSettings, FeatureSettings
from .errors import Hrdv2Error

log = logging.getLogger("hrdv2_dask")


def _features(args) -> int:
    from .pipeline import extract
    from .workflows import extract_options

    features = FeatureSettings.from_args(args)
    cluster = ClusterSettings.from_args(args)
    out = extract(
        args.input,
        args.output,
        progress=not args.quiet,
        **extract_options(features, cluster),
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


def _analysis(args) -> int:
    from pathlib import Path

    from .analysis.registry import get_analysis
    from .io.store import open_features

    analysis = get_analysis(args.command, "the command line")
    options = analysis.options.from_args(args)
    features = open_features(args.store)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = analysis.run(options, features, Path(args.out))
    print(json.dumps(result, indent=2, default=str))
    return 0


def _run(args) -> int:
    from .workflows import run_workflow

    summary = run_workflow(args.workflow, progress=not args.quiet)
    print(json.dumps(summary["analyses"], indent=2, default=str))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(
        args.out_dir,
        size=args.size,
        weights=args.weights,
        model=args.model,
        progress=not args.quiet,
    )
    return 0


def _add_analyses(sub) -> None:
    """One subcommand per registered analysis: STORE [its positional options] OUT [flags]."""
    from .analysis.registry import ANALYSES

    for name, analysis in ANALYSES.items():
        a = sub.add_parser(name, help=analysis.help)
        a.add_argument("store", help="feature store (from `hrdv2 features`)")
        analysis.options.add_arguments(a, positional=True)
        a.add_argument("out", help="output folder")
        analysis.options.add_arguments(a, positional=False)
        a.set_defaults(func=_analysis)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrdv2", description="High-resolution DINOv2 features for images of any size."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("features", help="compute a feature store from an image")
    f.add_argument("input", help="image: Zarr, OME-Zarr, TIFF/OME-TIFF/SVS, PNG, JPEG or .npy")
    f.add_argument("output", help="output Zarr store (created or resumed)")
    FeatureSettings.add_arguments(f)
    ClusterSettings.add_arguments(f)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_features)

    _add_analyses(sub)

    r = sub.add_parser("run", help="run a workflow YAML file")
    r.add_argument("workflow")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run)

    i = sub.add_parser("info", help="describe a feature store")
    i.add_argument("store")
    i.set_defaults(func=_info)

    d = sub.add_parser("demo", help="build a sample image and extract its features")
    d.add_argument("out_dir", nargs="?", default="hrdv2-demo")
    d.add_argument(
        "--model",
        default="dinov2_vits14",
        help="backbone (filterbank: classical features, no weights needed)",
    )
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
