"""Open Inference Protocol tensors <-> numpy: the one place that decodes and encodes them.

A tensor's data arrives either as one raw little-endian buffer per input
(``raw_input_contents``) or in the typed ``contents`` field that matches its
datatype. BYTES elements in a raw buffer are each a 4-byte little-endian length
followed by that many bytes. Every malformed tensor raises
:class:`~deepserve.errors.InvalidInput` with a message that names the input and
says what was expected.

Numeric raw data is decoded without copying: the arrays returned are read-only
views of the request's buffers. Outputs are always encoded raw.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, MutableMapping
from typing import Union

import numpy as np

from deepserve.errors import InvalidInput
from deepserve.proto import inference_pb2

__all__ = [
    "DATATYPE_TO_NUMPY",
    "ParameterValue",
    "decode_input",
    "decode_request_inputs",
    "dict_to_parameters",
    "encode_output",
    "numpy_to_datatype",
    "parameters_to_dict",
    "split_reserved",
]

InferInputTensor = inference_pb2.ModelInferRequest.InferInputTensor
InferOutputTensor = inference_pb2.ModelInferResponse.InferOutputTensor
ParameterValue = Union[bool, int, float, str]

# Protocol datatype -> numpy dtype. Fixed little-endian: that is the wire order.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# (numpy kind, itemsize) -> datatype; byte order does not matter here.
_KIND_SIZE_TO_DATATYPE: dict[tuple[str, int], str] = {
    (dtype.kind, dtype.itemsize): name
    for name, dtype in DATATYPE_TO_NUMPY.items()
    if name != "BYTES"
}

# Datatype -> the InferTensorContents field that carries it. FP16 has none.
_CONTENTS_FIELD: dict[str, str] = {
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

# Datatypes narrower than their typed field, whose values need a range check.
_NARROW_INTS: dict[str, np.dtype] = {
    "UINT8": np.dtype(np.uint32),
    "UINT16": np.dtype(np.uint32),
    "INT8": np.dtype(np.int32),
    "INT16": np.dtype(np.int32),
}

_LENGTH = struct.Struct("<I")  # BYTES element length prefix
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1


def numpy_to_datatype(dtype: np.dtype | type | str) -> str:
    """The protocol datatype for a numpy dtype.

    Args:
        dtype: Anything ``np.dtype`` accepts. Object, ``S`` and ``U`` dtypes map to BYTES.

    Returns:
        The datatype name, e.g. ``"FP32"``.

    Raises:
        TypeError: The dtype has no protocol datatype (e.g. complex); a server bug,
            not a client error.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    datatype = _KIND_SIZE_TO_DATATYPE.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return datatype


# ---------------------------------------------------------------- decoding


def decode_input(tensor: InferInputTensor, raw: bytes | None) -> np.ndarray:
    """Decode one input tensor to a numpy array of its declared shape.

    Args:
        tensor: The input's metadata and, when ``raw`` is None, its typed contents.
        raw: The input's entry of ``raw_input_contents``, or None to use the typed
            ``contents`` field matching the datatype.

    Returns:
        An array with the declared shape and the dtype of ``DATATYPE_TO_NUMPY``.
        Raw numeric data is a read-only zero-copy view of ``raw``; BYTES inputs are
        object arrays of ``bytes``.

    Raises:
        InvalidInput: Unknown datatype, negative dimension, an element count or
            byte length that does not match the shape, typed contents alongside
            raw data, values out of the datatype's range, or malformed BYTES
            length prefixes.
    """
    name, datatype = tensor.name, tensor.datatype
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise _invalid(
            name, f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_NUMPY)}"
        )
    shape = _checked_shape(name, tensor.shape)
    count = math.prod(shape)

    if raw is None:
        return _decode_typed(tensor, name, datatype, dtype, shape, count)
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        raise _invalid(name, "has both raw_input_contents and typed contents; expected only one")
    if datatype == "BYTES":
        return _decode_raw_bytes(raw, name, shape, count)

    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise _invalid(
            name,
            f"raw data is {len(raw)} bytes; expected {expected} bytes "
            f"({count} {datatype} elements of {dtype.itemsize} bytes for shape {list(shape)})",
        )
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise _invalid(name, "raw BOOL data has a byte other than 0 or 1")
    return array.reshape(shape)


# No tensor a request can carry has more dimensions or longer ones than these; anything
# beyond is refused from the header alone (numpy cannot even describe some such shapes).
MAX_RANK = 16
MAX_DIMENSION = 2**31 - 1


def _checked_shape(name: str, dims) -> tuple[int, ...]:
    shape = tuple(dims)
    if len(shape) > MAX_RANK:
        raise _invalid(name, f"shape has {len(shape)} dimensions; expected at most {MAX_RANK}")
    if any(dim < 0 for dim in shape):
        raise _invalid(name, f"shape {list(shape)} has a negative dimension; expected all >= 0")
    if any(dim > MAX_DIMENSION for dim in shape):
        raise _invalid(name, f"shape {list(shape)} has a dimension over {MAX_DIMENSION}")
    return shape


def decode_request_inputs(
    request: inference_pb2.ModelInferRequest,
    check: Callable[[str, str, tuple[int, ...]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Decode every input of a request.

    Args:
        request: The request. When it carries ``raw_input_contents``, there must be
            exactly one entry per input, in the order of ``inputs``.
        check: called with each input's name, datatype and shape before its data is
            read (the model's signature: :meth:`deepserve.runtime.Runtime.check_tensor`),
            so that a tensor the model would refuse costs no decoding.

    Returns:
        Input name -> array, in request order.

    Raises:
        InvalidInput: A duplicate input name, a raw entry count that does not match
            the input count, or any error of :func:`decode_input`.
    """
    inputs = request.inputs
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(inputs):
        names = ", ".join(repr(tensor.name) for tensor in inputs)
        raise InvalidInput(
            f"request has {len(raws)} raw_input_contents entries for {len(inputs)} inputs "
            f"({names}); expected exactly one per input, in the order of `inputs`"
        )
    decoded: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        if tensor.name in decoded:
            raise _invalid(tensor.name, "appears more than once; expected unique input names")
        if "shared_memory_region" in tensor.parameters:  # Triton's shared-memory extension
            raise _invalid(tensor.name, "is in a shared-memory region, which DeepServe does not support; "
                                        "send the data in raw_input_contents")
        if check is not None:
            check(tensor.name, tensor.datatype, _checked_shape(tensor.name, tensor.shape))
        decoded[tensor.name] = decode_input(tensor, raws[i] if raws else None)
    return decoded


def _decode_typed(
    tensor: InferInputTensor,
    name: str,
    datatype: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    count: int,
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _invalid(
            name, f"{datatype} has no typed contents field; expected its data in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise _invalid(
            name,
            f"has {len(values)} values in contents.{field}; expected {count} "
            f"for shape {list(shape)}",
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)  # a plain list keeps numpy from reading bytes as sequences
        return array.reshape(shape)
    wide = _NARROW_INTS.get(datatype)
    if wide is None:
        return np.array(values, dtype=dtype).reshape(shape)
    array = np.array(values, dtype=wide)
    info = np.iinfo(dtype)
    if count and (array.min() < info.min or array.max() > info.max):
        raise _invalid(
            name,
            f"contents.{field} has values outside [{info.min}, {info.max}]; expected {datatype}",
        )
    return array.astype(dtype).reshape(shape)


def _decode_raw_bytes(raw: bytes, name: str, shape: tuple[int, ...], count: int) -> np.ndarray:
    size = len(raw)
    # Each element takes at least its 4-byte prefix: catches absurd shapes before allocating.
    if count * _LENGTH.size > size:
        raise _invalid(
            name,
            f"raw BYTES data is {size} bytes; expected at least {count * _LENGTH.size} "
            f"(a 4-byte length prefix for each of {count} elements of shape {list(shape)})",
        )
    array = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > size:
            raise _invalid(
                name,
                f"raw BYTES data ends inside the length prefix of element {i}; "
                f"expected {count} elements for shape {list(shape)}",
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        end = offset + length
        if end > size:
            raise _invalid(
                name,
                f"raw BYTES element {i} declares {length} bytes but only {size - offset} remain",
            )
        array[i] = raw[offset:end]
        offset = end
    if offset != size:
        raise _invalid(
            name,
            f"raw BYTES data has {size - offset} bytes after its {count} elements; "
            f"expected exactly {count} length-prefixed elements for shape {list(shape)}",
        )
    return array.reshape(shape)


def _invalid(name: str, problem: str) -> InvalidInput:
    return InvalidInput(f"input {name!r}: {problem}")


# ---------------------------------------------------------------- encoding


def encode_output(name: str, array: np.ndarray) -> tuple[InferOutputTensor, bytes]:
    """Encode one output as its tensor metadata and raw bytes.

    Args:
        name: Output name.
        array: The output; numeric, bool, or BYTES (object arrays of ``bytes``/``str``,
            or ``S``/``U`` arrays; ``str`` is encoded as UTF-8).

    Returns:
        ``(tensor, raw)``: the tensor (name, datatype, shape; no typed contents) and
        its entry for ``raw_output_contents``, little-endian, BYTES length-prefixed.

    Raises:
        TypeError: The dtype has no protocol datatype, or a BYTES element is
            neither bytes nor str (a server bug, not a client error).
    """
    array = np.asarray(array)
    datatype, raw = _encoded(name, array)
    return InferOutputTensor(name=name, datatype=datatype, shape=array.shape), raw


def add_outputs(response: inference_pb2.ModelInferResponse, outputs: dict[str, np.ndarray]) -> None:
    """Append every output to ``response``, as :func:`encode_output` encodes it, with no
    temporary message (``outputs.add`` builds the tensor in place; appending a built one
    copies it): the answer path of every ``ModelInfer``."""
    for name, array in outputs.items():
        array = np.asarray(array)
        datatype, raw = _encoded(name, array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)


def _encoded(name: str, array: np.ndarray) -> tuple[str, bytes]:
    """An output's datatype and raw bytes (little-endian, BYTES length-prefixed)."""
    datatype = numpy_to_datatype(array.dtype)
    if datatype == "BYTES":
        return datatype, _encode_bytes(name, array)
    wire = DATATYPE_TO_NUMPY[datatype]
    # tobytes() writes C order whatever the layout: only another byte order needs a conversion.
    return datatype, (array if array.dtype == wire else array.astype(wire)).tobytes()


def _encode_bytes(name: str, array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.ravel().tolist():  # S -> bytes, U -> str, O -> the objects
        if isinstance(item, str):
            item = item.encode("utf-8")
        elif not isinstance(item, (bytes, bytearray, memoryview)):
            raise TypeError(f"output {name!r}: BYTES element of type {type(item).__name__}")
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


# ---------------------------------------------------------------- parameters


def parameters_to_dict(
    params: Mapping[str, inference_pb2.InferParameter],
) -> dict[str, ParameterValue]:
    """Plain values of a ``parameters`` map.

    Args:
        params: A request's, tensor's or response's ``parameters`` map.

    Returns:
        Name -> value: ``bool``, ``int`` (int64 and uint64), ``float`` or ``str``.

    Raises:
        InvalidInput: A parameter has no value set.
    """
    out: dict[str, ParameterValue] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(
                f"parameter {key!r} has no value; expected a bool, int, float or string"
            )
        out[key] = getattr(param, kind)
    return out


# Request parameters Triton reserves for itself (its "parameters", "sequence" and
# "schedule_policy" extensions), and every name with the "triton_" prefix. DeepServe honours
# `timeout` (a server-side deadline) and accepts the others without effect: its models are
# stateless and each has one FIFO queue (docs/triton-compatibility.md).
TRITON_RESERVED = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"})


def split_reserved(parameters: dict[str, ParameterValue]) -> tuple[dict[str, ParameterValue], float | None]:
    """A request's parameters without Triton's reserved ones, and its ``timeout`` in seconds.

    Args:
        parameters: the request's parameters (:func:`parameters_to_dict`).

    Returns:
        ``(model parameters, timeout)``; timeout is None when absent or 0 (Triton: none).

    Raises:
        InvalidInput: ``timeout`` or ``priority`` is not a non-negative integer.
    """
    model_parameters = {k: v for k, v in parameters.items() if k not in TRITON_RESERVED and not k.startswith("triton_")}
    for name in ("timeout", "priority"):
        value = parameters.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0) and not (
                isinstance(value, str) and value.isdigit()):
            raise InvalidInput(f"parameter '{name}': expected a non-negative integer"
                               f"{' (microseconds)' if name == 'timeout' else ''}, got {value!r}")
    timeout_us = int(parameters.get("timeout") or 0)
    return model_parameters, (timeout_us / 1e6 if timeout_us else None)


def dict_to_parameters(
    values: Mapping[str, ParameterValue],
    target: MutableMapping[str, inference_pb2.InferParameter],
) -> None:
    """Write plain values into a ``parameters`` map.

    Args:
        values: Name -> ``bool``, ``int``, ``float`` or ``str`` (numpy scalars too).
            Integers go to ``int64_param``, or ``uint64_param`` above the int64 range.
        target: The message's ``parameters`` map; existing keys are overwritten.

    Raises:
        TypeError: A value of another type.
        ValueError: An integer outside both the int64 and the uint64 range.
    """
    for key, value in values.items():
        field, plain = _parameter_field(key, value)
        setattr(target[key], field, plain)  # the oneof clears any earlier kind


def _parameter_field(key: str, value: object) -> tuple[str, ParameterValue]:
    if isinstance(value, (bool, np.bool_)):
        return "bool_param", bool(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if _INT64_MIN <= value <= _INT64_MAX:
            return "int64_param", value
        if 0 <= value <= _UINT64_MAX:
            return "uint64_param", value
        raise ValueError(f"parameter {key!r}: {value} fits neither int64 nor uint64")
    if isinstance(value, (float, np.floating)):
        return "double_param", float(value)
    if isinstance(value, str):
        return "string_param", value
    raise TypeError(f"parameter {key!r}: unsupported type {type(value).__name__}")
