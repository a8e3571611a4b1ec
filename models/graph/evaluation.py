"""Evaluation: recall@k and NDCG@k of the served model against popularity, common
neighbours and Adamic-Adar, for training users (held-out edges) and new users.

The model is evaluated through the serving runtime (:class:`deepserve.runtime.RecommenderRuntime`
with its ONNX Runtime session and sidecar arrays), the code a gRPC request runs, not the
torch modules.
"""

from __future__ import annotations

import numpy as np

from deepserve.models.graph.data import Graph, GraphSplit, adjacency_lists, cold_queries, pad_neighbors, warm_queries

EVAL_K = 10
HEURISTICS = ("popularity", "common_neighbours", "adamic_adar")


def served_recommend(runtime, users: np.ndarray, neighbors: list[np.ndarray] | None = None,
                     exclude_known: bool = True, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Run a loaded recommender runtime over many users in batches.

    Args:
        runtime: a :class:`~deepserve.runtime.RecommenderRuntime` with its session loaded.
        users: (U,) training-graph indices, -1 for new users.
        neighbors: per user, the known neighbours (None: none given).

    Returns:
        ``(ids, scores)``, each (U, max_k), graph indices.
    """
    neighbors = neighbors if neighbors is not None else [np.empty(0, np.int64)] * len(users)
    ids, scores = [], []
    for lo in range(0, len(users), batch):
        out = runtime.run({
            "user": np.asarray(users[lo : lo + batch], np.int64),
            "neighbors": pad_neighbors(neighbors[lo : lo + batch]),
            "exclude_known": np.full(len(users[lo : lo + batch]), exclude_known, bool),
        })
        ids.append(out["ids"])
        scores.append(out["scores"])
    return np.concatenate(ids), np.concatenate(scores)


def recall_at_k(recommended_ids: np.ndarray, targets: list[np.ndarray], k: int = EVAL_K) -> float:
    """Mean over users of ``hits in the top k / min(k, #targets)``.

    The denominator is capped at ``k``, so a user with more than k targets can still reach 1.
    """
    values = [np.isin(r[:k], t).sum() / min(k, len(t)) for r, t in zip(recommended_ids, targets)]
    return float(np.mean(values)) if values else 0.0


def ndcg_at_k(recommended_ids: np.ndarray, targets: list[np.ndarray], k: int = EVAL_K) -> float:
    """Mean over users of binary-relevance NDCG@k (ideal: every one of the first min(k, #targets) a hit)."""
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    for r, t in zip(recommended_ids, targets):
        dcg = (np.isin(r[:k], t) * discount[: len(r[:k])]).sum()
        values.append(dcg / discount[: min(k, len(t))].sum())
    return float(np.mean(values)) if values else 0.0


def top_k_excluding(scores: np.ndarray, exclude: list[np.ndarray], k: int) -> np.ndarray:
    """The k best columns of each row of ``scores`` (U, N) outside ``exclude``; ties to the lower id."""
    scores = np.array(scores, np.float64)
    for i, e in enumerate(exclude):
        scores[i, e] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def popularity_baseline(train_degree: np.ndarray, exclude: list[np.ndarray], k: int = EVAL_K) -> np.ndarray:
    """Recommend the users with the highest training degree, outside each user's exclusions."""
    out, rows = [], _rows_per_chunk(len(train_degree))
    for lo in range(0, len(exclude), rows):
        part = exclude[lo : lo + rows]
        out.append(top_k_excluding(np.broadcast_to(train_degree, (len(part), len(train_degree))), part, k))
    return np.concatenate(out) if out else np.empty((0, k), np.int64)


def adamic_adar_baseline(num_nodes: int, train_edges: np.ndarray, query_neighbors: list[np.ndarray],
                         exclude: list[np.ndarray], k: int = EVAL_K,
                         queries_in_graph: bool = True) -> np.ndarray:
    """Rank candidates ``v`` by Adamic-Adar: the sum over common neighbours ``w`` of 1 / log(deg w).

    Args:
        query_neighbors: each query user's neighbours (a training user's own, or a new user's
            known neighbours).
        queries_in_graph: False for new users: their edges are not in ``train_edges``, so
            each common neighbour's degree gets one more (the query's link).
    """
    degree = np.bincount(train_edges.ravel(), minlength=num_nodes).astype(np.float64)
    degree = degree + (0 if queries_in_graph else 1)
    weight = 1.0 / np.log(np.maximum(degree, 2.0))  # a common neighbour has degree >= 2
    return _two_hop_baseline(weight, num_nodes, train_edges, query_neighbors, exclude, k)


def _rows_per_chunk(num_nodes: int) -> int:
    """Query rows per dense (rows, N) score block: about 160 MB of float64 at most."""
    return int(np.clip(20_000_000 // max(num_nodes, 1), 1, 512))


def common_neighbours_baseline(num_nodes: int, train_edges: np.ndarray, query_neighbors: list[np.ndarray],
                               exclude: list[np.ndarray], k: int = EVAL_K) -> np.ndarray:
    """Rank candidates by the number of neighbours they share with the query; ties to the lower id."""
    return _two_hop_baseline(np.ones(num_nodes), num_nodes, train_edges, query_neighbors, exclude, k)


def _adjacency(num_nodes: int, train_edges: np.ndarray):
    """The training graph as a symmetric scipy CSR matrix of ones."""
    from scipy import sparse

    src = np.concatenate([train_edges[:, 0], train_edges[:, 1]])
    dst = np.concatenate([train_edges[:, 1], train_edges[:, 0]])
    return sparse.csr_matrix((np.ones(len(src)), (src, dst)), shape=(num_nodes, num_nodes))


def _two_hop_baseline(weight: np.ndarray, num_nodes: int, train_edges: np.ndarray,
                      query_neighbors: list[np.ndarray], exclude: list[np.ndarray], k: int) -> np.ndarray:
    from scipy import sparse

    adjacency = _adjacency(num_nodes, train_edges)
    out, chunk = [], _rows_per_chunk(num_nodes)
    for lo in range(0, len(query_neighbors), chunk):
        part = query_neighbors[lo : lo + chunk]
        rows = np.repeat(np.arange(len(part)), [len(a) for a in part])
        cols = np.concatenate(part).astype(np.int64) if part else np.empty(0, np.int64)
        q = sparse.csr_matrix((weight[cols], (rows, cols)), shape=(len(part), num_nodes))
        out.append(top_k_excluding((q @ adjacency).toarray(), exclude[lo : lo + chunk], k))
    return np.concatenate(out) if out else np.empty((0, k), np.int64)


def two_hop_ceiling(num_nodes: int, train_edges: np.ndarray, query_neighbors: list[np.ndarray],
                    targets: list[np.ndarray], k: int = EVAL_K) -> float:
    """Recall@k of an oracle that ranks first every target sharing a neighbour with the query
    (a training user's own neighbours, or a new user's known ones): no ranking of the 2-hop
    walk, where the heuristics' candidates come from, does better. How much room is left."""
    adjacency = _adjacency(num_nodes, train_edges)
    values = []
    for s, t in zip(query_neighbors, targets):
        reached = np.zeros(num_nodes, bool)
        reached[adjacency[s].indices] = True  # the neighbours' neighbours
        values.append(min(int(reached[t].sum()), k) / min(k, len(t)))
    return float(np.mean(values)) if values else 0.0


def evaluate(runtime, graph: Graph, split: GraphSplit, k: int = EVAL_K, max_queries: int | None = None,
             seed: int = 0) -> dict:
    """Recall@k and NDCG@k of the served model and the heuristics, warm and cold.

    Warm: every training user with a test edge ranks all users except itself and its
    training neighbours; its test neighbours are the targets. Cold: every cold user with a
    target ranks all users from its known neighbours, which are excluded.

    Args:
        runtime: a loaded :class:`~deepserve.runtime.RecommenderRuntime`.
        max_queries: evaluate a seeded sample of at most this many warm (and cold) users
            (large graphs); None: all of them.
    """
    n = graph.num_nodes
    train_lists = adjacency_lists(n, split.train_edges)
    degree = np.bincount(split.train_edges.ravel(), minlength=n)
    users, targets = warm_queries(split, n)
    c_users, c_known, c_targets = cold_queries(split)
    if max_queries is not None:
        rng = np.random.default_rng([seed, 17])
        w = np.sort(rng.choice(len(users), size=min(max_queries, len(users)), replace=False))
        c = np.sort(rng.choice(len(c_users), size=min(max_queries, len(c_users)), replace=False))
        users, targets = users[w], [targets[i] for i in w]
        c_users, c_known, c_targets = c_users[c], [c_known[i] for i in c], [c_targets[i] for i in c]
    warm_exclude = [np.append(train_lists[u], u) for u in users]
    warm_neighbours = [train_lists[u] for u in users]

    ranked = {
        "model": served_recommend(runtime, users)[0],
        "popularity": popularity_baseline(degree, warm_exclude, k),
        "common_neighbours": common_neighbours_baseline(n, split.train_edges, warm_neighbours, warm_exclude, k),
        "adamic_adar": adamic_adar_baseline(n, split.train_edges, warm_neighbours, warm_exclude, k),
    }
    cold_ranked = {
        "model": served_recommend(runtime, np.full(len(c_users), -1, np.int64), c_known)[0],
        "popularity": popularity_baseline(degree, c_known, k),
        "common_neighbours": common_neighbours_baseline(n, split.train_edges, c_known, c_known, k),
        "adamic_adar": adamic_adar_baseline(n, split.train_edges, c_known, c_known, k, queries_in_graph=False),
    }
    metrics: dict = {}
    for method in ("model", *HEURISTICS):
        prefix = "" if method == "model" else f"{method}_"
        metrics[f"{prefix}recall_at_{k}"] = recall_at_k(ranked[method], targets, k)
        metrics[f"{prefix}ndcg_at_{k}"] = ndcg_at_k(ranked[method], targets, k)
        if len(c_users):
            metrics[f"cold_{prefix}recall_at_{k}"] = recall_at_k(cold_ranked[method], c_targets, k)
            metrics[f"cold_{prefix}ndcg_at_{k}"] = ndcg_at_k(cold_ranked[method], c_targets, k)
    for part in ("", "cold_") if len(c_users) else ("",):
        r = metrics[f"{part}recall_at_{k}"]
        for method in HEURISTICS:
            metrics[f"{part}recall_ratio_to_{method}"] = r / max(metrics[f"{part}{method}_recall_at_{k}"], 1e-12)
        best = max(metrics[f"{part}{m}_recall_at_{k}"] for m in ("common_neighbours", "adamic_adar"))
        metrics[f"{part}recall_ratio_to_best_heuristic"] = r / max(best, 1e-12)
    metrics[f"two_hop_ceiling_recall_at_{k}"] = two_hop_ceiling(n, split.train_edges, warm_neighbours, targets, k)
    if len(c_users):
        metrics[f"cold_two_hop_ceiling_recall_at_{k}"] = two_hop_ceiling(n, split.train_edges, c_known, c_targets, k)
        metrics["cold_to_warm_recall_ratio"] = metrics[f"cold_recall_at_{k}"] / max(metrics[f"recall_at_{k}"], 1e-12)
    metrics["eval_warm_users"] = int(len(users))
    metrics["eval_warm_targets"] = int(sum(len(t) for t in targets))
    metrics["eval_cold_users"] = int(len(c_users))
    metrics["eval_cold_targets"] = int(sum(len(t) for t in c_targets))
    return metrics
