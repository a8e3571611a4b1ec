"""Training: the encoder for link prediction, then the pairwise scorer on candidates drawn
exactly as the served model draws them.

Both see the graph as the evaluation will: each step (encoder) or episode (scorer) hides
some training edges, to predict them from both ends, and makes some users cold (all their
edges leave the graph; part become known neighbours, the rest targets). Message passing
is sparse (``torch.sparse.mm``): memory grows with the number of edges, not N^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepserve.models.common import progress
from deepserve.models.graph.data import _known_cut, csr
from deepserve.models.graph.model import GraphSAGE, MeanAdjacency, GraphSAGEConfig, PairScorer, ScorerConfig
from deepserve.models.graph.pairs import CandidateIndex

SPECTRAL_DIMS = 8  # structural features for a graph that comes without node features

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

    keep: np.ndarray  # (E,) bool: the message-passing edges
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

    sup = np.flatnonzero(hidden & ~cu & ~cv)
    sup = sup[rng.choice(len(sup), size=min(cfg.warm_batch, len(sup)), replace=False)]
    flip = rng.random(len(sup)) < 0.5  # predict each hidden edge from one end, either one
    warm_user = np.where(flip, e1[sup], e0[sup])
    warm_target = np.where(flip, e0[sup], e1[sup])

    one = cu ^ cv  # a cold user's edges to warm users; edges between two cold users are dropped
    owner, other, known = _known_cut(np.where(cu[one], e0[one], e1[one]),
                                     np.where(cu[one], e1[one], e0[one]), known_fraction, rng)
    cold_users, slot = np.unique(owner, return_inverse=True)
    targets = np.flatnonzero(~known)
    targets = targets[rng.choice(len(targets), size=min(cfg.cold_batch, len(targets)), replace=False)]
    return _Episode(~hidden & ~cu & ~cv, warm_user, warm_target, cold_users,
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


def _excluded(adjacency: MeanAdjacency, ep: _Episode, negatives: np.ndarray) -> torch.Tensor:
    """(Q, S): which sampled negatives each query must not be scored against: a warm
    query's training neighbours, a cold one's known neighbours (the served model masks
    those). Work O(the queries' degrees), memory O(Q x S)."""
    slot_of = np.full(adjacency.num_nodes, -1, np.int64)
    slot_of[negatives] = np.arange(len(negatives))
    indptr, indices = adjacency.indptr, adjacency.indices
    starts, lens = indptr[ep.warm_user], np.diff(indptr)[ep.warm_user]
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
    rows = np.concatenate([np.repeat(np.arange(len(ep.warm_user)), lens)])
    cols = slot_of[indices[offsets]]
    out = np.zeros((len(ep.warm_user) + len(ep.target_slot), len(negatives)), bool)
    out[rows[cols >= 0], cols[cols >= 0]] = True
    # Cold queries: their user's known neighbours.
    known = np.zeros((len(ep.cold_users), len(negatives)), bool)
    kc = slot_of[ep.known_user]
    known[ep.known_slot[kc >= 0], kc[kc >= 0]] = True
    out[len(ep.warm_user):] = known[ep.target_slot]
    return torch.from_numpy(out)


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
    # Each uniform negative stands for (n - 1) / S users: adding the log of that keeps the
    # sampled softmax an estimate of the full softmax over every user.
    n_neg = min(cfg.negatives, n)
    log_weight = float(np.log((n - 1) / n_neg))
    adjacency = MeanAdjacency(n, train_edges)
    for _ in progress(range(cfg.steps), desc, "step"):
        net.train()
        ep = _sample_episode(train_edges, eligible, n, cfg, known_fraction, rng)
        h1, z = net.encode(xt, adjacency.tensor(ep.keep))  # (N, H), (N, D)
        z_cold = _cold_embeddings(net, xt, h1, ep)  # (C, D)
        queries = torch.cat([z[torch.from_numpy(ep.warm_user)], z_cold[torch.from_numpy(ep.target_slot)]])
        query_ids = torch.from_numpy(np.concatenate([ep.warm_user, ep.cold_users[ep.target_slot]]))
        targets = torch.from_numpy(np.concatenate([ep.warm_target, ep.target_user]))  # (Q,)

        negatives_np = rng.choice(n, size=n_neg, replace=False)
        negatives = torch.from_numpy(negatives_np)  # (S,)
        positive = (queries * z[targets]).sum(dim=1, keepdim=True)  # (Q, 1)
        negative = queries @ z[negatives].T + log_weight  # (Q, S)
        excluded = _excluded(adjacency, ep, negatives_np)
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


# ---------------------------------------------------------------------------- index and scorer


def index_arrays(net: GraphSAGE, x: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """What the served model keeps beside its ONNX file (see ``pairs.ARRAYS``): the graph
    ``edges`` as CSR, the encoder's states over it, and the cold-start weights."""
    adjacency = MeanAdjacency(len(x), edges)
    with torch.no_grad():
        h1, z = net.encode(torch.from_numpy(x), adjacency.tensor())
    indptr, indices = adjacency.indptr, adjacency.indices
    with torch.no_grad():
        smoothed = adjacency.tensor()(torch.from_numpy(x[:, :-1])).numpy()  # (N, F)
    return {"indptr": indptr, "indices": indices, "z": z.numpy(), "x": x, "h1": h1.numpy(), "smoothed": smoothed,
            **net.cold_weights()}


def _scorer_episode(net: GraphSAGE, x: np.ndarray, edges: np.ndarray, cfg: ScorerConfig,
                    eligible: np.ndarray, known_fraction: float, rng: np.random.Generator):
    """One episode's queries as the served model sees them: prepared candidates and, per
    candidate, whether it is a hidden neighbour (the label)."""
    n = len(x)
    hidden = rng.random(len(edges)) < 0.1  # as split_graph's test_fraction
    n_cold = min(len(eligible), max(1, int(round(0.05 * n))))
    is_cold = np.zeros(n, bool)
    is_cold[rng.choice(eligible, size=n_cold, replace=False)] = True
    e0, e1 = edges[:, 0], edges[:, 1]
    cu, cv = is_cold[e0], is_cold[e1]
    index = CandidateIndex(index_arrays(net, x, edges[~hidden & ~cu & ~cv]), cfg.two_hop, cfg.nearest)

    sup = edges[hidden & ~cu & ~cv]
    users = np.unique(sup.ravel())
    users = np.sort(rng.choice(users, size=min(cfg.warm_queries, len(users)), replace=False))
    hidden_lists = dict(zip(*_lists(n, sup)))
    warm_targets = [hidden_lists[u] for u in users]

    one = cu ^ cv
    owner, other, known = _known_cut(np.where(cu[one], e0[one], e1[one]),
                                     np.where(cu[one], e1[one], e0[one]), known_fraction, rng)
    cold_users, start = np.unique(owner, return_index=True)
    parts = np.split(np.arange(len(owner)), start[1:])
    pick = rng.choice(len(cold_users), size=min(cfg.cold_queries, len(cold_users)), replace=False)
    c_known = [np.sort(other[parts[i]][known[parts[i]]]) for i in pick]
    c_targets = [np.sort(other[parts[i]][~known[parts[i]]]) for i in pick]
    keep = [i for i, t in enumerate(c_targets) if len(t)]
    c_known, c_targets = [c_known[i] for i in keep], [c_targets[i] for i in keep]

    rows = np.concatenate([users, np.full(len(c_known), -1)])
    lists = [np.empty(0, np.int64)] * len(users) + c_known
    width = max(1, max((len(a) for a in lists), default=1))
    neighbors = np.full((len(rows), width), -1, np.int64)
    for i, a in enumerate(lists):
        neighbors[i, : len(a)] = a
    prepared = index.prepare(rows, neighbors, np.ones(len(rows), bool))
    targets = warm_targets + c_targets
    labels = np.stack([np.isin(prepared.candidates[i], targets[i]) & (prepared.candidates[i] >= 0)
                       for i in range(len(rows))])
    return prepared, labels, index.z


def _lists(n: int, edges: np.ndarray):
    indptr, indices = csr(n, edges)
    users = np.flatnonzero(np.diff(indptr))
    return users, [indices[indptr[u] : indptr[u + 1]].astype(np.int64) for u in users]


def train_scorer(net: GraphSAGE, x: np.ndarray, train_edges: np.ndarray, cfg: ScorerConfig, seed: int,
                 min_cold_degree: int = 4, known_fraction: float = 0.5, desc: str = "train scorer") -> PairScorer:
    """Fit the pairwise scorer with a listwise loss: each query's softmax over its candidates
    should put its mass on the hidden neighbours among them (queries without one are left out).

    Candidates and features come from :class:`CandidateIndex` over episode graphs (10% of
    the training edges hidden, 5% of the users made cold), so training sees what serving does.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 13])
    n = len(x)
    eligible = np.flatnonzero(np.bincount(train_edges.ravel(), minlength=n) >= min_cold_degree)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("feats", "query", "candidates", "valid", "labels")}
    embeddings = []  # per episode (N, D): candidates' embeddings are gathered per step
    for e in progress(range(cfg.episodes), f"{desc}: episodes", "episode"):
        prepared, labels, z = _scorer_episode(net, x, train_edges, cfg, eligible, known_fraction, rng)
        useful = labels.any(axis=1)
        parts["feats"].append(prepared.pair_features[useful])
        parts["query"].append(prepared.query[useful])
        # Global rows into the stacked embeddings; padding points at any row and is masked.
        parts["candidates"].append(np.maximum(prepared.candidates[useful], 0) + e * n)
        parts["valid"].append(prepared.candidates[useful] >= 0)
        parts["labels"].append(labels[useful])
        embeddings.append(z)
    feats = np.concatenate(parts["feats"])
    valid = np.concatenate(parts["valid"])
    mean, std = feats[valid].mean(0), feats[valid].std(0)
    scorer = PairScorer(feats.shape[-1], net.self2.out_features, cfg.hidden, mean, np.maximum(std, 1e-6))
    tensors = [torch.from_numpy(a) for a in (feats, np.concatenate(parts["query"]),
                                             np.concatenate(parts["candidates"]), valid,
                                             np.concatenate(parts["labels"]))]
    stacked = torch.from_numpy(np.concatenate(embeddings))  # (episodes * N, D)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = len(feats)
    steps = max(1, min(cfg.steps, int(np.ceil(cfg.epochs * total / cfg.batch))))  # a small graph overfits
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in progress(range(steps), desc, "step"):
        scorer.train()
        pick = torch.from_numpy(rng.choice(total, size=min(cfg.batch, total), replace=False))
        f, q, c, v, y = (t[pick] for t in tensors)
        logits = scorer(f, q, stacked[c]).masked_fill(~v, float("-inf"))  # (b, C)
        # -log of the softmax mass on the positives: listwise, like recall@k.
        loss = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~y, float("-inf")), 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return scorer.eval()
