"""Analyses across a collection: one sample across members, one model applied to each
(co-segmentation), train once / score on held-out members, saved models and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import xarray as xr
from PIL import Image

import hrdv2_dask as hd
from hrdv2_dask import analysis as an
from hrdv2_dask.analysis.collection import allocate, draw_members, members
from hrdv2_dask.cli import main
from hrdv2_dask.errors import ConfigError, InputError

pytest.importorskip("sklearn")
pytest.importorskip("skops")

C, SHAPE, CELL = 8, (48, 60), 12


def _textures(n_textures: int = 3, seed: int = 0) -> np.ndarray:
    """``(n_textures, C)`` well separated mean features, one per texture."""
    return np.random.default_rng(seed).normal(0, 3, (n_textures, C))


def _member(layout: np.ndarray, means: np.ndarray, seed: int, attrs=None) -> xr.DataArray:
    """Features of one image: each pixel its texture's mean plus noise."""
    rng = np.random.default_rng(seed)
    x = means[layout].transpose(2, 0, 1) + rng.normal(0, 0.5, (C, *layout.shape))
    return xr.DataArray(
        da.from_array(x.astype(np.float32), chunks=(C, 24, 30)),
        dims=("feature", "y", "x"),
        coords={"y": np.arange(layout.shape[0]) + 0.0, "x": np.arange(layout.shape[1]) + 0.0},
        attrs={"out_stride": 1, "model": "synthetic", "stride": 14, **(attrs or {})},
    )


def _layout(seed: int, n_textures: int = 3) -> np.ndarray:
    """A random block layout of the textures (every texture present)."""
    rng = np.random.default_rng(seed)
    blocks = (SHAPE[0] // CELL, SHAPE[1] // CELL)
    cells = rng.integers(0, n_textures, blocks)
    cells.flat[:n_textures] = np.arange(n_textures)
    return cells.repeat(CELL, 0).repeat(CELL, 1)


def _tree(n: int = 6, attrs=None) -> tuple[xr.DataTree, dict[str, np.ndarray]]:
    means = _textures()
    nodes: dict[str, object] = {"/": xr.Dataset()}
    truth = {}
    for i in range(n):
        key = f"z{i:03d}"
        truth[key] = _layout(10 + i)
        nodes[f"/{key}"] = _member(truth[key], means, 100 + i, attrs).to_dataset(name="features")
    return xr.DataTree.from_dict(nodes), truth


def _read(path) -> np.ndarray:
    """The one data variable of a written Zarr output."""
    store = xr.open_zarr(path, consolidated=False)
    return store[next(iter(store.data_vars))].values


def _one_permutation_accuracy(pred: dict, truth: dict) -> float:
    """Accuracy after one global label permutation (the best, by majority over all members)."""
    p = np.concatenate([np.asarray(pred[k]).ravel() for k in truth])
    t = np.concatenate([truth[k].ravel() for k in truth])
    mapping = {}
    for label in np.unique(p):
        vals, counts = np.unique(t[p == label], return_counts=True)
        mapping[int(label)] = int(vals[np.argmax(counts)])
    assert len(set(mapping.values())) == len(mapping), "labels are not a permutation"
    return float((np.vectorize(mapping.get)(p) == t).mean())


def _labels(tree_truth: dict, keys, every: int = 7) -> dict[str, np.ndarray]:
    """Sparse scribbles: every ``every``-th row of the true layout, classes 1..3."""
    out = {}
    for key in keys:
        lab = np.zeros(SHAPE, np.uint8)
        lab[::every] = tree_truth[key][::every] + 1
        out[key] = lab
    return out


# ---------------------------------------------------------------------------------------------
# Sampling across members
# ---------------------------------------------------------------------------------------------


def test_allocate_balanced_and_proportional():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(allocate([100, 100, 100], 90, "balanced", rng), [30, 30, 30])
    np.testing.assert_array_equal(allocate([100, 4, 100], 90, "balanced", rng), [43, 4, 43])
    np.testing.assert_array_equal(allocate([3, 4], 90, "balanced", rng), [3, 4])
    draws = np.array([allocate([100, 300], 40, "proportional", rng) for _ in range(400)])
    assert (draws.sum(axis=1) == 40).all()
    np.testing.assert_allclose(draws.mean(axis=0), [10, 30], atol=0.5)


def test_draw_across_members_is_seeded_and_bounded():
    tree, _ = _tree(3)
    datas = [m.data for _, m in members(tree)]
    a = draw_members(datas, n=300, seed=1)
    b = draw_members(datas, n=300, seed=1)
    for u, v in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(u, v)
    x, pos, member, _ = a
    assert x.shape == (300, C) and np.bincount(member).tolist() == [100, 100, 100]
    # each sample is the feature at its position in its member
    for i, (y, xx) in enumerate(pos[:20]):
        np.testing.assert_array_equal(x[i], datas[member[i]][:, y, xx].compute())
    _, _, member, _ = draw_members(datas, n=300, seed=1, sample="proportional")
    assert len(member) == 300 and set(member.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# Co-segmentation
# ---------------------------------------------------------------------------------------------


def test_kmeans_labels_mean_the_same_in_every_member():
    tree, truth = _tree(6)
    model = an.fit_kmeans(tree, k=3, n_samples=3000, seed=0)
    labels = model.predict(tree)
    pred = {k: labels[k]["kmeans"].values for k in truth}
    assert _one_permutation_accuracy(pred, truth) > 0.99
    again = an.fit_kmeans(tree, k=3, n_samples=3000, seed=0).predict(tree)
    for k in truth:
        np.testing.assert_array_equal(again[k]["kmeans"].values, pred[k])


def test_cluster_and_pca_runs_write_every_member_a_sheet_and_a_summary(tmp_path):
    tree, truth = _tree(4)
    out = tmp_path / "clusters"
    summary = an.get_analysis("cluster").run(an.KMeansOptions(k=3, samples=2000), tree, out)
    assert sorted(summary["members"]) == sorted(truth)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for key in truth:
        assert (out / key / "clusters.zarr").is_dir() and (out / key / "clusters.png").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] >= 2 * 256 and sheet.size[1] >= 2 * 256
    pred = {k: _read(out / k / "clusters.zarr") for k in truth}
    assert _one_permutation_accuracy(pred, truth) > 0.99
    # PCA (two-step foreground too) on a subset: only those members are written
    options = an.PCAOptions(samples=2000, foreground=True, images=("z001,z003",))
    assert options.images == ("z001", "z003")
    summary = an.get_analysis("pca").run(options, tree, tmp_path / "pca")
    assert sorted(summary["members"]) == ["z001", "z003"]
    assert sorted(p.name for p in (tmp_path / "pca").iterdir()) == [
        "contact_sheet.png",
        "summary.json",
        "z001",
        "z003",
    ]


def test_pca_colours_are_one_mapping_for_all_members():
    tree, truth = _tree(3)
    model = an.fit_pca(tree, n_samples=3000, sample="proportional")
    rgb = an.pca_rgb(tree, model)
    single = an.pca_rgb(tree["z001"]["features"], model)
    np.testing.assert_array_equal(rgb["z001"]["pca_rgb"].values, single.values)
    # the same texture gets about the same colour in every member
    colours = {}
    for key, lab in truth.items():
        img = rgb[key]["pca_rgb"].values.astype(float)
        for t in range(3):
            colours.setdefault(t, []).append(img[lab == t].mean(axis=0))
    for t in range(3):
        spread = np.ptp(np.array(colours[t]), axis=0).max()
        assert spread < 10, (t, colours[t])


def test_pca_foreground_across_members():
    # texture 0 is a background around a central object of two textures in every member (each
    # its own size); the background is far from the object along one direction
    means = np.zeros((3, C))
    means[0, 0], means[1, 1], means[2, 1] = 8.0, 2.0, -2.0
    nodes: dict[str, object] = {"/": xr.Dataset()}
    truth = {}
    for i in range(3):
        lab = np.zeros(SHAPE, int)
        m = 8 + 4 * i
        lab[m:-m, m:-m] = 1 + (np.arange(SHAPE[1] - 2 * m)[None] >= (SHAPE[1] - 2 * m) // 2)
        truth[f"m{i}"] = lab
        nodes[f"/m{i}"] = _member(lab, means, i).to_dataset(name="features")
    tree = xr.DataTree.from_dict(nodes)
    model = an.fit_pca(tree, n_samples=4000, foreground=True)
    proj = model.project(tree)
    for key, lab in truth.items():
        nan = np.isnan(proj[key]["pca"].values[0])
        assert (nan == (lab == 0)).mean() > 0.99


# ---------------------------------------------------------------------------------------------
# Train once, apply anywhere
# ---------------------------------------------------------------------------------------------


def test_train_on_four_members_score_on_two():
    tree, truth = _tree(6)
    keys = list(truth)
    labels = _labels(truth, keys)
    seg, report = an.fit_segmenter(
        tree, labels, method="logistic", train=tuple(keys[:4]), test=tuple(keys[4:])
    )
    assert report["train"] == keys[:4] and report["test"] == keys[4:]
    assert report["test_accuracy"] > 0.95 and report["train_accuracy"] > 0.95
    assert report["mean_iou"] > 0.9 and set(report["iou"]) == {"1", "2", "3"}
    labelled = sum(int((labels[k] > 0).sum()) for k in keys[:4])
    assert report["n_labelled"] == report["n_train"] == labelled
    assert report["n_test"] == sum(int((labels[k] > 0).sum()) for k in keys[4:])
    pred = seg.predict(tree)
    for k in keys[4:]:  # held-out members, scored on every pixel
        assert (pred[k]["segmentation"].values == truth[k] + 1).mean() > 0.95
    # default training members: every labelled member but the test ones
    _, report = an.fit_segmenter(tree, labels, method="logistic", test=(keys[5],))
    assert report["train"] == keys[:5]


def test_saved_models_apply_identically_and_refuse_other_settings(tmp_path):
    tree, truth = _tree(3)
    labels = _labels(truth, list(truth)[:2])
    seg, _ = an.fit_segmenter(tree, labels, method="random_forest")
    km = an.fit_kmeans(tree, k=3, n_samples=2000)
    pca = an.fit_pca(tree, n_samples=2000, foreground=True)
    for model, name, var in [
        (seg, "seg", "segmentation"),
        (km, "km", "kmeans"),
        (pca, "pca", "pca"),
    ]:
        model.save(tmp_path / name)
        loaded = hd.load_model(tmp_path / name)
        assert type(loaded) is type(model) and loaded.settings == model.settings
        assert loaded.settings["stride"] == 14 and loaded.settings["n_features"] == C
        a, b = model.apply(tree), loaded.apply(tree)
        for k in truth:
            np.testing.assert_array_equal(a[k][var].values, b[k][var].values)
    other, _ = _tree(2, attrs={"stride": 7})
    with pytest.raises(InputError, match=r"stride=14 but member 'z000' have stride=7") as err:
        hd.load_model(tmp_path / "seg").apply(other)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"model='synthetic' but these features have model='x'"):
        hd.load_model(tmp_path / "km").apply(_member(truth["z000"], _textures(), 0, {"model": "x"}))


def test_saved_estimators_are_not_pickles(tmp_path):
    tree, truth = _tree(2)
    seg, _ = an.fit_segmenter(tree, _labels(truth, list(truth)), method="random_forest")
    path = seg.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "estimator.skops", "model.json"]
    meta = json.loads((path / "model.json").read_text())
    assert meta["kind"] == "segmenter" and meta["fields"]["classes"] == [1, 2, 3]
    (path / "model.json").write_text(json.dumps({**meta, "kind": "nope"}))
    with pytest.raises(InputError, match="unknown kind 'nope'"):
        hd.load_model(path)
    with pytest.raises(InputError, match="not a saved hrdv2 model"):
        hd.load_model(tmp_path)


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        ({"z009": np.ones(SHAPE, np.uint8)}, {}, "'z009' is not a member"),
        (np.ones((2, *SHAPE), np.uint8), {}, "has 2 planes but the collection has 3 members"),
        ({"z000": np.ones((10, 10), np.uint8)}, {}, r"Member 'z000': labels have shape \(10, 10\)"),
        (None, {"test": ("z002",)}, "Test member 'z002' has no labels"),
        (None, {"test": ("zz",)}, "Test member 'zz' is not a member"),
        (None, {"images": ("z7",)}, "Member 'z7' is not a member"),
    ],
)
def test_bad_collection_labels_are_one_line(labels, kwargs, match):
    tree, truth = _tree(3)
    if labels is None:
        labels = _labels(truth, ["z000", "z001"])
    with pytest.raises(InputError, match=match) as err:
        an.fit_segmenter(tree, labels, method="logistic", **kwargs)
    assert "\n" not in str(err.value)


def test_train_and_test_must_not_overlap():
    with pytest.raises(ConfigError, match="share members"):
        an.SegmentOptions(labels="l.png", train=("a", "b"), test=("b",))


# ---------------------------------------------------------------------------------------------
# On disk, through the command line: a real collection store (MeanPool backbone)
# ---------------------------------------------------------------------------------------------

DISK = (3, 56, 70)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, local_client):
    """A 3-plane stack's collection store, and single stores with other stride / out_stride."""
    root = tmp_path_factory.mktemp("stack")
    rng = np.random.default_rng(0)
    planes = np.zeros(DISK, np.uint8)
    planes[:, :, : DISK[2] // 2] = 60
    planes[:, :, DISK[2] // 2 :] = 200
    planes = (planes + rng.integers(0, 20, DISK)).astype(np.uint8)
    tifffile.imwrite(root / "stack.tif", planes, metadata={"axes": "ZYX"})
    kw = dict(tile=140, dtype="float32", client=local_client, progress=False)
    hd.extract_collection(root / "stack.tif", root / "c.zarr", backbone=hd.MeanPool(), **kw)
    hd.extract(root / "stack.tif", root / "s7.zarr", plane=0, backbone=hd.MeanPool(14, 7), **kw)
    hd.extract(
        root / "stack.tif", root / "o2.zarr", plane=0, backbone=hd.MeanPool(), out_stride=2, **kw
    )
    labels = np.zeros(DISK, np.uint8)
    labels[:2, ::9, 4:20] = 1
    labels[:2, ::9, -20:-4] = 2
    tifffile.imwrite(root / "labels.tif", labels, metadata={"axes": "ZYX"})
    folder = root / "labels"
    folder.mkdir()
    Image.fromarray(labels[0]).save(folder / "z000.png")
    Image.fromarray(labels[1]).save(folder / "z001.png")
    return root


def test_cli_segment_a_collection_and_apply_the_saved_model(stacks, tmp_path, capsys):
    out, model = tmp_path / "seg", tmp_path / "model"
    argv = ["segment", str(stacks / "c.zarr"), str(stacks / "labels.tif"), str(out)]
    assert main([*argv, "--test", "z001", "--save-model", str(model), "--proba"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"] == ["z000"] and summary["test"] == ["z001"]
    assert summary["test_accuracy"] == 1.0 and summary["mean_iou"] == 1.0
    assert sorted(summary["members"]) == ["z000", "z001", "z002"]
    assert (out / "z002" / "probabilities.zarr").is_dir() and (out / "contact_sheet.png").is_file()
    # a folder of label images named by key gives the same model and predictions
    folder_out = tmp_path / "seg2"
    assert (
        main(
            [
                "segment",
                str(stacks / "c.zarr"),
                str(stacks / "labels"),
                str(folder_out),
                "--test",
                "z001",
            ]
        )
        == 0
    )
    capsys.readouterr()
    first = _read(out / "z002" / "segmentation.zarr")
    second = _read(folder_out / "z002" / "segmentation.zarr")
    np.testing.assert_array_equal(first, second)
    # apply the saved model: predictions identical to the run that trained it
    applied = tmp_path / "applied"
    assert (
        main(["apply", str(model), str(stacks / "c.zarr"), str(applied), "--images", "z002"]) == 0
    )
    again = _read(applied / "z002" / "segmentation.zarr")
    np.testing.assert_array_equal(again, first)
    assert sorted(p.name for p in applied.iterdir()) == [
        "contact_sheet.png",
        "summary.json",
        "z002",
    ]
    # stores made with another stride / out_stride are refused in one line
    for store, setting in [("s7.zarr", "stride=7"), ("o2.zarr", "out_stride=2")]:
        capsys.readouterr()
        assert main(["apply", str(model), str(stacks / store), str(tmp_path / store)]) == 2
        err = capsys.readouterr().err.strip()
        assert setting in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--test", "z009"], "'z009' is not a member"),
        (["--images", "nope"], "'nope' is not a member"),
        (["--train", "z002"], "Training members ['z002'] have no labelled pixel"),
    ],
)
def test_cli_bad_collection_inputs_end_in_one_line(stacks, tmp_path, capsys, extra, match):
    argv = ["segment", str(stacks / "c.zarr"), str(stacks / "labels.tif"), str(tmp_path / "o")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_wrong_plane_count_and_misnamed_label_files(stacks, tmp_path, capsys):
    tifffile.imwrite(
        tmp_path / "two.tif", np.ones((2, *DISK[1:]), np.uint8), metadata={"axes": "ZYX"}
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.ones(DISK[1:], np.uint8)).save(bad / "z0.png")
    for labels, match in [
        (tmp_path / "two.tif", "has 2 planes but the collection has 3 members"),
        (bad, "is named after no member"),
    ]:
        assert main(["segment", str(stacks / "c.zarr"), str(labels), str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err


def test_cli_cluster_a_collection(stacks, tmp_path, capsys):
    out = tmp_path / "k"
    assert (
        main(["cluster", str(stacks / "c.zarr"), str(out), "-k", "2", "--sample", "proportional"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["members"]) == ["z000", "z001", "z002"] and summary["k"] == 2
    labels = [_read(out / k / "clusters.zarr") for k in summary["members"]]
    # the two halves of every plane: one label each, the same in every member
    for lab in labels:
        np.testing.assert_array_equal(lab, labels[0])
    assert Path(summary["contact_sheet"]).is_file()


def test_stack_workflow_ships_its_data():
    from hrdv2_dask.workflows import load_workflow

    root = Path(__file__).resolve().parents[2] / "workflows"
    wf = load_workflow(root / "micrograph_stack_scribbles.yaml")
    assert tifffile.imread(wf.input).shape[0] == 4
    seg = wf.analyses[0].options
    assert seg.train == ("z000",) and seg.test == ("z002",)
    assert sorted(p.name for p in Path(seg.labels).iterdir()) == ["z000.png", "z002.png"]


def test_a_workflow_on_a_stack_segments_and_clusters_every_plane(tmp_path, local_client):
    import yaml

    from hrdv2_dask.workflows import run_workflow

    rng = np.random.default_rng(1)
    planes = np.where(np.arange(DISK[2])[None, None] < DISK[2] // 2, 50, 200)
    planes = (planes + rng.integers(0, 30, DISK)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", planes, metadata={"axes": "ZYX"})
    (tmp_path / "labels").mkdir()
    lab = np.zeros(DISK[1:], np.uint8)
    lab[::8, 4:20], lab[::8, -20:-4] = 1, 2
    Image.fromarray(lab).save(tmp_path / "labels" / "z001.png")
    wf = {
        "input": "stack.tif",
        "output_dir": "out",
        "features": {"model": "filterbank", "shifts": [1], "tile": 252, "dtype": "float32"},
        "analyses": [
            {"segment": {"labels": "labels", "method": "logistic", "save_model": "out/m"}},
            {"cluster": {"k": 2, "samples": 2000}},
        ],
    }
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf))
    summary = run_workflow(tmp_path / "wf.yaml", client=local_client, progress=False)
    out = tmp_path / "out"
    assert sorted(summary["feature_shape"]) == ["z000", "z001", "z002"]
    seg, clusters = summary["analyses"]
    assert seg["train"] == ["z001"] and seg["train_accuracy"] == 1.0
    assert (out / "m" / "model.json").is_file() and (out / "summary.json").is_file()
    for step in ("segment", "cluster"):
        assert (out / step / "contact_sheet.png").is_file()
        assert sorted(json.loads((out / step / "summary.json").read_text())["members"]) == [
            "z000",
            "z001",
            "z002",
        ]
    pred = _read(out / "segment" / "z002" / "segmentation.zarr")
    assert (pred[:, :20] == 1).mean() > 0.95 and (pred[:, -20:] == 2).mean() > 0.95
    assert clusters["k"] == 2


def test_similarity_and_predictions_on_a_tree_are_lazy_per_member():
    from test_analysis import counting_scheduler

    tree, truth = _tree(3)
    km = an.fit_kmeans(tree, k=3, n_samples=1000)
    with counting_scheduler(0):
        sims = an.similarity(tree, points=[(5, 7)])
        labels = km.predict(tree)
    assert sorted(sims.children) == sorted(truth) == sorted(labels.children)
    for key in truth:
        sim = sims[key]["similarity"].values
        assert sim[5, 7] == pytest.approx(1.0, abs=1e-5)
        # the query's own texture is the most similar one in its member
        same = truth[key] == truth[key][5, 7]
        assert sim[same].mean() > sim[~same].max() - 0.2


def test_members_without_features_are_named_in_the_summary(tmp_path):
    tree, truth = _tree(2)
    tree.attrs["members"] = [{"key": k, "status": "done"} for k in truth] + [
        {"key": "bad", "status": "failed", "error": "InputError: unreadable"}
    ]
    summary = an.get_analysis("cluster").run(an.KMeansOptions(k=3, samples=500), tree, tmp_path)
    assert summary["left_out"] == ["bad"] and sorted(summary["members"]) == sorted(truth)
    with pytest.raises(InputError, match="'bad' is a member that failed"):
        an.fit_kmeans(tree, k=3, images=("bad",))
