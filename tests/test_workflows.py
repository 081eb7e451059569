"""Workflow files: the shipped ones validate; bad keys and values give clear errors."""

from __future__ import annotations

import json
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


def test_stack_workflow_runs_every_plane_with_one_intensity_mapping(tmp_path, local_client):
    """``micrograph_stack.yaml`` as shipped, on the filter bank at a coarse out_stride (no
    DINOv2 weights here): four members, one shared mapping recorded, every plane's PCA and
    clusters written, with the collection section of the YAML reaching extract_collection."""
    import dataclasses

    from hrdv2_dask.workflows import load_workflow, run_workflow

    wf = load_workflow(Path(WORKFLOWS[0]).parent / "micrograph_stack.yaml")
    assert wf.collection.intensity == "shared"
    features = dataclasses.replace(wf.features, model="filterbank", out_stride=8, tile=320)
    wf = dataclasses.replace(wf, features=features, output_dir=str(tmp_path / "out"))
    summary = run_workflow(wf, client=local_client, progress=False)
    keys = ["z000", "z001", "z002", "z003"]
    assert sorted(summary["feature_shape"]) == keys
    tree = hd.open_collection(tmp_path / "out" / "features.zarr")
    assert tree.attrs["settings"]["intensity"] == "shared"
    ranges = {tuple(tree[k]["features"].attrs["value_range"]) for k in keys}
    assert len(ranges) == 1
    for step in ("pca", "cluster"):
        assert (
            sorted(json.loads((tmp_path / "out" / step / "summary.json").read_text())["members"])
            == keys
        )
        assert (tmp_path / "out" / step / "contact_sheet.png").is_file()
