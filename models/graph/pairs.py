"""Candidates and pair features: the numpy half of the recommender, shared by training and
serving (the serving runtime imports this module; it must never import torch).

For a query (a training user, or a new user described by the neighbours it gives):

1. Its neighbourhood ``S``: a training user's own neighbours, or the given ones.
2. The 2-hop walk from ``S`` over the training graph's CSR adjacency counts, for every user
   reached, the common neighbours (CN), Adamic-Adar (sum of 1 / log deg w) and resource
   allocation (sum of 1 / deg w). A hub's walk is cut at ``walk_budget`` entries, lowest-degree
   neighbours first: those carry most of AA and RA.
3. Candidates: the best ``two_hop`` users by Adamic-Adar, and the best ``nearest`` users by
   embedding dot product (exact: one chunked matrix product and ``argpartition``), both
   outside the masked users; their union, padded with -1 to ``two_hop + nearest`` slots.
4. Per (query, candidate) pair: :data:`PAIR_FEATURES`, the squared gaps between the two
   users' smoothed features (each one's neighbours' mean features: where it sits) and both
   embeddings, which the ONNX pairwise scorer turns into a score.

A new user's embedding is the encoder's cold-start path (:meth:`CandidateIndex.embed_cold`):
the GraphSAGE layers evaluated for one extra node from its neighbours' stored inputs and
layer-1 states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAIR_FEATURES = ["log1p_common_neighbours", "adamic_adar", "resource_allocation", "jaccard",
                 "log1p_candidate_degree", "log1p_query_degree", "embedding_dot", "reached_in_two_hops",
                 "log1p_paths_of_length_3", "log1p_neighbours_in_two_hops", "three_hop_resource_allocation"]
# Arrays the runtime loads from the version's sidecar file (graph.npz), with their meaning.
ARRAYS = {
    "indptr": "(N+1,) int64 CSR row pointers of the training graph (both directions)",
    "indices": "(2E,) int32 CSR neighbours, sorted within a row",
    "z": "(N, D) float32 user embeddings (GraphSAGE over the training graph)",
    "x": "(N, F+1) float32 encoder inputs (standardized features, degree feature)",
    "h1": "(N, H) float32 encoder layer-1 states",
    "smoothed": "(N, F) float32 each user's neighbours' mean standardized features",
    "self1_w": "encoder weights for the cold-start path", "self1_b": "", "neigh1_w": "",
    "self2_w": "", "self2_b": "", "neigh2_w": "", "degree_stats": "(2,) degree feature mean, std",
}


@dataclass
class Prepared:
    """One batch of queries, ready for the scorer."""

    candidates: np.ndarray  # (B, C) int64 user indices, -1 = padding
    pair_features: np.ndarray  # (B, C, P) float32
    query: np.ndarray  # (B, D) float32 query embeddings
    candidate_embeddings: np.ndarray  # (B, C, D) float32
    cold: np.ndarray  # (B,) bool: embedded from the given neighbours

    def feeds(self) -> dict[str, np.ndarray]:
        return {"pair_features": self.pair_features, "query": self.query,
                "candidates": self.candidate_embeddings}


class CandidateIndex:
    """The training graph, its embeddings and the cold-start encoder, as numpy arrays.

    Args:
        arrays: see :data:`ARRAYS`.
        two_hop: candidates taken from the 2-hop walk (by Adamic-Adar).
        nearest: candidates taken by embedding dot product (at least the served ``k``).
        walk_budget: most 2-hop entries walked per query.
    """

    def __init__(self, arrays: dict[str, np.ndarray], two_hop: int = 200, nearest: int = 100,
                 walk_budget: int = 200_000):
        self.indptr = np.asarray(arrays["indptr"], np.int64)
        self.indices = np.asarray(arrays["indices"], np.int32)
        self.z = np.ascontiguousarray(arrays["z"], np.float32)
        self.x = np.asarray(arrays["x"], np.float32)
        self.h1 = np.asarray(arrays["h1"], np.float32)
        self.smoothed = np.asarray(arrays["smoothed"], np.float32)
        self.weights = {k: np.asarray(arrays[k], np.float32) for k in
                        ("self1_w", "self1_b", "neigh1_w", "self2_w", "self2_b", "neigh2_w", "degree_stats")}
        self.num_users = len(self.indptr) - 1
        self.degree = np.diff(self.indptr)
        self.log_degree = np.log1p(self.degree).astype(np.float32)
        self.two_hop = min(two_hop, self.num_users)
        self.nearest = min(nearest, self.num_users)
        self.width = self.two_hop + self.nearest
        self.walk_budget = walk_budget

    def neighbours(self, u: int) -> np.ndarray:
        return self.indices[self.indptr[u] : self.indptr[u + 1]].astype(np.int64)

    # ------------------------------------------------------------------ embeddings

    def embed_cold(self, lists: list[np.ndarray]) -> np.ndarray:
        """(B, D) embeddings of users known only by neighbours (GraphSAGE.cold, in numpy)."""
        w = self.weights
        count = np.array([len(a) for a in lists], np.float32)  # (B,)
        denom = np.maximum(count, 1.0)[:, None]
        x_mean = np.stack([self.x[a].sum(0) if len(a) else np.zeros(self.x.shape[1], np.float32)
                           for a in lists]) / denom  # (B, F)
        h1_mean = np.stack([self.h1[a].sum(0) if len(a) else np.zeros(self.h1.shape[1], np.float32)
                            for a in lists]) / denom  # (B, H)
        mean, std = w["degree_stats"]
        h0 = np.concatenate([x_mean[:, :-1], ((np.log1p(count) - mean) / std)[:, None]], axis=1)
        h1 = np.maximum(h0 @ w["self1_w"].T + w["self1_b"] + x_mean @ w["neigh1_w"].T, 0.0)  # (B, H)
        return (h1 @ w["self2_w"].T + w["self2_b"] + h1_mean @ w["neigh2_w"].T).astype(np.float32)

    # ------------------------------------------------------------------ structure

    def walk(self, seeds: np.ndarray, cold: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The 2-hop walk from ``seeds`` (a query's neighbours): the users reached (sorted),
        and their CN, AA and RA. A new user's link adds one to each seed's degree. Work
        O(walk log walk): a typical walk is a few thousand entries, far fewer than N."""
        if not len(seeds):
            empty = np.empty(0)
            return np.empty(0, np.int64), empty, empty, empty
        degree = self.degree[seeds] + (1 if cold else 0)
        order = np.argsort(degree, kind="stable")
        seeds, degree = seeds[order], degree[order]
        lens = self.degree[seeds]
        keep = max(1, int(np.searchsorted(np.cumsum(lens), self.walk_budget, side="right")))
        seeds, degree, lens = seeds[:keep], degree[:keep], lens[:keep]
        reached = self.indices[_ranges(self.indptr[seeds], lens)]
        users, inverse = np.unique(reached, return_inverse=True)
        d = np.maximum(degree, 2).astype(np.float64)  # a common neighbour has degree >= 2
        cn = np.bincount(inverse, minlength=len(users)).astype(np.float64)
        aa = np.bincount(inverse, np.repeat(1.0 / np.log(d), lens), minlength=len(users))
        ra = np.bincount(inverse, np.repeat(1.0 / d, lens), minlength=len(users))
        return users.astype(np.int64), cn, aa, ra

    def three_hop(self, candidates: np.ndarray, reached: np.ndarray, cn: np.ndarray,
                  ra: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate ``v``, from the query's walk (:meth:`walk`): the paths of length 3
        to it (sum over v's neighbours w of the 2-paths to w), how many of its neighbours the
        walk reached, and the resource that reaches it in three hops (sum of RA(w) / deg w).
        Work O(sum of the candidates' degrees)."""
        c = len(candidates)
        if not len(reached) or not c:
            zero = np.zeros(c, np.float32)
            return zero, zero, zero
        lens = self.degree[candidates]
        w = self.indices[_ranges(self.indptr[candidates], lens)]
        at = np.minimum(np.searchsorted(reached, w), len(reached) - 1)
        hit = reached[at] == w
        owner = np.repeat(np.arange(c), lens)
        p3 = np.bincount(owner, np.where(hit, cn[at], 0.0), minlength=c)
        n21 = np.bincount(owner, hit.astype(np.float64), minlength=c)
        ra3 = np.bincount(owner, np.where(hit, ra[at] / np.maximum(self.degree[w], 1), 0.0), minlength=c)
        return p3.astype(np.float32), n21.astype(np.float32), ra3.astype(np.float32)

    # ------------------------------------------------------------------ batches

    def prepare(self, users: np.ndarray, neighbors: np.ndarray, exclude_known: np.ndarray,
                chunk: int = 64) -> Prepared:
        """Candidates and pair features for a batch.

        Args:
            users: (B,) graph indices, -1 for a new user. A user without a training edge sent
                with neighbours is embedded from them, like a new one.
            neighbors: (B, M) graph indices, -1 = padding: a new user's neighbourhood, extra
                exclusions for a training user.
            exclude_known: (B,) mask the user, its training neighbours and the given ones.
        """
        b = len(users)
        given = [np.unique(row[row >= 0]) for row in neighbors]
        known = (users >= 0) & (users < self.num_users)
        has_edges = np.zeros(b, bool)
        has_edges[known] = self.degree[users[known]] > 0
        cold = ~(known & (has_edges | np.array([len(g) == 0 for g in given])))
        seeds = [given[i] if cold[i] else self.neighbours(int(users[i])) for i in range(b)]
        # Where a user sits, from its neighbours' features: a new user's from the given ones.
        smooth = np.stack([self.x[seeds[i], :-1].mean(0) if cold[i] and len(seeds[i]) else
                           self.smoothed[users[i]] if not cold[i] else np.zeros(self.smoothed.shape[1], np.float32)
                           for i in range(b)]) if b else np.zeros((0, self.smoothed.shape[1]), np.float32)
        query = np.empty((b, self.z.shape[1]), np.float32)
        query[~cold] = self.z[users[~cold]]
        if cold.any():
            query[cold] = self.embed_cold([seeds[i] for i in np.flatnonzero(cold)])
        masks = [np.unique(np.concatenate([seeds[i], given[i], users[i : i + 1][known[i : i + 1]]]))
                 if exclude_known[i] else np.empty(0, np.int64) for i in range(b)]

        candidates = np.full((b, self.width), -1, np.int64)
        feats = np.zeros((b, self.width, len(PAIR_FEATURES) + self.smoothed.shape[1]), np.float32)
        for lo in range(0, b, chunk):
            dots = query[lo : lo + chunk] @ self.z.T  # (b', N)
            for r in range(dots.shape[0]):
                i = lo + r
                dots[r, masks[i]] = -np.inf
            top = np.argpartition(-dots, self.nearest - 1, axis=1)[:, : self.nearest] \
                if self.nearest < self.num_users else np.tile(np.arange(self.num_users), (dots.shape[0], 1))
            for r in range(dots.shape[0]):
                i = lo + r
                near = top[r][np.isfinite(dots[r, top[r]])]
                reached, cn, aa, ra = self.walk(seeds[i], bool(cold[i]))
                pool = np.flatnonzero(~np.isin(reached, masks[i], assume_unique=True))
                if len(pool) > self.two_hop:  # best by AA, ties to the lower id (reached is sorted)
                    pool = pool[np.argsort(-aa[pool], kind="stable")[: self.two_hop]]
                chosen = np.union1d(reached[pool], near)  # (c,) sorted, c <= width
                c = len(chosen)
                at = np.minimum(np.searchsorted(reached, chosen), max(len(reached) - 1, 0))
                hit = (reached[at] == chosen) if len(reached) else np.zeros(c, bool)
                c_cn, c_aa, c_ra = (np.where(hit, a[at], 0.0).astype(np.float32) if len(reached)
                                    else np.zeros(c, np.float32) for a in (cn, aa, ra))
                p3, n21, ra3 = self.three_hop(chosen, reached, cn, ra)
                q_deg = float(len(seeds[i]))
                v_deg = self.degree[chosen].astype(np.float32)
                candidates[i, :c] = chosen
                feats[i, :c, : len(PAIR_FEATURES)] = np.stack([
                    np.log1p(c_cn), c_aa, c_ra, c_cn / np.maximum(q_deg + v_deg - c_cn, 1.0),
                    self.log_degree[chosen], np.full(c, np.log1p(q_deg), np.float32),
                    dots[r, chosen],  # every chosen user is unmasked, so finite
                    hit.astype(np.float32), np.log1p(p3), np.log1p(n21), ra3,
                ], axis=1)
                feats[i, :c, len(PAIR_FEATURES):] = (self.smoothed[chosen] - smooth[i]) ** 2
        emb = self.z[np.maximum(candidates, 0)]  # (B, C, D); padding rows are masked after scoring
        return Prepared(candidates, feats, query, emb, cold)

    @staticmethod
    def top_k(prepared: Prepared, scores: np.ndarray, k: int, masked_score: float) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best candidates of each row, best first; padding scores ``masked_score``
        and comes last (its id is then the row's first candidate, never a masked user)."""
        scores = np.where(prepared.candidates >= 0, scores, masked_score).astype(np.float32)  # (B, C)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: the lower id first
        ids = np.take_along_axis(prepared.candidates, order, axis=1)
        ids = np.where(ids >= 0, ids, prepared.candidates[:, :1])
        return ids, np.take_along_axis(scores, order, axis=1)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lens)])`` without a Python loop."""
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(int(lens.sum()))
