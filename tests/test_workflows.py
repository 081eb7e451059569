"""Workflow files: the shipped ones validate; bad keys and values give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import hrdv2_dask as hd
from hrdv2_dask.pipeline.plan import transform_set
from hrdv2_dask.workflows import SlurmSettings, Workflow, load_workflow

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.yaml"))


def test_there_are_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"demo", "wsi_pca_cluster", "micrograph_scribbles"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflows_validate(path):
    wf = load_workflow(path)
    assert wf.analyses
    assert len(transform_set(wf.features, 14)) >= 9
    again = Workflow.from_dict(wf.to_dict())
    assert again == wf


def test_scribble_labels_ship_with_the_workflow():
    wf = load_workflow(Path(WORKFLOWS[0]).parent / "micrograph_scribbles.yaml")
    labels = Path(wf.analyses[0].options.labels)
    assert labels.is_file()


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"featurez": {}}, "Did you mean 'features'"),
        ({"features": {"tile_px": 518}}, "Unknown key features.tile_px"),
        ({"features": {"dtype": "int8"}}, "features.dtype"),
        ({"features": {"shifts": [0]}}, "features.shifts"),
        ({"analyses": [{"pcaa": {}}]}, "Did you mean 'pca'"),
        ({"analyses": [{"cluster": {"k": 1}}]}, "cluster.k"),
        ({"analyses": [{"cluster": {"kk": 3}}]}, "Unknown key analyses\\[0\\].cluster.kk"),
        ({"analyses": [{"similarity": {}}]}, "exactly one of points"),
        ({"analyses": [{"segment": {}}]}, "needs labels"),
        ({"cluster": {"workers": 0}}, "cluster.workers"),
        ({"cluster": {"kind": "kubernetes"}}, "cluster.kind must be one of"),
        ({"cluster": {"kind": "cuda", "scheduler": "tcp://h:8786"}}, "excludes cluster.kind"),
        ({"cluster": {"slurm": {"queue": "gpu"}}}, "only used with cluster.kind: slurm"),
        (
            {"cluster": {"kind": "slurm", "slurm": {"queu": "gpu"}}},
            "Unknown key cluster.slurm.queu. Did you mean 'queue'",
        ),
        ({"cluster": {"kind": "slurm", "slurm": {"walltime": "2h"}}}, "cluster.slurm.walltime"),
        ({"cluster": {"kind": "slurm", "slurm": {"walltime": 14400}}}, "quoted in YAML"),
        ({"cluster": {"kind": "slurm", "slurm": {"memory": "lots"}}}, "cluster.slurm.memory"),
        ({"cluster": {"kind": "slurm", "slurm": {"cores": 0}}}, "cluster.slurm.cores"),
        (
            {"cluster": {"kind": "slurm", "slurm": {"gpus_per_job": 4}}},
            "gpus_per_job must be 0 .* or 1 .* cluster.workers: N",
        ),
        (
            {"cluster": {"kind": "slurm", "slurm": {"job_extra": "--exclusive"}}},
            "cluster.slurm.job_extra must be a list",
        ),
        ({"input": None}, "needs input"),
    ],
)
def test_bad_workflows_are_clear_errors(tmp_path, patch, match):
    data = {"input": "sample", "output_dir": "out", "analyses": [{"pca": {}}], **patch}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(hd.ConfigError, match=match):
        load_workflow(path)


def test_relative_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "sub" / "wf.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"input": "img.png", "output_dir": "out"}))
    wf = load_workflow(path)
    assert wf.input == str(path.parent / "img.png") and wf.output_dir == str(path.parent / "out")


def test_slurm_workflow_describes_the_jobs():
    from hrdv2_dask.pipeline.cluster import slurm_cluster_kwargs

    wf = load_workflow(Path(WORKFLOWS[0]).parent / "slurm_features.yaml")
    assert wf.cluster.kind == "slurm" and wf.cluster.workers == 8
    kw = slurm_cluster_kwargs(wf.cluster.slurm)
    assert kw["queue"] == "gpu" and kw["walltime"] == "04:00:00" and kw["memory"] == "64GB"
    assert "--gres=gpu:1" in kw["job_extra_directives"]


def test_slurm_kind_alone_uses_the_dask_config_defaults():
    wf = Workflow.from_dict({"input": "a.png", "output_dir": "o", "cluster": {"kind": "slurm"}})
    assert wf.cluster.slurm == SlurmSettings()
    assert Workflow.from_dict(wf.to_dict()) == wf
