"""The one options schema: every option is defined once, as a field of a frozen dataclass.

A field made with :func:`~hrdv2_dask._schema.option` carries its name (the YAML key and Python
keyword), its type (the annotation), its default, its limits and its help. From that one
definition come (see :class:`~hrdv2_dask._schema.Settings`):

- the check, run in ``__post_init__`` (the same message whether the value came from YAML, the
  command line or Python: what failed, the value and the fix);
- ``from_dict`` for YAML sections (unknown keys get "did you mean"), ``to_dict`` for attrs;
- the command-line arguments (``add_arguments``, ``from_args``);
- the keyword options of :func:`hrdv2_dask.extract` and of the analyses.

This module holds the sections of feature extraction and of the cluster; each analysis defines
its options beside its code (:mod:`hrdv2_dask.analysis`). A leaf: it imports only the schema
machinery, the errors and the device names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ._schema import Settings, Spec, option, unknown_key
from .device import check_device
from .errors import ConfigError

__all__ = [
    "ATTENTION",
    "CLUSTERS",
    "DTYPES",
    "FACETS",
    "PRECISIONS",
    "ClusterSettings",
    "CollectionSettings",
    "FeatureSettings",
    "Settings",
    "SlurmSettings",
    "Spec",
    "option",
    "unknown_key",
]

#: Where the Dask graph runs when no scheduler is given.
CLUSTERS = ("local", "cuda", "slurm")
#: Stored feature dtypes.
DTYPES = ("float16", "float32")
#: How the members of a collection map their intensities.
INTENSITIES = ("per-image", "shared")
#: What a ViT layer gives per patch: its output tokens or its attention's keys, queries, values.
FACETS = ("token", "key", "query", "value")
#: The class token's attention to the patches, per head: not given, after the facet, or alone.
ATTENTION = ("none", "append", "only")
#: Backbone arithmetic: bf16 autocast where the hardware has it natively (auto), or fixed.
PRECISIONS = ("auto", "fp32", "bf16")


# --- the feature, cluster and SLURM sections -------------------------------------------------

_WALLTIME = re.compile(r"(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})")


def _walltime(value: Any) -> str | None:
    return None if _WALLTIME.fullmatch(value) else "a SLURM time such as '02:00:00' or '1-00:00:00'"


def _memory(value: Any) -> str | None:
    from dask.utils import parse_bytes

    try:
        return None if parse_bytes(value) > 0 else "an amount such as '32GB'"
    except ValueError:
        return "an amount such as '32GB'"


def _device(value: Any) -> str | None:
    try:
        check_device(value)
    except ConfigError:
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"
    return None


def _channels(value: Any) -> str | None:
    if 1 <= len(value) <= 3 and len(set(value)) == len(value):
        return None
    return "one to three distinct channel indices (R, G, B in that order), e.g. 0,2,4"


def _positive_window(value: Any) -> str | None:
    return None if value[0] < value[1] else "(low, high) with low < high"


@dataclass(frozen=True)
class FeatureSettings(Settings):
    """The ``features`` section (YAML), the ``features`` command's options and
    :func:`hrdv2_dask.extract`'s keywords: backbone, ensemble, tiling, intensities, storage."""

    SECTION: ClassVar[str] = "features"

    model: str = option(
        "dinov2_vits14",
        "hub or timm model name (in Python also a backbone object or a factory)",
        api="backbone",
        python_value=lambda v: not isinstance(v, str),
    )
    weights: str | None = option(None, "checkpoint path, or 'random' (testing only)")
    random_seed: int = option(
        0,
        "seed of the random weights (with weights 'random'): the same seed, the same model",
        minimum=0,
    )
    model_options: dict | None = option(
        None,
        "passed to timm.create_model, repeatable (e.g. depth=2 for a small test model)",
        cli="--model-option",
        metavar="KEY=VALUE",
    )
    layer: int = option(
        -1,
        "transformer block whose features are taken (negative: from the end; -1: the last, "
        "after the final norm)",
        fix="E.g. -1 (the last block) or 9.",
    )
    facet: str = option("token", "per-patch output of that block", choices=FACETS)
    attention: str = option(
        "none",
        "the class token's attention to the patches, one channel per head",
        choices=ATTENTION,
    )
    precision: str = option(
        "auto",
        "backbone arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 "
        "(AVX512-BF16/AMX), else fp32",
        choices=PRECISIONS,
    )
    shifts: tuple[int, ...] = option(
        (1,), "shift magnitudes in px, e.g. 1,2", minimum=1, fix="Shifts are lengths in px (1, 2)."
    )
    neighbourhood: str = option("moore", "shift directions", choices=("moore", "von_neumann"))
    boundary: str = option("reflect", "border rule of the shifts", choices=("reflect", "periodic"))
    flips: bool = option(False, "add horizontal and vertical flips")
    stride: int | None = option(None, "patch-embedding stride (stride trick)", minimum=1)
    tile: int = option(518, "window size in px", minimum=1)
    overlap: int | None = option(None, "window overlap in px", minimum=0)
    out_stride: int = option(1, "pixels per output cell", minimum=1)
    dtype: str = option("float16", "stored dtype", choices=DTYPES)
    device: str = option("auto", "auto, cpu or cuda", check=_device)
    batch_size: int | None = option(None, "images per backbone call", minimum=1)
    block: int | None = option(None, "chunks per block task side (default: from memory)", minimum=1)
    components: int | None = option(
        None,
        "keep K PCA channels (fitted on sample windows, projected on the workers)",
        minimum=1,
    )
    mask: str | None = option(
        None,
        "skip background windows: 'auto' (bright background, e.g. slides), 'auto-dark', or a "
        "mask image of the whole image at any scale (non-zero = foreground); skipped cells are NaN"
        " (in Python also a 2-D array)",
        fix="Give 'auto', 'auto-dark' or the path of a mask image.",
        python_value=lambda v: hasattr(v, "ndim"),
    )
    debias: int = option(
        0,
        "estimate the backbone's positional artefact over N windows and subtract it",
        minimum=0,
        metavar="N",
        fix="It is a number of windows (e.g. 16); 0 = off.",
    )
    value_range: tuple[float, float] | None = option(
        None,
        "intensities mapped to 0 and 1 (default: dtype range for uint8/bool, else the "
        "0.5/99.5 percentiles of a seeded sample of chunks)",
        check=_positive_window,
        metavar="LOW,HIGH",
    )
    axes: str | None = option(None, "axes of the source, e.g. CYX (default: from the file)")
    channels: tuple[int, ...] | None = option(
        None,
        "source channels the model sees as R, G, B, in that order (up to three; one: gray; "
        "two: B zero), e.g. 0,2,4; needed for images of more than 4 channels",
        minimum=0,
        check=_channels,
        metavar="C,C,C",
        fix="Channels are counted from 0 in the source's channel axis.",
    )
    level: int = option(0, "pyramid level of the source (0 = full resolution)", minimum=0)
    plane: int | None = option(
        None,
        "one plane of a Z/T stack (default: a stack is a collection of its planes)",
        minimum=0,
        metavar="K",
    )
    overwrite: bool = option(False, "replace a store made with other settings")
    stale_lock_hours: float = option(
        24.0,
        "take over a store's writer lock held from another host after this many hours (a lock "
        "of this host is taken over as soon as its process is gone)",
        minimum=0,
    )


@dataclass(frozen=True)
class SlurmSettings(Settings):
    """The ``cluster.slurm`` section: one SLURM job per Dask worker (dask-jobqueue).

    Settings left ``None`` come from the Dask config (``jobqueue.slurm``) or SLURM's defaults.
    The number of jobs is ``cluster.workers``.
    """

    SECTION: ClassVar[str] = "cluster.slurm"

    queue: str | None = option(None, "SLURM partition (#SBATCH -p)")
    account: str | None = option(None, "SLURM account (#SBATCH -A)")
    walltime: str | None = option(
        None,
        "job time limit, 'HH:MM:SS' or 'D-HH:MM:SS'",
        check=_walltime,
        fix="(It must be quoted in YAML: 04:00:00 unquoted reads as a number.)",
    )
    cores: int | None = option(None, "CPU cores booked per job (torch threads)", minimum=1)
    memory: str | None = option(None, "memory per job, e.g. 32GB", check=_memory)
    gpus_per_job: int = option(
        1,
        "0: CPU jobs; 1: one GPU per job (--gres=gpu:1, GPU resource)",
        check=lambda v: (
            None
            if v in (0, 1)
            else "0 (CPU jobs) or 1 (one Dask worker per GPU; for N GPUs set cluster.workers: N)"
        ),
    )
    job_extra: tuple[str, ...] = option(
        (),
        "more #SBATCH lines, e.g. --constraint=a100 (repeatable)",
        repeat=True,
        fix="A list of #SBATCH options such as ['--constraint=a100'].",
    )
    local_directory: str | None = option(None, "node-local scratch for the workers")
    python: str | None = option(None, "the workers' python (default: this one)")


@dataclass(frozen=True)
class ClusterSettings(Settings):
    """The ``cluster`` section: where the Dask graph runs.

    ``kind`` is ``local`` (an embedded LocalCluster), ``cuda`` (one worker per GPU of this
    host, dask-cuda) or ``slurm`` (SLURM jobs, dask-jobqueue; settings in ``slurm``);
    ``scheduler`` connects to an existing cluster instead. ``workers`` counts worker processes
    (local), GPUs (cuda) or SLURM jobs (slurm).
    """

    SECTION: ClassVar[str] = "cluster"

    kind: str = option(
        "local",
        "cluster to start: embedded (default), one worker per GPU (needs hrdv2-dask[cuda]) or "
        "SLURM jobs (needs hrdv2-dask[hpc]; settings from --slurm-* or the Dask config)",
        choices=CLUSTERS,
        cli="--cluster",
        api="cluster",
    )
    workers: int | None = option(
        None,
        "worker processes (local), GPUs (cuda) or SLURM jobs (slurm)",
        minimum=1,
        fix="It counts worker processes, GPUs or SLURM jobs.",
    )
    scheduler: str | None = option(
        None, "address of an existing Dask scheduler (instead of --cluster)"
    )
    slurm: SlurmSettings | None = option(None, "SLURM job settings (with kind slurm)")

    def _check_together(self) -> None:
        if self.scheduler is not None and self.kind != "local":
            raise ConfigError(
                f"cluster.scheduler ({self.scheduler!r}) connects to workers that are already "
                f"deployed; it excludes cluster.kind: {self.kind}. Drop one of them."
            )
        if self.slurm is not None and self.kind != "slurm":
            raise ConfigError(
                f"cluster.slurm is only used with cluster.kind: slurm, not {self.kind!r}."
            )
        if self.kind == "slurm" and self.slurm is None:
            object.__setattr__(self, "slurm", SlurmSettings())


@dataclass(frozen=True)
class CollectionSettings(Settings):
    """The options of a collection run (:func:`hrdv2_dask.extract_collection`, ``hrdv2
    features`` with a folder, a list or a stack) beyond those of one image."""

    SECTION: ClassVar[str] = "collection"

    intensity: str | None = option(
        None,
        "intensity mapping of the members: each its own (per-image) or one for all, estimated "
        "from a seeded sample across members (shared); default: shared for the planes of one "
        "stack, per-image otherwise",
        choices=INTENSITIES,
    )
    retry_failed: bool = option(False, "compute again the members that failed in an earlier run")
