"""Every bad request gets its status code and a message naming what was wrong; the
service stays healthy and no replica restarts."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from conftest import MAX_ROWS
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _gateway_status():
    return serve.get_app_handle("deepserve").status.remote().result()


@pytest.fixture(scope="module")
def before(server):
    """Process ids of the gateway (replica and workers) and the deployment-placed replica
    before the abuse."""
    return _pids(_gateway_status())


def _pids(status) -> tuple:
    return (status["pid"], *(w["pid"] for w in status["workers"]), status["models"]["digit-classifier-robust"]["pid"])


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server) as ch:
        yield ch


@pytest.fixture(scope="module")
def oip_stub(channel):
    return oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def fraud_stub(channel):
    return v1_grpc.FraudScoringStub(channel)


@pytest.fixture(scope="module")
def classifier_stub(channel):
    return v1_grpc.ClassifierStub(channel)


def _request(model="fraud-autoencoder", array=None, name="transactions", datatype="FP32", raw=None,
             version="", parameters=None, outputs=()):
    array = np.zeros((2, 30), np.float32) if array is None else array
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes() if raw is None else raw)
    for key, value in (parameters or {}).items():
        if isinstance(value, float):
            request.parameters[key].double_param = value
        else:
            request.parameters[key].string_param = value
    for o in outputs:
        request.outputs.add(name=o)
    return request


def _fails(call, request, code, *needles):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    for needle in needles:
        assert needle in error.details(), error.details()
    assert "Traceback" not in error.details() and 'File "' not in error.details()
    return error.details()


OIP_CASES = {
    "unknown model": (dict(model="no-such-model"), NOT_FOUND, ("no-such-model",)),
    "unknown version": (dict(version="99"), NOT_FOUND, ("version '99'",)),
    "wrong datatype": (dict(array=np.zeros((2, 30), np.float64), datatype="FP64"), INVALID,
                       ("'transactions'", "FP32", "FP64")),
    "wrong shape": (dict(array=np.zeros((2, 29), np.float32)), INVALID, ("'transactions'", "[-1, 30]")),
    "wrong input name": (dict(name="rows"), INVALID, ("no input 'rows'", "expects ['transactions']")),
    "byte length": (dict(raw=b"\0" * 239), INVALID, ("'transactions'", "240")),
    "NaN": (dict(array=np.full((2, 30), np.nan, np.float32)), INVALID, ("'transactions'", "NaN")),
    "Inf": (dict(array=np.full((1, 30), np.inf, np.float32)), INVALID, ("'transactions'", "infinite")),
    "empty batch": (dict(array=np.zeros((0, 30), np.float32)), INVALID, ("'transactions'", "empty")),
    "oversized batch": (dict(array=np.zeros((MAX_ROWS + 1, 30), np.float32)), INVALID,
                        ("'transactions'", f"limit of {MAX_ROWS}")),
    "unknown parameter": (dict(parameters={"temperature": 1.0}), INVALID, ("temperature",)),
    "bad threshold": (dict(parameters={"threshold": "high"}), INVALID, ("threshold", "'high'")),
    "unknown output": (dict(outputs=("verdict",)), INVALID, ("verdict",)),
    "parameters on a classifier": (dict(model="digit-classifier", name="images",
                                        array=np.zeros((1, 1, 8, 8), np.float32),
                                        parameters={"threshold": 0.5}), INVALID, ("no request parameters",)),
    "bad input to a deployment-placed model": (dict(model="digit-classifier-robust", name="images",
                                                    array=np.zeros((1, 1, 4, 4), np.float32)), INVALID,
                                               ("'images'", "[-1, 1, 8, 8]")),
}


@pytest.mark.parametrize("case", list(OIP_CASES))
def test_open_inference_protocol_errors(before, oip_stub, case):
    kwargs, code, needles = OIP_CASES[case]
    _fails(oip_stub.ModelInfer, _request(**kwargs), code, *needles)


def test_threshold_as_double_parameter_is_accepted(before, oip_stub):
    response = oip_stub.ModelInfer(_request(parameters={"threshold": 0.0}, outputs=("is_fraud",)), timeout=10)
    assert np.frombuffer(response.raw_output_contents[0], np.bool_).all()


def test_typed_contents_are_accepted(before, oip_stub):
    request = oip.ModelInferRequest(model_name="fraud-autoencoder")
    tensor = request.inputs.add(name="transactions", datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend([0.0] * 30)
    response = oip_stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["score", "feature_errors", "is_fraud"]


def _tx(**kwargs):
    return v1.Transaction(**kwargs)


SCORE_CASES = {
    "no transactions": (v1.ScoreRequest(), INVALID, ("empty",)),
    "neither form": (v1.ScoreRequest(transactions=[_tx()]), INVALID, ("transaction 0", "exactly one")),
    "both forms": (v1.ScoreRequest(transactions=[_tx(features=[0.0] * 30, named={"Time": 0.0})]), INVALID,
                   ("transaction 0",)),
    "short row": (v1.ScoreRequest(transactions=[_tx(features=[0.0] * 30), _tx(features=[0.0] * 29)]), INVALID,
                  ("transaction 1", "expected 30", "got 29")),
    "missing column": (v1.ScoreRequest(transactions=[_tx(named={"Time": 1.0, "Amount": 2.0})]), INVALID,
                       ("transaction 0", "missing ['V1'")),
    "NaN feature": (v1.ScoreRequest(transactions=[_tx(features=[float("nan")] * 30)]), INVALID, ("NaN",)),
    "NaN threshold": (v1.ScoreRequest(transactions=[_tx(features=[0.0] * 30)], threshold=float("nan")), INVALID,
                      ("threshold",)),
    "not an anomaly model": (v1.ScoreRequest(model="digit-classifier", transactions=[_tx(features=[0.0] * 30)]),
                             INVALID, ("classifier model",)),
    "unknown model": (v1.ScoreRequest(model="fraud-v9", transactions=[_tx(features=[0.0] * 30)]), NOT_FOUND,
                      ("fraud-v9",)),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_score_errors(before, fraud_stub, case):
    request, code, needles = SCORE_CASES[case]
    _fails(fraud_stub.Score, request, code, *needles)


CLASSIFY_CASES = {
    "no images": (v1.ClassifyRequest(), INVALID, ("empty",)),
    "pixel count": (v1.ClassifyRequest(images=[v1.Image(pixels=[0.0] * 63)]), INVALID,
                    ("image 0", "expected 64", "got 63")),
    "pixel range": (v1.ClassifyRequest(images=[v1.Image(pixels=[2.0] * 64)]), INVALID, ("image 0", "[0, 1]")),
    "not a PNG": (v1.ClassifyRequest(images=[v1.Image(png=b"GIF89a....")]), INVALID, ("image 0", "PNG")),
    "both forms": (v1.ClassifyRequest(images=[v1.Image(pixels=[0.0] * 64, png=b"x")]), INVALID, ("image 0",)),
    "top_k too large": (v1.ClassifyRequest(images=[v1.Image(pixels=[0.0] * 64)], top_k=11), INVALID,
                        ("top_k", "1..10")),
    "unknown version": (v1.ClassifyRequest(version="7", images=[v1.Image(pixels=[0.0] * 64)]), NOT_FOUND,
                        ("version '7'",)),
}


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify_errors(before, classifier_stub, case):
    request, code, needles = CLASSIFY_CASES[case]
    _fails(classifier_stub.Classify, request, code, *needles)


def test_deadline_exceeded(before, oip_stub):
    request = _request(model="digit-classifier-robust", name="images",
                       array=np.zeros((MAX_ROWS, 1, 8, 8), np.float32))
    with pytest.raises(grpc.RpcError) as info:
        oip_stub.ModelInfer(request, timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_overload_is_resource_exhausted(before, oip_stub):
    """digit-classifier is served with a 4-request queue: a burst overflows it."""
    request = _request(model="digit-classifier", name="images", array=np.random.default_rng(0).random(
        (MAX_ROWS, 1, 8, 8), dtype=np.float32))
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(oip_stub.ModelInfer, request, timeout=30) for _ in range(64)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "overloaded" in error.details() and "retry" in error.details()
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)


def test_still_healthy_and_nothing_restarted(before, server, oip_stub):
    with grpc.insecure_channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fraud-autoencoder", "digit-classifier", "digit-classifier-robust"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    status = _gateway_status()
    assert _pids(status) == before
    assert oip_stub.ModelInfer(_request(), timeout=10).model_name == "fraud-autoencoder"


def test_a_bytes_flood_is_refused_from_its_header(client):
    """A million-element BYTES tensor for an FP32 input is refused by the model's signature
    from its header: had its data been decoded first, the malformed buffer would have been
    the complaint (too short for a million length prefixes)."""
    request = oip.ModelInferRequest(model_name="fraud-autoencoder")
    request.inputs.add(name="transactions", datatype="BYTES", shape=[1_000_000])
    request.raw_input_contents.append(b"\xff\xff\xff\xff")
    details = _fails(client.inference.ModelInfer, request, INVALID, "'transactions'", "expected datatype FP32")
    assert "BYTES" in details and "length prefix" not in details and "at least" not in details


# ---------------------------------------------------------------------------- request bytes that do not parse


TRUNCATED = b"\x0a\x10abc"  # field 1, a string of 16 bytes; three follow
BAD_UTF8 = b"\x0a\x03a\xffb"  # field 1, a string that is not UTF-8

MALFORMED = {  # method path -> the message type it takes; every service the gateway serves
    "/inference.GRPCInferenceService/ModelInfer": "inference.ModelInferRequest",
    "/inference.GRPCInferenceService/ModelReady": "inference.ModelReadyRequest",
    "/deepserve.v1.FraudScoring/Score": "deepserve.v1.ScoreRequest",
    "/deepserve.v1.Classifier/Classify": "deepserve.v1.ClassifyRequest",
    "/deepserve.v1.Recommender/Recommend": "deepserve.v1.RecommendRequest",
    "/deepserve.v1.Models/ListModels": "deepserve.v1.ListModelsRequest",
    "/grpc.health.v1.Health/Check": "grpc.health.v1.HealthCheckRequest",
}


@pytest.mark.parametrize("body", [TRUNCATED, BAD_UTF8], ids=["truncated", "bad-utf8"])
@pytest.mark.parametrize("method", list(MALFORMED))
def test_bytes_that_are_not_the_message_are_invalid_argument(before, channel, method, body):
    """Fuzz run, issue 12: they were UNKNOWN with protobuf's DecodeError text. ListModelsRequest
    has no field 1: a string there is an unknown field, skipped, unless it does not parse."""
    if method.endswith("ListModels") and body == BAD_UTF8:
        body = b"\x0a\x10abc"
    details = _fails(channel.unary_unary(method), body, INVALID)
    assert details == f"the request is not a valid {MALFORMED[method]} message"


def test_malformed_bytes_in_streams_are_invalid_argument(before, channel):
    """Server streaming (GenerateStream) and bidirectional streaming (reflection) too."""
    with pytest.raises(grpc.RpcError) as refused:
        list(channel.unary_stream("/deepserve.v1.Generator/GenerateStream")(TRUNCATED, timeout=10))
    assert refused.value.code() == INVALID
    assert refused.value.details() == "the request is not a valid deepserve.v1.GenerateRequest message"
    reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as refused:
        list(reflect(iter([b"\x3a\x00", TRUNCATED]), timeout=10))  # list_services, then garbage
    assert refused.value.code() == INVALID
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in refused.value.details()


# ---------------------------------------------------------------------------- echoes of the request, bounded


LONG = "x" * 100_000

ECHO_CASES = {  # where a client's string comes back in a message: each is cut to 100 characters
    "model name": (lambda stub: stub.ModelInfer, _request(model=LONG), NOT_FOUND),
    "model version": (lambda stub: stub.ModelInfer, _request(version=LONG), NOT_FOUND),
    "input name": (lambda stub: stub.ModelInfer, _request(name=LONG), INVALID),
    "parameter key": (lambda stub: stub.ModelInfer, _request(parameters={LONG: 1.0}), INVALID),
    "parameter value": (lambda stub: stub.ModelInfer, _request(parameters={"threshold": LONG}), INVALID),
    "output name": (lambda stub: stub.ModelInfer, _request(outputs=(LONG,)), INVALID),
    "repository name": (lambda stub: stub.RepositoryIndex, oip.RepositoryIndexRequest(repository_name=LONG),
                        NOT_FOUND),
    "model metadata": (lambda stub: stub.ModelMetadata, oip.ModelMetadataRequest(name=LONG), NOT_FOUND),
}


@pytest.mark.parametrize("case", list(ECHO_CASES))
def test_echoed_client_strings_are_clipped(before, oip_stub, case):
    """Fuzz run: a 100 KB name came back whole, past the client's 16 KiB metadata limit (the
    client then saw RESOURCE_EXHAUSTED instead of the answer)."""
    call, request, code = ECHO_CASES[case]
    details = _fails(call(oip_stub), request, code, "x" * 100 + "…", "(100")
    assert "x" * 101 not in details and len(details) <= 1100, len(details)


def test_a_long_datatype_and_sampler_are_clipped(before, oip_stub, channel):
    details = _fails(oip_stub.ModelInfer, _request(datatype="F" * 4096), INVALID, "F" * 100 + "… (4096 characters)")
    assert "F" * 101 not in details
    generate = v1_grpc.GeneratorStub(channel).Generate
    details = _fails(generate, v1.GenerateRequest(sampler="s" * 10_000, steps=2), INVALID, "… (1000")
    assert "s" * 101 not in details


def test_messages_are_bounded_where_they_become_statuses():
    """errors.to_status: whichever layer built the message."""
    from deepserve.errors import MESSAGE_CHARS, InvalidInput, ModelNotFound, bounded, clip, to_status

    assert clip("abc") == "abc" and clip("a" * 150) == "a" * 100 + "… (150 characters)"
    code, message = to_status(ModelNotFound(f"model '{'m' * 5000}' is not served"))
    assert code == NOT_FOUND and message == f"model '{'m' * 100}… (5000 characters)' is not served"
    keys = sorted(f"key{i}" for i in range(10_000))  # many short words: the whole message is cut
    long = f"unknown parameters {keys}"
    message = to_status(InvalidInput(long))[1]
    assert len(message) <= MESSAGE_CHARS + 30 and message.endswith(f"… ({len(long)} characters)")
    assert bounded("bad\x00name\n\udcff") == "bad\\x00name\\n\\udcff"  # control characters, a lone surrogate
    bounded("\udcff" * 1_000_000).encode("utf-8")  # always encodable
    assert bounded("input 'transactions': expected datatype FP32, got FP64") == \
        "input 'transactions': expected datatype FP32, got FP64"


# ---------------------------------------------------------------------------- behind the token check


def test_malformed_bytes_with_tokens_are_parsed_only_once_authorized(tmp_path):
    """The token check comes first: a caller without a token gets UNAUTHENTICATED whatever its
    bytes (they are never parsed); an authorized one gets INVALID_ARGUMENT for bad bytes. The
    real GrpcServer, over a stub dataplane, in this process."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from deepserve.grpc_server import GrpcServer
    from deepserve.security import ServerSecurity
    from deepserve.settings import Settings

    token = "0123456789abcdef" * 2
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} inference,metadata,models\n")
    dataplane = SimpleNamespace(models={}, live=lambda: True, ready=lambda: True, labels=lambda name: ("", ""))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> GrpcServer:
        server = GrpcServer(dataplane, "127.0.0.1", 0, 1 << 20, "test-node",
                            security=ServerSecurity.from_settings(Settings(auth_tokens_file=str(tokens))))
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive")
            _fails(infer, TRUNCATED, grpc.StatusCode.UNAUTHENTICATED)
            with pytest.raises(grpc.RpcError) as refused:
                infer(TRUNCATED, timeout=10, metadata=[("authorization", f"Bearer {token}")])
            assert refused.value.code() == INVALID
            assert refused.value.details() == "the request is not a valid inference.ModelInferRequest message"
            assert oip.ServerLiveResponse.FromString(
                live(b"", timeout=10, metadata=[("authorization", f"Bearer {token}")])).live
            _fails(ch.unary_unary("/grpc.health.v1.Health/Check"), TRUNCATED, INVALID)  # open: no token needed
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
