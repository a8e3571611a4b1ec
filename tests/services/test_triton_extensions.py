"""Triton's gRPC extensions and reserved parameters, through Triton's own client.

ModelConfig, ModelStatistics and RepositoryIndex answer what tritonclient (and
perf_analyzer, tests/loadtests/test_perf_analyzer.py) ask; Triton's reserved request
parameters are accepted, and `timeout` is a server-side deadline.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import MAX_ROWS, TEST_MODELS
from deepserve.proto import inference_pb2 as oip

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tc(server):
    with triton.InferenceServerClient(server) as c:
        yield c


def _fraud_input(rows: int = 1, value: float = 0.0) -> triton.InferInput:
    x = triton.InferInput("transactions", [rows, 30], "FP32")
    x.set_data_from_numpy(np.full((rows, 30), value, np.float32))
    return x


def _stats(tc, name: str) -> dict:
    return tc.get_inference_statistics(name, as_json=True)["model_stats"][0]


def _count(stats: dict, *path: str) -> int:
    for key in path:
        stats = stats.get(key, {})
    return int(stats or 0)


def test_server_metadata_lists_the_extensions(tc):
    assert set(tc.get_server_metadata(as_json=True)["extensions"]) == {
        "model_configuration", "statistics", "parameters"}


def test_model_config_describes_signature_batching_and_instances(tc):
    fraud = tc.get_model_config("fraud-autoencoder", as_json=True)["config"]
    assert fraud["platform"] == "onnxruntime_onnx" and fraud["backend"] == "onnxruntime"
    assert int(fraud["max_batch_size"]) == MAX_ROWS  # rows per request; dims leave the batch out
    assert fraud["input"] == [{"name": "transactions", "data_type": "TYPE_FP32", "dims": ["30"]}]
    outputs = {o["name"]: o for o in fraud["output"]}
    assert outputs["score"]["dims"] == ["1"] and outputs["score"]["reshape"] == {}  # one value per row
    assert outputs["feature_errors"]["dims"] == ["30"]
    assert fraud["instance_group"] == [{"name": "fraud-autoencoder-gateway", "kind": "KIND_CPU", "count": 1}]
    assert fraud["parameters"]["placement"]["string_value"] == "gateway"
    assert fraud["version_policy"] == {"latest": {"num_versions": 1}}

    classifier = tc.get_model_config("digit-classifier", as_json=True)["config"]
    queue = classifier["dynamic_batching"]["default_queue_policy"]
    assert int(queue["max_queue_size"]) == TEST_MODELS["digit-classifier"]["batching"]["max_queued"]

    robust = tc.get_model_config("digit-classifier-robust", as_json=True)["config"]
    assert robust["instance_group"][0]["count"] == 1  # Serve's running replicas of its deployment
    assert robust["parameters"]["placement"]["string_value"] == "deployment"

    # Inputs whose only dimension is the batch keep full shapes, with no batch dimension.
    diffusion = tc.get_model_config("digit-diffusion", as_json=True)["config"]
    assert "max_batch_size" not in diffusion  # 0
    assert diffusion["input"] == [{"name": "label", "data_type": "TYPE_INT64", "dims": ["-1"]}]
    with pytest.raises(InferenceServerException, match="not served"):
        tc.get_model_config("no-such-model")


def test_statistics_count_requests_rows_and_executions(tc):
    before = _stats(tc, "fraud-autoencoder")
    for rows in (1, 3, 5):
        tc.infer("fraud-autoencoder", [_fraud_input(rows)])
    with pytest.raises(InferenceServerException):  # NaN: INVALID_ARGUMENT, a failed request
        tc.infer("fraud-autoencoder", [_fraud_input(1, np.nan)])
    after = _stats(tc, "fraud-autoencoder")

    def delta(*path):
        return _count(after, *path) - _count(before, *path)

    assert delta("inference_count") == 9  # rows
    assert delta("inference_stats", "success", "count") == 3
    assert delta("inference_stats", "fail", "count") == 1
    assert delta("inference_stats", "queue", "count") == 3
    assert delta("inference_stats", "compute_infer", "count") == 3
    assert delta("inference_stats", "compute_infer", "ns") > 0
    assert delta("inference_stats", "success", "ns") >= delta("inference_stats", "compute_infer", "ns")
    assert delta("execution_count") == 3  # one row-batch each: the fraud model computes inline
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    runs = {int(b["batch_size"]): _count(b, "compute_infer", "count") for b in after["batch_stats"]}
    assert {1, 3, 5} <= set(runs)


def test_statistics_of_deployment_placed_and_generative_models(tc, client):
    for name in ("digit-classifier-robust", "digit-diffusion"):
        before = _stats(tc, name)
        if name == "digit-diffusion":
            client.generate(label=2, count=2, seed=1, steps=3)
            rows = 2
        else:
            x = triton.InferInput("images", [4, 1, 8, 8], "FP32")
            x.set_data_from_numpy(np.zeros((4, 1, 8, 8), np.float32))
            tc.infer(name, [x])
            rows = 4
        after = _stats(tc, name)
        assert _count(after, "inference_count") - _count(before, "inference_count") == rows, name
        assert _count(after, "inference_stats", "success", "count") - _count(
            before, "inference_stats", "success", "count") == 1, name
        assert _count(after, "inference_stats", "compute_infer", "ns") > _count(
            before, "inference_stats", "compute_infer", "ns"), name
        assert _count(after, "execution_count") > _count(before, "execution_count"), name


def test_statistics_of_every_model_and_unknown_ones(tc):
    every = tc.get_inference_statistics(as_json=True)["model_stats"]
    assert sorted(s["name"] for s in every) == sorted(TEST_MODELS)
    with pytest.raises(InferenceServerException, match="not served"):
        tc.get_inference_statistics("no-such-model")


def test_repository_index(tc, client):
    index = tc.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {(n, "1", "READY") for n in TEST_MODELS}
    ready = client.inference.RepositoryIndex(oip.RepositoryIndexRequest(ready=True)).models
    assert {m.state for m in ready} == {"READY"} and {m.name for m in ready} == set(TEST_MODELS)


def test_repository_index_of_another_repository_is_not_found(client):
    with pytest.raises(grpc.RpcError) as failed:
        client.inference.RepositoryIndex(oip.RepositoryIndexRequest(repository_name="elsewhere"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_timeout_parameter_is_a_server_side_deadline(tc):
    label = triton.InferInput("label", [1], "INT64")
    label.set_data_from_numpy(np.array([4], np.int64))
    # tritonclient sends `timeout` as Triton's reserved request parameter (microseconds).
    result = tc.infer("digit-dcgan", [label], timeout=30_000_000, parameters={"seed": 3})
    assert result.as_numpy("images").shape == (1, 1, 8, 8)
    before = _stats(tc, "digit-diffusion")
    with pytest.raises(InferenceServerException) as failed:  # 1 ms for 1,000 diffusion steps
        tc.infer("digit-diffusion", [label], timeout=1_000, parameters={"steps": 1000})
    assert failed.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    after = _stats(tc, "digit-diffusion")
    assert _count(after, "inference_stats", "fail", "count") == _count(before, "inference_stats", "fail", "count") + 1


def _fraud_request(**parameters) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name="fraud-autoencoder",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="transactions", datatype="FP32", shape=[1, 30])],
        raw_input_contents=[np.zeros((1, 30), np.float32).tobytes()])
    for name, param in parameters.items():
        request.parameters[name].CopyFrom(param)
    return request


def test_other_reserved_parameters_are_accepted(tc, client):
    # tritonclient's own arguments for them...
    assert tc.infer("fraud-autoencoder", [_fraud_input()], priority=1).as_numpy("score").shape == (1,)
    assert tc.infer("fraud-autoencoder", [_fraud_input()], sequence_id=7, sequence_start=True).as_numpy("score").size == 1
    # ... and the ones it does not send itself.
    for name, param in (("headers", oip.InferParameter(string_param="x")),
                        ("triton_enable_empty_final_response", oip.InferParameter(bool_param=True))):
        response = client.inference.ModelInfer(_fraud_request(**{name: param}))
        assert [o.name for o in response.outputs][0] == "score"


def test_malformed_reserved_parameters_are_invalid(client):
    for name, param in (("timeout", oip.InferParameter(string_param="soon")),
                        ("timeout", oip.InferParameter(int64_param=-5)),
                        ("priority", oip.InferParameter(double_param=0.5))):
        with pytest.raises(grpc.RpcError) as failed:
            client.inference.ModelInfer(_fraud_request(**{name: param}))
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in failed.value.details()


def test_tritonclient_takes_the_retry_policy(server):
    """docs/triton-compatibility.md's recipe: DeepServe's service config through channel_args."""
    import json

    from deepserve.client import SERVICE_CONFIG

    args = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
    with triton.InferenceServerClient(f"ipv4:{server}", channel_args=args) as c:
        assert c.is_server_ready()
        assert c.infer("fraud-autoencoder", [_fraud_input()]).as_numpy("score").shape == (1,)
