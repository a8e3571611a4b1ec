"""Graphs for the recommender: the seeded synthetic generator, bring-your-own edge lists,
and the split a model is trained and evaluated on.

- :func:`synthetic_graph`: a seeded degree-corrected stochastic block model (Karrer and
  Newman, 2011) with communities of unequal sizes, heavy-tailed activity and node features
  that are a noisy signal of the community; ``triadic_closure`` grows a share of the edges
  by closing triangles (friends of friends become friends), the clustering real social
  graphs have and a block model lacks.
- :func:`load_edge_list`: an edge-list CSV (``src,dst``) or a graph-tool ``.gt`` file (as in
  Debian's ``python3-graph-tool`` collection of real networks), and an optional node-feature CSV.

:func:`split_graph` holds out test edges among training users and whole "cold" users;
:func:`rebuild_from_manifest` rebuilds the graph and split a model was evaluated on.
Numpy only (no torch): the serving runtime uses :func:`csr`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    # Share of the edges grown by triadic closure after the block model drew the rest: a
    # random user links to a random friend of a random friend. 0 is the plain block model
    # (average clustering about 0.01); 0.5 gives about 0.3, as in real social graphs.
    triadic_closure: float = 0.0
    # > 0: users live at uniform random points of a unit square (instead of in blocks) and
    # attach to users near them (a soft random geometric graph: Gaussian kernel, here the
    # expected number of users within one kernel width), chosen by activity; features are
    # then a noisy signal of the position. 0: the block model.
    latent_neighbourhood: float = 0.0




def _canonical(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Undirected, loop-free, unique edges over ``0..n-1`` as a sorted (E, 2) array with u < v."""
    keep = u != v
    lo, hi = np.minimum(u, v)[keep].astype(np.int64), np.maximum(u, v)[keep].astype(np.int64)
    keys = np.unique(lo * n + hi)  # one int64 per edge: sorts like (u, v), far cheaper than axis=0
    return np.stack([keys // n, keys % n], axis=1)


def csr(num_nodes: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of undirected edges as CSR: ``(indptr (N+1,) int64, indices (2E,) int32)``,
    each user's neighbours sorted."""
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    order = np.lexsort((dst, src))
    indptr = np.zeros(num_nodes + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=num_nodes), out=indptr[1:])
    return indptr, dst[order].astype(np.int32)


def _close_triangles(edges: np.ndarray, n: int, target: int, theta: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Grow ``edges`` to ``target`` edges by triadic closure, in rounds (a closure may close on
    an earlier one): a user drawn by activity ``theta`` links to a uniformly random neighbour
    of a uniformly random neighbour of its own."""
    while len(edges) < target:
        indptr, indices = csr(n, edges)
        degree = np.diff(indptr)
        p = np.where(degree > 0, theta, 0.0)
        m = min(int((target - len(edges)) * 1.2) + 100, max(1000, len(edges) // 4))
        u = rng.choice(n, size=m, p=p / p.sum())
        w = indices[indptr[u] + (rng.random(m) * degree[u]).astype(np.int64)]
        v = indices[indptr[w] + (rng.random(m) * degree[w]).astype(np.int64)]
        grown = _canonical(np.concatenate([edges[:, 0], u]), np.concatenate([edges[:, 1], v]), n)
        if len(grown) > target:  # keep every older edge, and a random part of the new ones
            new = grown[~_isin_rows(grown, edges, n)]
            pick = rng.choice(len(new), size=target - len(edges), replace=False)
            grown = _canonical(np.concatenate([edges[:, 0], new[pick, 0]]),
                               np.concatenate([edges[:, 1], new[pick, 1]]), n)
        edges = grown
    return edges


def _latent_edges(position: np.ndarray, theta: np.ndarray, target: int, neighbourhood: float,
                  rng: np.random.Generator) -> np.ndarray:
    """``target`` distinct edges of a soft random geometric graph: a user ``u`` drawn by
    activity aims at ``position[u] + N(0, s^2)`` (``s`` such that a disc of radius ``s`` holds
    about ``neighbourhood`` users) and links to one of the 16 users nearest that point, drawn
    by activity."""
    from scipy.spatial import cKDTree

    n = len(position)
    scale = np.sqrt(neighbourhood / (np.pi * n))
    tree = cKDTree(position)
    p_all = theta / theta.sum()
    edges = np.empty((0, 2), np.int64)
    while len(edges) < target:
        m = int((target - len(edges)) * 1.3) + 100
        u = rng.choice(n, size=m, p=p_all)
        aim = position[u] + rng.normal(scale=scale, size=(m, 2))
        _, near = tree.query(aim, k=min(16, n))  # (m, 16)
        weight = np.cumsum(theta[near], axis=1)
        pick = (weight < rng.random(m)[:, None] * weight[:, -1:]).sum(axis=1)
        v = near[np.arange(m), np.minimum(pick, near.shape[1] - 1)]
        edges = _canonical(np.concatenate([edges[:, 0], u]), np.concatenate([edges[:, 1], v]), n)
    return edges[np.sort(rng.choice(len(edges), size=target, replace=False))]


def _isin_rows(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.isin(a[:, 0] * n + a[:, 1], b[:, 0] * n + b[:, 1])


def average_clustering(num_nodes: int, edges: np.ndarray, sample: int = 20_000, seed: int = 0) -> float:
    """The average local clustering coefficient (users of degree < 2 count as 0, as networkx
    does), over a seeded sample of ``sample`` users on a large graph."""
    from scipy import sparse

    indptr, indices = csr(num_nodes, edges)
    adjacency = sparse.csr_matrix((np.ones(len(indices), np.float32), indices, indptr),
                                  shape=(num_nodes, num_nodes))
    rows = np.arange(num_nodes)
    if num_nodes > sample:
        rows = np.sort(np.random.default_rng(seed).choice(num_nodes, size=sample, replace=False))
    part = adjacency[rows]
    triangles = np.asarray((part @ adjacency).multiply(part).sum(axis=1)).ravel() / 2  # (S,)
    degree = np.diff(indptr)[rows].astype(np.float64)
    pairs = degree * (degree - 1) / 2
    return float(np.mean(np.where(pairs > 0, triangles / np.maximum(pairs, 1), 0.0)))


def synthetic_graph(seed: int, cfg: SyntheticGraphConfig | None = None) -> Graph:
    """A seeded degree-corrected stochastic block model with community-bearing features,
    optionally grown further by triadic closure.

    Each user belongs to one of ``communities`` communities (sizes drawn from a Dirichlet,
    so they are unequal) and has a degree propensity ``theta`` (lognormal, heavy-tailed).
    An edge is drawn by picking its first endpoint with probability proportional to
    ``theta``; with probability ``within_fraction`` the second endpoint comes from the same
    community, otherwise from everyone, again proportionally to ``theta``. Loops and
    repeats are dropped and draws continue until ``(1 - triadic_closure)`` of
    ``num_users * mean_degree / 2`` distinct edges exist; the rest close triangles
    (:func:`_close_triangles`).

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
    block_target = int(round(target * (1.0 - cfg.triadic_closure)))
    edges = np.empty((0, 2), np.int64)
    if cfg.latent_neighbourhood > 0:
        position = rng.random((n, 2))
        edges = _latent_edges(position, theta, block_target, cfg.latent_neighbourhood, rng)
    while len(edges) < block_target:
        m = int((block_target - len(edges)) * 1.3) + 100
        u = rng.choice(n, size=m, p=p_all)
        v = rng.choice(n, size=m, p=p_all)
        inside = rng.random(m) < cfg.within_fraction
        for c in range(k):
            sel = inside & (community[u] == c)
            v[sel] = rng.choice(members[c], size=int(sel.sum()), p=p_members[c])
        edges = _canonical(np.concatenate([edges[:, 0], u]), np.concatenate([edges[:, 1], v]), n)
    edges = edges[np.sort(rng.choice(len(edges), size=block_target, replace=False))]
    if cfg.triadic_closure > 0:
        edges = _close_triangles(edges, n, target, theta, rng)

    centroids = rng.normal(size=(k, cfg.signal_dims))  # (k, S)
    if cfg.latent_neighbourhood > 0:  # the position, standardized and projected, is the signal
        centre = (position - 0.5) / np.sqrt(1 / 12)
        projection = rng.normal(size=(2, cfg.signal_dims))
        signal = centre @ projection + rng.normal(scale=cfg.feature_noise, size=(n, cfg.signal_dims))
        community = None
    else:
        signal = centroids[community] + rng.normal(scale=cfg.feature_noise, size=(n, cfg.signal_dims))
    log_theta = (np.log(theta) - np.log(theta).mean()) / np.log(theta).std()
    activity = 0.3 * log_theta + rng.normal(size=n)  # correlation about 0.3
    noise = rng.normal(size=(n, cfg.noise_dims))
    features = np.column_stack([signal, activity, noise]).astype(np.float32)
    names = [*(f"community_signal_{i}" for i in range(cfg.signal_dims)), "activity_hint",
             *(f"noise_{i}" for i in range(cfg.noise_dims))]
    closure = (f", then {target - block_target} more grown by triadic closure (a user links to a "
               f"friend of a friend)" if cfg.triadic_closure > 0 else "")
    if cfg.latent_neighbourhood > 0:
        model = (f"latent-space graph: {n} users at uniform random points of a unit square, each "
                 f"edge from a user drawn by activity (lognormal, sigma {cfg.degree_sigma:g}) to one "
                 f"near it (Gaussian kernel holding about {cfg.latent_neighbourhood:g} users), chosen "
                 f"by activity")
        signals = f"{cfg.signal_dims} noisy position signals (a random projection + N(0, {cfg.feature_noise:g}^2))"
    else:
        model = (f"degree-corrected stochastic block model with {n} users in {k} communities of unequal "
                 f"sizes ({min(map(len, members))} to {max(map(len, members))} users), lognormal degree "
                 f"propensities (sigma {cfg.degree_sigma:g}), {cfg.within_fraction:.0%} of edges drawn "
                 f"inside a community")
        signals = f"{cfg.signal_dims} noisy community signals (centroid + N(0, {cfg.feature_noise:g}^2))"
    description = (
        f"Synthetic social graph from deepserve.models.graph.synthetic_graph (seed {seed}): a "
        f"{model}{closure}; {target} undirected edges (mean degree {2 * target / n:.1f}, "
        f"max {np.bincount(edges.ravel(), minlength=n).max()}). {features.shape[1]} features per "
        f"user: {signals}, one weak activity hint and {cfg.noise_dims} pure-noise columns."
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


GT_MAGIC = b"\xe2\x9b\xbe gt"  # "⛾ gt": graph-tool's binary format


def _read_graph_tool(path: Path) -> np.ndarray:
    """The edges of a graph-tool binary file (``.gt``, or gzipped ``.gt.gz``) as an (E, 2)
    array over vertex indices.

    The format (graph-tool's documentation, "The gt file format"): the magic, a version byte,
    an endianness byte, a length-prefixed comment, a directed flag, the vertex count N (u64),
    then each vertex's out-neighbours: a u64 count and that many indices in the narrowest
    unsigned width that holds N. Property maps follow; they are not read (the collection's
    vertex positions, say, are a layout drawn from every edge, held-out ones included).
    Directed edges count as undirected ones.

    Raises:
        ValueError: not a graph-tool file, or one that ends early.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: cannot decompress ({exc})") from None
    if raw[:6] != GT_MAGIC or len(raw) < 8 or raw[7] > 1:
        raise ValueError(f"{path}: not a graph-tool binary file (an edge-list CSV must not be compressed)")
    order = ">" if raw[7] else "<"
    u64 = np.dtype(order + "u8")

    def number(at: int) -> int:
        if at + 8 > len(raw):
            raise ValueError(f"{path}: the file ends inside its header or adjacency lists")
        return int(np.frombuffer(raw, u64, 1, at)[0])

    at = 16 + number(8)  # past the comment
    n = number(at + 1)  # after the directed flag
    at += 9
    width = next(w for w, top in ((1, 1 << 8), (2, 1 << 16), (4, 1 << 32), (8, None)) if top is None or n < top)
    index = np.dtype(order + f"u{width}")
    if n > (len(raw) - at) // 8:  # each vertex needs at least its count
        raise ValueError(f"{path}: {n} vertices cannot fit in a file of {len(raw)} bytes")
    sources, targets = [], []
    for v in range(n):
        k = number(at)
        at += 8
        if k > (len(raw) - at) // width:
            raise ValueError(f"{path}: vertex {v}'s neighbour list runs past the end of the file")
        targets.append(np.frombuffer(raw, index, k, at).astype(np.int64))
        sources.append(np.full(k, v, np.int64))
        at += k * width
    src, dst = (np.concatenate(a) if a else np.empty(0, np.int64) for a in (sources, targets))
    if len(dst) and dst.max() >= n:
        raise ValueError(f"{path}: a neighbour index is out of range (N = {n})")
    return np.stack([src, dst], axis=1)


def _edge_pairs(edges: Path) -> tuple[np.ndarray, str]:
    """(E, 2) user-id pairs from an edge-list CSV or a graph-tool file, and what the file is."""
    try:
        with open(edges, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise ValueError(f"{edges}: cannot read the edge list ({exc.strerror or exc})") from None
    if head == GT_MAGIC or head[:2] == b"\x1f\x8b":
        return _read_graph_tool(edges), f"graph-tool file {edges}"
    header, rows = _read_rows(edges, "edge-list")
    if "src" not in header or "dst" not in header:
        raise ValueError(f"{edges}: the header must name the columns src,dst (got {header})")
    i, j = header.index("src"), header.index("dst")
    pairs = np.empty((len(rows), 2), np.int64)
    for r, (line, row) in enumerate(rows):
        if len(row) <= max(i, j):
            raise ValueError(f"{edges}, line {line}: expected a src and a dst value, got {row}")
        pairs[r] = (_user_id(row[i], edges, line), _user_id(row[j], edges, line))
    return pairs, f"Edge list {edges}"


def load_edge_list(edges: Path, features: Path | None = None) -> Graph:
    """Load a graph from an edge list and an optional node-feature CSV.

    Args:
        edges: a CSV with a header naming the columns ``src`` and ``dst`` (other columns
            are ignored); each row is an undirected edge between two non-negative integer
            user ids. Or a graph-tool binary file (``.gt``, ``.gt.gz``), its vertex indices
            being the user ids (:func:`_read_graph_tool`). Self loops and repeated edges (in
            either direction) are dropped.
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
    pairs, what = _edge_pairs(edges)
    ids = np.unique(pairs)
    local = np.searchsorted(ids, pairs)  # (E, 2) in 0..N-1
    graph_edges = _canonical(local[:, 0], local[:, 1], len(ids))
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
        f"{what} ({n} users, {len(graph_edges)} undirected edges after dropping "
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

def pad_neighbors(lists: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Neighbour lists as a (B, M) int64 array padded with -1 (M at least 1)."""
    width = max(1, width or 0, max((len(a) for a in lists), default=0))
    out = np.full((len(lists), width), -1, np.int64)
    for i, a in enumerate(lists):
        out[i, : len(a)] = a
    return out

