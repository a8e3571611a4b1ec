"""Tests for deepserve.codec: tensors <-> numpy, and wire compatibility with Triton's client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor as pb_descriptor
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb2

from deepserve import codec
from deepserve.errors import InvalidInput
from deepserve.proto import inference_pb2

InferInputTensor = inference_pb2.ModelInferRequest.InferInputTensor

# One sample array per datatype, with values at the edges of each type's range.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 8, 9]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 8, 9]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 8, 9]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 8, 9]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [7, -8, 9]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1], [7, -8, 9]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [7, -8, 9]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [7, -8, 9]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.25, 65504.0], [np.inf, 0.0, -0.0]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.25, 3.4e38], [np.inf, 1e-30, -0.0]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.25, 1.7e308], [np.inf, 1e-300, -0.0]], dtype=np.float64),
    "BYTES": np.array(
        [[b"", b"a", b"\x00\xff"], [b"hello", "é".encode(), b"x" * 300]], dtype=object
    ),
}

TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _tensor(name: str, datatype: str, shape, field: str | None = None, values=()):
    tensor = InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    if field is not None:
        getattr(tensor.contents, field).extend(values)
    return tensor


def _assert_same(decoded: np.ndarray, expected: np.ndarray, datatype: str) -> None:
    assert decoded.shape == expected.shape
    assert decoded.dtype == codec.DATATYPE_TO_NUMPY[datatype]
    if datatype == "BYTES":
        assert decoded.tolist() == expected.tolist()
    else:
        np.testing.assert_array_equal(decoded, expected)


# ---------------------------------------------------------------- datatypes


def test_every_datatype_has_a_sample():
    assert set(SAMPLES) == set(codec.DATATYPE_TO_NUMPY)


@pytest.mark.parametrize("datatype", list(codec.DATATYPE_TO_NUMPY))
def test_numpy_to_datatype_inverts_the_table(datatype):
    assert codec.numpy_to_datatype(codec.DATATYPE_TO_NUMPY[datatype]) == datatype
    assert codec.numpy_to_datatype(SAMPLES[datatype].dtype) == datatype


def test_numpy_to_datatype_ignores_byte_order_and_maps_strings_to_bytes():
    assert codec.numpy_to_datatype(">f4") == "FP32"
    assert codec.numpy_to_datatype("S5") == "BYTES"
    assert codec.numpy_to_datatype("U3") == "BYTES"
    with pytest.raises(TypeError, match="complex"):
        codec.numpy_to_datatype(np.complex64)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_round_trip(datatype):
    expected = SAMPLES[datatype]
    out, raw = codec.encode_output("x", expected)
    assert (out.name, out.datatype, list(out.shape)) == ("x", datatype, [2, 3])
    assert not out.HasField("contents")

    decoded = codec.decode_input(_tensor("x", out.datatype, out.shape), raw)

    _assert_same(decoded, expected, datatype)


@pytest.mark.parametrize("datatype", list(TYPED_FIELD))
def test_typed_contents_round_trip(datatype):
    expected = SAMPLES[datatype]
    values = expected.ravel().tolist()
    tensor = _tensor("x", datatype, expected.shape, TYPED_FIELD[datatype], values)

    decoded = codec.decode_input(tensor, None)

    _assert_same(decoded, expected, datatype)


def test_raw_numeric_is_a_read_only_view_of_the_buffer():
    raw = np.arange(6, dtype="<f4").tobytes()

    decoded = codec.decode_input(_tensor("x", "FP32", [2, 3]), raw)

    assert np.shares_memory(decoded, np.frombuffer(raw, np.uint8))
    assert not decoded.flags.writeable


def test_fp16_raw_bytes_are_little_endian_halves():
    array = np.array([1.0, -2.0, 0.5], dtype=np.float16)
    _, raw = codec.encode_output("h", array)
    assert raw == bytes.fromhex("003c" "00c0" "0038")

    decoded = codec.decode_input(_tensor("h", "FP16", [3]), raw)

    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_arrays_are_encoded_little_endian():
    _, raw = codec.encode_output("y", np.array([1, 2], dtype=">i4"))
    assert raw == bytes.fromhex("01000000" "02000000")


def test_bytes_wire_format_is_length_prefixed():
    _, raw = codec.encode_output("s", np.array([b"ab", b"", "é"], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab" b"\x00\x00\x00\x00" b"\x02\x00\x00\x00\xc3\xa9"

    decoded = codec.decode_input(_tensor("s", "BYTES", [3]), raw)

    assert decoded.tolist() == [b"ab", b"", "é".encode()]


@pytest.mark.parametrize("array", [np.array([b"ab", b"c"]), np.array(["ab", "c"])])
def test_fixed_width_string_arrays_encode_as_bytes(array):
    out, raw = codec.encode_output("s", array)
    assert out.datatype == "BYTES"
    assert codec.decode_input(_tensor("s", "BYTES", [2]), raw).tolist() == [b"ab", b"c"]


def test_empty_and_scalar_tensors():
    assert codec.decode_input(_tensor("e", "FP32", [0, 4]), b"").shape == (0, 4)
    assert codec.decode_input(_tensor("e", "BYTES", [0]), b"").shape == (0,)
    scalar = codec.decode_input(_tensor("s", "INT64", []), np.int64(5).tobytes())
    assert scalar.shape == () and scalar == 5


def test_decode_request_inputs_raw_and_typed():
    raw_request = inference_pb2.ModelInferRequest()
    raw_request.inputs.extend([_tensor("a", "FP32", [2]), _tensor("b", "BYTES", [1])])
    raw_request.raw_input_contents.extend(
        [np.array([1, 2], "<f4").tobytes(), b"\x01\x00\x00\x00z"]
    )
    typed_request = inference_pb2.ModelInferRequest()
    typed_request.inputs.extend(
        [
            _tensor("a", "FP32", [2], "fp32_contents", [1, 2]),
            _tensor("b", "BYTES", [1], "bytes_contents", [b"z"]),
        ]
    )

    for request in (raw_request, typed_request):
        decoded = codec.decode_request_inputs(request)
        assert list(decoded) == ["a", "b"]
        np.testing.assert_array_equal(decoded["a"], [1.0, 2.0])
        assert decoded["b"].tolist() == [b"z"]


# ---------------------------------------------------------------- malformed input


def _raw_request(*inputs: tuple[InferInputTensor, bytes | None]):
    request = inference_pb2.ModelInferRequest()
    for tensor, raw in inputs:
        request.inputs.append(tensor)
        if raw is not None:
            request.raw_input_contents.append(raw)
    return request


MALFORMED = {
    "wrong byte length": (
        lambda: codec.decode_input(_tensor("pixels", "FP32", [2, 3]), b"\x00" * 20),
        r"20 bytes; expected 24 bytes",
    ),
    "element count vs shape": (
        lambda: codec.decode_input(
            _tensor("pixels", "INT64", [2, 2], "int64_contents", [1, 2, 3]), None
        ),
        r"3 values in contents\.int64_contents; expected 4",
    ),
    "unknown datatype": (
        lambda: codec.decode_input(_tensor("pixels", "FP8", [1]), b"\x00"),
        r"unknown datatype 'FP8'; expected one of BOOL",
    ),
    "negative dim": (
        lambda: codec.decode_input(_tensor("pixels", "FP32", [-1, 4]), b""),
        r"negative dimension",
    ),
    "mismatched raw count": (
        lambda: codec.decode_request_inputs(
            _raw_request(
                (_tensor("pixels", "FP32", [1]), b"\x00" * 4), (_tensor("mask", "BOOL", [1]), None)
            )
        ),
        r"1 raw_input_contents entries for 2 inputs \('pixels', 'mask'\)",
    ),
    "duplicate input": (
        lambda: codec.decode_request_inputs(
            _raw_request(
                (_tensor("pixels", "UINT8", [1]), b"\x01"),
                (_tensor("pixels", "UINT8", [1]), b"\x02"),
            )
        ),
        r"more than once",
    ),
    "truncated BYTES prefix": (
        # element 0 is b"a"; only 3 of element 1's 4 prefix bytes follow
        lambda: codec.decode_input(
            _tensor("pixels", "BYTES", [2]), b"\x01\x00\x00\x00a" b"\x00\x00\x00"
        ),
        r"length prefix of element 1",
    ),
    "BYTES element overruns the buffer": (
        lambda: codec.decode_input(_tensor("pixels", "BYTES", [1]), b"\x09\x00\x00\x00abc"),
        r"element 0 declares 9 bytes but only 3 remain",
    ),
    "BYTES trailing data": (
        lambda: codec.decode_input(_tensor("pixels", "BYTES", [1]), b"\x01\x00\x00\x00ab"),
        r"1 bytes after its 1 elements",
    ),
    "BYTES shape larger than the buffer can hold": (
        lambda: codec.decode_input(_tensor("pixels", "BYTES", [10**6]), b"\x00" * 8),
        r"expected at least 4000000",
    ),
    "a dimension numpy cannot hold, of an empty tensor": (
        lambda: codec.decode_input(_tensor("pixels", "FP32", [0, 2**62]), b""),
        r"shape \[0, 4611686018427387904\] has a dimension over 2147483647",
    ),
    "too many dimensions": (
        lambda: codec.decode_input(_tensor("pixels", "FP32", [1] * 65), b"\x00" * 4),
        r"shape has 65 dimensions; expected at most 16",
    ),
    "FP16 in typed contents": (
        lambda: codec.decode_input(_tensor("pixels", "FP16", [1], "fp32_contents", [1.0]), None),
        r"FP16 has no typed contents field",
    ),
    "raw and typed contents together": (
        lambda: codec.decode_input(
            _tensor("pixels", "FP32", [1], "fp32_contents", [1.0]), b"\x00" * 4
        ),
        r"both raw_input_contents and typed contents",
    ),
    "narrow integer out of range": (
        lambda: codec.decode_input(_tensor("pixels", "INT8", [2], "int_contents", [1, 300]), None),
        r"outside \[-128, 127\]",
    ),
    "raw BOOL byte not 0 or 1": (
        lambda: codec.decode_input(_tensor("pixels", "BOOL", [2]), b"\x01\x02"),
        r"other than 0 or 1",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_invalid_input_naming_the_input(case):
    call, expected = MALFORMED[case]
    with pytest.raises(InvalidInput, match=expected) as info:
        call()
    assert "'pixels'" in str(info.value)


# ---------------------------------------------------------------- parameters


def test_parameters_round_trip():
    values = {
        "flag": True, "n": -3, "big": 2**64 - 1, "ratio": 0.25, "label": "x", "np": np.int32(4),
    }
    request = inference_pb2.ModelInferRequest()

    codec.dict_to_parameters(values, request.parameters)

    assert request.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert request.parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert codec.parameters_to_dict(request.parameters) == {**values, "np": 4}


def test_parameters_rejects_unset_and_unsupported_values():
    request = inference_pb2.ModelInferRequest()
    request.parameters["empty"].SetInParent()
    with pytest.raises(InvalidInput, match="'empty' has no value"):
        codec.parameters_to_dict(request.parameters)

    target = inference_pb2.ModelInferRequest().parameters
    with pytest.raises(TypeError, match="'bad'"):
        codec.dict_to_parameters({"bad": [1]}, target)
    with pytest.raises(ValueError, match="'huge'"):
        codec.dict_to_parameters({"huge": 2**64}, target)
    assert len(target) == 0


# ---------------------------------------------------------------- Triton wire compatibility


def test_tritonclient_request_decodes_to_the_same_arrays():
    arrays = {name: SAMPLES[name] for name in ("FP32", "FP16", "INT64", "UINT8", "BOOL", "BYTES")}
    inputs = []
    for name, array in arrays.items():
        infer_input = triton.InferInput(f"in_{name}", list(array.shape), name)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    triton_request = triton_utils._get_inference_request(
        model_name="m",
        inputs=inputs,
        model_version="2",
        request_id="req-1",
        outputs=[triton.InferRequestedOutput("out")],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=7,
        timeout=1000,
        parameters={"custom": "yes"},
    )

    request = inference_pb2.ModelInferRequest.FromString(triton_request.SerializeToString())

    assert (request.model_name, request.model_version, request.id) == ("m", "2", "req-1")
    assert [o.name for o in request.outputs] == ["out"]
    assert codec.parameters_to_dict(request.parameters) == {
        "priority": 7, "timeout": 1000, "custom": "yes",
    }
    decoded = codec.decode_request_inputs(request)
    assert list(decoded) == [f"in_{name}" for name in arrays]
    for name, array in arrays.items():
        _assert_same(decoded[f"in_{name}"], array, name)


def test_our_response_reads_back_in_tritonclient():
    """As the server builds it (add_outputs), and output by output (encode_output): the same bytes."""
    names = ("FP32", "FP16", "UINT64", "BOOL", "BYTES")
    response = inference_pb2.ModelInferResponse(model_name="m", model_version="1", id="r")
    codec.add_outputs(response, {f"out_{name}": SAMPLES[name] for name in names})
    one_by_one = inference_pb2.ModelInferResponse(model_name="m", model_version="1", id="r")
    for name in names:
        tensor, raw = codec.encode_output(f"out_{name}", SAMPLES[name])
        one_by_one.outputs.append(tensor)
        one_by_one.raw_output_contents.append(raw)
    assert response == one_by_one

    wire = response.SerializeToString()
    result = triton.InferResult(triton_pb2.ModelInferResponse.FromString(wire))

    for name in ("FP32", "FP16", "UINT64", "BOOL"):
        np.testing.assert_array_equal(result.as_numpy(f"out_{name}"), SAMPLES[name])
    assert result.as_numpy("out_BYTES").tolist() == SAMPLES["BYTES"].tolist()


def _messages(descriptor) -> list:
    """Every message of a file, nested ones and map entries included."""
    found = []
    pending = list(descriptor.message_types_by_name.values())
    while pending:
        message = pending.pop()
        found.append(message)
        pending.extend(message.nested_types)
    return found


def _field_signature(field: pb_descriptor.FieldDescriptor) -> tuple:
    return (
        field.number,
        field.type,
        field.is_repeated,
        field.message_type.full_name if field.message_type else None,
        field.containing_oneof.name if field.containing_oneof else None,
    )


# Triton's model-configuration messages have many more fields than DeepServe fills (sequence
# batching, ensembles, optimisation policies, ...): ours declare a subset, each field as Triton's.
SUBSET_MESSAGES = {"inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput",
                   "inference.ModelDynamicBatching", "inference.ModelInstanceGroup"}
SERVED_RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
               "ModelConfig", "ModelStatistics", "RepositoryIndex"]


def test_oip_messages_match_tritonclient_descriptors():
    ours = inference_pb2.DESCRIPTOR
    theirs = triton_pb2.DESCRIPTOR.pool
    assert ours.package == "inference"

    messages = _messages(ours)
    assert len(messages) >= 40  # the core protocol's and Triton's extensions', nested and map entries
    for message in messages:
        reference = theirs.FindMessageTypeByName(message.full_name)
        names = {f.name for f in message.fields}
        if message.full_name in SUBSET_MESSAGES:
            assert names < {f.name for f in reference.fields}, message.full_name
        else:
            assert names == {f.name for f in reference.fields}, message.full_name
        for field in message.fields:
            assert _field_signature(field) == _field_signature(
                reference.fields_by_name[field.name]
            ), f"{message.full_name}.{field.name}"
        for enum in message.enum_types:
            values = {v.name: v.number for v in enum.values}
            assert values == {v.name: v.number for v in reference.enum_types_by_name[enum.name].values}
    data_type = ours.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in data_type.values} == {
        v.name: v.number for v in theirs.FindEnumTypeByName("inference.DataType").values}

    service = ours.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    reference_service = theirs.FindServiceByName("inference.GRPCInferenceService")
    assert [m.name for m in service.methods] == SERVED_RPCS
    for method in service.methods:
        reference = reference_service.methods_by_name[method.name]
        assert method.input_type.full_name == reference.input_type.full_name
        assert method.output_type.full_name == reference.output_type.full_name
        assert not (method.client_streaming or method.server_streaming)

def test_shared_memory_inputs_are_refused_by_name():
    request = inference_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "region0"
    with pytest.raises(InvalidInput, match="'x'.*shared-memory region"):
        codec.decode_request_inputs(request)


def test_triton_reserved_parameters_are_split_off():
    params = {"threshold": 0.5, "timeout": 2_500_000, "priority": 2, "sequence_id": 4, "triton_x": True, "headers": "h"}
    assert codec.split_reserved(params) == ({"threshold": 0.5}, 2.5)
    assert codec.split_reserved({"timeout": 0}) == ({}, None)  # Triton: 0 means none
    assert codec.split_reserved({"timeout": "1000"}) == ({}, 0.001)  # older clients send strings
    for bad in ({"timeout": -1}, {"timeout": 1.5}, {"priority": "high"}, {"timeout": True}):
        with pytest.raises(InvalidInput):
            codec.split_reserved(bad)
