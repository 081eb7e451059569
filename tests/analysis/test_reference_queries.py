"""Reference queries: KEY:Y,X / KEY:Y0,X0,Y1,X1 / KEY:MASK on a collection, similarity maps of
every member to their mean feature, masks with a threshold, and bad queries in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from synthetic_stores import write_collection, write_store

from hrdv2_dask import analysis as an
from hrdv2_dask.analysis.collection import open_store
from hrdv2_dask.analysis.queries import Query, mask_cells, parse_query, query_cells
from hrdv2_dask.cli import main
from hrdv2_dask.errors import ConfigError, InputError

F, H, W, S = 32, 40, 36, 2  # features, grid (cells), out_stride
# planted structure: member -> (y0, x0) of a 5x6-cell patch (cells)
PLANTED = {"a": (4, 6), "b": (25, 20)}
A_SECOND = (30, 2)  # a second copy in a
PATCH = (5, 6)


def _values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    structure = rng.normal(size=F).astype(np.float32) * 2
    out = {}
    for key in ("a", "b", "c"):
        v = rng.normal(size=(F, H, W)).astype(np.float32)
        spots = [PLANTED[key]] if key in PLANTED else []
        spots += [A_SECOND] if key == "a" else []
        for y, x in spots:
            cells = v[:, y : y + PATCH[0], x : x + PATCH[1]]
            cells += structure[:, None, None] - cells * 0.7  # mostly the structure
        out[key] = v
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("refq")
    return write_collection(root / "c.zarr", _values(), out_stride=S, chunk=16)


def _box_px(key: str) -> str:
    y, x = PLANTED[key]
    return f"{key}:{y * S},{x * S},{(y + PATCH[0]) * S},{(x + PATCH[1]) * S}"


# --- parsing and geometry (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("z000:12,30", "point", Query("point", "z000", (12, 30))),
        ("12,30", "point", Query("point", None, (12, 30))),
        (" im:0:1,2 ", "point", Query("point", "im:0", (1, 2))),
        ("a:0,0,10,20", "box", Query("box", "a", (0, 0, 10, 20))),
        ("a:masks/m.png", "mask", Query("mask", "a", (), "masks/m.png")),
        ("m.png", "mask", Query("mask", None, (), "m.png")),
    ],
)
def test_parse_query(text, kind, expected):
    assert parse_query(text, kind) == expected


@pytest.mark.parametrize(
    "text, kind, match",
    [
        ("a:1", "point", "is not KEY:Y,X"),
        ("a:1.5,2", "point", "is not KEY:Y,X"),
        ("a:1,2", "box", r"is not KEY:Y0,X0,Y1,X1"),
        ("a:5,0,5,9", "box", "is empty"),
        ("a:", "mask", "mask path is missing"),
        ("", "point", "must be text"),
    ],
)
def test_parse_query_refuses_malformed_text(text, kind, match):
    with pytest.raises(ConfigError, match=match):
        parse_query(text, kind)


def test_query_cells_follow_the_store_coordinates():
    # cell i covers pixels i*s .. i*s+s-1, centred at the store's coordinate i*s + (s-1)/2
    s = 4
    coords = np.arange(10) * s + (s - 1) / 2
    for p in range(40):
        rows, _ = query_cells(Query("point", "a", (p, 0)), grid=(10, 10), out_stride=s)
        assert abs(coords[rows.start] - p) <= s / 2
    rows, cols = query_cells(Query("box", "a", (3, 4, 9, 8)), grid=(10, 10), out_stride=s)
    assert (rows, cols) == (slice(0, 3), slice(1, 2))
    # the source image, not the padded grid, is the limit
    with pytest.raises(InputError, match="outside its image"):
        query_cells(
            Query("point", "a", (38, 0)), grid=(10, 10), out_stride=s, source_shape=(37, 40)
        )
    m = np.zeros((37, 40), bool)
    m[:5, 8:16] = True  # cell row 1 is 1/4 inside: out
    assert np.argwhere(mask_cells(m, grid=(10, 10), out_stride=s)).tolist() == [
        [0, 2], [0, 3]
    ]  # fmt: skip


# --- similarity to reference queries ----------------------------------------------------------


def test_a_query_on_a_finds_the_structure_in_b(collection):
    tree = open_store(collection)
    sims = an.similarity(tree, query_box=[_box_px("a")])
    assert isinstance(sims, xr.DataTree) and sorted(sims.children) == ["a", "b", "c"]
    b = sims["b"]["similarity"].values
    y, x = PLANTED["b"]
    inside = np.zeros(b.shape, bool)
    inside[y : y + PATCH[0], x : x + PATCH[1]] = True
    assert b[inside].min() > b[~inside].max()  # the planted copy is the maximum of b
    # outside a's query region, a's maximum is at its second copy
    a = sims["a"]["similarity"].values.copy()
    ya, xa = PLANTED["a"]
    a[ya : ya + PATCH[0], xa : xa + PATCH[1]] = -np.inf
    peak = np.unravel_index(np.argmax(a), a.shape)
    assert A_SECOND[0] <= peak[0] < A_SECOND[0] + PATCH[0]
    assert A_SECOND[1] <= peak[1] < A_SECOND[1] + PATCH[1]
    assert sims["c"]["similarity"].values.max() < b[inside].min()


def test_points_boxes_and_masks_agree_with_a_numpy_reference(collection, tmp_path):
    values = _values()
    ya, xa = PLANTED["a"]
    mask = np.zeros((H * S, W * S), np.uint8)
    mask[ya * S : (ya + 2) * S, xa * S : (xa + 3) * S] = 255  # 2x3 cells
    Image.fromarray(mask).save(tmp_path / "m.png")
    tree = open_store(collection)
    sims = an.similarity(
        tree, query=[f"b:{PLANTED['b'][0] * S + 1},{PLANTED['b'][1] * S}"],
        query_mask=[f"a:{tmp_path / 'm.png'}"], images=("c",),
    )  # fmt: skip
    assert list(sims.children) == ["c"]
    cells = [values["b"][:, PLANTED["b"][0], PLANTED["b"][1]]]
    cells += [values["a"][:, ya + i, xa + j] for i in range(2) for j in range(3)]
    q = np.mean(cells, axis=0)
    c = values["c"].reshape(F, -1)
    ref = (q @ c) / (np.linalg.norm(q) * np.linalg.norm(c, axis=0))
    np.testing.assert_allclose(sims["c"]["similarity"].values.ravel(), ref, atol=1e-5)


def test_threshold_gives_masks(collection):
    masks = an.similarity(open_store(collection), query_box=[_box_px("a")], threshold=0.6)
    b = masks["b"]["similarity_mask"]
    assert b.dtype == np.uint8 and b.attrs["threshold"] == 0.6
    y, x = PLANTED["b"]
    assert b.values[y : y + PATCH[0], x : x + PATCH[1]].all()
    assert b.values.sum() == PATCH[0] * PATCH[1]


def test_cli_on_a_collection(collection, tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["similarity", str(collection), str(out), "--query-box", _box_px("a"),
            "--query", "b:52,42", "--threshold", "0.6"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["members"]) == ["a", "b", "c"]
    assert (out / "contact_sheet.png").is_file()
    for key in "abc":
        assert (out / key / "similarity.png").is_file()
        labels = xr.open_zarr(out / key / "similarity_mask.zarr", consolidated=False)["labels"]
        assert labels.dtype == np.uint8
    sim = xr.open_zarr(out / "b" / "similarity.zarr", consolidated=False)["similarity"]
    assert {"kind": "box", "key": "a", "px": [8, 12, 18, 24]} in sim.attrs["queries"]
    assert "b" in capsys.readouterr().out


def test_yaml_and_python_share_the_options():
    opts = an.SimilarityOptions.from_dict({"query": ["a:1,2"], "threshold": 0.5})
    assert opts.query == ("a:1,2",) and opts.references
    assert an.SimilarityOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(ConfigError, match="not several or none"):
        an.SimilarityOptions(points=((1, 2),), query=("a:1,2",))
    with pytest.raises(ConfigError, match="is not KEY:Y,X"):
        an.SimilarityOptions.from_dict({"query": ["a:1"]})


# --- bad queries end in one line -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--query", "zz:1,1"], "Unknown member 'zz'"),
        (["--query", "a:1,1", "--query", "a:80,2"], "outside its image"),
        (["--query-box", "a:0,0,10,73"], "outside its image"),
        (["--query", "1,1"], "names no member"),
        (["--query", "a:1,2,3"], "is not KEY:Y,X"),
        (["--query", "a:1,1", "--point", "1,1"], "not several or none"),
        (["--query-mask", "a:missing.png"], "does not exist"),
    ],
)
def test_bad_queries_end_in_one_line(collection, tmp_path, args, message, capsys):
    assert main(["similarity", str(collection), str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_single_store_queries(tmp_path, capsys):
    values = _values()["b"]
    store = write_store(tmp_path / "b.zarr", values, out_stride=S)
    sim = an.similarity(open_store(store), query_box=[_box_px("b").split(":", 1)[1]])
    y, x = PLANTED["b"]
    assert np.unravel_index(np.argmax(sim.values), sim.shape)[0] in range(y, y + PATCH[0])
    with pytest.raises(InputError, match="one store; drop 'b:'"):
        an.similarity(open_store(store), query=["b:1,1"])
    small = np.zeros((10, 10), np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    assert main(["similarity", str(store), str(tmp_path / "o"),
                 "--query-mask", str(tmp_path / "small.png")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "is 10x10 px but the image" in err and "\n" not in err
