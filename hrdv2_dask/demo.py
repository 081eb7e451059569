"""``hrdv2 demo``: a sample image, its features on an embedded cluster, and a PCA picture."""

from __future__ import annotations

import logging
import os

from .data import SAMPLE_IMAGES, make_sample_image, texture_mosaic
from .io.samples import write_sample_image
from .workflows import Workflow, run_workflow

__all__ = ["SAMPLE_IMAGES", "make_sample_image", "run_demo", "texture_mosaic", "write_sample_image"]

log = logging.getLogger(__name__)


def run_demo(
    out_dir: str | os.PathLike = "hrdv2-demo",
    *,
    size: int = 2048,
    weights: str | None = None,
    out_stride: int = 4,
    progress: bool = True,
    client=None,
    model_options: dict | None = None,
    model: str = "dinov2_vits14",
) -> dict:
    """The demo workflow: sample image → features on an embedded cluster → PCA picture, clusters.

    Uses real DINOv2 weights when they are given or cached; otherwise runs on random weights and
    says so loudly (the outputs are marked ``random_weights=True``); ``model="filterbank"`` needs
    no weights at all (classical features). The summary names the backbone. Same as
    ``hrdv2 run workflows/demo.yaml``.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    wf = Workflow.from_dict(
        {
            "input": "sample",
            "sample_size": size,
            "output_dir": str(out_dir),
            "features": {
                "model": model,
                "weights": weights,
                "shifts": [1],
                "tile": 504,  # a multiple of the patch size (14) and of the output stride (4)
                "out_stride": out_stride,
                "model_options": model_options,
            },
            "analyses": [{"pca": {"components": 3}}, {"cluster": {"k": 6}}],
        }
    )
    summary = run_workflow(wf, client=client, progress=progress)
    log.info(
        "demo written to %s (features by %s); look at pca.png and clusters.png",
        out_dir,
        summary["backbone"],
    )
    return summary
