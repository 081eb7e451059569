"""Declarative workflows: a YAML file that chains feature extraction and analyses.

Example (``workflows/demo.yaml``)::

    input: sample            # a path, or "sample" for the built-in texture mosaic
    output_dir: hrdv2-demo
    features: {model: dinov2_vits14, shifts: [1], tile: 504, out_stride: 4}
    analyses:
      - pca: {components: 3}
      - cluster: {k: 6}

The sections are the schema's settings (:mod:`hrdv2_dask.config`): ``features`` is
:class:`~hrdv2_dask.config.FeatureSettings`, ``cluster`` :class:`~hrdv2_dask.config.ClusterSettings`
and each analysis its registered options (:mod:`hrdv2_dask.analysis.registry`), so a key means
the same here, on the command line and in Python, with the same defaults and limits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from .analysis.registry import get_analysis
from .config import (
    ClusterSettings,
    CollectionSettings,
    FeatureSettings,
    Settings,
    SlurmSettings,
    unknown_key,
)
from .errors import ConfigError, WeightsNotFoundError

__all__ = [
    "AnalysisStep",
    "ClusterSettings",
    "FeatureSettings",
    "SlurmSettings",
    "Workflow",
    "load_workflow",
    "run_analysis",
    "run_workflow",
]

log = logging.getLogger(__name__)

_TOP_KEYS = (
    "input",
    "output_dir",
    "features",
    "cluster",
    "collection",
    "analyses",
    "sample_size",
)


@dataclass(frozen=True)
class AnalysisStep:
    """One entry of ``analyses``: a registered analysis and its checked options."""

    kind: str
    options: Settings

    @classmethod
    def from_dict(cls, data: Any, where: str) -> AnalysisStep:
        if not isinstance(data, dict) or len(data) != 1:
            raise ConfigError(
                f"{where} must be a one-key mapping such as {{pca: {{components: 3}}}}, "
                f"got {data!r}."
            )
        ((kind, opts),) = data.items()
        analysis = get_analysis(kind, where)
        return cls(kind=kind, options=analysis.options.from_dict(opts, f"{where}.{kind}"))

    def to_dict(self) -> dict:
        return {self.kind: self.options.to_dict()}


@dataclass(frozen=True)
class Workflow:
    """A whole workflow file."""

    input: str
    output_dir: str
    features: FeatureSettings = field(default_factory=FeatureSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    collection: CollectionSettings = field(default_factory=CollectionSettings)
    analyses: tuple[AnalysisStep, ...] = ()
    sample_size: int = 2048

    @classmethod
    def from_dict(cls, data: Any, *, base: Path | None = None) -> Workflow:
        if not isinstance(data, dict):
            raise ConfigError(
                f"A workflow must be a mapping at the top level, got {type(data).__name__}."
            )
        for key in data:
            if key not in _TOP_KEYS:
                raise unknown_key(key, _TOP_KEYS, "top-level ")
        for key in ("input", "output_dir"):
            if not (isinstance(data.get(key), str) and data[key]):
                raise ConfigError(f"The workflow needs {key}: (a path).")
        analyses = data.get("analyses") or []
        if not isinstance(analyses, list):
            raise ConfigError(f"analyses must be a list, got {analyses!r}.")

        def resolve(p: str) -> str:
            return p if p == "sample" or base is None or os.path.isabs(p) else str(base / p)

        steps = []
        for i, entry in enumerate(analyses):
            step = AnalysisStep.from_dict(entry, f"analyses[{i}]")
            paths = {  # the options that are paths: relative to the workflow file
                name: resolve(getattr(step.options, name))
                for name in ("labels", "save_model")
                if isinstance(getattr(step.options, name, None), str)
            }
            if paths:
                step = AnalysisStep(step.kind, step.options.replace(**paths))
            steps.append(step)
        features = FeatureSettings.from_dict(data.get("features"))
        if features.mask is not None and features.mask not in ("auto", "auto-dark"):
            features = features.replace(mask=resolve(features.mask))
        return cls(
            input=resolve(data["input"]),
            output_dir=resolve(data["output_dir"]),
            features=features,
            cluster=ClusterSettings.from_dict(data.get("cluster")),
            collection=CollectionSettings.from_dict(data.get("collection")),
            analyses=tuple(steps),
            sample_size=int(data.get("sample_size", 2048)),
        )

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output_dir": self.output_dir,
            "features": self.features.to_dict(),
            "cluster": self.cluster.to_dict(),
            "collection": self.collection.to_dict(),
            "analyses": [s.to_dict() for s in self.analyses],
            "sample_size": self.sample_size,
        }


def load_workflow(path: str | os.PathLike) -> Workflow:
    """Read and validate a workflow YAML file (relative paths are relative to the file)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Workflow file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Workflow file {str(path)!r} is not valid YAML: {err}") from err
    return Workflow.from_dict(data, base=path.parent)


def extract_options(*sections: Settings) -> dict[str, Any]:
    """The keywords of :func:`hrdv2_dask.extract` (or ``extract_collection``) for these settings
    sections, by their Python names."""
    options = {}
    for settings in sections:
        names = type(settings).api_names()
        options.update({api: getattr(settings, name) for api, name in names.items()})
    return options


def _weights_or_random(f: FeatureSettings) -> str | None:
    """``f.weights``, or ``"random"`` (loudly) when no weights can be found for the model."""
    if f.weights is not None:
        return f.weights
    from .backbones import load_backbone

    try:
        load_backbone(f.model, stride=f.stride, **(f.model_options or {}))
    except WeightsNotFoundError as err:
        log.warning("%s", err)
        log.warning("*** continuing with RANDOM WEIGHTS: the outputs show no real features ***")
        return "random"
    return None


def _features_for(wf: Workflow, out: Path, *, client=None, progress: bool = True):
    from .io.samples import write_sample_image
    from .pipeline import extract

    source = wf.input
    if source == "sample":
        source = str(
            write_sample_image(out / "sample.zarr", size=wf.sample_size, png=out / "sample.png")
        )
    features = dataclasses.replace(wf.features, weights=_weights_or_random(wf.features))
    if features.plane is None and not _one_image(source, features):
        # several images (a stack, a folder...): a collection store; analyses run on its tree
        from .pipeline.collection import extract_collection

        run, options = extract_collection, extract_options(features, wf.cluster, wf.collection)
    else:
        run, options = extract, extract_options(features, wf.cluster)
    result = run(source, out / "features.zarr", client=client, progress=progress, **options)
    for row in result.attrs.get("members", []) if run is not extract else []:
        if row.get("status") == "failed":
            log.warning("member %s failed, left out: %s", row.get("key"), row.get("error"))
    return result


def _one_image(source: str, features: FeatureSettings) -> bool:
    from .pipeline.members import list_members

    return list_members(source, axes=features.axes, level=features.level).single


def run_analysis(step: AnalysisStep, features, out: Path) -> dict:
    """Run one analysis on an opened feature store; write Zarr + PNG under ``out``."""
    return get_analysis(step.kind, "analyses").run(step.options, features, out)


def run_workflow(wf: Workflow | str | os.PathLike, *, client=None, progress: bool = True) -> dict:
    """Run a workflow: features, then each analysis; returns and writes ``summary.json``.

    A fault reading or writing anywhere in it ends in one line (a
    :class:`~hrdv2_dask.errors.Hrdv2Error`); outputs appear only once complete.
    """
    from .pipeline.faults import results_faults

    if not isinstance(wf, Workflow):
        wf = load_workflow(wf)
    with results_faults(wf.output_dir):
        return _run_workflow(wf, client=client, progress=progress)


def _run_workflow(wf: Workflow, *, client, progress: bool) -> dict:
    from .io.outputs import write_json

    out = Path(wf.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = _features_for(wf, out, client=client, progress=progress)
    tree = isinstance(features, xr.DataTree)
    attrs = features.attrs.get("settings", {}) if tree else features.attrs
    summary: dict[str, Any] = {
        "workflow": wf.to_dict(),
        "features": str(out / "features.zarr"),
        "feature_shape": (
            {k: dict(node["features"].sizes) for k, node in features.children.items()}
            if tree
            else dict(features.sizes)
        ),
        # which backbone produced what: a filter bank, real weights or random ones
        "backbone": attrs.get("model"),
        "weights_origin": attrs.get("weights_origin"),
        "random_weights": bool(attrs.get("random_weights")),
        "analyses": [],
    }
    log.info(
        "features by %s (weights: %s)", summary["backbone"], summary["weights_origin"] or "none"
    )
    for step in wf.analyses:
        log.info("analysis: %s", step.kind)
        # a collection's analyses each write OUT/<analysis>/<key>/, a contact sheet and a summary
        summary["analyses"].append(run_analysis(step, features, out / step.kind if tree else out))
    write_json(summary, out / "summary.json")
    return summary
