"""Random weights are reproducible: built from ``random_seed`` on every worker, never shipped."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
import zarr

import hrdv2_dask as hd
from hrdv2_dask.errors import StoreError
from hrdv2_dask.pipeline.inputs import backbone_recipe
from hrdv2_dask.pipeline.workers import BackboneRecipe, seeded

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (150, 180, 3), dtype=np.uint8)


def _extract(image, store, client, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        return hd.extract(
            image,
            store,
            backbone="dinov2_vits14",
            weights="random",
            model_options=TINY,
            tile=112,
            out_stride=4,
            dtype="float32",
            client=client,
            progress=False,
            **options,
        )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_recipe_carries_the_seed_not_the_model():
    recipe, facts = backbone_recipe("dinov2_vits14", "random", None, "cpu", dict(TINY), 1, seed=5)
    assert isinstance(recipe, BackboneRecipe) and recipe.factory is None
    assert (recipe.name, recipe.weights, recipe.seed) == ("dinov2_vits14", "random", 5)
    assert facts.random_seed == 5 and facts.random_weights
    # what travels in the graph: a few hundred bytes, not the model's megabytes
    assert len(pickle.dumps(recipe)) < 2_000
    a, b = _state(recipe.build()), _state(recipe.build())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _state(BackboneRecipe(**{**recipe.__dict__, "seed": 6}).build())
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_seeding_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(0):
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


def test_the_same_command_twice_gives_bit_identical_stores(image, tmp_path, local_client):
    a = _extract(image, tmp_path / "a.zarr", local_client)
    torch.manual_seed(999)  # the caller's generator state must not matter
    b = _extract(image, tmp_path / "b.zarr", local_client)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.attrs["random_seed"] == 0 and a.attrs["random_weights"] is True
    c = _extract(image, tmp_path / "c.zarr", local_client, random_seed=1)
    assert c.attrs["random_seed"] == 1 and not np.array_equal(a.values, c.values)


def test_a_store_of_another_seed_is_not_resumed(image, tmp_path, local_client):
    store = tmp_path / "s.zarr"
    _extract(image, store, local_client)
    meta = zarr.open_group(store, mode="r+", zarr_format=3).attrs["hrdv2"]
    zarr.open_group(store, mode="r+", zarr_format=3).attrs["hrdv2"] = {**meta, "complete": False}
    with pytest.raises(StoreError, match="random_seed"):
        _extract(image, store, local_client, random_seed=2)


def test_the_random_model_is_not_in_the_graph(image, tmp_path, local_client, monkeypatch):
    """The graph holds the recipe (a name and a seed): no 'Sending large graph' per run."""
    import cloudpickle
    import dask

    from hrdv2_dask.pipeline import execute

    sizes, original = [], execute.build_tasks

    def measuring(plan, **kw):
        tasks = original(plan, **kw)
        sizes.append(len(cloudpickle.dumps(dict(dask.delayed(list(tasks.values())).dask))))
        return tasks

    monkeypatch.setattr(execute, "build_tasks", measuring)
    _extract(image, tmp_path / "g.zarr", local_client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hd.RandomWeightsWarning)
        model = hd.load_backbone("dinov2_vits14", "random", **TINY)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the whole graph (with the 81 kB image) is smaller than half the tiny model's weights
    assert len(sizes) == 1 and sizes[0] < model_bytes / 2, (sizes, model_bytes)
