"""``python -m benchmarks SUITE [options] --out DIR``: run one suite, write JSON and Markdown."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hrdv2_dask.config import PRECISIONS

from . import SUITES
from .common import BackboneSpec, parse_model_options, write_results

log = logging.getLogger("benchmarks")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible; use --device cpu.")
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="hrdv2-dask benchmarks: each suite writes OUT/SUITE.json and OUT/SUITE.md.",
    )
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name in SUITES:
        module = importlib.import_module(f"benchmarks.{name}")
        summary = module.__doc__.splitlines()[0].split(": ", 1)[-1]
        p = sub.add_parser(name, help=summary, description=module.__doc__)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.add_argument(
            "--out", default="benchmarks/results", help="output folder (default: %(default)s)"
        )
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
        p.add_argument(
            "--model", default="vit_small_patch14_dinov2", help="backbone (default: %(default)s)"
        )
        p.add_argument(
            "--weights", help="checkpoint file; without it random weights (and the output says so)"
        )
        p.add_argument(
            "--model-options",
            type=parse_model_options,
            default={},
            help="timm.create_model overrides, e.g. embed_dim=64,depth=2,num_heads=4",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="backbone arithmetic, as `hrdv2 features --precision` (default: %(default)s)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import distributed  # noqa: F401  (it sets its loggers to INFO on import: import it first)

    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for name in ("benchmarks", "hrdv2_dask"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    module = importlib.import_module(f"benchmarks.{args.suite}")
    spec = BackboneSpec(
        model=args.model,
        weights=args.weights,
        device=_device(args.device),
        model_options=tuple(sorted(args.model_options.items())),
        seed=args.seed,
        precision=args.precision,
    )
    result = module.run(args, spec)
    markdown = module.to_markdown(result)
    json_path, md_path = write_results(args.out, args.suite, result, markdown)
    print(markdown)
    print(f"\nwritten: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
