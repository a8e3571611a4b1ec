"""The recommender on real networks (Debian's graph-tool collection, `make graph-collection`),
and the graph-tool file reader that loads them."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepserve.models import graph
from deepserve.models.graph import collection
from deepserve.repository import ModelRepository

PROJECT = Path(__file__).resolve().parents[2]


def _gt_bytes(n: int, adjacency: list[list[int]], directed: bool = False, big_endian: bool = False,
               width: int | None = None) -> bytes:
    """A graph-tool binary file written here from the format's description (no property maps)."""
    order = ">" if big_endian else "<"
    width = width or next(w for w, top in ((1, 1 << 8), (2, 1 << 16), (4, 1 << 32)) if n < top)
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
    comment = b"written by the test"
    out = ["⛾ gt".encode(), bytes([1, int(big_endian)]), struct.pack(order + "Q", len(comment)), comment,
           bytes([int(directed)]), struct.pack(order + "Q", n)]
    for neighbours in adjacency:
        out.append(struct.pack(order + "Q", len(neighbours)))
        out.append(struct.pack(order + code * len(neighbours), *neighbours))
    out.append(struct.pack(order + "Q", 0))  # no property maps
    return b"".join(out)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
def test_graph_tool_files_are_read(tmp_path, big_endian, compressed):
    # Vertex 4 has no edge: like an isolated vertex of the collection, it is not a user.
    adjacency = [[1, 2], [2], [0, 3], [3], []]  # a repeat (2-0 after 0-2) and a loop (3-3)
    raw = _gt_bytes(5, adjacency, directed=True, big_endian=big_endian)
    path = tmp_path / "g.gt"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    g = graph.load_edge_list(path)
    assert g.num_nodes == 4 and g.node_ids is None
    assert g.edges.tolist() == [[0, 1], [0, 2], [1, 2], [2, 3]]
    assert g.description.startswith(f"graph-tool file {path}")


def test_graph_tool_index_width_follows_the_vertex_count(tmp_path):
    n = 300  # > 255: indices are two bytes wide
    path = tmp_path / "wide.gt"
    path.write_bytes(_gt_bytes(n, [[299]] + [[] for _ in range(n - 1)]))
    assert graph.load_edge_list(path).edges.tolist() == [[0, 1]]  # ids 0 and 299, mapped
    assert graph.load_edge_list(path).node_ids.tolist() == [0, 299]


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: b"not a graph at all", "header row"),  # read as a CSV: it is not a graph-tool file
    (lambda raw: raw[:6] + b"\x01\x07" + raw[8:], "not a graph-tool binary file"),  # bad endianness byte
    (lambda raw: raw[:40], "ends inside its header or adjacency lists"),
    (lambda raw: raw[:-12], "cannot fit"),  # cut inside the last vertex's count
    (lambda raw: raw[:44] + struct.pack("<Q", 100) + raw[52:], "vertex 0's neighbour list runs past the end"),
    (lambda raw: raw.replace(struct.pack("<Q", 3), struct.pack("<Q", 1 << 60), 1), "cannot fit"),
    (lambda raw: gzip.compress(raw)[:30], "cannot decompress"),
])
def test_a_broken_graph_tool_file_is_a_clear_error(tmp_path, mangle, message):
    raw = _gt_bytes(3, [[1, 2], [2], []])
    path = tmp_path / "broken.gt"
    path.write_bytes(mangle(raw))
    with pytest.raises(ValueError, match=message) as info:
        graph.load_edge_list(path)
    assert str(path) in str(info.value)


def test_a_missing_or_compressed_csv_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing.csv: cannot read the edge list"):
        graph.load_edge_list(tmp_path / "missing.csv")
    packed = tmp_path / "edges.csv.gz"
    packed.write_bytes(gzip.compress(b"src,dst\n1,2\n"))
    with pytest.raises(ValueError, match="not a graph-tool binary file .an edge-list CSV must not be compressed"):
        graph.load_edge_list(packed)


def test_an_index_out_of_range_is_refused(tmp_path):
    path = tmp_path / "range.gt"
    path.write_bytes(_gt_bytes(3, [[7], [], []]))
    with pytest.raises(ValueError, match="out of range"):
        graph.load_edge_list(path)


def test_the_collection_is_verified():
    path = collection.path_of("hep-th")  # make test fetched it (make graph-collection)
    assert path.stat().st_size > 100_000
    with pytest.raises(ValueError, match="unknown collection graph"):
        collection.path_of("facebook")


def test_real_coauthorship_graph_through_the_served_model(tmp_path):
    """`deepserve build --edges hep-th.gt.gz`: a real clustered graph (arXiv hep-th
    co-authorships), evaluated through the serving runtime. The model must hold its own
    against the heuristics there (it matches Adamic-Adar: measured 1.00x warm and cold; the
    issue's 1.2x is not met, see docs/benchmarks.md) and beat popularity many times over."""
    path = collection.path_of("hep-th")
    repo = tmp_path / "repo"
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", "build", "--only", "graph-recommender",
                           "--edges", str(path), "--repo", str(repo)], capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-2000:]
    model, _ = ModelRepository(repo).load("graph-recommender")
    m, data = model.manifest.metrics, model.manifest.training_data
    assert data["edges"]["sha256"] == collection.GRAPHS["hep-th"].sha256
    assert data["num_users"] == 7610 and data["num_edges"] == 15751  # isolated authors are not users
    assert m["average_clustering"] >= 0.4
    assert m["eval_warm_users"] >= 1500 and m["eval_cold_users"] >= 300
    for part in ("", "cold_"):
        assert m[f"{part}recall_at_10"] >= 10 * m[f"{part}popularity_recall_at_10"], part
        assert m[f"{part}recall_ratio_to_best_heuristic"] >= 0.97, part
        assert m[f"{part}recall_at_10"] > 0.6, part  # measured 0.656 warm, 0.641 cold
        # Why 1.2x the best heuristic is out of reach here: even an oracle ranking first every
        # target within two hops stays below it (measured 1.10x warm).
        assert m[f"{part}two_hop_ceiling_recall_at_10"] < 1.2 * m[f"{part}adamic_adar_recall_at_10"], part
    rebuilt, split = graph.rebuild_from_manifest(data)  # the manifest names the file and its digest
    assert rebuilt.num_nodes == 7610 and len(split.test_edges) == data["test_edges"]
    np.testing.assert_array_equal(rebuilt.edges, graph.load_edge_list(path).edges)
