"""The graph recommender, served: acceptance figures through the service (on the clustered
graph it is built on), cold start, exclusions, limits, and the Open Inference Protocol path."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from deepserve.models import graph
from deepserve.proto import inference_pb2 as oip

K = graph.EVAL_K


@pytest.fixture(scope="module")
def evaluation(repository):
    """The graph and split the served version was trained on, rebuilt from its manifest."""
    manifest = repository.get("graph-recommender").manifest
    g, split = graph.rebuild_from_manifest(manifest.training_data)
    return g, split, graph.adjacency_lists(g.num_nodes, split.train_edges)


def _infer(client, users: np.ndarray, neighbors: np.ndarray, exclude_known: bool = True, k: int = K):
    """One Open Inference Protocol call for a batch of users; returns (ids, scores)."""
    tensors = [("user", "INT64", users.astype("<i8")), ("neighbors", "INT64", neighbors.astype("<i8")),
               ("exclude_known", "BOOL", np.full(len(users), exclude_known))]
    request = oip.ModelInferRequest(
        model_name="graph-recommender",
        inputs=[oip.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=a.shape) for n, d, a in tensors],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("ids", "scores")],
        raw_input_contents=[a.tobytes() for _, _, a in tensors],
    )
    request.parameters["k"].int64_param = k
    response = client.inference.ModelInfer(request, timeout=30)
    out = {o.name: (o, raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
    ids = np.frombuffer(out["ids"][1], "<i8").reshape(out["ids"][0].shape)
    scores = np.frombuffer(out["scores"][1], "<f4").reshape(out["scores"][0].shape)
    return ids, scores


def test_served_recall_beats_the_baselines_and_cold_start_holds_up(client, evaluation):
    g, split, train_lists = evaluation
    n = g.num_nodes
    degree = np.bincount(split.train_edges.ravel(), minlength=n)

    # Warm users through the Open Inference Protocol, 256 per request.
    users, targets = graph.warm_queries(split, n)
    ranked = np.concatenate([
        _infer(client, users[lo : lo + 256], np.full((len(users[lo : lo + 256]), 1), -1))[0]
        for lo in range(0, len(users), 256)
    ])
    exclude = [np.append(train_lists[u], u) for u in users]
    warm = graph.recall_at_k(ranked, targets, K)
    popularity = graph.recall_at_k(graph.popularity_baseline(degree, exclude, K), targets, K)
    own = [train_lists[u] for u in users]
    adamic_adar = graph.recall_at_k(graph.adamic_adar_baseline(n, split.train_edges, own, exclude, K), targets, K)
    common = graph.recall_at_k(graph.common_neighbours_baseline(n, split.train_edges, own, exclude, K), targets, K)

    # Held-out users through the typed API, from their known neighbours only.
    cold_users, known, cold_targets = graph.cold_queries(split)
    cold_ranked = []
    for neighbours in known:
        response = client.recommend(neighbors=neighbours.tolist(), k=K)
        assert response.cold_start and len(response.users) == K
        cold_ranked.append([r.user for r in response.users])
    cold = graph.recall_at_k(np.array(cold_ranked), cold_targets, K)
    cold_popularity = graph.recall_at_k(graph.popularity_baseline(degree, known, K), cold_targets, K)
    cold_adamic_adar = graph.recall_at_k(graph.adamic_adar_baseline(
        n, split.train_edges, known, known, K, queries_in_graph=False), cold_targets, K)

    print(f"served recall@10 on the clustered graph: warm {warm:.4f} (popularity {popularity:.4f}, common "
          f"neighbours {common:.4f}, Adamic-Adar {adamic_adar:.4f}); cold {cold:.4f} (popularity "
          f"{cold_popularity:.4f}, Adamic-Adar {cold_adamic_adar:.4f}) over {len(cold_users)} held-out users")
    assert len(users) > 1000 and len(cold_users) > 100
    assert warm >= 2 * popularity and cold >= 2 * cold_popularity
    assert warm >= 1.05 * max(adamic_adar, common)
    assert cold >= cold_adamic_adar
    assert cold >= 0.7 * warm


def test_typed_api_and_open_inference_protocol_agree(client, evaluation):
    _, split, _ = evaluation
    users = graph.warm_queries(split, evaluation[0].num_nodes)[0][:20]
    ids, scores = _infer(client, users, np.full((len(users), 1), -1), k=5)
    for u, row, row_scores in zip(users, ids, scores):
        response = client.recommend(user=int(u), k=5)
        assert not response.cold_start
        assert [r.user for r in response.users] == row.tolist()
        # Batches of 20 and of 1 sum in another order: float32 rounding, not another ranking.
        np.testing.assert_allclose([r.score for r in response.users], row_scores, rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(row_scores) <= 0)


def test_known_neighbours_and_self_are_left_out_unless_asked(client, evaluation):
    _, _, train_lists = evaluation
    hub = int(np.argmax([len(a) for a in train_lists]))  # the best-connected user
    known = set(train_lists[hub].tolist()) | {hub}
    default = [r.user for r in client.recommend(user=hub, k=100).users]
    assert not known & set(default)
    everyone = [r.user for r in client.recommend(user=hub, k=100, exclude_known=False).users]
    assert known & set(everyone)  # its friends score high once they may appear
    # Neighbours given with a known user are extra exclusions.
    top = default[0]
    again = [r.user for r in client.recommend(user=hub, neighbors=[top], k=100).users]
    assert top not in again and again[0] == default[1]


def test_cold_start_excludes_the_given_neighbours_and_unknown_ids_use_them(client, evaluation):
    _, split, _ = evaluation
    neighbours = split.cold_known[0].tolist()
    new = client.recommend(neighbors=neighbours, k=20)
    assert new.cold_start and not set(neighbours) & {r.user for r in new.users}
    # An id the graph does not hold, with neighbours: the same cold start.
    unknown = client.recommend(user=10**12, neighbors=neighbours, k=20)
    assert unknown.cold_start and [r.user for r in unknown.users] == [r.user for r in new.users]
    # A held-out user is in the graph without edges: sent by id with its neighbours, it is
    # embedded from them too, and says so.
    by_id = client.recommend(user=int(split.cold_users[0]), neighbors=neighbours, k=20)
    assert by_id.cold_start and int(split.cold_users[0]) not in {r.user for r in by_id.users}
    # Order and duplicates in the list do not matter.
    shuffled = client.recommend(neighbors=neighbours[::-1] + neighbours[:1], k=20)
    assert [r.user for r in shuffled.users] == [r.user for r in new.users]


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "no neighbours were given"),
    ({"user": 10**12}, "is not in the graph and no neighbours"),
    ({"neighbors": [1, 10**12]}, "neighbour 1000000000000 is not in the graph"),
    ({"neighbors": [1, -3]}, "ids are >= 0"),
    ({"user": 1, "k": 101}, "k: expected an integer in 1..100"),
    ({"neighbors": list(range(1025))}, "at most 1024"),
    ({"user": 1, "model": "digit-classifier"}, "not a recommender"),
])
def test_bad_requests_are_invalid_argument(client, kwargs, fragment):
    with pytest.raises(grpc.RpcError) as info:
        client.recommend(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_k_defaults_to_ten(client):
    request = client.recommend(user=3, k=0)
    assert len(request.users) == 10


def test_open_inference_protocol_errors(client):
    one = np.array([1])
    for kwargs, fragment in [
        ({"k": 0}, "k: expected an integer in 1..100"),
        ({"k": 500}, "k: expected"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            _infer(client, one, np.full((1, 1), -1), **kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _infer(client, np.array([-1]), np.full((1, 2), -1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no neighbours" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _infer(client, np.array([1]), np.array([[4, -9]]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ids are >= 0" in info.value.details()
