"""Graph recommender ("people you may know"): ``graph-recommender``.

Two stages. Candidate generation and pair features run in numpy over the training graph
kept beside the ONNX file (:mod:`.pairs`: the 2-hop walk gives common neighbours,
Adamic-Adar and resource allocation; a GraphSAGE embedding gives the nearest users by dot
product, exactly). The ONNX graph is a pairwise scorer over those structural features and
the two users' embeddings (:mod:`.model`), so it can count what a dot product cannot.

- :mod:`.data`: graphs (the seeded synthetic generator with a triadic-closure knob, edge
  lists), the split, query helpers; numpy only.
- :mod:`.pairs`: candidates and pair features, shared by training and the serving runtime;
  numpy only.
- :mod:`.model`: the GraphSAGE encoder (sparse message passing) and the pairwise scorer.
- :mod:`.training`: training both.
- :mod:`.evaluation`: recall/NDCG of the served model against popularity, common neighbours
  and Adamic-Adar.
- :mod:`.export`: the build: export, sidecar arrays, evaluation through the serving runtime, publishing.

The names below load their module on first use, so that ``deepserve.models.graph.pairs``
(which the serving runtime imports) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "data": ["Graph", "GraphSplit", "SyntheticGraphConfig", "adjacency_lists", "average_clustering",
             "cold_queries", "csr", "load_edge_list", "pad_neighbors", "rebuild_from_manifest", "sha256_of",
             "split_graph", "synthetic_graph", "warm_queries"],
    "pairs": ["CandidateIndex", "PAIR_FEATURES"],
    "model": ["GraphSAGE", "GraphSAGEConfig", "PairScorer", "ScorerConfig"],
    "training": ["index_arrays", "model_inputs", "spectral_features", "train", "train_scorer"],
    "evaluation": ["EVAL_K", "adamic_adar_baseline", "common_neighbours_baseline", "evaluate", "ndcg_at_k",
                 "popularity_baseline", "recall_at_k", "served_recommend", "top_k_excluding"],
    "export": ["CLUSTERED", "K_MAX", "MASKED_SCORE", "SIDECAR", "GraphBuildOptions", "build", "fit_and_evaluate",
              "served_runtime"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
