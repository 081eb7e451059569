"""The analysis registry: one options schema per analysis, shared by YAML, CLI and Python."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from PIL import Image

from hrdv2_dask import analysis as an
from hrdv2_dask.analysis.kmeans import MAX_CLUSTERS
from hrdv2_dask.config import Settings
from hrdv2_dask.errors import ConfigError

pytest.importorskip("sklearn")

NAMES = ["cluster", "pca", "segment", "similarity"]

# values the Python functions need besides the options under test (labels is an array there)
PYTHON_BASE = {"segment": {"labels": np.ones((4, 4), int)}}
YAML_BASE = {"segment": {"labels": "labels.png"}}

# bad values beyond the ones derived from each spec's minimum, maximum, choices and type
BAD = [
    ("cluster", {"k": 10, "samples": 5}, "cluster.samples must be >= k"),
    ("similarity", {}, "needs exactly one of points"),
    ("similarity", {"points": [[1, 2]], "box": [0, 0, 1, 1]}, "needs exactly one of points"),
    ("similarity", {"points": []}, "non-empty list"),
    ("similarity", {"points": [[1, 2, 3]]}, "similarity.points must be"),
    ("similarity", {"box": [0, 0, 1]}, "similarity.box must be a list of 4 integers"),
    ("segment", {"labels": None}, "needs labels"),
    ("segment", {"holdout": 1.0}, r"segment.holdout must be a fraction in \[0, 1\)"),
    ("segment", {"holdout": -0.1}, r"segment.holdout must be a fraction in \[0, 1\)"),
]


def _features(shape=(32, 32), c: int = 6) -> xr.DataArray:
    """A tiny dask-backed ``(feature, y, x)`` store: two regions along x plus noise."""
    rng = np.random.default_rng(0)
    region = (np.arange(shape[1]) >= shape[1] // 2)[None, :].repeat(shape[0], 0)
    means = rng.normal(0, 3, (2, c))
    x = means[region.astype(int)].transpose(2, 0, 1) + rng.normal(0, 0.3, (c, *shape))
    return xr.DataArray(
        da.from_array(x.astype(np.float32), chunks=(c, 16, 16)),
        dims=("feature", "y", "x"),
        coords={"y": np.arange(shape[0]), "x": np.arange(shape[1])},
        attrs={"out_stride": 1},
    )


def _spec_cases() -> list[tuple[str, dict, str]]:
    """One bad value per limit the schema states: below minimum, above maximum, not a choice."""
    cases = []
    for name in NAMES:
        options = an.ANALYSES[name].options
        for field, spec in options.specs().items():
            where = f"{name}.{field} must be"
            if spec.minimum is not None:
                cases.append((name, {field: int(spec.minimum) - 1}, where))
            if spec.maximum is not None:
                cases.append((name, {field: int(spec.maximum) + 1}, where))
            if spec.choices is not None:
                cases.append((name, {field: "nope"}, where))
            if isinstance(options.defaults()[field], bool):
                cases.append((name, {field: "yes"}, where))
    return cases


def _call_python(name: str, features: xr.DataArray, values: dict) -> None:
    """The analysis's Python function with ``values`` given under their Python keywords."""
    record = an.ANALYSES[name]
    api = {field: keyword for keyword, field in record.options.api_names().items()}
    kwargs = {**PYTHON_BASE.get(name, {}), **{api[k]: v for k, v in values.items()}}
    record.function(features, **kwargs)


def test_every_analysis_is_registered_once_with_its_section():
    assert sorted(an.ANALYSES) == NAMES
    for name, record in an.ANALYSES.items():
        assert record.name == name and record.options.SECTION == name
        assert issubclass(record.options, Settings) and record.help
        assert callable(record.run) and callable(record.function)
    assert an.ANALYSES["cluster"].options.specs()["k"].maximum == MAX_CLUSTERS == 65536


@pytest.mark.parametrize("name", NAMES)
def test_option_defaults_are_the_python_keyword_defaults(name):
    record = an.ANALYSES[name]
    params = inspect.signature(record.function).parameters
    defaults = record.options.defaults()
    not_keywords = set()
    for keyword, field in record.options.api_names().items():
        param = params.get(keyword)
        if param is None or param.default is inspect.Parameter.empty:
            not_keywords.add(field)
            continue
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, keyword
        assert param.default == defaults[field], keyword
    # the labels array is a positional argument; proba is Segmenter.predict's; save_model the
    # model's save(path)
    assert not_keywords <= {"labels", "proba", "save_model"}
    if "labels" in defaults:
        assert params["labels"].default is inspect.Parameter.empty


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_through_yaml(name):
    options = an.ANALYSES[name].options
    base = {**YAML_BASE.get(name, {}), **({"points": [[1, 2]]} if name == "similarity" else {})}
    built = options.from_dict(base, where=f"analyses[0].{name}")
    assert options.from_dict(json.loads(json.dumps(built.to_dict()))) == built


@pytest.mark.parametrize(
    "name, values, match",
    BAD + _spec_cases(),
    ids=[f"{n}-{'-'.join(v) or 'nothing'}" for n, v, _ in BAD + _spec_cases()],
)
def test_limits_are_the_same_from_yaml_and_python(name, values, match):
    features = _features((8, 8))
    options = an.ANALYSES[name].options
    with pytest.raises(ConfigError, match=match) as from_yaml:
        options.from_dict({**YAML_BASE.get(name, {}), **values}, where=f"analyses[0].{name}")
    python_fields = set(options.api_names().values()) - {"proba"}
    if not set(values) <= python_fields:
        return  # only the workflow and the command line know this option
    with pytest.raises(ConfigError) as from_python:
        _call_python(name, features, values)
    assert str(from_python.value) == str(from_yaml.value)


def test_unknown_keys_and_names_get_suggestions():
    with pytest.raises(ConfigError, match=r"Unknown key analyses\[0\]\.cluster\.kk\. Did you"):
        an.KMeansOptions.from_dict({"kk": 3}, where="analyses[0].cluster")
    with pytest.raises(ConfigError) as err:
        an.get_analysis("pcaa", "analyses[0]")
    assert str(err.value) == (
        "Unknown analysis 'pcaa' in analyses[0]. Did you mean 'pca'? "
        "Known: ['cluster', 'pca', 'segment', 'similarity']."
    )
    with pytest.raises(ConfigError, match="Did you mean 'cluster'"):
        an.get_analysis("clustr")
    with pytest.raises(ConfigError, match="Unknown analysis 3 in analyses. Known"):
        an.get_analysis(3)
    assert an.get_analysis("segment") is an.ANALYSES["segment"]


def test_register_refuses_a_taken_name_or_another_section():
    def run(options, features, out):  # pragma: no cover - never registered
        return {}

    with pytest.raises(ConfigError, match="registered twice"):
        an.register("pca", an.PCAOptions, help="again", function=an.fit_pca)(run)
    with pytest.raises(ConfigError, match="SECTION is 'pca'"):
        an.register("pca2", an.PCAOptions, help="other", function=an.fit_pca)(run)
    assert sorted(an.ANALYSES) == NAMES


FIT = ("--images", "--sample")  # every analysis that fits, on a collection
SEGMENT = ("--train", "--test", "--save-model")
QUERIES = ("--query", "--query-box", "--query-mask", "--threshold")


def _parse(name: str, argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(exit_on_error=False)
    an.ANALYSES[name].options.add_arguments(parser)
    return parser, parser.parse_args(argv)


@pytest.mark.parametrize(
    "name, flags",
    [
        ("pca", {"--components", "--foreground", "--samples", "--seed", *FIT, "--save-model"}),
        ("cluster", {"-k", "--samples", "--seed", *FIT, "--save-model"}),
        ("similarity", {"--point", "--box", "--images", *QUERIES}),
        ("segment", {"--method", "--holdout", "--seed", "--proba", *FIT, *SEGMENT}),
    ],
)
def test_command_line_flags_are_todays(name, flags):
    parser, _ = _parse(name, ["labels.png"] if name == "segment" else [])
    given = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert given == flags
    positional = [a.dest for a in parser._actions if not a.option_strings]
    assert positional == (["labels"] if name == "segment" else [])


def test_command_line_values_build_the_options():
    KM, SIM, SEG = an.KMeansOptions, an.SimilarityOptions, an.SegmentOptions
    assert KM.from_args(_parse("cluster", ["-k", "3"])[1]) == KM(k=3)
    args = _parse("similarity", ["--point", "10,20", "--point", "1,2"])[1]
    assert SIM.from_args(args).points == ((10, 20), (1, 2))
    assert SIM.from_args(_parse("similarity", ["--box", "0,0,4,5"])[1]).box == (0, 0, 4, 5)
    with pytest.raises(ConfigError, match="needs exactly one of points"):
        SIM.from_args(_parse("similarity", [])[1])
    args = _parse("segment", ["l.png", "--method", "logistic", "--proba", "--holdout", "0"])[1]
    assert SEG.from_args(args) == SEG(labels="l.png", method="logistic", holdout=0.0, proba=True)


def _labels_png(path: Path, shape=(32, 32)) -> Path:
    labels = np.zeros(shape, np.uint8)
    labels[4:6, 2:14] = 1
    labels[20:22, 18:30] = 2
    Image.fromarray(labels).save(path)
    return path


def _reported_paths(summary: dict) -> list[Path]:
    return [Path(p) for v in summary.values() if isinstance(v, list) for p in v if "/" in str(p)]


@pytest.mark.parametrize(
    "name, values, files",
    [
        ("pca", {"samples": 500}, ["pca.zarr", "pca.ome.zarr", "pca.png"]),
        ("pca", {"components": 2, "samples": 500}, ["pca.zarr"]),
        ("cluster", {"k": 2, "samples": 500}, ["clusters.zarr", "clusters.png"]),
        ("similarity", {"box": [2, 3, 6, 9]}, ["similarity.zarr", "similarity.png"]),
        (
            "segment",
            {"proba": True},
            ["segmentation.zarr", "segmentation.png", "probabilities.zarr"],
        ),
    ],
)
def test_run_writes_the_files_it_reports(tmp_path, name, values, files):
    record = an.get_analysis(name)
    if name == "segment":
        values = {**values, "labels": str(_labels_png(tmp_path / "labels.png"))}
    options = record.options.from_dict(values)
    out = tmp_path / "out"
    out.mkdir()
    summary = record.run(options, _features(), out)
    json.dumps(summary)  # a JSON-able summary
    assert _reported_paths(summary) == [out / f for f in files]
    assert all(p.exists() for p in _reported_paths(summary))
    store = xr.open_zarr(out / files[0], consolidated=False)
    attrs = store[next(iter(store.data_vars))].attrs
    assert attrs["analysis"] == name and attrs["options"] == options.to_dict()
    if name == "pca":
        assert len(summary["explained_variance_ratio"]) == options.components
    if name == "segment":
        assert {"train_accuracy", "holdout_accuracy", "classes"} <= set(summary)
        assert summary["classes"] == [1, 2] and (out / "probabilities.zarr").exists()
