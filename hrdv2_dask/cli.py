"""Command line: ``hrdv2 features|info|pca|cluster|similarity|segment|apply|index|search|run``
and ``hrdv2 demo``.

Each subcommand parses its arguments, builds the options and calls one public function. Errors
that hrdv2_dask raises on purpose end the program with exit code 2 and one line on stderr; a
collection with failed members ends with exit code 3 after its summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import ClusterSettings, CollectionSettings, FeatureSettings
from .errors import Hrdv2Error

log = logging.getLogger("hrdv2_dask")


def _features(args) -> int:
    from .pipeline import extract
    from .workflows import extract_options

    features = FeatureSettings.from_args(args)
    cluster = ClusterSettings.from_args(args)
    if features.plane is None:
        from .pipeline.members import list_members

        members = list_members(args.input, axes=features.axes, level=features.level)
        if not members.single:
            return _collection(args, features, cluster)
    out = extract(
        args.input,
        args.output,
        progress=not args.quiet,
        **extract_options(features, cluster),
    )
    print(f"{args.output}: {dict(out.sizes)} {out.dtype}")
    return 0


def _collection(args, features, cluster) -> int:
    """``features`` for an INPUT of several images: a collection store and a summary."""
    from .pipeline.collection import extract_collection
    from .workflows import extract_options

    collection = CollectionSettings.from_args(args)
    extract_collection(
        args.input,
        args.output,
        progress=not args.quiet,
        **extract_options(features, cluster),
        **{api: getattr(collection, n) for api, n in CollectionSettings.api_names().items()},
    )
    return _summary(args.output)


def _summary(store) -> int:
    """Print a collection's members done and failed (with reasons); 3 if any failed."""
    from .io.collection import read_members

    rows = read_members(store)
    failed = [r for r in rows if r.get("status") == "failed"]
    done = sum(r.get("status") == "done" for r in rows)
    print(f"{store}: {len(rows)} members, {done} done, {len(failed)} failed")
    for row in failed:
        print(f"  failed {row['key']} ({row.get('source')}): {row.get('error')}")
    return 3 if failed else 0


def _info(args) -> int:
    from .io.collection import is_collection, members_csv, read_members
    from .io.store import open_features

    if is_collection(args.store):
        if args.table:
            print(members_csv(read_members(args.store)), end="")
            return 0
        for row in read_members(args.store):
            shape = "x".join(str(v) for v in row.get("shape") or []) or "?"
            error = f"  {row['error']}" if row.get("error") else ""
            print(f"{row['key']}\t{row.get('status')}\t{shape}\t{row.get('source')}{error}")
        return 0
    arr = open_features(args.store)
    print(
        json.dumps(
            {"dims": dict(arr.sizes), "dtype": str(arr.dtype), **arr.attrs}, indent=2, default=str
        )
    )
    return 0


def _analysis(args) -> int:
    from pathlib import Path

    from .analysis.collection import open_store
    from .analysis.registry import get_analysis

    analysis = get_analysis(args.command, "the command line")
    options = analysis.options.from_args(args)
    from .pipeline.faults import results_faults

    features = open_store(args.store)
    # a fault reading the store or writing the results: one line
    with results_faults(args.out):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = analysis.run(options, features, Path(args.out))
    print(json.dumps(result, indent=2, default=str))
    return 0


def _index(args) -> int:
    from .analysis.retrieval import IndexOptions, build_index

    options = IndexOptions.from_args(args)
    print(json.dumps(build_index(args.store, args.index, **options.to_dict()), indent=2))
    return 0


def _search(args) -> int:
    from .analysis.retrieval import SearchOptions, search

    options = SearchOptions.from_args(args)
    hits = search(args.index, out=args.out, **options.to_dict())
    print(json.dumps(hits, indent=2))
    return 0


def _add_retrieval(sub) -> None:
    """``hrdv2 index STORE INDEX`` and ``hrdv2 search INDEX --query ...``."""
    from .analysis.retrieval import IndexOptions, SearchOptions

    a = sub.add_parser("index", help="FAISS index of region and image embeddings")
    a.add_argument("store", help="feature store or collection")
    a.add_argument("index", help="index folder to write")
    IndexOptions.add_arguments(a)
    a.set_defaults(func=_index)
    s = sub.add_parser("search", help="regions most similar to a query, from an index")
    s.add_argument("index", help="index folder (from `hrdv2 index`)")
    SearchOptions.add_arguments(s)
    s.add_argument("--out", help="folder for hits.json and contact_sheet.png")
    s.set_defaults(func=_search)


def _apply(args) -> int:
    from pathlib import Path

    from .analysis.collection import open_store
    from .analysis.models import ApplyOptions, apply_model
    from .pipeline.faults import results_faults

    options = ApplyOptions.from_args(args)
    features = open_store(args.store)
    with results_faults(args.out):
        result = apply_model(
            args.model, features, Path(args.out), images=options.images, proba=options.proba
        )
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
        a.add_argument("store", help="feature store or collection (from `hrdv2 features`)")
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
    f.add_argument(
        "input",
        help="image (Zarr, OME-Zarr, TIFF/OME-TIFF/SVS, PNG, JPEG or .npy), or several: a stack "
        "(Z/T axis longer than 1), a folder, a glob, a .txt or .csv list (a collection store)",
    )
    f.add_argument("output", help="output Zarr store (created or resumed)")
    FeatureSettings.add_arguments(f)
    ClusterSettings.add_arguments(f)
    CollectionSettings.add_arguments(f)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_features)

    _add_analyses(sub)
    _add_retrieval(sub)

    from .analysis.models import ApplyOptions

    m = sub.add_parser("apply", help="apply a saved model (--save-model) to a store or collection")
    m.add_argument("model", help="model folder (from pca, cluster or segment --save-model)")
    m.add_argument("store", help="feature store or collection with the model's feature settings")
    m.add_argument("out", help="output folder")
    ApplyOptions.add_arguments(m)
    m.set_defaults(func=_apply)

    r = sub.add_parser("run", help="run a workflow YAML file")
    r.add_argument("workflow")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run)

    i = sub.add_parser("info", help="describe a feature store")
    i.add_argument("store")
    i.add_argument("--table", action="store_true", help="a collection's members table as CSV")
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


def _quiet_exit() -> None:
    """Nothing after the one line: when a read fails, zarr's sibling reads are still pending,
    and the interpreter reports each at exit ("Exception ignored in ...", "coroutine ... was
    never awaited"); with -v they are shown."""
    import warnings

    sys.unraisablehook = lambda unraisable: None
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,  # bind to the current stderr on every call (main() is also used as a library)
    )
    import distributed  # noqa: F401 - configures its loggers on import; quiet them afterwards

    for noisy in ("distributed", "tornado", "asyncio", "tifffile", "faiss"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # A task's error reaches the user as one line; its worker's report of it ("Compute Failed"),
    # and asyncio's of the zarr reads it left pending, only with -v.
    for noisy in ("asyncio", "distributed.worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR if args.verbose else logging.CRITICAL)
    try:
        return args.func(args)
    except Hrdv2Error as err:
        print(f"hrdv2: error: {err}", file=sys.stderr)
        if not args.verbose:
            _quiet_exit()
        return 2
    except KeyboardInterrupt:
        print("hrdv2: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
