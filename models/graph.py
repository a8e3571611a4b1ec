"""Graph recommender: a GraphSAGE encoder trained for link prediction on a social graph.

One model comes from this file, ``graph-recommender`` ("people you may know"). A 2-layer
GraphSAGE encoder (mean aggregation, Hamilton et al., 2017) turns node features and the
training graph into user embeddings; the score of a candidate is a dot product, so top-k
for a batch is one matrix product. The exported graph carries everything it needs: the
weights, the node features, the precomputed layer-1 states and final embeddings of every
training user, and the training graph's neighbour table (for masking known contacts).

Cold start happens inside the graph: a new user (``user == -1``) is described only by the
users it already knows (``neighbors``). Its layer-0 state is the mean of those neighbours'
features (with its degree feature computed from how many it gave), its layer-1 state
comes from the first layer over the neighbours' features, and its embedding from the
second layer over its own layer-1 state and the mean of the neighbours' precomputed
layer-1 states: the same two GraphSAGE layers, evaluated for one extra node. Training
simulates such users every step, so the weights are fitted to that path too.

Data comes from one of:
- :func:`synthetic_graph`: a seeded degree-corrected stochastic block model (Karrer and
  Newman, 2011) with communities of unequal sizes, heavy-tailed activity and node
  features that are a noisy signal of the community;
- :func:`load_edge_list`: an edge-list CSV (``src,dst``) and an optional node-feature
  CSV (``id`` then numeric columns): bring your own graph.

:func:`split_graph` holds out test edges among training users and whole "cold" users;
:func:`rebuild_from_manifest` rebuilds the graph and split a model was evaluated on.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepserve.models.common import (
    ExportSpec,
    card_header,
    export_and_publish,
    progress,
    seed_everything,
)
from deepserve.repository import Manifest

K_MAX = 100  # recommendations per user in the exported graph (a graph under 200 users: N // 2)
EVAL_K = 10
# Excluded users get the lowest finite float32 score: finite, so the ONNX/PyTorch parity
# check stays meaningful; they reach the top-K only when fewer than K candidates remain.
MASKED_SCORE = float(np.finfo(np.float32).min)
MAX_NEIGHBOR_TABLE = 50_000_000  # entries in the N x max_degree table baked into the graph
SPECTRAL_DIMS = 8  # structural features for a graph that comes without node features

# ---------------------------------------------------------------------------- data


@dataclass
class Graph:
    """An undirected simple graph over users ``0..N-1`` with per-user features."""

    num_nodes: int
    edges: np.ndarray  # (E, 2) int64, u < v, sorted, unique
    features: np.ndarray  # (N, F) float32, raw (F may be 0)
    feature_names: list[str]
    node_ids: np.ndarray | None  # (N,) sorted external ids; None when they are 0..N-1
    community: np.ndarray | None  # (N,) int64 for the synthetic graph, else None
    source: str  # "synthetic" or the edge-list path
    description: str


@dataclass
class SyntheticGraphConfig:
    num_users: int = 5_000
    communities: int = 10
    mean_degree: float = 20.0
    within_fraction: float = 0.8  # share of edges drawn inside the first endpoint's community
    degree_sigma: float = 1.0  # lognormal spread of the degree propensities
    size_concentration: float = 2.0  # Dirichlet concentration of community sizes (low = unequal)
    signal_dims: int = 13  # feature dims that carry the community
    noise_dims: int = 2  # feature dims that carry nothing
    feature_noise: float = 2.0  # std of the noise around a community's centroid


def _canonical(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Undirected, loop-free, unique edges as a sorted (E, 2) array with u < v."""
    keep = u != v
    pairs = np.stack([np.minimum(u, v)[keep], np.maximum(u, v)[keep]], axis=1)
    return np.unique(pairs.astype(np.int64), axis=0).reshape(-1, 2)


def synthetic_graph(seed: int, cfg: SyntheticGraphConfig | None = None) -> Graph:
    """A seeded degree-corrected stochastic block model with community-bearing features.

    Each user belongs to one of ``communities`` communities (sizes drawn from a Dirichlet,
    so they are unequal) and has a degree propensity ``theta`` (lognormal, heavy-tailed).
    An edge is drawn by picking its first endpoint with probability proportional to
    ``theta``; with probability ``within_fraction`` the second endpoint comes from the same
    community, otherwise from everyone, again proportionally to ``theta``. Loops and
    repeats are dropped and draws continue until ``num_users * mean_degree / 2`` distinct
    edges exist, so expected degree is proportional to ``theta``.

    Features (``signal_dims + 1 + noise_dims`` columns): the community's random centroid
    plus Gaussian noise (``community_signal_*``), a weak hint of activity
    (``activity_hint``: log theta buried in noise), and pure noise (``noise_*``).
    """
    cfg = cfg or SyntheticGraphConfig()
    rng = np.random.default_rng(seed)
    n, k = cfg.num_users, cfg.communities
    shares = rng.dirichlet(np.full(k, cfg.size_concentration))
    community = rng.choice(k, size=n, p=shares).astype(np.int64)
    theta = rng.lognormal(0.0, cfg.degree_sigma, size=n)
    p_all = theta / theta.sum()
    members = [np.flatnonzero(community == c) for c in range(k)]
    p_members = [theta[m] / theta[m].sum() for m in members]

    target = int(round(n * cfg.mean_degree / 2))
    edges = np.empty((0, 2), np.int64)
    while len(edges) < target:
        m = int((target - len(edges)) * 1.3) + 100
        u = rng.choice(n, size=m, p=p_all)
        v = rng.choice(n, size=m, p=p_all)
        inside = rng.random(m) < cfg.within_fraction
        for c in range(k):
            sel = inside & (community[u] == c)
            v[sel] = rng.choice(members[c], size=int(sel.sum()), p=p_members[c])
        edges = _canonical(np.concatenate([edges[:, 0], u]), np.concatenate([edges[:, 1], v]))
    edges = edges[np.sort(rng.choice(len(edges), size=target, replace=False))]

    centroids = rng.normal(size=(k, cfg.signal_dims))  # (k, S)
    signal = centroids[community] + rng.normal(scale=cfg.feature_noise, size=(n, cfg.signal_dims))
    log_theta = (np.log(theta) - np.log(theta).mean()) / np.log(theta).std()
    activity = 0.3 * log_theta + rng.normal(size=n)  # correlation about 0.3
    noise = rng.normal(size=(n, cfg.noise_dims))
    features = np.column_stack([signal, activity, noise]).astype(np.float32)
    names = [*(f"community_signal_{i}" for i in range(cfg.signal_dims)), "activity_hint",
             *(f"noise_{i}" for i in range(cfg.noise_dims))]
    description = (
        f"Synthetic social graph from deepserve.models.graph.synthetic_graph (seed {seed}): a "
        f"degree-corrected stochastic block model with {n} users in {k} communities of unequal "
        f"sizes ({min(map(len, members))} to {max(map(len, members))} users), lognormal degree "
        f"propensities (sigma {cfg.degree_sigma:g}), {cfg.within_fraction:.0%} of edges drawn "
        f"inside a community, {target} undirected edges (mean degree {2 * target / n:.1f}, "
        f"max {np.bincount(edges.ravel(), minlength=n).max()}). {features.shape[1]} features per "
        f"user: {cfg.signal_dims} noisy community signals (centroid + N(0, "
        f"{cfg.feature_noise:g}^2)), one weak activity hint and {cfg.noise_dims} pure-noise columns."
    )
    return Graph(n, edges, features, names, None, community, "synthetic", description)


# ---------------------------------------------------------------------------- bring your own graph


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_rows(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank data rows of a CSV, each with its line number."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the {what} CSV ({exc})") from None
    if len(rows) < 2:
        raise ValueError(f"{path}: the {what} CSV needs a header row and at least one data row")
    return [h.strip() for h in rows[0][1]], rows[1:]


def _user_id(value: str, path: Path, line: int) -> int:
    try:
        uid = int(value.strip())
    except ValueError:
        raise ValueError(f"{path}, line {line}: user id {value!r} is not an integer") from None
    if uid < 0:
        raise ValueError(f"{path}, line {line}: user id {uid} is negative")
    return uid


def load_edge_list(edges: Path, features: Path | None = None) -> Graph:
    """Load a graph from an edge-list CSV and an optional node-feature CSV.

    Args:
        edges: a CSV with a header naming the columns ``src`` and ``dst`` (other columns
            are ignored); each row is an undirected edge between two non-negative integer
            user ids. Self loops and repeated edges (in either direction) are dropped.
        features: a CSV whose first column is ``id``, then one or more numeric feature
            columns. Users of the edge list without a row get zeros; rows for ids absent
            from the edge list are ignored.

    Returns:
        The graph over the users of the edge list, mapped to ``0..N-1`` in sorted id order;
        ``node_ids`` holds the sorted external ids unless they already are ``0..N-1``.

    Raises:
        ValueError: a missing column, a non-integer or negative id, a non-numeric or
            non-finite feature, a repeated feature row, or no edge left.
    """
    header, rows = _read_rows(edges, "edge-list")
    if "src" not in header or "dst" not in header:
        raise ValueError(f"{edges}: the header must name the columns src,dst (got {header})")
    i, j = header.index("src"), header.index("dst")
    pairs = np.empty((len(rows), 2), np.int64)
    for r, (line, row) in enumerate(rows):
        if len(row) <= max(i, j):
            raise ValueError(f"{edges}, line {line}: expected a src and a dst value, got {row}")
        pairs[r] = (_user_id(row[i], edges, line), _user_id(row[j], edges, line))
    ids = np.unique(pairs)
    local = np.searchsorted(ids, pairs)  # (E, 2) in 0..N-1
    graph_edges = _canonical(local[:, 0], local[:, 1])
    if len(graph_edges) == 0:
        raise ValueError(f"{edges}: no edge left after dropping self loops")
    n = len(ids)
    node_ids = None if ids[-1] == n - 1 else ids

    x = np.zeros((n, 0), np.float32)
    names: list[str] = []
    matched = 0
    if features is not None:
        fheader, frows = _read_rows(features, "node-feature")
        if fheader[0] != "id" or len(fheader) < 2:
            raise ValueError(f"{features}: the header must be 'id' then at least one feature "
                             f"column (got {fheader})")
        names = fheader[1:]
        x = np.zeros((n, len(names)), np.float32)
        seen: set[int] = set()
        for line, row in frows:
            if len(row) != len(fheader):
                raise ValueError(f"{features}, line {line}: {len(row)} values, the header has "
                                 f"{len(fheader)}")
            uid = _user_id(row[0], features, line)
            if uid in seen:
                raise ValueError(f"{features}, line {line}: a second row for user id {uid}")
            seen.add(uid)
            try:
                values = np.array([float(v) for v in row[1:]], np.float64)
            except ValueError:
                raise ValueError(f"{features}, line {line}: every feature must be numeric, "
                                 f"got {row[1:]}") from None
            if not np.isfinite(values).all():
                raise ValueError(f"{features}, line {line}: NaN or infinite feature value")
            pos = int(np.searchsorted(ids, uid))
            if pos < n and ids[pos] == uid:
                x[pos] = values
                matched += 1
    description = (
        f"Edge list {edges} ({n} users, {len(graph_edges)} undirected edges after dropping "
        f"loops and repeats" + (f", ids mapped from {ids[0]}..{ids[-1]}" if node_ids is not None
                                 else "")
        + (f"); features from {features} ({len(names)} columns, {matched} of {n} users have a "
           f"row, the rest zeros)." if features is not None else "); no node features.")
    )
    return Graph(n, graph_edges, x, names, node_ids, None, str(edges), description)


# ---------------------------------------------------------------------------- split


@dataclass
class GraphSplit:
    """Training graph, held-out warm edges and held-out cold users.

    Every edge of the full graph is in exactly one of: ``train_edges``; ``test_edges``
    (both ends training users); a cold user's ``cold_known`` or ``cold_targets``; or
    dropped (both ends cold).
    """

    train_edges: np.ndarray  # (E_tr, 2)
    test_edges: np.ndarray  # (E_te, 2)
    cold_users: np.ndarray  # (C,) sorted
    cold_known: list[np.ndarray]  # per cold user: neighbours given at request time
    cold_targets: list[np.ndarray]  # per cold user: neighbours to predict
    params: dict  # what split_graph was called with (besides the graph)


def _known_cut(owner: np.ndarray, other: np.ndarray, known_fraction: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle each owner's pairs and mark the first ``known_fraction`` (at least 2) as known.

    Returns:
        ``(owner, other, known)`` sorted by owner, ``known`` a boolean mask.
    """
    order = np.lexsort((rng.random(len(owner)), owner))
    owner, other = owner[order], other[order]
    _, start, size = np.unique(owner, return_index=True, return_counts=True)
    rank = np.arange(len(owner)) - np.repeat(start, size)
    cut = np.maximum(2, np.ceil(known_fraction * size)).astype(np.int64)
    return owner, other, rank < np.repeat(cut, size)


def split_graph(graph: Graph, seed: int, test_fraction: float = 0.1, cold_fraction: float = 0.05,
                min_cold_degree: int = 4, known_fraction: float = 0.5) -> GraphSplit:
    """Hold out cold users and test edges; deterministic in ``seed``.

    Cold users (``cold_fraction`` of all users, drawn among users of degree at least
    ``min_cold_degree``) leave the training graph entirely. Each one's edges to training
    users are shuffled and cut into known neighbours (``known_fraction``, at least 2) and
    targets (the rest); edges between two cold users are dropped. ``test_fraction`` of
    the remaining edges are held out as test edges.
    """
    rng = np.random.default_rng([seed, 7])  # its own stream: the generator's draws stay apart
    n, edges = graph.num_nodes, graph.edges
    degree = np.bincount(edges.ravel(), minlength=n)
    eligible = np.flatnonzero(degree >= min_cold_degree)
    n_cold = min(int(round(cold_fraction * n)), len(eligible))
    cold = np.sort(rng.choice(eligible, size=n_cold, replace=False))
    is_cold = np.zeros(n, bool)
    is_cold[cold] = True
    cu, cv = is_cold[edges[:, 0]], is_cold[edges[:, 1]]

    one = cu ^ cv  # edges between a cold user and a training user
    owner, other, known = _known_cut(np.where(cu[one], edges[one, 0], edges[one, 1]),
                                     np.where(cu[one], edges[one, 1], edges[one, 0]),
                                     known_fraction, rng)
    lo, hi = np.searchsorted(owner, cold, side="left"), np.searchsorted(owner, cold, side="right")
    known_lists = [np.sort(other[i:j][known[i:j]]) for i, j in zip(lo, hi)]
    target_lists = [np.sort(other[i:j][~known[i:j]]) for i, j in zip(lo, hi)]

    warm = edges[~cu & ~cv]
    held = rng.random(len(warm)) < test_fraction
    params = {"seed": seed, "test_fraction": test_fraction, "cold_fraction": cold_fraction,
              "min_cold_degree": min_cold_degree, "known_fraction": known_fraction}
    return GraphSplit(warm[~held], warm[held], cold, known_lists, target_lists, params)


def rebuild_from_manifest(training_data: dict) -> tuple[Graph, GraphSplit]:
    """The graph and split a graph-recommender version was trained and evaluated on.

    Raises:
        ValueError: a bring-your-own graph whose CSV files changed since the build.
    """
    if training_data["source"] == "synthetic":
        graph = synthetic_graph(training_data["generator_seed"],
                                SyntheticGraphConfig(**training_data["generator"]))
    else:
        for key in ("edges", "features"):
            info = training_data.get(key)
            if info and sha256_of(Path(info["path"])) != info["sha256"]:
                raise ValueError(f"{info['path']}: sha256 differs from the one recorded at build time")
        feats = training_data.get("features")
        graph = load_edge_list(Path(training_data["edges"]["path"]),
                               Path(feats["path"]) if feats else None)
    return graph, split_graph(graph, **training_data["split"])


def adjacency_lists(num_nodes: int, edges: np.ndarray) -> list[np.ndarray]:
    """Each user's sorted neighbours in an undirected edge list."""
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    return np.split(dst, np.searchsorted(src, np.arange(1, num_nodes)))


def warm_queries(split: GraphSplit, num_nodes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Training users with at least one test edge, and their test neighbours (the targets)."""
    lists = adjacency_lists(num_nodes, split.test_edges)
    users = np.array([u for u, t in enumerate(lists) if len(t)], np.int64)
    return users, [lists[u] for u in users]


def cold_queries(split: GraphSplit) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Cold users with at least one target: (users, known neighbours, targets)."""
    keep = [i for i, t in enumerate(split.cold_targets) if len(t)]
    return (split.cold_users[keep], [split.cold_known[i] for i in keep],
            [split.cold_targets[i] for i in keep])


# ---------------------------------------------------------------------------- network


@dataclass
class GraphSAGEConfig:
    hidden: int = 64
    embedding_dim: int = 64
    steps: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-5
    supervision_fraction: float = 0.1  # training edges hidden from message passing each step
    simulated_cold_fraction: float = 0.05  # users made cold each step (as split_graph does)
    warm_batch: int = 2048  # supervised (user, held-out neighbour) pairs per step
    cold_batch: int = 1024  # (simulated cold user, target) pairs per step
    negatives: int = 1024  # uniformly sampled users per step, shared by the batch's softmax
    cold_weight: float = 1.0


def mean_aggregate(h: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   inv_degree: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` over each node's in-neighbours along directed edges ``src -> dst``."""
    out = torch.zeros_like(h).index_add_(0, dst, h[src])  # (N, D)
    return out * inv_degree[:, None]


class GraphSAGE(nn.Module):
    """Two GraphSAGE layers with mean aggregation:
    ``h' = act(W_self h + W_neigh mean_{u in N(v)} h_u + b)``, ReLU after the first layer
    and none after the second, so that an embedding's norm can carry popularity.

    The input's last column is the degree feature, ``(log(1 + degree) - mean) / std``
    with the training graph's mean and std (kept here, so a cold user's can be computed).
    """

    def __init__(self, in_dim: int, cfg: GraphSAGEConfig, degree_mean: float, degree_std: float):
        super().__init__()
        self.self1 = nn.Linear(in_dim, cfg.hidden)
        self.neigh1 = nn.Linear(in_dim, cfg.hidden, bias=False)
        self.self2 = nn.Linear(cfg.hidden, cfg.embedding_dim)
        self.neigh2 = nn.Linear(cfg.hidden, cfg.embedding_dim, bias=False)
        self.register_buffer("degree_mean", torch.tensor(degree_mean, dtype=torch.float32))
        self.register_buffer("degree_std", torch.tensor(degree_std, dtype=torch.float32))

    def degree_feature(self, degree: torch.Tensor) -> torch.Tensor:
        return (torch.log1p(degree.float()) - self.degree_mean) / self.degree_std

    def layer1(self, h0: torch.Tensor, neigh0: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.self1(h0) + self.neigh1(neigh0))  # (B, hidden)

    def layer2(self, h1: torch.Tensor, neigh1: torch.Tensor) -> torch.Tensor:
        return self.self2(h1) + self.neigh2(neigh1)  # (B, embedding_dim)

    def encode(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
        """Full-graph forward pass. Returns the layer-1 states (N, hidden) and embeddings (N, D)."""
        degree = torch.zeros(len(x)).index_add_(0, dst, torch.ones(len(dst)))
        inv_degree = 1.0 / degree.clamp(min=1.0)  # isolated nodes aggregate zeros
        h1 = self.layer1(x, mean_aggregate(x, src, dst, inv_degree))
        return h1, self.layer2(h1, mean_aggregate(h1, src, dst, inv_degree))

    def cold(self, x_mean: torch.Tensor, h1_mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Embed users known only by neighbours: the neighbours' mean input (B, F) and mean
        layer-1 state (B, hidden), and how many neighbours there were (B,).

        The user's own layer-0 state is the neighbours' mean features with the degree
        column replaced by the user's own degree feature (from ``count``).
        """
        h0 = torch.cat([x_mean[:, :-1], self.degree_feature(count)[:, None]], dim=1)  # (B, F)
        return self.layer2(self.layer1(h0, x_mean), h1_mean)  # (B, D)


class ExportedRecommender(nn.Module):
    """The served graph: (user, neighbors, exclude_known) -> (ids, scores, embedding).

    ``user`` (B,) is a training-graph index or -1 for a new user; any value outside
    ``0..N-1`` is treated as -1. ``neighbors`` (B, M) lists known users, -1 = padding (an
    index outside ``0..N-1`` is treated as padding too). A new user's embedding is computed
    from its neighbours (:meth:`GraphSAGE.cold`); a training user's is looked up, unless it
    has no edge in the training graph (a held-out user, say) and neighbours are given: then
    it is embedded from them like a new user. With ``exclude_known``, the user itself, its
    training-graph neighbours and the given neighbours are masked with ``MASKED_SCORE``
    before the top-k.
    """

    def __init__(self, net: GraphSAGE, x: torch.Tensor, h1: torch.Tensor, z: torch.Tensor,
                 neighbor_table: torch.Tensor, k: int):
        super().__init__()
        self.net = net
        n = len(x)
        self.num_users = n
        self.k = k
        # Row N of each padded table is the dummy user: zeros, so padding adds nothing to a sum.
        self.register_buffer("x_pad", torch.cat([x, torch.zeros(1, x.shape[1])]))  # (N+1, F)
        self.register_buffer("h1_pad", torch.cat([h1, torch.zeros(1, h1.shape[1])]))  # (N+1, H)
        self.register_buffer("z", z)  # (N, D)
        self.register_buffer("neighbor_table", neighbor_table)  # (N, max_degree), padded with N

    def masked_scores(self, user: torch.Tensor, neighbors: torch.Tensor, exclude_known: torch.Tensor):
        """Every candidate's score (B, N) after masking, and the users' embeddings (B, D)."""
        n = self.num_users
        known = (user >= 0) & (user < n)  # (B,) in the training graph
        row = torch.where(known, user, torch.zeros_like(user))  # a valid index for the lookups
        own = self.neighbor_table[row].long()  # (B, max_degree), N = padding
        valid = (neighbors >= 0) & (neighbors < n)  # (B, M)
        nb = torch.where(valid, neighbors, torch.full_like(neighbors, n))  # padding -> dummy
        count = valid.sum(dim=1).float()  # (B,)
        denom = count.clamp(min=1.0)[:, None]  # no neighbour: zeros, not NaN
        x_mean = self.x_pad[nb].sum(dim=1) / denom  # (B, F)
        h1_mean = self.h1_pad[nb].sum(dim=1) / denom  # (B, H)
        z_cold = self.net.cold(x_mean, h1_mean, count)  # (B, D)
        # A user without training edges has only its own features behind its lookup: the
        # neighbours it comes with say more.
        warm = known & ((own[:, 0] < n) | (count == 0))
        emb = torch.where(warm[:, None], self.z[row], z_cold)  # (B, D)

        scores = emb @ self.z.T  # (B, N)
        scores = torch.cat([scores, torch.zeros_like(scores[:, :1])], dim=1)  # (B, N+1), dummy last
        own = torch.where(known[:, None], own, torch.full_like(own, n))
        me = torch.where(known, user, torch.full_like(user, n))[:, None]  # (B, 1)
        masked = torch.cat([own, nb, me], dim=1)  # (B, max_degree + M + 1)
        # Not excluding: route every mask to the dummy column, which is sliced off below.
        masked = torch.where(exclude_known[:, None], masked, torch.full_like(masked, n))
        scores = scores.scatter(1, masked, MASKED_SCORE)
        return scores[:, :n], emb

    def forward(self, user: torch.Tensor, neighbors: torch.Tensor, exclude_known: torch.Tensor):
        scores, emb = self.masked_scores(user, neighbors, exclude_known)
        top, ids = torch.topk(scores, self.k, dim=1)  # (B, K) descending
        return ids, top, emb


# ---------------------------------------------------------------------------- training


def spectral_features(num_nodes: int, edges: np.ndarray, dims: int = SPECTRAL_DIMS) -> np.ndarray:
    """Structural node features for a graph without any: spectral coordinates.

    The leading non-trivial eigenvectors of the symmetrically normalized adjacency
    ``D^-1/2 A D^-1/2`` place users of a densely connected group close together (isolated
    users get zeros). Deterministic: dense for small graphs, else ARPACK from a fixed start.

    Returns:
        (N, min(dims, N - 2)) float32.
    """
    from scipy import sparse
    from scipy.sparse.linalg import eigsh

    dims = max(0, min(dims, num_nodes - 2))
    src, dst = (t.numpy() for t in _directed(edges))
    degree = np.bincount(src, minlength=num_nodes).astype(np.float64)
    scale = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
    norm = sparse.csr_matrix((scale[src] * scale[dst], (src, dst)), shape=(num_nodes, num_nodes))
    if num_nodes <= 2000:
        values, vectors = np.linalg.eigh(norm.toarray())
    else:
        values, vectors = eigsh(norm, k=dims + 1, which="LA", v0=np.full(num_nodes, num_nodes ** -0.5))
    order = np.argsort(-values, kind="stable")[1 : dims + 1]  # the first is the trivial one
    return (vectors[:, order] * np.sqrt(num_nodes)).astype(np.float32)


def model_inputs(features: np.ndarray, train_edges: np.ndarray, fit_rows: np.ndarray):
    """The network's input matrix: standardized features, then the degree feature.

    Features are standardized with the mean and std of ``fit_rows`` (the training users);
    the degree is each user's degree in the training graph.

    Returns:
        ``(x (N, F+1) float32, degree_mean, degree_std)``.
    """
    raw = features.astype(np.float64)
    mean = raw[fit_rows].mean(0) if raw.shape[1] else np.zeros(0)
    std = raw[fit_rows].std(0) if raw.shape[1] else np.ones(0)
    std = np.where(std < 1e-8, 1.0, std)
    degree = np.bincount(train_edges.ravel(), minlength=len(raw))
    log_degree = np.log1p(degree[fit_rows])
    d_mean, d_std = float(log_degree.mean()), float(max(log_degree.std(), 1e-6))
    x = np.column_stack([(raw - mean) / std, (np.log1p(degree) - d_mean) / d_std])
    return x.astype(np.float32), d_mean, d_std


def _directed(edges: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of undirected edges, as (src, dst) index tensors."""
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    return torch.from_numpy(src), torch.from_numpy(dst)


@dataclass
class _Episode:
    """One training step's view of the training graph, as the evaluation will see it:
    some edges hidden (to predict from both ends), some users made cold (all their edges
    leave the graph; a part become known neighbours, the rest targets)."""

    src: torch.Tensor  # (2 E_mp,) message-passing edges, both directions
    dst: torch.Tensor
    warm_user: np.ndarray  # (Qw,) query users of hidden edges
    warm_target: np.ndarray  # (Qw,) the other end
    cold_users: np.ndarray  # (C,) sorted
    known_slot: np.ndarray  # (K,) index into cold_users ...
    known_user: np.ndarray  # (K,) ... and one of its known neighbours
    target_slot: np.ndarray  # (Qc,) index into cold_users ...
    target_user: np.ndarray  # (Qc,) ... and one of its targets


def _sample_episode(edges: np.ndarray, eligible: np.ndarray, n: int, cfg: GraphSAGEConfig,
                    known_fraction: float, rng: np.random.Generator) -> _Episode:
    e0, e1 = edges[:, 0], edges[:, 1]
    hidden = rng.random(len(edges)) < cfg.supervision_fraction
    is_cold = np.zeros(n, bool)
    n_cold = min(len(eligible), max(1, int(round(cfg.simulated_cold_fraction * n))))
    is_cold[rng.choice(eligible, size=n_cold, replace=False)] = True
    cu, cv = is_cold[e0], is_cold[e1]
    src, dst = _directed(edges[~hidden & ~cu & ~cv])

    sup = hidden & ~cu & ~cv
    warm_user = np.concatenate([e0[sup], e1[sup]])
    warm_target = np.concatenate([e1[sup], e0[sup]])
    pick = rng.choice(len(warm_user), size=min(cfg.warm_batch, len(warm_user)), replace=False)

    one = cu ^ cv  # a cold user's edges to warm users; edges between two cold users are dropped
    owner, other, known = _known_cut(np.where(cu[one], e0[one], e1[one]),
                                     np.where(cu[one], e1[one], e0[one]), known_fraction, rng)
    cold_users, slot = np.unique(owner, return_inverse=True)
    targets = np.flatnonzero(~known)
    targets = targets[rng.choice(len(targets), size=min(cfg.cold_batch, len(targets)), replace=False)]
    return _Episode(src, dst, warm_user[pick], warm_target[pick], cold_users,
                    slot[known], other[known], slot[targets], other[targets])


def _cold_embeddings(net: GraphSAGE, x: torch.Tensor, h1: torch.Tensor, ep: _Episode) -> torch.Tensor:
    """The episode's cold users embedded from their known neighbours, as the export does."""
    slot, known = torch.from_numpy(ep.known_slot), torch.from_numpy(ep.known_user)
    c = len(ep.cold_users)
    count = torch.zeros(c).index_add_(0, slot, torch.ones(len(slot)))  # (C,)
    inv = (1.0 / count.clamp(min=1.0))[:, None]
    x_mean = torch.zeros(c, x.shape[1]).index_add_(0, slot, x[known]) * inv  # (C, F)
    h1_mean = torch.zeros(c, h1.shape[1]).index_add_(0, slot, h1[known]) * inv  # (C, H)
    return net.cold(x_mean, h1_mean, count)  # (C, D)


def _excluded(adjacency: torch.Tensor, ep: _Episode, n: int, negatives: torch.Tensor) -> torch.Tensor:
    """(Q, S): which sampled negatives each query must not be scored against.

    A warm query excludes its message-passing neighbours, a cold one its known
    neighbours, as the served model does; ``adjacency`` is an all-False (N, N) scratch
    matrix, left all-False again.
    """
    flat = adjacency.view(-1)  # (N*N,): 1-D indexing is the fast path
    keys = ep.src * n + ep.dst
    flat[keys] = True
    warm = adjacency.index_select(0, torch.from_numpy(ep.warm_user)).index_select(1, negatives)
    flat[keys] = False  # reset only what was set: cheaper than clearing N x N
    known = torch.zeros(len(ep.cold_users), n, dtype=torch.bool)
    known.view(-1)[torch.from_numpy(ep.known_slot * n + ep.known_user)] = True
    cold = known.index_select(1, negatives)[torch.from_numpy(ep.target_slot)]
    return torch.cat([warm, cold])  # (Qw + Qc, S)


def train(x: np.ndarray, train_edges: np.ndarray, net: GraphSAGE, cfg: GraphSAGEConfig, seed: int,
          min_cold_degree: int = 4, known_fraction: float = 0.5, desc: str = "train") -> GraphSAGE:
    """Fit the encoder for link prediction as it will be used: on hidden edges and new users.

    Each step samples an :class:`_Episode` (``supervision_fraction`` of the edges hidden,
    ``simulated_cold_fraction`` of the users made cold, like :func:`split_graph` does),
    runs the remaining graph through both layers, embeds the cold users from their known
    neighbours, and minimizes a sampled softmax: each query's true neighbour against
    ``negatives`` uniformly drawn users (minus those the served model would mask).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    n = len(x)
    xt = torch.from_numpy(x)
    degree = np.bincount(train_edges.ravel(), minlength=n)
    eligible = np.flatnonzero(degree >= min_cold_degree)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    # Each uniform negative stands for (n - 1) / S users: adding the log of that keeps the
    # sampled softmax an estimate of the full softmax over every user.
    n_neg = min(cfg.negatives, n)
    log_weight = float(np.log((n - 1) / n_neg))
    for _ in progress(range(cfg.steps), desc, "step"):
        net.train()
        ep = _sample_episode(train_edges, eligible, n, cfg, known_fraction, rng)
        h1, z = net.encode(xt, ep.src, ep.dst)  # (N, H), (N, D)
        z_cold = _cold_embeddings(net, xt, h1, ep)  # (C, D)
        queries = torch.cat([z[torch.from_numpy(ep.warm_user)], z_cold[torch.from_numpy(ep.target_slot)]])
        query_ids = torch.from_numpy(np.concatenate([ep.warm_user, ep.cold_users[ep.target_slot]]))
        targets = torch.from_numpy(np.concatenate([ep.warm_target, ep.target_user]))  # (Q,)

        negatives = torch.from_numpy(rng.choice(n, size=n_neg, replace=False))  # (S,)
        positive = (queries * z[targets]).sum(dim=1, keepdim=True)  # (Q, 1)
        negative = queries @ z[negatives].T + log_weight  # (Q, S)
        excluded = _excluded(adjacency, ep, n, negatives)
        # Nor is a user its own candidate, or the positive its own negative.
        excluded |= (negatives[None, :] == targets[:, None]) | (negatives[None, :] == query_ids[:, None])
        logits = torch.cat([positive, negative.masked_fill(excluded, float("-inf"))], dim=1)
        losses = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="none")
        n_warm = len(ep.warm_user)
        terms = [losses[:n_warm].mean()] if n_warm else []
        if len(ep.target_slot):
            terms.append(cfg.cold_weight * losses[n_warm:].mean())
        if not terms:  # a tiny graph may hide nothing in a step
            continue
        loss = sum(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def neighbor_table(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """(N, max_degree) int32: each user's training neighbours, padded with N (the dummy)."""
    lists = adjacency_lists(num_nodes, edges)
    width = max(1, max(len(a) for a in lists))
    if num_nodes * width > MAX_NEIGHBOR_TABLE:
        raise ValueError(f"the neighbour table would hold {num_nodes} x {width} entries (max degree "
                         f"{width}), more than {MAX_NEIGHBOR_TABLE}: this model bakes the training "
                         f"graph into its file and suits graphs of moderate size and degree")
    table = np.full((num_nodes, width), num_nodes, np.int32)
    for u, a in enumerate(lists):
        table[u, : len(a)] = a
    return table


def exported_model(net: GraphSAGE, x: np.ndarray, train_edges: np.ndarray) -> ExportedRecommender:
    """Precompute the training graph's states and wrap them with the network for export."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        h1, z = net.encode(xt, *_directed(train_edges))
    table = torch.from_numpy(neighbor_table(len(x), train_edges))
    # A tiny graph returns half its users: with all of them, masked users (exact ties) would
    # fill every row's tail and make the ids of two runtimes incomparable.
    k = K_MAX if len(x) >= 2 * K_MAX else max(1, len(x) // 2)
    return ExportedRecommender(net, xt, h1, z, table, k=k).eval()


# ---------------------------------------------------------------------------- evaluation


def pad_neighbors(lists: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Neighbour lists as a (B, M) int64 array padded with -1 (M at least 1)."""
    width = max(1, width or 0, max((len(a) for a in lists), default=0))
    out = np.full((len(lists), width), -1, np.int64)
    for i, a in enumerate(lists):
        out[i, : len(a)] = a
    return out


def onnx_recommend(session, users: np.ndarray, neighbors: list[np.ndarray] | None = None,
                   exclude_known: bool = True, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Run the exported graph over many users in batches.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the exported model.
        users: (U,) training-graph indices, -1 for new users.
        neighbors: per user, the known neighbours (None: none given).

    Returns:
        ``(ids, scores)``, each (U, K).
    """
    neighbors = neighbors if neighbors is not None else [np.empty(0, np.int64)] * len(users)
    ids, scores = [], []
    for lo in range(0, len(users), batch):
        feeds = {
            "user": np.asarray(users[lo : lo + batch], np.int64),
            "neighbors": pad_neighbors(neighbors[lo : lo + batch]),
            "exclude_known": np.full(len(users[lo : lo + batch]), exclude_known, bool),
        }
        i, s = session.run(["ids", "scores"], feeds)
        ids.append(i)
        scores.append(s)
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
    out = []
    for lo in range(0, len(exclude), 512):
        part = exclude[lo : lo + 512]
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
    from scipy import sparse

    degree = np.bincount(train_edges.ravel(), minlength=num_nodes).astype(np.float64)
    degree = degree + (0 if queries_in_graph else 1)
    weight = 1.0 / np.log(np.maximum(degree, 2.0))  # a common neighbour has degree >= 2
    src = np.concatenate([train_edges[:, 0], train_edges[:, 1]])
    dst = np.concatenate([train_edges[:, 1], train_edges[:, 0]])
    adjacency = sparse.csr_matrix((np.ones(len(src)), (src, dst)), shape=(num_nodes, num_nodes))
    out = []
    for lo in range(0, len(query_neighbors), 512):
        part = query_neighbors[lo : lo + 512]
        rows = np.repeat(np.arange(len(part)), [len(a) for a in part])
        cols = np.concatenate(part) if part else np.empty(0, np.int64)
        q = sparse.csr_matrix((weight[cols], (rows, cols)), shape=(len(part), num_nodes))
        out.append(top_k_excluding((q @ adjacency).toarray(), exclude[lo : lo + 512], k))
    return np.concatenate(out) if out else np.empty((0, k), np.int64)


def evaluate(session, graph: Graph, split: GraphSplit, k: int = EVAL_K) -> dict:
    """Recall@k and NDCG@k of the exported graph and both baselines, warm and cold.

    Warm: every training user with a test edge ranks all users except itself and its
    training neighbours; its test neighbours are the targets. Cold: every cold user with a
    target ranks all users from its known neighbours, which are excluded.
    """
    n = graph.num_nodes
    train_lists = adjacency_lists(n, split.train_edges)
    degree = np.bincount(split.train_edges.ravel(), minlength=n)
    users, targets = warm_queries(split, n)
    warm_exclude = [np.append(train_lists[u], u) for u in users]
    c_users, c_known, c_targets = cold_queries(split)

    ranked = {
        "gnn": onnx_recommend(session, users)[0],
        "popularity": popularity_baseline(degree, warm_exclude, k),
        "adamic_adar": adamic_adar_baseline(n, split.train_edges, [train_lists[u] for u in users],
                                            warm_exclude, k),
    }
    cold_ranked = {
        "gnn": onnx_recommend(session, np.full(len(c_users), -1, np.int64), c_known)[0],
        "popularity": popularity_baseline(degree, c_known, k),
        "adamic_adar": adamic_adar_baseline(n, split.train_edges, c_known, c_known, k,
                                            queries_in_graph=False),
    }
    metrics: dict = {}
    for method, prefix in (("gnn", ""), ("popularity", "popularity_"), ("adamic_adar", "adamic_adar_")):
        metrics[f"{prefix}recall_at_{k}"] = recall_at_k(ranked[method], targets, k)
        metrics[f"{prefix}ndcg_at_{k}"] = ndcg_at_k(ranked[method], targets, k)
        if len(c_users):
            metrics[f"cold_{prefix}recall_at_{k}"] = recall_at_k(cold_ranked[method], c_targets, k)
            metrics[f"cold_{prefix}ndcg_at_{k}"] = ndcg_at_k(cold_ranked[method], c_targets, k)
    r = metrics[f"recall_at_{k}"]
    metrics["recall_ratio_to_popularity"] = r / max(metrics[f"popularity_recall_at_{k}"], 1e-12)
    metrics["recall_ratio_to_adamic_adar"] = r / max(metrics[f"adamic_adar_recall_at_{k}"], 1e-12)
    if len(c_users):
        metrics["cold_to_warm_recall_ratio"] = metrics[f"cold_recall_at_{k}"] / max(r, 1e-12)
    metrics["eval_warm_users"] = int(len(users))
    metrics["eval_warm_targets"] = int(sum(len(t) for t in targets))
    metrics["eval_cold_users"] = int(len(c_users))
    metrics["eval_cold_targets"] = int(sum(len(t) for t in c_targets))
    return metrics


def tie_free_rows(scores: np.ndarray, k: int, tolerance: float = 1e-5) -> np.ndarray:
    """Rows whose top-k order (and the k-th/(k+1)-th boundary) has no near-tie.

    Two scores within ``tolerance * max(1, |score|)`` may legitimately come out in either
    order from two runtimes; rows without such pairs must give identical ids.
    """
    top = -np.sort(-scores, axis=1)[:, : k + 1]  # (B, k+1) descending
    gaps = top[:, :-1] - top[:, 1:]
    return np.flatnonzero((gaps > tolerance * np.maximum(1.0, np.abs(top[:, :-1]))).all(axis=1))


def check_topk_ids(model: ExportedRecommender, session, example) -> None:
    """ONNX Runtime must return PyTorch's top-k ids for a batch without near-ties.

    Raises:
        RuntimeError: some row's ids differ.
    """
    with torch.no_grad():
        want, _, _ = model(*example)
    feeds = dict(zip(("user", "neighbors", "exclude_known"), (t.numpy() for t in example)))
    have = session.run(["ids"], feeds)[0]
    bad = np.flatnonzero((want.numpy() != have).any(axis=1))
    if len(bad):
        raise RuntimeError(f"ONNX Runtime's top-k ids differ from PyTorch's in {len(bad)} of "
                           f"{len(have)} rows (first: row {bad[0]})")


# ---------------------------------------------------------------------------- model card


def _pca_2d(z: np.ndarray) -> np.ndarray:
    centred = z - z.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T  # (N, 2)


def _write_card(directory: Path, manifest: Manifest, projection: np.ndarray,
                colour: np.ndarray, colour_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, k = manifest.metrics, EVAL_K
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    if colour_label == "community":
        for c in np.unique(colour):
            at = colour == c
            ax1.scatter(projection[at, 0], projection[at, 1], s=3, alpha=0.7, label=f"{c} ({at.sum()})")
        ax1.legend(title="community (users)", fontsize=7, markerscale=3, loc="upper left",
                   bbox_to_anchor=(1.0, 1.0))
    else:
        points = ax1.scatter(projection[:, 0], projection[:, 1], c=colour, s=3, cmap="viridis", alpha=0.7)
        fig.colorbar(points, ax=ax1, label=colour_label)
    ax1.set(title="user embeddings: first two principal components", xticks=[], yticks=[])
    methods = [("GNN", ""), ("popularity", "popularity_"), ("Adamic-Adar", "adamic_adar_")]
    width = 0.38
    pos = np.arange(len(methods))
    warm = [m[f"{p}recall_at_{k}"] for _, p in methods]
    ax2.bar(pos - width / 2, warm, width, label="warm (held-out edges)")
    if f"cold_recall_at_{k}" in m:
        cold = [m[f"cold_{p}recall_at_{k}"] for _, p in methods]
        ax2.bar(pos + width / 2, cold, width, label="cold (new users)")
    ax2.set(xticks=pos, xticklabels=[name for name, _ in methods], ylabel=f"recall@{k}",
            title=f"recall@{k} through the exported graph")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(directory / "card.png", dpi=110)
    plt.close(fig)

    def row(label: str, prefix: str) -> str:
        cold = (f"{m[f'cold_{prefix}recall_at_{k}']:.4f} | {m[f'cold_{prefix}ndcg_at_{k}']:.4f}"
                if f"cold_{prefix}recall_at_{k}" in m else "- | -")
        return f"| {label} | {m[f'{prefix}recall_at_{k}']:.4f} | {m[f'{prefix}ndcg_at_{k}']:.4f} | {cold} |\n"

    td, extra = manifest.training_data, manifest.extra
    text = card_header(manifest) + (
        "## Data\n\n"
        f"{td['description']}\n\n"
        f"Split (seed {td['split']['seed']}): {td['cold_users']} cold users "
        f"({td['split']['cold_fraction']:.0%} of users, degree >= {td['split']['min_cold_degree']}) "
        f"removed from the training graph, their edges to training users cut into known "
        f"neighbours ({td['split']['known_fraction']:.0%}, at least 2) and targets; "
        f"{td['test_edges']} test edges ({td['split']['test_fraction']:.0%} of the rest) held out; "
        f"{td['train_edges']} training edges.\n\n"
        f"## Results through the exported graph (ONNX Runtime)\n\n"
        f"| method | warm recall@{k} | warm NDCG@{k} | cold recall@{k} | cold NDCG@{k} |\n"
        "|---|---|---|---|---|\n"
        + row("GNN (this model)", "") + row("popularity (training degree)", "popularity_")
        + row("Adamic-Adar", "adamic_adar_") + "\n"
        f"Warm: {m['eval_warm_users']} training users with a test edge; each ranks all users but "
        f"itself and its training neighbours. Cold: {m.get('eval_cold_users', 0)} new users, each "
        f"sent as `user = -1` with its known neighbours, which are excluded from its ranking. "
        f"recall@{k} = hits in the top {k} / min({k}, number of targets), averaged over users.\n\n"
        "![embeddings and recall](card.png)\n\n"
        "## How it works\n\n"
        f"2-layer GraphSAGE, mean aggregation, {extra['embedding_dim']}-dim embeddings, dot-product "
        f"scores. Inputs: {manifest.preprocessing['node_inputs']} "
        f"({len(extra['feature_names'])} feature columns + degree). Cold start: {extra['cold_start']}\n\n"
        "## Limits\n\n"
        "The training graph is baked into the file: users or edges added after the build are "
        "invisible to warm lookups (a new user must be sent as `-1` with its neighbours, and is "
        "never recommended to others) until the model is rebuilt. Scores are comparable within "
        "a request, not calibrated probabilities. A graph without node features gets spectral "
        "coordinates instead: they describe the graph's coarse structure only.\n"
    )
    (directory / "card.md").write_text(text)


# ---------------------------------------------------------------------------- build


@dataclass
class GraphBuildOptions:
    name: str = "graph-recommender"
    edges: Path | None = None
    features: Path | None = None
    synthetic: SyntheticGraphConfig = field(default_factory=SyntheticGraphConfig)
    config: GraphSAGEConfig = field(default_factory=GraphSAGEConfig)


COLD_START = (
    "for user = -1 the layer-0 state is the mean of the given neighbours' (standardized) "
    "features, with the degree feature computed from the number of valid neighbours; the "
    "layer-1 state applies the first layer to it and to the neighbours' mean features; the "
    "embedding applies the second layer to that and to the mean of the neighbours' "
    "precomputed layer-1 states (the divisor is max(count, 1), so a row without valid "
    "neighbours gives finite scores). Training users' embeddings are looked up, except for a "
    "training-graph user without training edges (e.g. a held-out user) sent with neighbours: "
    "it is embedded from them like a new user (its own index is still masked)."
)


def _example_batch(model: ExportedRecommender, split: GraphSplit, n: int, rows: int = 48):
    """A held-out batch of up to ``rows`` warm and ``rows`` cold users, without near-ties in
    their top-k.

    ONNX Runtime and PyTorch may order two near-equal scores differently, which would make
    the id comparison fail for no fault of the export; such rows are left out.

    Raises:
        ValueError: no candidate row is free of ties (a tiny or degenerate graph).
    """
    users, _ = warm_queries(split, n)
    c_users, c_known, _ = cold_queries(split)
    users, c_users, c_known = users[:512], c_users[:512], c_known[:512]
    # Half the held-out users come as -1, half by their (edgeless) training-graph index.
    c_users = np.where(np.arange(len(c_users)) % 2 == 0, -1, c_users)
    user = np.concatenate([users, c_users])
    # Warm users also send two extra exclusions, as a client may.
    lists = [np.array([(u + 1) % n, (u + 7) % n]) for u in users] + list(c_known)
    neighbors = torch.from_numpy(pad_neighbors(lists))
    exclude = torch.ones(len(user), dtype=torch.bool)
    exclude[::5] = False  # and some rows leave the known users in
    with torch.no_grad():
        scores, _ = model.masked_scores(torch.from_numpy(user), neighbors, exclude)
    keep = tie_free_rows(scores.numpy(), model.k)
    keep = np.concatenate([keep[keep < len(users)][:rows], keep[keep >= len(users)][:rows]])
    if not len(keep):
        raise ValueError("no held-out user's top-k is free of ties, so ONNX Runtime and PyTorch "
                         "cannot be compared; the graph is too small or its users too alike")
    keep = torch.from_numpy(keep)
    return torch.from_numpy(user)[keep], neighbors[keep], exclude[keep]


def _training_data(graph: Graph, split: GraphSplit, opts: GraphBuildOptions, seed: int) -> dict:
    """What :func:`rebuild_from_manifest` needs to rebuild the graph and split, and their sizes."""
    if graph.source == "synthetic":
        source = {"source": "synthetic", "generator_seed": seed, "generator": asdict(opts.synthetic)}
    else:
        def file(path: Path | None) -> dict | None:
            return {"path": str(Path(path).resolve()), "sha256": sha256_of(path)} if path else None

        source = {"source": graph.source, "edges": file(opts.edges), "features": file(opts.features)}
    return {
        **source,
        "description": graph.description,
        "split": split.params,
        "num_users": graph.num_nodes,
        "num_edges": int(len(graph.edges)),
        "train_edges": int(len(split.train_edges)),
        "test_edges": int(len(split.test_edges)),
        "cold_users": int(len(split.cold_users)),
    }


def build(repo: Path, seed: int, options: GraphBuildOptions | None = None) -> Path:
    """Train, export, evaluate through ONNX Runtime and publish the graph recommender.

    Raises:
        ValueError: a bad bring-your-own edge list or feature table.
    """
    import onnxruntime as ort

    opts = options or GraphBuildOptions()
    seed_everything(seed)
    if opts.edges is None:
        if opts.features is not None:
            raise ValueError("node features need an edge list (--edges) to go with them")
        graph = synthetic_graph(seed, opts.synthetic)
    else:
        graph = load_edge_list(opts.edges, opts.features)
    split = split_graph(graph, seed)
    if len(split.train_edges) == 0 or len(split.test_edges) == 0:
        raise ValueError(f"{graph.source}: the graph is too small to hold out test edges "
                         f"({len(graph.edges)} edges)")
    print(f"graph-recommender: {graph.num_nodes} users, {len(split.train_edges)} training edges, "
          f"{len(split.test_edges)} test edges, {len(split.cold_users)} cold users")
    n = graph.num_nodes
    features, feature_names = graph.features, graph.feature_names
    if features.shape[1] == 0:
        features = spectral_features(n, split.train_edges)
        feature_names = [f"spectral_{i}" for i in range(features.shape[1])]
    warm_rows = np.setdiff1d(np.arange(n), split.cold_users)
    x, d_mean, d_std = model_inputs(features, split.train_edges, warm_rows)
    cfg = opts.config
    net = GraphSAGE(x.shape[1], cfg, d_mean, d_std)
    net = train(x, split.train_edges, net, cfg, seed, split.params["min_cold_degree"],
                split.params["known_fraction"], desc=f"train {opts.name}")
    model = exported_model(net, x, split.train_edges)
    example = _example_batch(model, split, n)

    spec = ExportSpec(
        name=opts.name,
        kind="recommender",
        module=model,
        example_inputs=example,
        input_names=["user", "neighbors", "exclude_known"],
        output_names=["ids", "scores", "embedding"],
        descriptions={
            "user": "training-graph user index (0..N-1, see extra.node_ids), or -1 for a new user",
            "neighbors": "known neighbour indices, -1 = padding; define a new user's embedding, "
                         "extra exclusions for a training user",
            "exclude_known": "mask the user, its training neighbours and the given neighbours",
            "ids": f"recommended user indices, best first ({model.k} per row)",
            "scores": "dot-product scores, descending (masked users score the float32 minimum)",
            "embedding": "the user's embedding (looked up, or computed from its neighbours)",
        },
        dynamic_axes={"neighbors": {0: "batch", 1: "neighbors"}},
        preprocessing={
            "in_graph": True,
            "client": "map external user ids to indices with extra.node_ids (when not null); send "
                      "-1 as user for a new user together with the users it knows",
            "node_inputs": "standardized node features (spectral coordinates of the training "
                           "graph when it has none) and log(1 + training degree), precomputed and "
                           "stored in the graph",
        },
        training_data=_training_data(graph, split, opts, seed),
        metrics={},
        seed=seed,
        extra={
            "max_k": model.k,
            "num_users": n,
            "embedding_dim": cfg.embedding_dim,
            "node_ids": None if graph.node_ids is None else graph.node_ids.tolist(),
            "aggregation": "mean",
            "cold_start": COLD_START,
            "feature_names": feature_names,
            "max_degree": int(model.neighbor_table.shape[1]),
            # Users the graph holds without a training edge (the held-out ones, isolated users):
            # sent with neighbours, they are embedded from them like new users (cold start).
            "edgeless_users": np.flatnonzero(np.bincount(split.train_edges.ravel(), minlength=n) == 0).tolist(),
            "masked_score": MASKED_SCORE,
            "config": asdict(cfg),
        },
    )

    def measure(onnx_bytes: bytes, manifest: Manifest) -> dict:
        """The figures, measured on the exported file itself (export_and_publish's hook)."""
        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        check_topk_ids(model, session, example)
        metrics = {**evaluate(session, graph, split), "onnx_topk_id_parity_rows": int(len(example[0]))}
        manifest.extra["baselines"] = {
            method: {key: v for key, v in metrics.items() if key.startswith((method, f"cold_{method}"))}
            for method in ("popularity", "adamic_adar")
        }
        return metrics

    spec.evaluate = measure
    projection = _pca_2d(model.z.numpy())
    colour, label = ((graph.community, "community") if graph.community is not None
                     else (np.log1p(np.bincount(split.train_edges.ravel(), minlength=n)), "log(1 + degree)"))
    spec.write_card = partial(_write_card, projection=projection, colour=colour, colour_label=label)
    return export_and_publish(spec, repo)
