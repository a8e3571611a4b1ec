"""The networks: a GraphSAGE encoder (sparse message passing) and the pairwise scorer that
is exported to ONNX.

The encoder (Hamilton et al., 2017; two layers, mean aggregation) turns node features and
the training graph into user embeddings, used to find candidates beyond two hops and as
pair features. The scorer (in the spirit of BUDDY/NCN: structure a dot product cannot
count, next to the embeddings) scores each (query, candidate) pair from the pair's
structural features (:data:`~deepserve.models.graph.pairs.PAIR_FEATURES`) and the
element-wise product of the two embeddings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


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


@dataclass
class ScorerConfig:
    hidden: int = 64
    episodes: int = 4  # graphs with hidden edges and cold users, candidates drawn as served
    warm_queries: int = 1024  # per episode
    cold_queries: int = 512  # per episode
    steps: int = 400
    epochs: float = 8.0  # at most this many passes over the queries (a small graph has few)
    batch: int = 128  # queries per step (each with all its candidates: a listwise loss)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    two_hop: int = 200  # candidates from the 2-hop walk, by Adamic-Adar
    nearest: int = 100  # candidates by embedding dot product (exact)


# ---------------------------------------------------------------------------- encoder


class MeanAdjacency:
    """The training graph's row-normalized adjacency in CSR, built once: ``A @ h`` is each
    node's mean over its neighbours (zeros when it has none). A step that hides edges
    passes a mask over them (:meth:`tensor`): only the values change. Memory O(edges)."""

    def __init__(self, num_nodes: int, edges: np.ndarray):
        from deepserve.models.graph.data import csr

        self.num_nodes = num_nodes
        self.indptr, self.indices = csr(num_nodes, edges)
        self.row = np.repeat(np.arange(num_nodes), np.diff(self.indptr))  # (2E,)
        # Each CSR entry's undirected edge: keys (min, max) of both directions, matched to `edges`.
        lo, hi = np.minimum(self.row, self.indices), np.maximum(self.row, self.indices)
        self.edge = np.searchsorted(edges[:, 0].astype(np.int64) * num_nodes + edges[:, 1],
                                    lo.astype(np.int64) * num_nodes + hi)  # (2E,)
        self._crow = torch.from_numpy(self.indptr)
        self._col = torch.from_numpy(self.indices.astype(np.int64))
        # The transpose has the same structure mirrored: its entries are A's, reordered. Kept,
        # so that the backward pass need not transpose a sparse matrix every step.
        self._t_order = np.lexsort((self.row, self.indices))
        column_counts = np.bincount(self.indices, minlength=num_nodes)
        self._t_crow = torch.from_numpy(np.concatenate([[0], np.cumsum(column_counts)]))
        self._t_col = torch.from_numpy(self.row[self._t_order].astype(np.int64))

    def tensor(self, keep: np.ndarray | None = None) -> "Propagate":
        """The mean over neighbours along the edges with ``keep`` (E,) True (all: None)."""
        weight = np.ones(len(self.row)) if keep is None else keep[self.edge].astype(np.float64)
        degree = np.bincount(self.row, weights=weight, minlength=self.num_nodes)
        values = (weight / np.maximum(degree, 1.0)[self.row]).astype(np.float32)
        shape = (self.num_nodes, self.num_nodes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            a = torch.sparse_csr_tensor(self._crow, self._col, torch.from_numpy(values), shape, check_invariants=False)
            at = torch.sparse_csr_tensor(self._t_crow, self._t_col, torch.from_numpy(values[self._t_order]), shape,
                                         check_invariants=False)
        return Propagate(a, at)


class Propagate:
    """``propagate(h)`` = ``A @ h`` for a sparse CSR ``A``, with ``A^T @ grad`` as its backward."""

    def __init__(self, a: torch.Tensor, at: torch.Tensor):
        self.a, self.at = a, at

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return _SparseMatmul.apply(h, self)


class _SparseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, op: Propagate) -> torch.Tensor:
        ctx.op = op
        return op.a @ h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.op.at @ grad, None


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

    def encode(self, x: torch.Tensor, mean: Propagate):
        """Full-graph forward pass (``mean``: :meth:`MeanAdjacency.tensor`). Returns the
        layer-1 states (N, hidden) and embeddings (N, D)."""
        h1 = self.layer1(x, mean(x))  # (N, hidden)
        return h1, self.layer2(h1, mean(h1))

    def cold(self, x_mean: torch.Tensor, h1_mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Embed users known only by neighbours: the neighbours' mean input (B, F) and mean
        layer-1 state (B, hidden), and how many neighbours there were (B,).

        The user's own layer-0 state is the neighbours' mean features with the degree
        column replaced by the user's own degree feature (from ``count``).
        """
        h0 = torch.cat([x_mean[:, :-1], self.degree_feature(count)[:, None]], dim=1)  # (B, F)
        return self.layer2(self.layer1(h0, x_mean), h1_mean)  # (B, D)

    def cold_weights(self) -> dict[str, np.ndarray]:
        """The cold-start path's weights, for :class:`~deepserve.models.graph.pairs.CandidateIndex`."""
        def a(t: torch.Tensor) -> np.ndarray:
            return t.detach().numpy().astype(np.float32)

        return {"self1_w": a(self.self1.weight), "self1_b": a(self.self1.bias), "neigh1_w": a(self.neigh1.weight),
                "self2_w": a(self.self2.weight), "self2_b": a(self.self2.bias), "neigh2_w": a(self.neigh2.weight),
                "degree_stats": np.array([self.degree_mean.item(), self.degree_std.item()], np.float32)}


# ---------------------------------------------------------------------------- scorer


class PairScorer(nn.Module):
    """The exported graph: ``(pair_features (R, C, P), query (R, D), candidates (R, C, D))
    -> scores (R, C)``, an MLP over the standardized pair features and the element-wise
    product of the query's and the candidate's embeddings."""

    def __init__(self, num_features: int, embedding_dim: int, hidden: int,
                 mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.mlp = nn.Sequential(
            nn.Linear(num_features + embedding_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, pair_features: torch.Tensor, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        f = (pair_features - self.mean) / self.std  # (R, C, P)
        h = torch.cat([f, query[:, None, :] * candidates], dim=-1)  # (R, C, P + D)
        return self.mlp(h).squeeze(-1)  # (R, C)
