"""Build: train the encoder and the pairwise scorer, export the scorer to ONNX, write the
sidecar arrays, evaluate the result through the serving runtime, and publish the version.

A version folder holds ``model.onnx`` (the pairwise scorer), ``graph.npz`` (the training
graph as CSR, the encoder's states and cold-start weights: :data:`pairs.ARRAYS`), the
manifest (which lists ``graph.npz`` with its sha256 in ``files``) and the card.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from deepserve.models.common import (
    ONNX_OPSET,
    ExportSpec,
    _onnx_bytes,
    card_header,
    check_parity,
    code_revision,
    seed_everything,
)
from deepserve.models.graph.data import (
    Graph,
    GraphSplit,
    SyntheticGraphConfig,
    average_clustering,
    cold_queries,
    load_edge_list,
    pad_neighbors,
    sha256_of,
    split_graph,
    synthetic_graph,
    warm_queries,
)
from deepserve.models.graph.evaluation import EVAL_K, HEURISTICS, evaluate
from deepserve.models.graph.model import GraphSAGE, GraphSAGEConfig, PairScorer, ScorerConfig
from deepserve.models.graph.pairs import PAIR_FEATURES, CandidateIndex
from deepserve.models.graph.training import index_arrays, model_inputs, spectral_features, train, train_scorer
from deepserve.repository import MANIFEST_FILE, MODEL_FILE, Manifest, TensorSpec, next_version, sha256_file

K_MAX = 100  # recommendations per user (a graph under 200 users: N // 2)
# Padding scores the lowest finite float32: finite, so scores stay comparable numbers.
MASKED_SCORE = float(np.finfo(np.float32).min)
SIDECAR = "graph.npz"
CLUSTERED = 0.6  # the default build's triadic closure: average clustering about 0.23 at 5,000 users

COLD_START = (
    "a new user (user = -1, or a training-graph user without training edges sent with "
    "neighbours) is described by the neighbours it gives: they are its neighbourhood for the "
    "2-hop walk (each one's degree counts the new link) and its embedding is the encoder's "
    "two GraphSAGE layers evaluated for one extra node from their stored inputs and layer-1 "
    "states (pairs.CandidateIndex.embed_cold); the given neighbours are excluded."
)


@dataclass
class GraphBuildOptions:
    name: str = "graph-recommender"
    edges: Path | None = None
    features: Path | None = None
    synthetic: SyntheticGraphConfig = field(default_factory=lambda: SyntheticGraphConfig(triadic_closure=CLUSTERED))
    # A second synthetic graph the same recipe is trained and evaluated on, for the build
    # report only (synthetic builds): the community graph without triadic closure.
    companion: SyntheticGraphConfig | None = field(default_factory=SyntheticGraphConfig)
    config: GraphSAGEConfig = field(default_factory=GraphSAGEConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    max_eval_queries: int | None = None  # evaluate a seeded sample of users (large graphs)


@dataclass
class Fitted:
    """A trained recommender, before export."""

    graph: Graph
    split: GraphSplit
    net: GraphSAGE
    scorer: PairScorer
    arrays: dict[str, np.ndarray]
    feature_names: list[str]
    k: int
    seconds: dict[str, float]


def fit(graph: Graph, seed: int, opts: GraphBuildOptions, desc: str) -> Fitted:
    """Split the graph, train the encoder and then the scorer on the training graph."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    split = split_graph(graph, seed)
    if len(split.train_edges) == 0 or len(split.test_edges) == 0:
        raise ValueError(f"{graph.source}: the graph is too small to hold out test edges "
                         f"({len(graph.edges)} edges)")
    n = graph.num_nodes
    features, feature_names = graph.features, graph.feature_names
    if features.shape[1] == 0:
        features = spectral_features(n, split.train_edges)
        feature_names = [f"spectral_{i}" for i in range(features.shape[1])]
    warm_rows = np.setdiff1d(np.arange(n), split.cold_users)
    x, d_mean, d_std = model_inputs(features, split.train_edges, warm_rows)
    seconds["prepare"] = time.perf_counter() - started
    cfg, params = opts.config, split.params
    net = GraphSAGE(x.shape[1], cfg, d_mean, d_std)
    started = time.perf_counter()
    net = train(x, split.train_edges, net, cfg, seed, params["min_cold_degree"], params["known_fraction"],
                desc=f"train {desc}")
    seconds["train_encoder"] = time.perf_counter() - started
    started = time.perf_counter()
    scorer = train_scorer(net, x, split.train_edges, opts.scorer, seed, params["min_cold_degree"],
                          params["known_fraction"], desc=f"train {desc} scorer")
    seconds["train_scorer"] = time.perf_counter() - started
    arrays = index_arrays(net, x, split.train_edges)
    # A tiny graph returns half its users: with all of them, the tail would be padding.
    k = K_MAX if n >= 2 * K_MAX else max(1, n // 2)
    return Fitted(graph, split, net, scorer, arrays, feature_names, k, seconds)


def candidate_settings(opts: GraphBuildOptions, k: int) -> dict[str, int]:
    return {"two_hop": opts.scorer.two_hop, "nearest": max(opts.scorer.nearest, k)}


def _example(fitted: Fitted, settings: dict[str, int], rows: int = 32) -> tuple[torch.Tensor, ...]:
    """A held-out batch (warm and cold users) as the scorer sees it: tracing and parity."""
    index = CandidateIndex(fitted.arrays, **settings)
    users, _ = warm_queries(fitted.split, fitted.graph.num_nodes)
    c_users, c_known, _ = cold_queries(fitted.split)
    user = np.concatenate([users[:rows], np.full(min(rows, len(c_users)), -1)])
    lists = [np.empty(0, np.int64)] * len(users[:rows]) + list(c_known[:rows])
    prepared = index.prepare(user, pad_neighbors(lists), np.ones(len(user), bool))
    return tuple(torch.from_numpy(a) for a in prepared.feeds().values())


def _sidecar_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: the runtime maps it in quickly
    return buffer.getvalue()


def served_runtime(manifest: Manifest, onnx_bytes: bytes, files: dict[str, bytes]):
    """The serving runtime over these bytes, as a replica loads it (session on the CPU)."""
    from deepserve.runtime import runtime_for

    previous = os.environ.get("DEEPSERVE_PROVIDER")
    os.environ["DEEPSERVE_PROVIDER"] = "cpu"
    try:
        runtime = runtime_for(manifest, max_rows=4096)
        runtime.files = files
        runtime.load(onnx_bytes, intra_op_threads=1)
    finally:
        if previous is None:
            os.environ.pop("DEEPSERVE_PROVIDER", None)
        else:
            os.environ["DEEPSERVE_PROVIDER"] = previous
    return runtime


def _manifest(name: str, version: str, fitted: Fitted, onnx_bytes: bytes, settings: dict[str, int],
              training_data: dict, seed: int, files: dict[str, str], cfg: GraphBuildOptions) -> Manifest:
    d = fitted.net.self2.out_features
    k = fitted.k
    graph = fitted.graph
    n = graph.num_nodes
    return Manifest(
        name=name,
        version=version,
        kind="recommender",
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        inputs=[
            TensorSpec("user", "INT64", [-1], "training-graph user index (0..N-1, see extra.node_ids), "
                       "or -1 for a new user"),
            TensorSpec("neighbors", "INT64", [-1, -1], "known neighbour indices, -1 = padding; a new "
                       "user's neighbourhood, extra exclusions for a training user"),
            TensorSpec("exclude_known", "BOOL", [-1], "mask the user, its training neighbours and the "
                       "given neighbours"),
        ],
        outputs=[
            TensorSpec("ids", "INT64", [-1, k], f"recommended user indices, best first ({k} per row)"),
            TensorSpec("scores", "FP32", [-1, k], "pairwise scores, descending"),
            TensorSpec("embedding", "FP32", [-1, d], "the user's embedding (looked up, or computed "
                       "from its neighbours)"),
        ],
        preprocessing={
            "in_graph": False,
            "client": "map external user ids to indices with extra.node_ids (when not null); send "
                      "-1 as user for a new user together with the users it knows",
            "candidates": f"the runtime draws up to {settings['two_hop']} candidates from the 2-hop "
                          f"walk (by Adamic-Adar) and the {settings['nearest']} nearest users by "
                          f"embedding dot product (exact), computes their pair features from "
                          f"{SIDECAR}, and the ONNX graph scores them",
            "node_inputs": "standardized node features (spectral coordinates of the training "
                           "graph when it has none) and log(1 + training degree)",
        },
        training_data=training_data,
        metrics={},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        code_revision=code_revision(),
        seed=seed,
        extra={
            "max_k": k,
            "num_users": n,
            "embedding_dim": d,
            "node_ids": None if graph.node_ids is None else graph.node_ids.tolist(),
            "aggregation": "mean",
            "cold_start": COLD_START,
            "feature_names": fitted.feature_names,
            # Users the graph holds without a training edge (the held-out ones, isolated users):
            # sent with neighbours, they are embedded from them like new users (cold start).
            "edgeless_users": np.flatnonzero(np.diff(fitted.arrays["indptr"]) == 0).tolist(),
            "masked_score": MASKED_SCORE,
            "sidecar": SIDECAR,
            "candidates": settings,
            "pair_features": [*PAIR_FEATURES, *(f"smoothed_gap_{name}" for name in fitted.feature_names)],
            "scorer_inputs": {
                "pair_features": f"(R, C, {len(PAIR_FEATURES) + len(fitted.feature_names)}) FP32, "
                                 "extra.pair_features per candidate",
                "query": f"(R, {d}) FP32 query embeddings",
                "candidates": f"(R, C, {d}) FP32 candidate embeddings",
                "scores": "(R, C) FP32 output",
            },
            "config": asdict(cfg.config),
            "scorer_config": asdict(cfg.scorer),
            "onnx_opset": ONNX_OPSET,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
        },
        files=files,
    )


def _export(fitted: Fitted, name: str, settings: dict[str, int]) -> tuple[bytes, float]:
    spec = ExportSpec(
        name=name, kind="recommender", module=fitted.scorer, example_inputs=_example(fitted, settings),
        input_names=["pair_features", "query", "candidates"], output_names=["scores"], descriptions={},
        preprocessing={}, training_data={}, metrics={}, seed=0,
        dynamic_axes={"pair_features": {0: "batch", 1: "candidates"}, "candidates": {0: "batch", 1: "candidates"},
                      "scores": {0: "batch", 1: "candidates"}},
    )
    fitted.scorer.eval()
    onnx_bytes = _onnx_bytes(spec)
    return onnx_bytes, check_parity(spec, onnx_bytes)


def _training_data(graph: Graph, split: GraphSplit, generator: SyntheticGraphConfig | None,
                   opts: GraphBuildOptions, seed: int) -> dict:
    """What :func:`rebuild_from_manifest` needs to rebuild the graph and split, and their sizes."""
    if graph.source == "synthetic":
        source = {"source": "synthetic", "generator_seed": seed, "generator": asdict(generator)}
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


def fit_and_evaluate(graph: Graph, generator: SyntheticGraphConfig | None, seed: int, opts: GraphBuildOptions,
                     desc: str, version: str = "0"):
    """Train, export and evaluate through the serving runtime.

    Returns:
        ``(fitted, manifest, onnx_bytes, sidecar_bytes)``; the manifest holds the metrics.
    """
    fitted = fit(graph, seed, opts, desc)
    settings = candidate_settings(opts, fitted.k)
    started = time.perf_counter()
    onnx_bytes, parity = _export(fitted, opts.name, settings)
    sidecar = _sidecar_bytes(fitted.arrays)
    fitted.seconds["export"] = time.perf_counter() - started
    manifest = _manifest(opts.name, version, fitted, onnx_bytes, settings,
                         _training_data(graph, fitted.split, generator, opts, seed), seed,
                         {SIDECAR: hashlib.sha256(sidecar).hexdigest()}, opts)
    started = time.perf_counter()
    runtime = served_runtime(manifest, onnx_bytes, {SIDECAR: sidecar})
    metrics = evaluate(runtime, fitted.graph, fitted.split, max_queries=opts.max_eval_queries, seed=seed)
    fitted.seconds["evaluate"] = time.perf_counter() - started
    metrics["average_clustering"] = average_clustering(graph.num_nodes, graph.edges)
    metrics["onnx_parity_max_diff"] = parity
    manifest.metrics = metrics
    manifest.extra["baselines"] = {
        method: {key: v for key, v in metrics.items() if key.startswith((method, f"cold_{method}"))}
        for method in HEURISTICS
    }
    return fitted, manifest, onnx_bytes, sidecar


def build(repo: Path, seed: int, options: GraphBuildOptions | None = None) -> Path:
    """Train, export, evaluate through the serving runtime and publish the graph recommender.

    Raises:
        ValueError: a bad bring-your-own edge list or feature table.
    """
    opts = options or GraphBuildOptions()
    seed_everything(seed)
    generator = None
    if opts.edges is None:
        if opts.features is not None:
            raise ValueError("node features need an edge list (--edges) to go with them")
        generator = opts.synthetic
        graph = synthetic_graph(seed, generator)
    else:
        graph = load_edge_list(opts.edges, opts.features)
    print(f"{opts.name}: {graph.num_nodes} users, {len(graph.edges)} edges")
    version = next_version(repo, opts.name)
    fitted, manifest, onnx_bytes, sidecar = fit_and_evaluate(graph, generator, seed, opts, opts.name, version)
    m = manifest.metrics
    print(f"{opts.name}: recall@{EVAL_K} {m[f'recall_at_{EVAL_K}']:.4f} (best heuristic x"
          f"{m['recall_ratio_to_best_heuristic']:.2f}), cold {m.get(f'cold_recall_at_{EVAL_K}', 0):.4f} "
          f"(x{m.get('cold_recall_ratio_to_best_heuristic', 0):.2f})")
    if opts.companion is not None and generator is not None:
        seed_everything(seed)
        other = synthetic_graph(seed, opts.companion)
        _, companion, _, _ = fit_and_evaluate(other, opts.companion, seed, opts, f"{opts.name} (community graph)")
        manifest.metrics.update({f"community_graph_{key}": v for key, v in companion.metrics.items()})
        manifest.extra["community_graph"] = {"generator": asdict(opts.companion), "generator_seed": seed,
                                             "description": other.description}
    manifest.metrics["build_seconds"] = fitted.seconds

    directory = repo / opts.name / version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_FILE).write_bytes(onnx_bytes)
    (directory / SIDECAR).write_bytes(sidecar)
    assert sha256_file(directory / SIDECAR) == manifest.files[SIDECAR]
    _write_card(directory, manifest, fitted)
    # The manifest goes last: a version directory without one is not a version yet.
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST_FILE)
    return directory


# ---------------------------------------------------------------------------- model card


def _pca_2d(z: np.ndarray) -> np.ndarray:
    centred = z - z.mean(0)
    _, _, vt = np.linalg.svd(centred[:20_000], full_matrices=False)
    return centred @ vt[:2].T  # (N, 2)


METHODS = [("model", ""), ("popularity", "popularity_"), ("common neighbours", "common_neighbours_"),
           ("Adamic-Adar", "adamic_adar_")]


def _table(m: dict, prefix: str = "") -> str:
    k = EVAL_K
    rows = "| method | warm recall@10 | warm NDCG@10 | cold recall@10 | cold NDCG@10 |\n|---|---|---|---|---|\n"
    for label, p in METHODS:
        cold = (f"{m[f'{prefix}cold_{p}recall_at_{k}']:.4f} | {m[f'{prefix}cold_{p}ndcg_at_{k}']:.4f}"
                if f"{prefix}cold_{p}recall_at_{k}" in m else "- | -")
        rows += f"| {label} | {m[f'{prefix}{p}recall_at_{k}']:.4f} | {m[f'{prefix}{p}ndcg_at_{k}']:.4f} | {cold} |\n"
    return rows


def _write_card(directory: Path, manifest: Manifest, fitted: Fitted) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, k = manifest.metrics, EVAL_K
    graph, split = fitted.graph, fitted.split
    projection = _pca_2d(fitted.arrays["z"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    if graph.community is not None:
        for c in np.unique(graph.community):
            at = graph.community == c
            ax1.scatter(projection[at, 0], projection[at, 1], s=3, alpha=0.7, label=f"{c} ({at.sum()})")
        ax1.legend(title="community (users)", fontsize=7, markerscale=3, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        colour = np.log1p(np.bincount(split.train_edges.ravel(), minlength=graph.num_nodes))
        points = ax1.scatter(projection[:, 0], projection[:, 1], c=colour, s=3, cmap="viridis", alpha=0.7)
        fig.colorbar(points, ax=ax1, label="log(1 + degree)")
    ax1.set(title="user embeddings: first two principal components", xticks=[], yticks=[])
    width = 0.38
    pos = np.arange(len(METHODS))
    ax2.bar(pos - width / 2, [m[f"{p}recall_at_{k}"] for _, p in METHODS], width, label="warm (held-out edges)")
    if f"cold_recall_at_{k}" in m:
        ax2.bar(pos + width / 2, [m[f"cold_{p}recall_at_{k}"] for _, p in METHODS], width, label="cold (new users)")
    ax2.set(xticks=pos, xticklabels=[label for label, _ in METHODS], ylabel=f"recall@{k}",
            title=f"recall@{k} through the serving runtime")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(directory / "card.png", dpi=110)
    plt.close(fig)

    td, extra = manifest.training_data, manifest.extra
    community = ""
    if "community_graph_recall_at_10" in m:
        community = (
            "### The same recipe on the community graph (no triadic closure)\n\n"
            f"{extra['community_graph']['description']} Average clustering "
            f"{m['community_graph_average_clustering']:.3f}.\n\n" + _table(m, "community_graph_") + "\n")
    text = card_header(manifest) + (
        "## Data\n\n"
        f"{td['description']} Average clustering {m['average_clustering']:.3f}.\n\n"
        f"Split (seed {td['split']['seed']}): {td['cold_users']} cold users "
        f"({td['split']['cold_fraction']:.0%} of users, degree >= {td['split']['min_cold_degree']}) "
        f"removed from the training graph, their edges to training users cut into known "
        f"neighbours ({td['split']['known_fraction']:.0%}, at least 2) and targets; "
        f"{td['test_edges']} test edges ({td['split']['test_fraction']:.0%} of the rest) held out; "
        f"{td['train_edges']} training edges.\n\n"
        "## Results through the serving runtime (ONNX Runtime + sidecar arrays)\n\n"
        + _table(m) + "\n"
        f"Warm: {m['eval_warm_users']} training users with a test edge; each ranks all users but "
        f"itself and its training neighbours. Cold: {m.get('eval_cold_users', 0)} new users, each "
        f"sent as `user = -1` with its known neighbours, which are excluded from its ranking. "
        f"recall@{k} = hits in the top {k} / min({k}, number of targets), averaged over users. "
        f"The room left: an oracle ranking first every target that shares a neighbour with the "
        f"query reaches {m[f'two_hop_ceiling_recall_at_{k}']:.4f} warm"
        + (f" and {m[f'cold_two_hop_ceiling_recall_at_{k}']:.4f} cold"
           if f"cold_two_hop_ceiling_recall_at_{k}" in m else "")
        + "; no ranking of the 2-hop walk does better.\n\n"
        + community +
        "![embeddings and recall](card.png)\n\n"
        "## How it works\n\n"
        f"Two stages. Candidates: up to {extra['candidates']['two_hop']} users from the 2-hop walk "
        f"(best Adamic-Adar) and the {extra['candidates']['nearest']} nearest by embedding dot product "
        f"(exact). Scores: an MLP (the ONNX graph) over each pair's structural features "
        f"({', '.join(extra['pair_features'])}) and the element-wise product of the two "
        f"{extra['embedding_dim']}-dim GraphSAGE embeddings (2 layers, mean aggregation, sparse "
        f"message passing). The scorer is trained with a listwise loss on candidates drawn as served, "
        f"from graphs with hidden edges and simulated new users. Cold start: {extra['cold_start']}\n\n"
        "## Limits\n\n"
        f"The training graph lives in `{SIDECAR}` beside the ONNX file: users or edges added after the "
        "build are invisible to warm lookups (a new user must be sent as `-1` with its neighbours, and "
        "is never recommended to others) until the model is rebuilt. Scores are comparable within a "
        "request, not calibrated probabilities. A hub's 2-hop walk stops after "
        "200,000 entries (lowest-degree neighbours first). A graph without node features gets spectral "
        "coordinates instead: they describe the graph's coarse structure only.\n"
    )
    (directory / "card.md").write_text(text)
