"""The real service over real gRPC: Triton's client, deepserve.v1, health, reflection.

Answers are compared with ONNX Runtime run directly on the repository's files.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from conftest import TEST_MODELS
from deepserve.models import digits, fraud

# Models whose served signature is their graph's (the generators take labels: test_generation.py).
MODELS = ("fraud-autoencoder", "digit-classifier", "digit-classifier-robust", "graph-recommender")


@pytest.fixture(scope="module")
def triton_client(server):
    with triton.InferenceServerClient(server) as c:
        yield c


@pytest.fixture(scope="module")
def direct(repository):
    """ONNX Runtime sessions on the repository files: the expected answers."""
    sessions = {}
    for name in MODELS:
        _, data = repository.load(name)
        sessions[name] = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sessions


@pytest.fixture(scope="module")
def transactions(repository):
    seed = repository.get("fraud-autoencoder").manifest.seed
    x, label, _ = fraud.generate_transactions(seed, fraud.SyntheticConfig(n_rows=4000))
    order = np.argsort(-label, kind="stable")[:40]  # some fraud first, then normal rows
    return x[order].astype(np.float32), label[order]


@pytest.fixture(scope="module")
def held_out_digits(repository):
    return digits.load_digits_split(repository.get("digit-classifier").manifest.training_data["split_seed"])


# ---------------------------------------------------------------------------- Triton's client


def test_server_live_ready_and_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    meta = triton_client.get_server_metadata()
    assert meta.name == "deepserve" and meta.version


@pytest.mark.parametrize("name", MODELS)
def test_model_metadata_matches_manifest(triton_client, repository, name):
    manifest = repository.get(name).manifest
    assert triton_client.is_model_ready(name)
    meta = triton_client.get_model_metadata(name)
    assert meta.name == name and list(meta.versions) == [manifest.version]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (t.name, t.datatype, t.shape) for t in manifest.inputs
    ]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    assert outputs[: len(manifest.outputs)] == [(t.name, t.datatype, t.shape) for t in manifest.outputs]


def _triton_infer(client, name, array, input_name, parameters=None, outputs=None):
    tensor = triton.InferInput(input_name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(name, [tensor], outputs=requested, parameters=parameters)


def test_fraud_infer_equals_onnx_runtime(triton_client, direct, transactions, repository):
    x, _ = transactions
    result = _triton_infer(triton_client, "fraud-autoencoder", x, "transactions")
    want_score, want_errors = direct["fraud-autoencoder"].run(None, {"transactions": x})
    np.testing.assert_allclose(result.as_numpy("score"), want_score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("feature_errors"), want_errors, rtol=1e-5, atol=1e-6)
    threshold = repository.get("fraud-autoencoder").manifest.threshold
    np.testing.assert_array_equal(result.as_numpy("is_fraud"), want_score > threshold)
    assert result.get_response().model_version == "1" or result.get_response().model_version


def test_fraud_threshold_parameter_and_requested_outputs(triton_client, direct, transactions):
    x, _ = transactions
    want_score = direct["fraud-autoencoder"].run(["score"], {"transactions": x})[0]
    cutoff = float(np.median(want_score))  # tritonclient 2.41 sends string (or int) parameters
    result = _triton_infer(triton_client, "fraud-autoencoder", x, "transactions",
                           parameters={"threshold": str(cutoff)}, outputs=["is_fraud"])
    np.testing.assert_array_equal(result.as_numpy("is_fraud"), want_score > cutoff)
    assert result.as_numpy("score") is None  # only what was asked for


@pytest.mark.parametrize("name", ["digit-classifier", "digit-classifier-robust"])
def test_classifier_infer_equals_onnx_runtime(triton_client, direct, held_out_digits, name):
    x = held_out_digits.x_test[:50]
    result = _triton_infer(triton_client, name, x, "images")
    want_probs, want_feats = direct[name].run(None, {"images": x})
    np.testing.assert_allclose(result.as_numpy("probabilities"), want_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("features"), want_feats, rtol=1e-5, atol=1e-5)


def test_served_classifier_accuracy_equals_manifest(triton_client, held_out_digits, repository):
    x, y = held_out_digits.x_test, held_out_digits.y_test
    predictions = []
    for start in range(0, len(x), 100):  # several requests, as a client would send them
        probs = _triton_infer(triton_client, "digit-classifier", x[start : start + 100], "images")
        predictions.append(probs.as_numpy("probabilities").argmax(1))
    accuracy = float((np.concatenate(predictions) == y).mean())
    # The same number of correct answers as at build time (half an image of tolerance).
    manifest_accuracy = repository.get("digit-classifier").manifest.metrics["accuracy"]
    assert accuracy == pytest.approx(manifest_accuracy, abs=0.5 / len(y))


# ---------------------------------------------------------------------------- deepserve.v1


def test_score_equals_onnx_runtime_with_explanations(client, direct, transactions, repository):
    x, label = transactions
    response = client.score(x.tolist())
    manifest = repository.get("fraud-autoencoder").manifest
    want_score, want_errors = direct["fraud-autoencoder"].run(None, {"transactions": x})
    assert response.model == "fraud-autoencoder" and response.version == manifest.version
    assert len(response.results) == len(x)
    names = manifest.extra["feature_names"]
    for i, r in enumerate(response.results):
        assert r.score == pytest.approx(float(want_score[i]), rel=1e-5)
        assert r.threshold == pytest.approx(manifest.threshold)
        assert r.is_fraud == bool(want_score[i] > manifest.threshold)
        top = np.argsort(-want_errors[i])[:3]
        assert [c.name for c in r.top_features] == [names[j] for j in top]
        assert r.top_features[0].error == pytest.approx(float(want_errors[i, top[0]]), rel=1e-5)
    # The synthetic fraud rows at the front are mostly caught.
    flagged = np.array([r.is_fraud for r in response.results])
    assert flagged[label == 1].mean() >= 0.6


def test_score_by_name_and_threshold_override(client, transactions, repository):
    x, _ = transactions
    names = repository.get("fraud-autoencoder").manifest.extra["feature_names"]
    by_row = client.score(x[:5].tolist())
    by_name = client.score([dict(zip(names, map(float, row))) for row in x[:5]], threshold=0.0)
    for a, b in zip(by_row.results, by_name.results):
        assert a.score == pytest.approx(b.score, rel=1e-6)
        assert b.threshold == 0.0 and b.is_fraud  # every score is above 0


def test_score_explains_with_as_many_features_as_asked(client, direct, transactions, repository):
    """``top_features``: 0 gives the score and the decision alone (the cheapest answer), N the N
    largest errors; more than the model has is INVALID_ARGUMENT."""
    x, _ = transactions
    want_score, want_errors = direct["fraud-autoencoder"].run(None, {"transactions": x[:8]})
    names = repository.get("fraud-autoencoder").manifest.extra["feature_names"]
    bare = client.score(x[:8].tolist(), top_features=0)
    assert [r.top_features for r in bare.results] == [[]] * 8
    assert [r.score for r in bare.results] == pytest.approx(want_score.tolist(), rel=1e-5)
    five = client.score(x[:8].tolist(), top_features=5)
    for i, r in enumerate(five.results):
        assert [c.name for c in r.top_features] == [names[j] for j in np.argsort(-want_errors[i])[:5]]
    with pytest.raises(grpc.RpcError) as refused:
        client.score(x[:1].tolist(), top_features=len(names) + 1)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"top_features: at most {len(names)}" in refused.value.details()


def test_classify_pixels_and_png(client, held_out_digits, direct):
    x = held_out_digits.x_test[:20]
    response = client.classify(list(x), top_k=2)
    want = direct["digit-classifier"].run(["probabilities"], {"images": x})[0]
    for row, expected in zip(response.results, want):
        assert len(row.top) == 2
        assert row.top[0].label == int(expected.argmax())
        assert row.top[0].probability == pytest.approx(float(expected.max()), abs=1e-5)
    png = io.BytesIO()
    Image.fromarray((x[0, 0] * 255).round().astype(np.uint8), mode="L").save(png, format="PNG")
    by_png = client.classify([png.getvalue()], model="digit-classifier-robust")
    assert by_png.model == "digit-classifier-robust"
    assert by_png.results[0].top[0].label == held_out_digits.y_test[0]


def test_list_models_shows_provider(client, repository):
    models = {m.name: m for m in client.list_models().models}
    assert set(models) == set(TEST_MODELS)
    for name, info in models.items():
        assert info.ready and info.execution_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
        assert info.sha256 == repository.get(name).manifest.sha256
        assert info.batching["batch_runs"] >= 0 and info.batching["threaded"] in (0.0, 1.0)


# ---------------------------------------------------------------------------- health, reflection


def test_health_overall_and_per_model(server):
    with grpc.insecure_channel(server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", *TEST_MODELS):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_api(server):
    with grpc.insecure_channel(server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "deepserve.v1.FraudScoring", "deepserve.v1.Classifier",
                "deepserve.v1.Generator", "deepserve.v1.Recommender", "deepserve.v1.Models",
                "grpc.health.v1.Health"} <= names
        symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        found = next(iter(stub.ServerReflectionInfo(iter([symbol]), timeout=5)))
        assert found.file_descriptor_response.file_descriptor_proto


def test_every_answer_names_the_node(server, client):
    """Trailing metadata ``deepserve-node`` on answers and on errors, both APIs and streams."""
    import ray

    from deepserve.proto import deepserve_pb2 as v1
    from deepserve.proto import inference_pb2 as oip

    node = ray.util.get_node_ip_address()  # the default name: the Ray node's address
    _, call = client.fraud.Score.with_call(v1.ScoreRequest(transactions=[v1.Transaction(features=[0.0] * 30)]))
    assert dict(call.trailing_metadata())["deepserve-node"] == node
    _, call = client.inference.ServerReady.with_call(oip.ServerReadyRequest())
    assert dict(call.trailing_metadata())["deepserve-node"] == node
    with pytest.raises(grpc.RpcError) as failed:
        client.inference.ModelMetadata(oip.ModelMetadataRequest(name="no-such-model"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(failed.value.trailing_metadata())["deepserve-node"] == node
    stream = client.generate_stream(label=1, count=1, seed=3, steps=2)
    assert sum(1 for _ in stream) >= 2  # progress, then the result
    assert dict(stream.trailing_metadata())["deepserve-node"] == node
