"""graph-recommender: the figures recomputed through the serving runtime (ONNX Runtime +
sidecar arrays), against popularity, common neighbours and Adamic-Adar on the clustered
graph it serves and on the community graph; masks and cold start; the bring-your-own-graph
loader; the generator's clustering knob; and the split it was evaluated on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from deepserve.models import graph
from deepserve.repository import ModelRepository

PROJECT = Path(__file__).resolve().parents[2]
MODEL = "graph-recommender"
K = graph.EVAL_K


def _build(repo: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepserve.cli", "build", "--only", MODEL, "--repo", str(repo), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT)


def _served(repo: ModelRepository, version: str | None = None):
    """A version's manifest and its serving runtime, loaded from verified files as a replica does."""
    model, data = repo.load(MODEL, version)
    return model.manifest, graph.served_runtime(model.manifest, data, model.read_files()), data


@pytest.fixture(scope="module")
def built(repository):
    """The repository's graph-recommender (conftest builds it when absent), served."""
    manifest, runtime, data = _served(repository)
    return manifest, runtime, ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def rebuilt(built):
    """The graph and split the model was trained and evaluated on, from its manifest alone."""
    return graph.rebuild_from_manifest(built[0].training_data)


def _run(runtime, user, neighbors, exclude):
    out = runtime.run({"user": np.asarray(user, np.int64), "neighbors": np.asarray(neighbors, np.int64),
                       "exclude_known": np.asarray(exclude, bool)})
    return out["ids"], out["scores"], out["embedding"]


def _recall(ids: np.ndarray, targets: list[np.ndarray]) -> float:
    """recall@10 counted here, without the module's metric code."""
    return float(np.mean([len(set(r[:K].tolist()) & set(t.tolist())) / min(K, len(t)) for r, t in zip(ids, targets)]))


# ---------------------------------------------------------------------------- figures


def test_figures_recomputed_through_the_serving_runtime(built, rebuilt):
    manifest, runtime, _ = built
    g, split = rebuilt
    assert manifest.training_data["train_edges"] == len(split.train_edges)
    assert manifest.training_data["test_edges"] == len(split.test_edges)

    users, targets = graph.warm_queries(split, g.num_nodes)
    warm = _recall(graph.served_recommend(runtime, users)[0], targets)
    c_users, c_known, c_targets = graph.cold_queries(split)
    cold = _recall(graph.served_recommend(runtime, np.full(len(c_users), -1), c_known)[0], c_targets)

    metrics = graph.evaluate(runtime, g, split)
    assert metrics["recall_at_10"] == pytest.approx(warm, abs=1e-12)
    assert metrics["cold_recall_at_10"] == pytest.approx(cold, abs=1e-12)
    for key, value in metrics.items():
        assert manifest.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["eval_cold_users"] >= 200 and metrics["eval_warm_users"] >= 2000


def test_quality_bar_on_the_clustered_graph(built):
    """The served graph is the clustered one; the model beats every heuristic there, warm and
    cold, and popularity at least twice (docs/model-repository.md has the figures)."""
    m = built[0].metrics
    assert m["average_clustering"] >= 0.2
    for part in ("", "cold_"):
        model = m[f"{part}recall_at_10"]
        assert model >= 2.0 * m[f"{part}popularity_recall_at_10"], part
        assert model >= m[f"{part}adamic_adar_recall_at_10"], part
        assert model >= m[f"{part}common_neighbours_recall_at_10"], part
    assert m["recall_ratio_to_best_heuristic"] >= 1.05  # measured 1.07 at seed 0
    assert m["cold_recall_ratio_to_best_heuristic"] >= 1.0  # measured 1.04 at seed 0


def test_the_community_graph_is_in_the_build_report(built):
    """The same recipe on the block model without triadic closure, evaluated the same way."""
    manifest = built[0]
    m = manifest.metrics
    assert manifest.extra["community_graph"]["generator"]["triadic_closure"] == 0
    assert m["community_graph_average_clustering"] < 0.2
    for part in ("", "cold_"):
        model = m[f"community_graph_{part}recall_at_10"]
        assert model >= 2.0 * m[f"community_graph_{part}popularity_recall_at_10"], part
        assert model >= m[f"community_graph_{part}adamic_adar_recall_at_10"], part
        assert model >= m[f"community_graph_{part}common_neighbours_recall_at_10"], part


def test_heuristics_and_metrics_on_a_hand_checked_graph():
    # 0-1, 0-2, 1-2, 1-3, 2-3, 3-4: from 0, user 3 shares neighbours 1 and 2 (degree 3 each).
    edges = np.array([[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [3, 4]])
    ranked = graph.adamic_adar_baseline(5, edges, [np.array([1, 2])], [np.array([0, 1, 2])], k=2)
    assert ranked[0, 0] == 3  # 2 / log 3, the only non-zero candidate; then the lower id
    assert ranked[0, 1] == 4
    assert graph.common_neighbours_baseline(5, edges, [np.array([3])], [np.array([3])], k=2).tolist() == [[1, 2]]
    degree = np.bincount(edges.ravel(), minlength=5)
    assert graph.popularity_baseline(degree, [np.array([3])], k=2).tolist() == [[1, 2]]
    assert graph.recall_at_k(np.array([[3, 4, 0]]), [np.array([4, 9])], k=2) == 0.5
    assert graph.ndcg_at_k(np.array([[3, 4]]), [np.array([3])], k=2) == 1.0
    assert graph.ndcg_at_k(np.array([[4, 3]]), [np.array([3])], k=2) == pytest.approx(1 / np.log2(3))
    # The ceiling: from 0 (neighbours 1, 2) user 3 is two hops away, 4 is three; user 4
    # (neighbour 3) reaches 1 and 2. Held-out targets 3 and 4 for 0: one of two reachable.
    ceiling = graph.evaluation.two_hop_ceiling
    assert ceiling(5, edges, [np.array([1, 2])], [np.array([3, 4])], k=10) == 0.5
    assert ceiling(5, edges, [np.array([1, 2])], [np.array([3, 4])], k=1) == 1.0  # one hit fills k = 1
    assert ceiling(5, edges, [np.array([1, 2]), np.array([3])], [np.array([4]), np.array([1, 2])]) == 0.5


# ---------------------------------------------------------------------------- the served model


def test_signature_manifest_and_sidecar(built):
    manifest, runtime, session = built
    sig = {t.name: (t.datatype, t.shape) for t in [*manifest.inputs, *manifest.outputs]}
    k, d = manifest.extra["max_k"], manifest.extra["embedding_dim"]
    assert sig == {"user": ("INT64", [-1]), "neighbors": ("INT64", [-1, -1]),
                   "exclude_known": ("BOOL", [-1]), "ids": ("INT64", [-1, k]),
                   "scores": ("FP32", [-1, k]), "embedding": ("FP32", [-1, d])}
    # The ONNX graph is the pairwise scorer; the graph and embeddings live in the sidecar.
    assert [i.name for i in session.get_inputs()] == ["pair_features", "query", "candidates"]
    assert [o.name for o in session.get_outputs()] == ["scores"]
    assert session.get_inputs()[0].shape[2] == len(manifest.extra["pair_features"])
    assert list(manifest.files) == [graph.SIDECAR] and len(manifest.files[graph.SIDECAR]) == 64
    assert k == graph.K_MAX and manifest.kind == "recommender"
    assert manifest.extra["num_users"] == 5000 and manifest.extra["node_ids"] is None
    assert manifest.training_data["generator"]["triadic_closure"] == graph.CLUSTERED
    assert runtime.index is not None and runtime.index.num_users == 5000
    assert all(isinstance(v, float) for key, v in manifest.metrics.items() if "recall" in key or "ndcg" in key)


def test_known_users_are_masked_only_when_asked(built, rebuilt):
    _, runtime, _ = built
    g, split = rebuilt
    lists = graph.adjacency_lists(g.num_nodes, split.train_edges)
    users = np.argsort([-len(a) for a in lists], kind="stable")[:32]  # the best-connected users
    extra = np.stack([(users + 3) % g.num_nodes, (users + 11) % g.num_nodes, np.full(32, -1)], axis=1)
    ids, scores, _ = _run(runtime, users, extra, np.ones(32, bool))
    for u, row, given in zip(users, ids, extra):
        assert u not in row
        assert not set(row.tolist()) & set(lists[u].tolist())
        assert not set(row.tolist()) & set(given[given >= 0].tolist())
        assert len(set(row.tolist())) == len(row)  # no repeats
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()
    assert (ids >= 0).all() and (ids < g.num_nodes).all()

    ids, scores, _ = _run(runtime, users, extra, np.zeros(32, bool))
    returned_neighbours = sum(len(set(row.tolist()) & set(lists[u].tolist())) for u, row in zip(users, ids))
    assert returned_neighbours > 0  # friends are the best candidates when nothing is excluded
    assert (np.diff(scores, axis=1) <= 0).all()


def test_cold_users_from_their_neighbours(built, rebuilt):
    _, runtime, _ = built
    g, split = rebuilt
    _, c_known, _ = graph.cold_queries(split)
    known = c_known[:4]
    padded = graph.pad_neighbors(known, width=max(map(len, known)) + 3)  # extra -1 padding
    ids, scores, emb = _run(runtime, [-1] * 4, padded, [True] * 4)
    assert np.isfinite(scores).all() and np.isfinite(emb).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    for row, given in zip(ids, known):
        assert not set(row.tolist()) & set(given.tolist())
    # Padding and neighbour order do not change the answer (a set).
    shuffled = graph.pad_neighbors([a[::-1] for a in known])
    ids2, scores2, emb2 = _run(runtime, [-1] * 4, shuffled, [True] * 4)
    np.testing.assert_allclose(emb2, emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ids2, ids)

    # A held-out user sent by its own index (it has no training edge) is embedded from its
    # neighbours just the same, and never recommended to itself.
    c_users, _, _ = graph.cold_queries(split)
    by_index = _run(runtime, c_users[:4], padded, [True] * 4)
    np.testing.assert_allclose(by_index[2], emb, rtol=1e-6, atol=1e-6)
    assert not (by_index[0] == c_users[:4, None]).any()

    # No valid neighbour at all: the server rejects such rows, but the runtime stays finite.
    ids, scores, emb = _run(runtime, [-1, -1], [[-1, -1], [-1, -1]], [True, False])
    assert np.isfinite(scores).all() and np.isfinite(emb).all()
    # One batch may mix warm and cold rows; a row's answer does not depend on the others.
    warm_alone = _run(runtime, [7], [[-1]], [True])
    mixed = _run(runtime, [7, -1], graph.pad_neighbors([np.empty(0, np.int64), known[0]]), [True, True])
    np.testing.assert_array_equal(mixed[2][0], warm_alone[2][0])  # a lookup
    np.testing.assert_array_equal(mixed[0][0], warm_alone[0][0])
    np.testing.assert_allclose(mixed[1][0], warm_alone[1][0], rtol=1e-5)


# ---------------------------------------------------------------------------- bring your own graph


def test_edge_list_ids_are_mapped_and_cleaned(tmp_path):
    edges = tmp_path / "edges.csv"
    edges.write_text("src,dst\n10,20\n20,30\n\n30,10\n10,10\n20,10\n30,42\n")
    feats = tmp_path / "features.csv"
    feats.write_text("id,age,score\n20,1.5,2\n99,1,1\n42,-3,0.25\n")
    g = graph.load_edge_list(edges, feats)
    assert g.num_nodes == 4 and g.node_ids.tolist() == [10, 20, 30, 42]
    assert g.edges.tolist() == [[0, 1], [0, 2], [1, 2], [2, 3]]  # the loop and the repeat dropped
    assert g.feature_names == ["age", "score"]
    np.testing.assert_array_equal(g.features, [[0, 0], [1.5, 2], [0, 0], [-3, 0.25]])

    contiguous = tmp_path / "contiguous.csv"
    contiguous.write_text("dst,src,weight\n0,1,5\n2,1,5\n")  # column order and extras do not matter
    g = graph.load_edge_list(contiguous)
    assert g.node_ids is None and g.num_nodes == 3 and g.features.shape == (3, 0)
    assert g.edges.tolist() == [[0, 1], [1, 2]]


@pytest.mark.parametrize("edges_text, features_text, message", [
    ("from,to\n1,2\n", None, "src,dst"),
    ("src,dst\n1,x\n", None, "line 2: user id 'x' is not an integer"),
    ("src,dst\n1,2\n\n-3,2\n", None, "line 4: user id -3 is negative"),
    ("src,dst\n1,2\n3\n", None, "line 3: expected a src and a dst value"),
    ("src,dst\n1,1\n", None, "no edge left"),
    ("src,dst\n", None, "at least one data row"),
    ("src,dst\n1,2\n", "user,a\n1,0.5\n", "'id' then at least one feature column"),
    ("src,dst\n1,2\n", "id,a\n1,abc\n", "line 2: every feature must be numeric"),
    ("src,dst\n1,2\n", "id,a,b\n1,0.5\n", "line 2: 2 values, the header has 3"),
    ("src,dst\n1,2\n", "id,a\n1,0.5\n1,0.7\n", "line 3: a second row for user id 1"),
    ("src,dst\n1,2\n", "id,a\n1,nan\n", "NaN or infinite"),
])
def test_malformed_csv_is_a_clear_error(tmp_path, edges_text, features_text, message):
    edges = tmp_path / "edges.csv"
    edges.write_text(edges_text)
    feats = None
    if features_text is not None:
        feats = tmp_path / "features.csv"
        feats.write_text(features_text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        graph.load_edge_list(edges, feats)
    assert str(feats or edges) in str(info.value)  # the message names the file at fault


def test_bring_your_own_graph_build(tmp_path):
    """A small graph with non-contiguous ids through `deepserve build --edges --node-features`."""
    g = graph.synthetic_graph(3, graph.SyntheticGraphConfig(num_users=400, communities=4, mean_degree=12))
    ids = 1000 + 7 * np.arange(g.num_nodes)  # external ids, not 0..N-1
    edges, feats = tmp_path / "edges.csv", tmp_path / "features.csv"
    edges.write_text("src,dst\n" + "".join(f"{ids[u]},{ids[v]}\n" for u, v in g.edges))
    feats.write_text("id," + ",".join(g.feature_names) + "\n" + "".join(
        f"{ids[i]}," + ",".join(f"{v:.6g}" for v in row) + "\n" for i, row in enumerate(g.features)))
    done = _build(tmp_path / "repo", "--edges", str(edges), "--node-features", str(feats), "--seed", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest, runtime, _ = _served(ModelRepository(tmp_path / "repo"))
    assert manifest.extra["node_ids"] == sorted(set(ids[g.edges.ravel()].tolist()))
    assert manifest.training_data["edges"]["sha256"] == graph.sha256_of(edges)
    assert "community_graph" not in manifest.extra  # a companion graph only for synthetic builds
    rebuilt, split = graph.rebuild_from_manifest(manifest.training_data)
    assert rebuilt.num_nodes == manifest.extra["num_users"]
    metrics = graph.evaluate(runtime, rebuilt, split)
    assert metrics["recall_at_10"] == pytest.approx(manifest.metrics["recall_at_10"], abs=1e-6)
    assert metrics["recall_at_10"] > metrics["popularity_recall_at_10"]

    edges.write_text(edges.read_text() + "5,6\n")  # changed since the build: refused
    with pytest.raises(ValueError, match="sha256"):
        graph.rebuild_from_manifest(manifest.training_data)


def test_cli_rejects_bad_graph_options(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("src,dst\n1,two\n")
    done = _build(tmp_path / "r", "--edges", str(bad))
    assert done.returncode == 2 and "bad.csv" in done.stderr and "not an integer" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", "build", "--only", "fraud-autoencoder",
                           "--edges", str(bad), "--repo", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 2 and "--only graph-recommender" in done.stderr


# ---------------------------------------------------------------------------- generator and split


def test_triadic_closure_is_the_clustering_knob():
    plain = graph.synthetic_graph(0)
    clustered = graph.synthetic_graph(0, graph.SyntheticGraphConfig(triadic_closure=graph.CLUSTERED))
    assert len(plain.edges) == len(clustered.edges) == 50_000  # same size, other structure
    assert graph.average_clustering(5000, plain.edges) < 0.1
    assert graph.average_clustering(5000, clustered.edges) >= 0.2
    again = graph.synthetic_graph(0, graph.SyntheticGraphConfig(triadic_closure=graph.CLUSTERED))
    np.testing.assert_array_equal(again.edges, clustered.edges)  # seeded
    assert (clustered.edges[:, 0] < clustered.edges[:, 1]).all()
    assert len(np.unique(clustered.edges, axis=0)) == len(clustered.edges)


def test_split_is_seeded_and_partitions_the_edges():
    g = graph.synthetic_graph(0)
    a, b, c = graph.split_graph(g, 0), graph.split_graph(g, 0), graph.split_graph(g, 1)
    assert np.array_equal(a.train_edges, b.train_edges) and np.array_equal(a.test_edges, b.test_edges)
    assert np.array_equal(a.cold_users, b.cold_users)
    assert all(np.array_equal(x, y) for x, y in zip(a.cold_known, b.cold_known))
    assert all(np.array_equal(x, y) for x, y in zip(a.cold_targets, b.cold_targets))
    assert not np.array_equal(a.cold_users, c.cold_users)
    assert not np.array_equal(a.test_edges, c.test_edges)

    n = g.num_nodes
    cold = set(a.cold_users.tolist())
    assert len(cold) == round(0.05 * n)
    degree = np.bincount(g.edges.ravel(), minlength=n)
    assert (degree[a.cold_users] >= 4).all()
    warm_edges = np.concatenate([a.train_edges, a.test_edges])
    assert not cold & set(warm_edges.ravel().tolist())  # cold users left the training graph
    cold_pairs = [(u, w) for u, known, target in zip(a.cold_users, a.cold_known, a.cold_targets)
                  for w in [*known, *target]]
    assert all(w not in cold for _, w in cold_pairs)  # only edges to training users
    cold_edges = {(min(u, w), max(u, w)) for u, w in cold_pairs}
    for known, target in zip(a.cold_known, a.cold_targets):
        assert not set(known.tolist()) & set(target.tolist())
        assert len(known) >= min(2, len(known) + len(target))
    between_cold = sum(1 for u, v in g.edges if u in cold and v in cold)
    assert len(warm_edges) + len(cold_edges) + between_cold == len(g.edges)
    assert abs(len(a.test_edges) / len(warm_edges) - 0.1) < 0.01
