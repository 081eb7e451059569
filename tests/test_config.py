"""The one options schema: CLI, YAML and Python reach every option, with the same defaults and
the same limits, because all three are built from the same fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing

import pytest

import hrdv2_dask as hd
from hrdv2_dask.cli import build_parser, main
from hrdv2_dask.config import ClusterSettings, FeatureSettings, Settings, SlurmSettings
from hrdv2_dask.pipeline import split_options

SECTIONS = (FeatureSettings, ClusterSettings)


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _bad_values(cls: type[Settings]) -> list[tuple[str, object]]:
    """One out-of-limits value for every field that has a limit (range or choices)."""
    bad = []
    for name, spec in cls.specs().items():
        if spec.choices is not None:
            bad.append((name, "nope"))
        elif spec.minimum is not None:
            default = cls.defaults()[name]
            below = int(spec.minimum) - 1
            bad.append((name, (below,) if isinstance(default, tuple) else below))
    return bad


def _cli_flag(cls: type[Settings], name: str) -> str:
    spec = cls.specs()[name]
    return spec.cli or "--" + name.replace("_", "-")


def test_every_option_is_reachable_from_cli_yaml_and_python():
    parser = _subparser("features")
    dests = {a.dest for a in parser._actions}
    params = inspect.signature(hd.extract).parameters
    for cls in SECTIONS:
        for api, name in cls.api_names().items():
            inner = typing.get_type_hints(cls)[name]
            nested = any(
                isinstance(t, type) and issubclass(t, Settings) for t in typing.get_args(inner)
            )
            if nested:  # SLURM settings: --slurm-* flags, a YAML mapping, a Python object/dict
                assert {f"slurm_{f.name}" for f in dataclasses.fields(SlurmSettings)} <= dests
            else:
                assert name in dests, f"--{name} is missing from `hrdv2 features`"
            assert name in {f.name for f in dataclasses.fields(cls)}  # the YAML key
            assert api in params, f"extract() has no keyword {api!r}"
            assert params[api].kind is inspect.Parameter.KEYWORD_ONLY


def test_defaults_agree():
    args = build_parser().parse_args(["features", "in.png", "out.zarr"])
    assert FeatureSettings.from_args(args) == FeatureSettings()
    assert ClusterSettings.from_args(args) == ClusterSettings()
    assert FeatureSettings.from_dict({}) == FeatureSettings()
    params = inspect.signature(hd.extract).parameters
    for cls in SECTIONS:
        defaults = cls.defaults()
        for api, name in cls.api_names().items():
            assert params[api].default == defaults[name], api
    features, cluster = split_options({})
    assert (features, cluster) == (FeatureSettings(), ClusterSettings())


@pytest.mark.parametrize(
    "cls, name, value",
    [(cls, n, v) for cls in SECTIONS for n, v in _bad_values(cls)],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_limits_agree(cls, name, value, tmp_path, capsys):
    """The same bad value is refused by YAML, Python and the CLI, with the same message."""
    with pytest.raises(hd.ConfigError) as yaml_err:
        cls.from_dict({name: value})
    api = {n: a for a, n in cls.api_names().items()}[name]
    with pytest.raises(hd.ConfigError) as py_err:
        hd.extract(tmp_path / "img.npy", tmp_path / "out.zarr", **{api: value})
    assert str(py_err.value) == str(yaml_err.value)
    text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    argv = ["features", str(tmp_path / "img.npy"), str(tmp_path / "o.zarr")]
    try:
        code = main([*argv, _cli_flag(cls, name), text])
    except SystemExit as exit_:  # argparse itself refuses a value outside the choices
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert str(yaml_err.value) in err or "invalid choice" in err  # argparse checks choices
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "o.zarr").exists()


def test_unknown_python_option_suggests_the_closest(tmp_path):
    with pytest.raises(hd.ConfigError, match="Unknown option out_strid. Did you mean 'out_stride'"):
        hd.extract(tmp_path / "x.npy", tmp_path / "o.zarr", out_strid=2)


def test_round_trip_through_dicts():
    f = FeatureSettings(
        shifts=(1, 2), flips=True, value_range=(0.0, 4095.0), model_options={"d": 2}
    )
    assert FeatureSettings.from_dict(f.to_dict()) == f
    c = ClusterSettings(kind="slurm", workers=3, slurm=SlurmSettings(job_extra=("--x",)))
    assert ClusterSettings.from_dict(c.to_dict()) == c


def test_cli_values_arrive_typed():
    args = build_parser().parse_args(
        [
            "features",
            "in.png",
            "out.zarr",
            "--shifts",
            "1,2",
            "--model-option",
            "depth=2",
            "--value-range",
            "0,4095",
            "--cluster",
            "slurm",
            "--slurm-job-extra=--constraint=a100",
            "--slurm-memory",
            "8GB",
        ]
    )
    f, c = FeatureSettings.from_args(args), ClusterSettings.from_args(args)
    assert f.shifts == (1, 2) and f.model_options == {"depth": 2}
    assert f.value_range == (0.0, 4095.0)
    assert c.slurm == SlurmSettings(memory="8GB", job_extra=("--constraint=a100",))


def test_analysis_commands_come_from_the_registry():
    from hrdv2_dask.analysis.registry import ANALYSES

    assert {"pca", "cluster", "similarity", "segment"} <= set(ANALYSES)
    for name, analysis in ANALYSES.items():
        parser = _subparser(name)
        dests = {a.dest for a in parser._actions}
        assert {f.name for f in dataclasses.fields(analysis.options)} <= dests, name


def test_collection_options_come_from_the_schema():
    from hrdv2_dask.config import CollectionSettings

    dests = {a.dest for a in _subparser("features")._actions}
    params = inspect.signature(hd.extract_collection).parameters
    for api, name in CollectionSettings.api_names().items():
        assert name in dests and params[api].default == CollectionSettings.defaults()[name]
    for api in inspect.signature(hd.extract).parameters:
        if api != "source":
            assert api in params, api
    with pytest.raises(hd.ConfigError, match="collection.intensity must be one of"):
        hd.extract_collection([], "out.zarr", intensity="nope")
