"""Declarative workflows: a YAML file that chains feature extraction and analyses.

Example (``workflows/demo.yaml``)::

    input: sample            # a path, or "sample" for the built-in texture mosaic
    output_dir: hrdv2-demo
    features: {model: dinov2_vits14, shifts: [1], tile: 504, out_stride: 4}
    analyses:
      - pca: {components: 3}
      - cluster: {k: 6}

Every section is a frozen dataclass built by ``from_dict``, which rejects unknown keys and bad
values with a message that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import CLUSTERS
from .errors import ConfigError

__all__ = [
    "AnalysisStep",
    "ClusterSettings",
    "FeatureSettings",
    "SlurmSettings",
    "Workflow",
    "load_workflow",
    "run_workflow",
]

log = logging.getLogger(__name__)


def _from_dict(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}.")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"Unknown key {where}.{key}.{extra} Known keys: {sorted(names)}.")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class FeatureSettings:
    """The ``features`` section: backbone, ensemble, tiling and storage."""

    model: str = "dinov2_vits14"
    weights: str | None = None
    shifts: tuple[int, ...] = (1,)
    neighbourhood: str = "moore"
    boundary: str = "reflect"
    flips: bool = False
    stride: int | None = None
    tile: int = 518
    overlap: int | None = None
    out_stride: int = 1
    dtype: str = "float16"
    device: str = "auto"
    batch_size: int | None = None
    model_options: dict | None = None  # passed to timm.create_model (e.g. tiny test models)
    components: int | None = None
    mask: str | None = None  # "auto", "auto-dark" or a mask image path
    debias: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "shifts",
            tuple(self.shifts) if isinstance(self.shifts, list | tuple) else (self.shifts,),
        )
        _check(
            all(isinstance(s, int) and s > 0 for s in self.shifts),
            f"features.shifts must be positive integers, got {self.shifts!r}.",
        )
        _check(
            self.neighbourhood in ("moore", "von_neumann"),
            f"features.neighbourhood must be 'moore' or 'von_neumann', got {self.neighbourhood!r}.",
        )
        _check(
            self.boundary in ("reflect", "periodic"),
            f"features.boundary must be 'reflect' or 'periodic', got {self.boundary!r}.",
        )
        _check(
            self.dtype in ("float16", "float32"),
            f"features.dtype must be 'float16' or 'float32', got {self.dtype!r}.",
        )
        for name in ("tile", "out_stride"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and value > 0,
                f"features.{name} must be a positive integer, got {value!r}.",
            )
        _check(
            self.components is None or (isinstance(self.components, int) and self.components > 0),
            f"features.components must be a positive integer or null, got {self.components!r}.",
        )
        _check(
            self.mask is None or (isinstance(self.mask, str) and self.mask != ""),
            "features.mask must be 'auto', 'auto-dark' or the path of a mask image, got "
            f"{self.mask!r}.",
        )
        _check(
            isinstance(self.debias, int) and not isinstance(self.debias, bool) and self.debias >= 0,
            f"features.debias must be a number of windows >= 0 (e.g. 16), got {self.debias!r}.",
        )

    def transforms(self):
        """The transform set these settings describe (shift lengths checked against the patch)."""
        import re

        from .backbones import model_spec
        from .transforms import combine, flips, shifts

        patch = re.search(r"patch(\d+)", model_spec(self.model).timm_name)
        patch_size = int(patch[1]) if patch else 14
        sets = [shifts(self.shifts, self.neighbourhood, self.boundary, patch_size=patch_size)]
        if self.flips:
            sets.append(flips())
        return combine(*sets)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shifts"] = list(self.shifts)
        return d


_WALLTIME = re.compile(r"(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})")


def _optional_text(value: Any, where: str) -> None:
    _check(
        value is None or (isinstance(value, str) and value.strip() != ""),
        f"{where} must be a non-empty string or null, got {value!r}.",
    )


@dataclass(frozen=True)
class SlurmSettings:
    """The ``cluster.slurm`` section: one SLURM job per Dask worker (dask-jobqueue).

    Settings left ``null`` come from the Dask config (``jobqueue.slurm``) or SLURM's defaults.
    The number of jobs is ``cluster.workers``.
    """

    queue: str | None = None  # partition (#SBATCH -p)
    account: str | None = None  # #SBATCH -A
    walltime: str | None = None  # "HH:MM:SS" or "D-HH:MM:SS"
    cores: int | None = None  # CPU cores booked per job (torch threads)
    memory: str | None = None  # memory per job, e.g. "32GB"
    gpus_per_job: int = 1  # 0: CPU jobs; 1: one GPU per job (--gres=gpu:1, GPU resource)
    job_extra: tuple[str, ...] = ()  # more #SBATCH lines, e.g. ["--constraint=a100"]
    local_directory: str | None = None  # node-local scratch for the workers
    python: str | None = None  # the workers' python (default: this one)

    def __post_init__(self) -> None:
        for name in ("queue", "account", "local_directory", "python"):
            _optional_text(getattr(self, name), f"cluster.slurm.{name}")
        _check(
            self.walltime is None
            or (isinstance(self.walltime, str) and _WALLTIME.fullmatch(self.walltime)),
            "cluster.slurm.walltime must be a SLURM time such as '02:00:00' or '1-00:00:00' "
            f"(quoted in YAML), got {self.walltime!r}.",
        )
        _check(
            self.cores is None or (isinstance(self.cores, int) and self.cores > 0),
            f"cluster.slurm.cores must be a positive integer, got {self.cores!r}.",
        )
        _check(
            self.memory is None or (isinstance(self.memory, str) and _bytes(self.memory) > 0),
            f"cluster.slurm.memory must be an amount such as '32GB', got {self.memory!r}.",
        )
        _check(
            self.gpus_per_job in (0, 1) and not isinstance(self.gpus_per_job, bool),
            "cluster.slurm.gpus_per_job must be 0 (CPU jobs) or 1 (one Dask worker per GPU; "
            f"for N GPUs set cluster.workers: N), got {self.gpus_per_job!r}.",
        )
        extra = self.job_extra
        _check(
            isinstance(extra, list | tuple) and all(isinstance(e, str) and e for e in extra),
            f"cluster.slurm.job_extra must be a list of #SBATCH options such as "
            f"['--constraint=a100'], got {extra!r}.",
        )
        object.__setattr__(self, "job_extra", tuple(extra))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "job_extra": list(self.job_extra)}


def _bytes(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        return 0


@dataclass(frozen=True)
class ClusterSettings:
    """The ``cluster`` section: where the Dask graph runs.

    ``kind`` is ``local`` (an embedded LocalCluster), ``cuda`` (one worker per GPU of this
    host, dask-cuda) or ``slurm`` (SLURM jobs, dask-jobqueue; settings in ``slurm``);
    ``scheduler`` connects to an existing cluster instead. ``workers`` counts worker processes
    (local), GPUs (cuda) or SLURM jobs (slurm).
    """

    kind: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    slurm: SlurmSettings | None = None

    def __post_init__(self) -> None:
        _check(
            self.kind in CLUSTERS,
            f"cluster.kind must be one of {list(CLUSTERS)}, got {self.kind!r}.",
        )
        _check(
            self.workers is None or (isinstance(self.workers, int) and self.workers > 0),
            f"cluster.workers must be a positive integer, got {self.workers!r}.",
        )
        _optional_text(self.scheduler, "cluster.scheduler")
        _check(
            self.scheduler is None or self.kind == "local",
            f"cluster.scheduler ({self.scheduler!r}) connects to workers that are already "
            f"deployed; it excludes cluster.kind: {self.kind}. Drop one of them.",
        )
        _check(
            self.slurm is None or self.kind == "slurm",
            f"cluster.slurm is only used with cluster.kind: slurm, not {self.kind!r}.",
        )
        if self.kind == "slurm" and self.slurm is None:
            object.__setattr__(self, "slurm", SlurmSettings())

    @classmethod
    def from_dict(cls, data: Any, where: str = "cluster") -> ClusterSettings:
        if isinstance(data, dict) and data.get("slurm") is not None:
            data = {**data, "slurm": _from_dict(SlurmSettings, data["slurm"], f"{where}.slurm")}
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["slurm"] = None if self.slurm is None else self.slurm.to_dict()
        return d


_ANALYSES = {
    "pca": {"components": 3, "foreground": False, "samples": 100_000, "seed": 0},
    "cluster": {"k": 6, "samples": 100_000, "seed": 0},
    "similarity": {"points": None, "box": None},
    "segment": {
        "labels": None,
        "method": "random_forest",
        "holdout": 0.2,
        "seed": 0,
        "proba": False,
    },
}


@dataclass(frozen=True)
class AnalysisStep:
    """One entry of ``analyses``: a kind and its options (defaults filled in)."""

    kind: str
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> AnalysisStep:
        if not isinstance(data, dict) or len(data) != 1:
            raise ConfigError(
                f"{where} must be a one-key mapping such as {{pca: {{components: 3}}}}, "
                f"got {data!r}."
            )
        ((kind, opts),) = data.items()
        if kind not in _ANALYSES:
            hint = difflib.get_close_matches(str(kind), _ANALYSES, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"Unknown analysis {kind!r} in {where}.{extra} Known: {sorted(_ANALYSES)}."
            )
        opts = opts or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}.{kind} options must be a mapping, got {opts!r}.")
        defaults = _ANALYSES[kind]
        for key in opts:
            if key not in defaults:
                raise ConfigError(
                    f"Unknown key {where}.{kind}.{key}. Known keys: {sorted(defaults)}."
                )
        merged = {**defaults, **opts}
        if kind == "cluster":
            _check(
                isinstance(merged["k"], int) and 2 <= merged["k"] <= 65535,
                f"{where}.cluster.k must be an integer in 2..65535, got {merged['k']!r}.",
            )
        if kind == "pca":
            _check(
                isinstance(merged["components"], int) and merged["components"] >= 1,
                f"{where}.pca.components must be a positive integer, got {merged['components']!r}.",
            )
        if kind == "similarity":
            _check(
                (merged["points"] is None) != (merged["box"] is None),
                f"{where}.similarity needs exactly one of points: [[y, x], ...] or "
                "box: [y0, x0, y1, x1].",
            )
        if kind == "segment":
            _check(
                merged["labels"] is not None,
                f"{where}.segment needs labels: PATH (a sparse label image).",
            )
            _check(
                merged["method"] in ("random_forest", "logistic"),
                f"{where}.segment.method must be 'random_forest' or 'logistic', "
                f"got {merged['method']!r}.",
            )
        return cls(kind=kind, options=merged)


@dataclass(frozen=True)
class Workflow:
    """A whole workflow file."""

    input: str
    output_dir: str
    features: FeatureSettings = field(default_factory=FeatureSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    analyses: tuple[AnalysisStep, ...] = ()
    sample_size: int = 2048

    @classmethod
    def from_dict(cls, data: Any, *, base: Path | None = None) -> Workflow:
        if not isinstance(data, dict):
            raise ConfigError(
                f"A workflow must be a mapping at the top level, got {type(data).__name__}."
            )
        known = {"input", "output_dir", "features", "cluster", "analyses", "sample_size"}
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" Did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(
                    f"Unknown top-level key {key!r}.{extra} Known keys: {sorted(known)}."
                )
        for key in ("input", "output_dir"):
            _check(
                isinstance(data.get(key), str) and data[key], f"The workflow needs {key}: (a path)."
            )
        analyses = data.get("analyses") or []
        _check(isinstance(analyses, list), f"analyses must be a list, got {analyses!r}.")

        def resolve(p: str) -> str:
            return p if p == "sample" or base is None or os.path.isabs(p) else str(base / p)

        steps = tuple(AnalysisStep.from_dict(a, f"analyses[{i}]") for i, a in enumerate(analyses))
        steps = tuple(
            AnalysisStep(s.kind, {**s.options, "labels": resolve(s.options["labels"])})
            if s.kind == "segment"
            else s
            for s in steps
        )
        features = _from_dict(FeatureSettings, data.get("features"), "features")
        if features.mask is not None and features.mask not in ("auto", "auto-dark"):
            features = dataclasses.replace(features, mask=resolve(features.mask))
        return cls(
            input=resolve(data["input"]),
            output_dir=resolve(data["output_dir"]),
            features=features,
            cluster=ClusterSettings.from_dict(data.get("cluster")),
            analyses=steps,
            sample_size=int(data.get("sample_size", 2048)),
        )

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "output_dir": self.output_dir,
            "features": self.features.to_dict(),
            "cluster": self.cluster.to_dict(),
            "analyses": [{s.kind: dict(s.options)} for s in self.analyses],
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


def _features_for(wf: Workflow, out: Path, *, client=None, progress: bool = True):
    from .demo import write_sample_image
    from .errors import WeightsNotFoundError
    from .extract import extract

    source = wf.input
    if source == "sample":
        source = str(
            write_sample_image(out / "sample.zarr", size=wf.sample_size, png=out / "sample.png")
        )
    f = wf.features
    weights = f.weights
    if weights is None:
        from .backbones import load_backbone

        try:
            load_backbone(f.model, stride=f.stride, **(f.model_options or {}))
        except WeightsNotFoundError as err:
            log.warning("%s", err)
            log.warning("*** continuing with RANDOM WEIGHTS: the outputs show no real features ***")
            weights = "random"
    return extract(
        source,
        out / "features.zarr",
        backbone=f.model,
        weights=weights,
        transforms=f.transforms(),
        tile=f.tile,
        overlap=f.overlap,
        out_stride=f.out_stride,
        dtype=f.dtype,
        client=client,
        stride=f.stride,
        device=f.device,
        workers=wf.cluster.workers,
        scheduler=wf.cluster.scheduler,
        cluster=wf.cluster.kind,
        slurm=wf.cluster.slurm,
        batch_size=f.batch_size,
        progress=progress,
        model_options=f.model_options or {},
        components=f.components,
        mask=f.mask,
        debias=f.debias,
    )


def run_analysis(step: AnalysisStep, features, out: Path) -> dict:
    """Run one analysis on an opened feature store; write Zarr + PNG under ``out``."""
    from . import analysis as an
    from .io import outputs

    o = step.options
    attrs = {"analysis": step.kind, "options": {k: v for k, v in o.items()}}
    if step.kind == "pca":
        model = an.fit_pca(
            features,
            components=o["components"],
            n_samples=o["samples"],
            seed=o["seed"],
            foreground=o["foreground"],
        )
        written = [out / "pca.zarr"]
        if model.n_components >= 3:
            rgb = an.pca_rgb(features, model)
            outputs.write_ome_pyramid(rgb, out / "pca.ome.zarr", overwrite=True)
            outputs.write_png(rgb, out / "pca.png")
            written += [out / "pca.ome.zarr", out / "pca.png"]
        outputs.write_array(
            model.project(features),
            out / "pca.zarr",
            attrs={**attrs, **model.to_dict()},
            overwrite=True,
        )
        return {
            "pca": [str(p) for p in written],
            "explained_variance_ratio": [
                round(float(v), 4) for v in model.explained_variance_ratio
            ],
        }
    if step.kind == "cluster":
        model = an.fit_kmeans(features, k=o["k"], n_samples=o["samples"], seed=o["seed"])
        labels = model.predict(features)
        outputs.write_labels(
            labels, out / "clusters.zarr", attrs={**attrs, **model.to_dict()}, overwrite=True
        )
        outputs.write_png(labels, out / "clusters.png", palette=outputs.PALETTE)
        return {"cluster": [str(out / "clusters.zarr"), str(out / "clusters.png")]}
    if step.kind == "similarity":
        sim = an.similarity(features, points=o["points"], box=o["box"], dtype="float16")
        outputs.write_array(sim, out / "similarity.zarr", attrs=attrs, overwrite=True)
        outputs.write_png(sim, out / "similarity.png")
        return {"similarity": [str(out / "similarity.zarr"), str(out / "similarity.png")]}
    if step.kind == "segment":
        from .io.readers import open_image

        data, _ = open_image(o["labels"])
        labels = data[..., 0]
        seg, report = an.fit_segmenter(
            features, labels, method=o["method"], holdout=o["holdout"], seed=o["seed"]
        )
        pred = seg.predict(features)
        outputs.write_labels(
            pred, out / "segmentation.zarr", attrs={**attrs, **report}, overwrite=True
        )
        outputs.write_png(pred, out / "segmentation.png", palette=outputs.PALETTE)
        if o["proba"]:
            outputs.write_array(
                seg.predict(features, proba=True),
                out / "probabilities.zarr",
                attrs=attrs,
                overwrite=True,
            )
        return {
            "segment": [str(out / "segmentation.zarr"), str(out / "segmentation.png")],
            **report,
        }
    raise ConfigError(f"Unknown analysis {step.kind!r}.")  # pragma: no cover - validated earlier


def run_workflow(wf: Workflow | str | os.PathLike, *, client=None, progress: bool = True) -> dict:
    """Run a workflow: features, then each analysis; returns and writes ``summary.json``."""
    import json

    if not isinstance(wf, Workflow):
        wf = load_workflow(wf)
    out = Path(wf.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = _features_for(wf, out, client=client, progress=progress)
    summary: dict[str, Any] = {
        "workflow": wf.to_dict(),
        "features": str(out / "features.zarr"),
        "feature_shape": dict(features.sizes),
        "random_weights": bool(features.attrs.get("random_weights")),
        "analyses": [],
    }
    for step in wf.analyses:
        log.info("analysis: %s", step.kind)
        summary["analyses"].append(run_analysis(step, features, out))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
