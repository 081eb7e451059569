"""Retrieval: region embeddings, the FAISS index of a store or collection, search, bad input."""

from __future__ import annotations

import json
import sys

import dask
import dask.array as da
import numpy as np
import pytest
from PIL import Image
from synthetic_stores import write_collection, write_store

import hrdv2_dask as hd
from hrdv2_dask.analysis import retrieval as rt
from hrdv2_dask.analysis.embeddings import embeddings_of, region_block, region_sums
from hrdv2_dask.cli import main
from hrdv2_dask.errors import InputError, MissingExtraError, StoreError

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

F, H, W, R, S = 16, 48, 40, 4, 2  # features, grid, region side (cells), out_stride
# where the pattern is planted (cells, region-aligned): member -> list of (y, x)
PLANTED = {"a": [(8, 8), (32, 24)], "b": [(20, 32)], "c": [(0, 12)], "d": [(44, 36)]}
MASKED = ("c", slice(16, 28), slice(0, 12))  # NaN cells: 3x3 regions never indexed


def _members(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pattern = rng.normal(size=(F, R, R)).astype(np.float32)
    values, images = {}, {}
    for key in ("a", "b", "c", "d", "e"):
        v = rng.normal(size=(F, H, W)).astype(np.float32)
        for y, x in PLANTED.get(key, []):
            v[:, y : y + R, x : x + R] = pattern + 0.3 * rng.normal(size=pattern.shape)
        values[key] = v
        images[key] = rng.integers(0, 256, (H * S, W * S), dtype=np.uint8)
    key, ys, xs = MASKED
    values[key][:, ys, xs] = np.nan
    values[key][:, 28, 0:4] = np.nan  # 1/4 of a region: still indexed
    return values, images


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    values, images = _members()
    path = write_collection(root / "c.zarr", values, images=images, out_stride=S, chunk=12)
    return path, values


@pytest.fixture(scope="module")
def index(collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    summary = rt.build_index(collection[0], out, region=R)
    assert summary["kind"] == "flat" and summary["images"] == 5
    return out


def _planted_boxes(key: str) -> set[tuple]:
    return {(key, y * S, x * S, (y + R) * S, (x + R) * S) for y, x in PLANTED[key]}


# --- embeddings -------------------------------------------------------------------------------


def test_region_sums_match_a_naive_reference_across_chunkings():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 23, 17)).astype(np.float32)
    x[:, 3, 4] = np.nan
    unit = x / np.linalg.norm(x, axis=0)
    ref = np.zeros((6, 6, 5), np.float32)
    for i in range(6):
        for j in range(5):
            cell = unit[:, i * 4 : i * 4 + 4, j * 4 : j * 4 + 4].reshape(5, -1)
            ok = np.isfinite(cell).all(axis=0)
            ref[:5, i, j] = cell[:, ok].sum(axis=1)
            ref[5, i, j] = ok.sum()
    for chunks in ((5, 8, 8), (5, 5, 7), (5, 23, 17)):
        got = region_sums(da.from_array(x, chunks=chunks), 4).compute()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    r = embeddings_of(ref, origin=(0, 0), region=4, grid=(23, 17))
    assert len(r.vectors) == 30 and np.allclose(np.linalg.norm(r.vectors, axis=1), 1)
    assert r.boxes[-1].tolist() == [20, 16, 23, 17]  # edge regions cut to the grid


def test_region_block_of_an_all_nan_block_is_empty():
    out = region_block(np.full((3, 4, 4), np.nan, np.float32), 2)
    assert not out.any()


def test_region_sums_are_lazy(collection):
    def no_compute(dsk, keys, **kwargs):
        raise AssertionError("region_sums computed something")

    feats = hd.open_features(collection[0] / "a")
    with dask.config.set(scheduler=no_compute):
        sums = region_sums(feats.data, 8)
    assert isinstance(sums, da.Array) and sums.numblocks == (1, 3, 3)  # chunks of 12 -> 16
    assert sums.chunks[1:] == ((2, 2, 2), (2, 2, 1))


# --- index and search ---------------------------------------------------------------------------


def test_planted_copies_are_all_in_the_top_10(index):
    ((y, x),) = PLANTED["b"]
    hits = rt.search(index, query_box=[f"b:{y * S},{x * S},{(y + R) * S},{(x + R) * S}"], k=10)
    assert len(hits) == 10 and hits[0]["key"] == "b" and hits[0]["score"] > 0.999
    found = {(h["key"], *h["box"]) for h in hits}
    planted = set().union(*(_planted_boxes(k) for k in PLANTED))
    assert planted <= found  # recall@10 = 1.0
    top = sorted(hits, key=lambda h: -h["score"])[: len(planted)]
    assert {(h["key"], *h["box"]) for h in top} == planted  # and they rank first
    # a point query: the R x R cells around it
    point = rt.search(index, query=f"a:{8 * S + 4},{8 * S + 4}", k=10)  # one text: one query
    assert _planted_boxes("a") & {(h["key"], *h["box"]) for h in point}


def test_masked_regions_never_appear(index, collection):
    rows, vectors = rt.index_vectors(index)
    assert len(rows) == 5 * (H // R) * (W // R) - 9 and len(vectors) == len(rows)
    key, ys, xs = MASKED
    masked = {
        (key, y * S, x * S)
        for y in range(ys.start, ys.stop, R)
        for x in range(xs.start, xs.stop, R)
    }
    assert len(masked) == 9 and not masked & {r[:3] for r in rows}
    assert (key, 28 * S, 0) in {r[:3] for r in rows}  # 3/4 valid: kept
    everything = rt.search(index, query_box=["c:0,0,8,8"], k=len(rows))
    assert len(everything) == len(rows)
    assert not masked & {(h["key"], *h["box"][:2]) for h in everything}


def test_an_index_of_a_collection_is_the_union_of_member_indexes(index, collection, tmp_path):
    rows, vectors = rt.index_vectors(index)
    union_rows, union_vectors = [], []
    for key in "abcde":
        single = tmp_path / key
        summary = rt.build_index(collection[0] / key, single, region=R)  # the member's store
        assert summary["images"] == 1
        r, v = rt.index_vectors(single)
        union_rows += r
        union_vectors.append(v)
    union_vectors = np.concatenate(union_vectors)
    a = sorted(range(len(rows)), key=lambda i: rows[i])
    b = sorted(range(len(union_rows)), key=lambda i: union_rows[i])
    assert [rows[i] for i in a] == [union_rows[i] for i in b]
    assert np.array_equal(vectors[a], union_vectors[b])  # bit-identical


def test_image_embeddings(index, collection):
    loaded = rt.load_index(index)
    assert loaded.images_table.column("key").to_pylist() == list("abcde")
    values = collection[1]["a"]
    unit = values / np.linalg.norm(values, axis=0)
    mean = unit.reshape(F, -1).sum(axis=1)
    np.testing.assert_allclose(loaded.images.reconstruct(0), mean / np.linalg.norm(mean), atol=1e-5)


def test_ivfpq_index_finds_the_planted_copies(collection, tmp_path):
    summary = rt.build_index(collection[0], tmp_path / "ivf", region=R, kind="ivfpq")
    assert summary["kind"] == "ivfpq" and summary["factory"].startswith("IVF")
    ((y, x),) = PLANTED["b"]
    hits = rt.search(
        tmp_path / "ivf",
        query_box=[f"b:{y * S},{x * S},{(y + R) * S},{(x + R) * S}"],
        k=10,
        nprobe=64,  # every list: the PQ codes alone decide
    )
    planted = set().union(*(_planted_boxes(k) for k in PLANTED))
    assert planted <= {(h["key"], *h["box"]) for h in hits}  # recall@10 = 1.0


def test_contact_sheet_and_cli(index, tmp_path, capsys):
    code = main(
        [
            "search",
            str(index),
            "--query-box",
            "b:40,64,48,72",
            "-k",
            "7",
            "--out",
            str(tmp_path / "hits"),
        ]
    )
    assert code == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 7 and set(hits[0]) == {"key", "box", "score"}
    assert json.loads((tmp_path / "hits" / "hits.json").read_text()) == hits
    sheet = np.asarray(Image.open(tmp_path / "hits" / "contact_sheet.png").convert("RGB"))
    # the query, then 7 hits: 2 rows of 5
    assert sheet.shape[0] == 2 * (192 + 16 + 4) - 4 and sheet.shape[1] == 5 * (192 + 4) - 4
    assert (sheet == (255, 40, 40)).all(axis=-1).sum() > 7 * 50  # boxes drawn
    assert (sheet[:192, :192] == (40, 220, 40)).all(axis=-1).sum() > 50  # the query's


def test_cli_index_of_a_store(collection, tmp_path, capsys):
    assert main(["index", str(collection[0] / "a"), str(tmp_path / "i"), "--region", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["regions"] == (H // 8) * (W // 8) and summary["images"] == 1
    assert main(["search", str(tmp_path / "i"), "--query", "10,10", "-k", "1"]) == 0  # no key
    assert json.loads(capsys.readouterr().out)[0]["box"] == [0, 0, 16, 16]


def test_build_index_is_exported():
    assert hd.build_index is rt.build_index and hd.search is rt.search


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--query", "zz:1,1"], "Unknown member 'zz'"),
        (["--query", "a:1000,1"], "outside its image"),
        (["--query-box", "a:0,0,8,500"], "outside its image"),
        (["--query", "1,1"], "names no member"),
        (["--query", "a:1,2,3"], "is not KEY:Y,X"),
        ([], "search needs a query"),
        (["--query-box", "c:32,0,56,24"], "masked"),
    ],
)
def test_bad_queries_end_in_one_line(index, args, message, capsys):
    assert main(["search", str(index), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bad_targets(collection, index, tmp_path, capsys):
    assert main(["index", str(collection[0]), str(index)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an hrdv2 index"):
        rt.build_index(collection[0], tmp_path / "x")
    with pytest.raises(StoreError, match="build it with"):
        rt.search(tmp_path / "x", query=["a:1,1"])
    # an interrupted build (no index.json) is built again without --overwrite
    (tmp_path / "y" / ".tmp").mkdir(parents=True)
    (tmp_path / "y" / "regions.faiss").write_bytes(b"partial")
    with pytest.raises(StoreError, match="incomplete index"):
        rt.search(tmp_path / "y", query=["a:1,1"])
    assert rt.build_index(collection[0], tmp_path / "y", region=R)["regions"] > 0
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == sorted(rt._FILES)


def test_missing_faiss_is_one_line(collection, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'hrdv2-dask\[retrieval\]'"):
        rt.build_index(collection[0], tmp_path / "i")
    assert main(["index", str(collection[0]), str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip()
    assert "faiss-cpu" in err and "\n" not in err
    assert not (tmp_path / "i").exists()


def test_ivfpq_with_too_few_regions_is_refused(tmp_path):
    write_store(tmp_path / "one.zarr", np.ones((4, 8, 8), np.float32))
    with pytest.raises(InputError, match="too few for IVF-PQ"):
        rt.build_index(tmp_path / "one.zarr", tmp_path / "i", kind="ivfpq")


def test_an_index_of_masked_cells_only_is_empty(tmp_path):
    values = np.full((4, 16, 16), np.nan, np.float32)
    values[:, 0, 0] = 1.0  # one valid cell: too few for any region
    write_store(tmp_path / "m.zarr", values)
    summary = rt.build_index(tmp_path / "m.zarr", tmp_path / "i", region=4)
    assert summary["regions"] == 0 and summary["images"] == 1
    with pytest.raises(InputError, match="holds no region"):
        rt.search(tmp_path / "i", query=["0,0"])
