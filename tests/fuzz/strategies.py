"""Hypothesis strategies for hostile (and some valid) requests to every served model, over
both APIs: the Open Inference Protocol (``inference.GRPCInferenceService``) and the typed
``deepserve.v1`` services, plus ``grpc.health.v1``.

Every strategy draws a :class:`Case`: which RPC, which category of abuse, the request (a
protobuf message, or wire bytes where protobuf cannot express the abuse: invalid UTF-8,
corrupt encodings, messages over the size limit) and, where the answer is certain, the
status codes it may get. :func:`categories` names each strategy; the harness
(``harness.py``) sends them and judges the answers.

Large payloads (messages over the limit, flood tensors) are built when sent, from what was
drawn, so that hypothesis only ever draws a few small numbers for them.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import inference_pb2 as oip

# ---------------------------------------------------------------------------- the served signatures

# As docs/model-repository.md describes them (the Open Inference Protocol view: generators take
# a `label` tensor and parameters, not their graph's inputs).
MAX_ROWS = 1024  # tests/conftest.py serves with max_rows_per_request = MAX_ROWS
MAX_COUNT = 64  # images per generation request
NUM_USERS = 5000  # graph-recommender: ids 0..4999
MAX_K = 100
MAX_NEIGHBORS = 1024

SIGNATURES: dict[str, dict[str, tuple[str, list[int]]]] = {
    "fraud-autoencoder": {"transactions": ("FP32", [-1, 30])},
    "digit-classifier": {"images": ("FP32", [-1, 1, 8, 8])},
    "digit-classifier-robust": {"images": ("FP32", [-1, 1, 8, 8])},
    "digit-dcgan": {"label": ("INT64", [-1])},
    "digit-diffusion": {"label": ("INT64", [-1])},
    "graph-recommender": {"user": ("INT64", [-1]), "neighbors": ("INT64", [-1, -1]),
                          "exclude_known": ("BOOL", [-1])},
}
MODELS = tuple(SIGNATURES)
OUTPUTS = {
    "fraud-autoencoder": ("score", "feature_errors", "is_fraud"),
    "digit-classifier": ("probabilities", "features"),
    "digit-classifier-robust": ("probabilities", "features"),
    "digit-dcgan": ("images", "png", "seed", "generated_label"),
    "digit-diffusion": ("images", "png", "seed", "generated_label"),
    "graph-recommender": ("ids", "scores", "embedding"),
}
MODEL_PARAMETERS = {
    "fraud-autoencoder": ("threshold",),
    "digit-classifier": (),
    "digit-classifier-robust": (),
    "digit-dcgan": ("seed", "steps", "guidance", "sampler"),
    "digit-diffusion": ("seed", "steps", "guidance", "sampler"),
    "graph-recommender": ("k",),
}
# Triton's reserved request parameters, accepted by every model (services/codec.py).
RESERVED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers")
FEATURE_NAMES = ("Time", *(f"V{i}" for i in range(1, 29)), "Amount")  # the credit-card schema

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2,
            "INT32": 4, "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}
NUMPY = {"BOOL": np.bool_, "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
         "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4",
         "FP64": "<f8"}
ODD_DATATYPES = ("", "fp32", "Fp32", "FP8", "BF16", "FP128", "STRING", "INT4", "UINT128", "COMPLEX64",
                 " FP32", "FP32 ", "FP32\x00", "BYTES\n", "TYPE_FP32", "float32", "F" * 4096)
CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents")
RIGHT_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
# Shapes that are empty, zero, negative, huge, or whose element count overflows int64.
HOSTILE_SHAPES = (
    [], [0], [0, 0], [1], [-1], [-1, 30], [2, -30], [INT64_MIN], [INT64_MAX], [INT64_MAX, 2],
    [0, 4611686018427387904], [4611686018427387904, 0], [2**31, 2**31], [2**32, 2**32],
    [2**62, 30], [2**31 - 1, 30], [3037000500, 3037000500], [1] * 64, [1] * 1000, [2] * 63,
    [1, 1, 8, 8, 1], [1, 64], [64], [1, 30, 1], [0, 30], [0, 1, 8, 8], [MAX_ROWS + 1, 30],
)

OK, INVALID, NOT_FOUND, EXHAUSTED = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
EXPECT_VALID = frozenset({OK, EXHAUSTED})  # a valid request may only be turned away for load
EXPECT_INVALID = frozenset({INVALID})
EXPECT_NOT_FOUND = frozenset({NOT_FOUND})


# ---------------------------------------------------------------------------- the case


@dataclass(eq=False)
class Case:
    """One request: where it goes, what kind of abuse it is, and what it may get back.

    Exactly one of ``message``, ``wire`` and ``build`` gives the bytes sent.
    """

    api: str  # "oip", "v1" or "health"
    method: str  # the RPC, e.g. "ModelInfer"
    category: str  # the kind of abuse (a key of CATEGORIES)
    model: str = ""
    message: object = None  # a protobuf message
    wire: bytes | None = None  # bytes sent as they are
    build: Callable[[], bytes] | None = None  # builds large bytes when sent
    timeout: float = 60.0  # the client's deadline; past it (and not a deadline case), the server hung
    expect: frozenset | None = None  # status codes this request may get; None: any the oracle allows
    note: str = ""

    def payload(self) -> bytes:
        if self.build is not None:
            return self.build()
        if self.wire is not None:
            return self.wire
        return self.message.SerializeToString()

    def describe(self, limit: int = 700) -> str:
        """A reproducer: the RPC and the request, long byte strings and lists shortened."""
        head = f"{self.api}.{self.method} [{self.category}] model={self.model!r}"
        if self.timeout < 60:
            head += f" timeout={self.timeout}s"
        if self.note:
            head += f" ({self.note})"
        if self.message is not None and self.wire is None and self.build is None:
            body = text_format.MessageToString(_shortened(self.message), as_one_line=True, as_utf8=True)
        elif self.build is not None:
            body = "<built when sent; see note>"
        else:
            body = f"wire bytes ({len(self.wire)}): {self.wire[:160]!r}{'...' if len(self.wire) > 160 else ''}"
        text = f"{head}: {body}"
        return text if len(text) <= limit else text[:limit] + "..."

    __repr__ = describe

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a falsifying example
        printer.text(self.describe(4000))


def _shortened(message):
    """A copy whose long bytes fields and long repeated fields are cut (for printing)."""
    copy = type(message)()
    copy.CopyFrom(message)
    _shorten(copy)
    return copy


def _shorten(message) -> None:
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                items = value.values() if fd.message_type.fields_by_name["value"].message_type else ()
                for item in items:
                    _shorten(item)
            elif fd.is_repeated:
                if len(value) > 8:
                    del value[8:]
                for item in value:
                    _shorten(item)
            else:
                _shorten(value)
        elif fd.is_repeated:
            if fd.type == FieldDescriptor.TYPE_BYTES:
                for i, item in enumerate(value):
                    if len(item) > 48:
                        value[i] = item[:32] + f"...<{len(item)} bytes>".encode()
            if len(value) > 12:
                del value[12:]
        elif fd.type == FieldDescriptor.TYPE_BYTES and len(value) > 48:
            setattr(message, fd.name, value[:32] + f"...<{len(value)} bytes>".encode())
        elif fd.type == FieldDescriptor.TYPE_STRING and len(value) > 80:
            setattr(message, fd.name, value[:40] + f"...<{len(value)} chars>")


# ---------------------------------------------------------------------------- wire helpers


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return tag(field_number, 2) + varint(len(payload)) + payload


def with_bytes(message, placeholder: str, replacement: bytes) -> bytes:
    """``message`` serialized, with the one string field set to ``placeholder`` holding
    ``replacement`` instead (same length, so every enclosing length prefix stays right)."""
    assert len(placeholder.encode()) == len(replacement)
    data = message.SerializeToString()
    needle = varint(len(replacement)) + placeholder.encode()
    assert data.count(needle) == 1, "placeholder not unique"
    return data.replace(needle, varint(len(replacement)) + replacement)


# ---------------------------------------------------------------------------- small strategies

seeds = st.integers(0, 2**32 - 1)
int64s = st.one_of(st.sampled_from([0, 1, -1, 2, 10, 1023, 1024, 1025, 4999, 5000, 2**31 - 1, 2**31, 2**32,
                                    INT64_MIN, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX))
uint64s = st.one_of(st.sampled_from([0, 1, 2**63, UINT64_MAX]), st.integers(0, UINT64_MAX))
doubles = st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 20.0, 20.000001, 1e308, -1e308, 5e-324,
                                     math.nan, math.inf, -math.inf, 3.4028235e38, 3.5e38]),
                    st.floats(allow_nan=True, allow_infinity=True))
odd_text = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e999", "-1", "0", "1", "10", "0x10", " 5", "5 ",
                     "1.5", "1_000", "١٢", "²", "ddim", "ddpm", "gan", "DDIM", "\x00", "a\x00b", "../..",
                     "x" * 10_000, "\u202e", "\U0001f600"]),
    st.text(max_size=24),
)
model_names = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(["", "no-such-model", "Fraud-Autoencoder", " fraud-autoencoder", "fraud-autoencoder ",
                     "fraud-autoencoder/1", "../fraud-autoencoder", "fraud-autoencoder\x00", "digit-classifier\n",
                     "*", "%s", "{}", "x" * 100_000, "\u0000", "\U0001f600"]),
    st.text(max_size=32),
)
versions = st.one_of(
    st.sampled_from(["", "1", "0", "-1", "2", "01", "1.0", "1 ", " 1", "+1", "latest", "9" * 40, "١", "¹",
                     "1\x00", "v1", "x" * 10_000]),
    st.text(max_size=16),
)
BAD_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xe2\x82", b"\xf0\x28\x8c\xbc",
            b"\xf8\xa1\xa1\xa1\xa1", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\x80")


@st.composite
def bad_utf8(draw) -> bytes:
    """Invalid UTF-8, between ASCII (at least 4 bytes in all)."""
    prefix = draw(st.text("abcdefgh-0123456789", min_size=1, max_size=8)).encode()
    return prefix + draw(st.sampled_from(BAD_UTF8)) + draw(st.sampled_from([b"", b"x", b"-1"])) + b"zz"


def placeholder_for(bad: bytes) -> str:
    return "~" * len(bad)


# ---------------------------------------------------------------------------- valid tensors


def valid_arrays(model: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs that the model accepts, ``rows`` rows of them."""
    rng = np.random.default_rng(seed)
    if model == "fraud-autoencoder":
        return {"transactions": (rng.standard_normal((rows, 30)) * 5).astype(np.float32)}
    if model.startswith("digit-classifier"):
        return {"images": rng.random((rows, 1, 8, 8), dtype=np.float32)}
    if model in ("digit-dcgan", "digit-diffusion"):
        return {"label": rng.integers(-1, 10, rows).astype(np.int64)}
    if model == "graph-recommender":
        width = int(rng.integers(1, 9))
        neighbors = rng.integers(-1, NUM_USERS, (rows, width)).astype(np.int64)
        users = rng.integers(-1, NUM_USERS, rows).astype(np.int64)
        neighbors[:, 0] = np.where(users < 0, rng.integers(0, NUM_USERS, rows), neighbors[:, 0])  # new users need one
        return {"user": users, "neighbors": neighbors, "exclude_known": rng.random(rows) < 0.5}
    raise KeyError(model)


def add_tensor(request, name: str, datatype: str, shape, raw: bytes | None = None):
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return tensor


def infer_request(model: str, arrays: dict[str, np.ndarray], typed: bool = False, version: str = ""):
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    for name, array in arrays.items():
        datatype = SIGNATURES.get(model, {}).get(name, ("FP32",))[0]
        if typed:
            tensor = add_tensor(request, name, datatype, array.shape)
            getattr(tensor.contents, RIGHT_FIELD[datatype]).extend(array.ravel().tolist())
        else:
            add_tensor(request, name, datatype, array.shape, np.ascontiguousarray(array).tobytes())
    return request


def set_parameter(target, key: str, kind: str, value) -> None:
    param = target[key]
    if kind != "empty":
        setattr(param, f"{kind}_param", value)


@st.composite
def valid_parameters(draw, model: str) -> dict[str, tuple[str, object]]:
    """Parameters the model accepts: name -> (kind, value)."""
    out: dict[str, tuple[str, object]] = {}
    if model == "fraud-autoencoder" and draw(st.booleans()):
        out["threshold"] = draw(st.sampled_from([
            ("double", draw(st.floats(-1e6, 1e6))), ("int64", draw(st.integers(-10, 10**6))),
            ("string", str(draw(st.floats(-100, 100))))]))
    elif model in ("digit-dcgan", "digit-diffusion"):
        if draw(st.booleans()):
            out["seed"] = draw(st.sampled_from([("int64", draw(st.integers(0, INT64_MAX))),
                                                ("uint64", draw(uint64s)), ("string", str(draw(st.integers(0, 10**9))))]))
        if model == "digit-diffusion":
            if draw(st.booleans()):
                out["steps"] = ("int64", draw(st.integers(1, 12)))
            if draw(st.booleans()):
                out["guidance"] = ("double", draw(st.floats(0.0, 20.0)))
            if draw(st.booleans()):
                out["sampler"] = ("string", draw(st.sampled_from(["ddim", "ddpm"])))
        else:
            if draw(st.booleans()):
                out["steps"] = ("int64", draw(st.sampled_from([0, 1])))
            if draw(st.booleans()):
                out["sampler"] = ("string", draw(st.sampled_from(["", "gan"])))
    elif model == "graph-recommender" and draw(st.booleans()):
        out["k"] = draw(st.sampled_from([("int64", draw(st.integers(1, MAX_K))),
                                         ("string", str(draw(st.integers(1, MAX_K))))]))
    if draw(st.integers(0, 9)) == 0:
        out["sequence_id"] = ("int64", draw(st.integers(0, 100)))
    return out


def rows_for(model: str) -> st.SearchStrategy[int]:
    if model in ("digit-dcgan", "digit-diffusion"):
        return st.integers(1, 4)
    return st.integers(1, 8)


# ---------------------------------------------------------------------------- Open Inference Protocol


@st.composite
def oip_valid(draw) -> Case:
    model = draw(st.sampled_from(MODELS))
    arrays = valid_arrays(model, draw(rows_for(model)), draw(seeds))
    request = infer_request(model, arrays, typed=draw(st.booleans()), version=draw(st.sampled_from(["", "1"])))
    for key, (kind, value) in draw(valid_parameters(model)).items():
        set_parameter(request.parameters, key, kind, value)
    outputs = draw(st.lists(st.sampled_from(OUTPUTS[model]), unique=True, max_size=len(OUTPUTS[model])))
    for name in outputs:
        request.outputs.add(name=name)
    request.id = draw(st.text(max_size=12))
    return Case("oip", "ModelInfer", "oip.valid", model, request, expect=EXPECT_VALID)


def _target_input(draw, models=MODELS) -> tuple[str, dict[str, np.ndarray], str]:
    model = draw(st.sampled_from(models))
    arrays = valid_arrays(model, draw(rows_for(model)), draw(seeds))
    return model, arrays, draw(st.sampled_from(sorted(arrays)))


def _rebuild(model: str, arrays: dict[str, np.ndarray], replace: str, tensor_fn) -> oip.ModelInferRequest:
    """A valid request whose input ``replace`` is written by ``tensor_fn(request)`` instead."""
    request = oip.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        if name == replace:
            tensor_fn(request)
        else:
            add_tensor(request, name, SIGNATURES[model][name][0], array.shape, array.tobytes())
    return request


@st.composite
def oip_datatype(draw) -> Case:
    """Every datatype string (valid, wrong for the input, unknown) with data sized for it."""
    model, arrays, name = _target_input(draw)
    datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.sampled_from(ODD_DATATYPES), st.text(max_size=8)))
    shape = arrays[name].shape
    count = int(np.prod(shape))
    rng = np.random.default_rng(draw(seeds))
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", 1) + b"x" for _ in range(count))
    else:
        raw = rng.bytes(count * ITEMSIZE.get(datatype, draw(st.sampled_from([1, 4, 8]))))
    request = _rebuild(model, arrays, name, lambda r: add_tensor(r, name, datatype, shape, raw))
    right = SIGNATURES[model][name][0]
    return Case("oip", "ModelInfer", "oip.datatype", model, request, expect=None if datatype == right else EXPECT_INVALID,
                note=f"input {name!r} as {datatype[:20]!r}")


@st.composite
def oip_shape(draw) -> Case:
    """Shapes that are empty, zero, negative, huge or overflowing, with little or no data."""
    model, arrays, name = _target_input(draw)
    shape = draw(st.one_of(st.sampled_from(HOSTILE_SHAPES),
                           st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=6),
                           st.lists(st.integers(-2, 70), max_size=5)))
    datatype = SIGNATURES[model][name][0]
    count = math.prod(shape) if shape and all(d >= 0 for d in shape) else (1 if not shape else -1)
    data = draw(st.sampled_from(["empty", "small", "sized", "typed"]))
    nbytes = count * ITEMSIZE[datatype] if 0 <= count <= 1_000_000 else None
    if data == "sized" and nbytes is not None:
        raw = bytes(nbytes)
    elif data == "small" or data == "sized":
        raw = bytes(draw(st.integers(0, 64)))
    else:
        raw = b""

    def tensor(request):
        if data == "typed":
            t = add_tensor(request, name, datatype, shape)
            getattr(t.contents, RIGHT_FIELD[datatype]).extend([0] * draw(st.integers(0, 8)))
        else:
            add_tensor(request, name, datatype, shape, raw)

    if data == "typed":
        request = oip.ModelInferRequest(model_name=model)
        for n, array in arrays.items():  # typed contents for every input: raw for some would be a mix
            if n == name:
                tensor(request)
            else:
                t = add_tensor(request, n, SIGNATURES[model][n][0], array.shape)
                getattr(t.contents, RIGHT_FIELD[SIGNATURES[model][n][0]]).extend(array.ravel().tolist())
    else:
        request = _rebuild(model, arrays, name, tensor)
    sane = len(shape) == len(SIGNATURES[model][name][1]) and all(
        w in (-1, g) for w, g in zip(SIGNATURES[model][name][1], shape)) and all(d > 0 for d in shape)
    return Case("oip", "ModelInfer", "oip.shape", model, request, expect=None if sane else EXPECT_INVALID,
                note=f"input {name!r} shape {shape} data {data}")


@st.composite
def oip_byte_length(draw) -> Case:
    """Raw data a few bytes short or long, empty, or far too long."""
    model, arrays, name = _target_input(draw)
    raw = arrays[name].tobytes()
    change = draw(st.one_of(st.integers(-len(raw), -1), st.integers(1, 16),
                            st.sampled_from([-len(raw), 1 << 20, 3, 7])))
    raw = raw[:change] if change < 0 else raw + bytes(change)
    request = _rebuild(model, arrays, name,
                       lambda r: add_tensor(r, name, SIGNATURES[model][name][0], arrays[name].shape, raw))
    return Case("oip", "ModelInfer", "oip.byte_length", model, request, expect=EXPECT_INVALID,
                note=f"input {name!r} raw {change:+d} bytes")


@st.composite
def oip_typed_contents(draw) -> Case:
    """Typed contents in the wrong field, the wrong count, alongside raw data, out of range."""
    model, arrays, name = _target_input(draw)
    array = arrays[name]
    datatype = draw(st.sampled_from([SIGNATURES[model][name][0]] * 3 + list(DATATYPES)))
    field_name = draw(st.sampled_from(CONTENTS_FIELDS))
    count = array.size + draw(st.sampled_from([0, 0, 0, -1, 1, 1000, -array.size]))
    values = {
        "bool_contents": [True] * count, "bytes_contents": [b"\x00\x01"] * count,
        "fp32_contents": [0.5] * count, "fp64_contents": [0.25] * count,
        "int_contents": [draw(st.sampled_from([0, 1, 300, -129, 2**31 - 1, -(2**31)]))] * count,
        "uint_contents": [draw(st.sampled_from([0, 1, 256, 65536, 2**32 - 1]))] * count,
        "int64_contents": [draw(st.sampled_from([0, 1, -1, 9, 10, INT64_MAX, INT64_MIN]))] * count,
        "uint64_contents": [draw(st.sampled_from([0, 1, 2**63, UINT64_MAX]))] * count,
    }[field_name]
    also_raw = draw(st.integers(0, 5)) == 0  # typed contents and raw data for the same input
    request = oip.ModelInferRequest(model_name=model)
    for n, a in arrays.items():
        dt = datatype if n == name else SIGNATURES[model][n][0]
        t = add_tensor(request, n, dt, a.shape)
        if n == name:
            getattr(t.contents, field_name).extend(values)
        else:
            getattr(t.contents, RIGHT_FIELD[dt]).extend(a.ravel().tolist())
        if also_raw:
            request.raw_input_contents.append(a.tobytes())
    right = (datatype == SIGNATURES[model][name][0] and (
        (field_name == RIGHT_FIELD[datatype] and count == array.size and not also_raw)
        or (also_raw and count == 0)))  # empty typed contents beside raw data: only the raw data counts
    return Case("oip", "ModelInfer", "oip.typed_contents", model, request, expect=None if right else EXPECT_INVALID,
                note=f"input {name!r} {datatype} in {field_name} x{count}{' + raw' if also_raw else ''}")


@st.composite
def oip_nonfinite(draw) -> Case:
    """NaN and infinities in float inputs (raw or typed) and in float parameters."""
    where = draw(st.sampled_from(["tensor", "tensor", "fp64", "parameter"]))
    if where == "parameter":
        model = draw(st.sampled_from(["fraud-autoencoder", "digit-diffusion"]))
        request = infer_request(model, valid_arrays(model, 1, draw(seeds)))
        key = "threshold" if model == "fraud-autoencoder" else "guidance"
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, -math.nan]))
        if draw(st.booleans()):
            request.parameters[key].double_param = value
        else:
            request.parameters[key].string_param = draw(st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999", "Infinity"]))
        return Case("oip", "ModelInfer", "oip.nonfinite", model, request, expect=EXPECT_INVALID, note=f"parameter {key}")
    model = draw(st.sampled_from(["fraud-autoencoder", "digit-classifier", "digit-classifier-robust"]))
    array = valid_arrays(model, draw(st.integers(1, 4)), draw(seeds))
    name = next(iter(array))
    a = array[name].astype(np.float64 if where == "fp64" else np.float32)
    flat = a.reshape(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if where == "fp64":
        request = oip.ModelInferRequest(model_name=model)
        add_tensor(request, name, "FP64", a.shape, a.tobytes())
    else:
        request = infer_request(model, {name: a}, typed=draw(st.booleans()))
    return Case("oip", "ModelInfer", "oip.nonfinite", model, request, expect=EXPECT_INVALID, note=f"{where} NaN/Inf")


@st.composite
def oip_bytes_flood(draw) -> Case:
    """BYTES tensors: many tiny elements, huge or truncated length prefixes, long typed lists."""
    model, arrays, name = _target_input(draw)
    kind = draw(st.sampled_from(["tiny", "huge_prefix", "truncated_prefix", "typed", "short"]))
    n = draw(st.sampled_from([1, 10, 1000, 100_000, 1_000_000]))
    shape = draw(st.sampled_from([[n], [n, 1], [1, n], list(arrays[name].shape)]))
    count = math.prod(shape)

    def build_raw() -> bytes:
        if kind == "tiny":
            return b"\0\0\0\0" * count
        if kind == "huge_prefix":
            return struct.pack("<I", draw_prefix) + b"x" * 8
        if kind == "truncated_prefix":
            return b"\x01\0\0\0x" * (count - 1) + b"\x01\0"
        return b"\0\0\0\0" * max(count // 2, 0)  # short: fewer elements than the shape

    draw_prefix = draw(st.sampled_from([0xFFFFFFFF, 2**31, 2**31 - 1, 1 << 24]))
    if kind == "typed":
        request = oip.ModelInferRequest(model_name=model)
        for nm, a in arrays.items():
            t = add_tensor(request, nm, "BYTES" if nm == name else SIGNATURES[model][nm][0],
                           shape if nm == name else a.shape)
            if nm == name:
                t.contents.bytes_contents.extend([b""] * min(count, 100_000))
            else:
                getattr(t.contents, RIGHT_FIELD[SIGNATURES[model][nm][0]]).extend(a.ravel().tolist())
        return Case("oip", "ModelInfer", "oip.bytes_flood", model, request, expect=EXPECT_INVALID,
                    note=f"input {name!r} BYTES typed x{min(count, 100_000)} shape {shape}")

    def build() -> bytes:
        request = _rebuild(model, arrays, name, lambda r: add_tensor(r, name, "BYTES", shape, build_raw()))
        return request.SerializeToString()

    return Case("oip", "ModelInfer", "oip.bytes_flood", model, build=build, expect=EXPECT_INVALID,
                note=f"ModelInfer model={model} input {name!r} BYTES {kind} shape {shape}"
                     + (f" prefix {draw_prefix}" if kind == "huge_prefix" else ""))


@st.composite
def oip_names(draw) -> Case:
    """Unknown, missing, duplicate, empty and long input and output names; raw entry counts."""
    model = draw(st.sampled_from(MODELS))
    arrays = valid_arrays(model, draw(rows_for(model)), draw(seeds))
    request = infer_request(model, arrays)
    kind = draw(st.sampled_from(["unknown_input", "missing_input", "duplicate_input", "renamed_input",
                                 "extra_raw", "missing_raw", "unknown_output", "duplicate_output", "long_name",
                                 "odd_name"]))
    expect = EXPECT_INVALID
    name = draw(st.one_of(st.sampled_from(["", " ", "x" * 100_000, "images\x00", "transactions ", "INPUT0",
                                           "label", "user", "images", "transactions"]), st.text(max_size=16)))
    if kind == "unknown_input":
        add_tensor(request, name or "extra", "FP32", [1], b"\0" * 4)
        if name in arrays:  # a duplicate, then
            pass
    elif kind == "missing_input":
        del request.inputs[0]
        del request.raw_input_contents[0]
    elif kind == "duplicate_input":
        request.inputs.append(request.inputs[0])
        request.raw_input_contents.append(request.raw_input_contents[0])
    elif kind == "renamed_input":
        if name in SIGNATURES[model] and len(SIGNATURES[model]) == 1:
            expect = None
        request.inputs[0].name = name
    elif kind == "extra_raw":
        request.raw_input_contents.append(b"\0" * draw(st.integers(0, 64)))
    elif kind == "missing_raw":
        del request.raw_input_contents[-1]
    elif kind == "unknown_output":
        request.outputs.add(name=name)
        if name in OUTPUTS[model]:
            expect = None
    elif kind == "duplicate_output":
        out = draw(st.sampled_from(OUTPUTS[model]))
        request.outputs.add(name=out)
        request.outputs.add(name=out)
        expect = None
    elif kind == "long_name":
        request.inputs[0].name = "i" * draw(st.sampled_from([1000, 100_000, 1_000_000]))
    else:
        request.inputs[0].name = draw(st.sampled_from(["\x00", "\n", "\u202e", "\U0001f600", "%s%n", "'; --"]))
    return Case("oip", "ModelInfer", "oip.names", model, request, expect=expect, note=kind)


@st.composite
def oip_model_version(draw) -> Case:
    """Unknown models and versions on every per-model RPC; a few served ones in between."""
    method = draw(st.sampled_from(["ModelInfer", "ModelInfer", "ModelMetadata", "ModelReady", "ModelConfig",
                                   "ModelStatistics"]))
    name, version = draw(model_names), draw(versions)
    served = name in SIGNATURES and version_is(version) == "served"
    unclear = name in SIGNATURES and version_is(version) == "unclear"
    if method == "ModelInfer":
        target = name if name in SIGNATURES else draw(st.sampled_from(MODELS))
        request = infer_request(target, valid_arrays(target, 1, draw(seeds)))
        request.model_name, request.model_version = name, version
        if unclear:
            expect = None
        elif served and name == target:
            expect = EXPECT_VALID
        elif served:
            expect = EXPECT_INVALID  # a served model, another model's inputs
        else:
            expect = EXPECT_NOT_FOUND
    else:
        request = getattr(oip, f"{method}Request")(name=name, version=version)
        if served or (method == "ModelStatistics" and name == "" and version == ""):
            expect = frozenset({OK})
        elif unclear or (method == "ModelStatistics" and name == ""):
            expect = None  # every model at that version: NOT_FOUND for a version none serves
        else:
            expect = EXPECT_NOT_FOUND
    return Case("oip", method, "oip.model_version", name, request, expect=expect)


PARAMETER_KEYS = st.one_of(
    st.sampled_from(sorted({p for ps in MODEL_PARAMETERS.values() for p in ps})),
    st.sampled_from(RESERVED_PARAMETERS),
    st.sampled_from(["triton_enable_empty_final_response", "binary_data_output", "shared_memory_region",
                     "classification", "temperature", "", "x" * 10_000, "threshold\x00", "K"]),
    st.text(max_size=12),
)


@st.composite
def parameter_values(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["bool", "int64", "uint64", "double", "string", "empty"]))
    value = {"bool": st.booleans(), "int64": int64s, "uint64": uint64s, "double": doubles, "string": odd_text,
             "empty": st.none()}[kind]
    return kind, draw(value)


@st.composite
def oip_parameters(draw) -> Case:
    """Request, input and output parameters of every kind, known and unknown, in and out of range."""
    model = draw(st.sampled_from(MODELS))
    request = infer_request(model, valid_arrays(model, draw(rows_for(model)), draw(seeds)))
    params = draw(st.dictionaries(PARAMETER_KEYS, parameter_values(), min_size=1, max_size=4))
    where = draw(st.sampled_from(["request", "request", "input", "output"]))
    target = (request.parameters if where == "request" else request.inputs[0].parameters if where == "input"
              else request.outputs.add(name=OUTPUTS[model][0]).parameters)
    for key, (kind, value) in params.items():
        set_parameter(target, key, kind, value)
    expect = None
    if where == "request":
        accepted = set(MODEL_PARAMETERS[model]) | set(RESERVED_PARAMETERS)
        unknown = [k for k in params if k not in accepted and not k.startswith("triton_")]
        empty = [k for k, (kind, _) in params.items() if kind == "empty"]
        if unknown or empty:
            expect = EXPECT_INVALID
    elif where == "input" and "shared_memory_region" in params:
        expect = EXPECT_INVALID
    desc = ", ".join(f"{k[:20]!r}={kind}:{v!r:.40}" for k, (kind, v) in params.items())
    return Case("oip", "ModelInfer", "oip.parameters", model, request, expect=expect, note=f"{where} params {desc}")


@st.composite
def oip_values(draw) -> Case:
    """Model-specific values: labels, user and neighbour ids, booleans, extreme finite floats."""
    model = draw(st.sampled_from(MODELS))
    rows = draw(st.integers(1, 4))
    arrays = valid_arrays(model, rows, draw(seeds))
    ids = st.sampled_from([INT64_MIN, -(2**31), -2, -1, 0, 9, 10, 11, 4999, 5000, 2**31, INT64_MAX])
    note = ""
    if model in ("digit-dcgan", "digit-diffusion"):
        arrays["label"][draw(st.integers(0, rows - 1))] = draw(ids)
        note = f"labels {arrays['label'].tolist()}"
    elif model == "graph-recommender":
        width = draw(st.sampled_from([1, 2, 8, MAX_NEIGHBORS, MAX_NEIGHBORS + 1, 4096]))
        neighbors = np.full((rows, width), -1, np.int64)
        for i in range(rows):
            neighbors[i, 0] = draw(ids)
        arrays["neighbors"] = neighbors
        arrays["user"][:] = draw(ids)
        note = f"user {arrays['user'][0]} neighbors[:,0] {neighbors[:, 0].tolist()} width {width}"
        if draw(st.booleans()):  # BOOL bytes other than 0 and 1
            raw = bytes([draw(st.sampled_from([0, 1, 2, 255]))]) * rows
            request = _rebuild(model, arrays, "exclude_known",
                               lambda r: add_tensor(r, "exclude_known", "BOOL", [rows], raw))
            return Case("oip", "ModelInfer", "oip.values", model, request, note=note + f" exclude_known bytes {raw[:1]!r}")
    else:
        name = next(iter(arrays))
        flat = arrays[name].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([3.4028235e38, -3.4028235e38, 1e-45, -1.0, 2.0, 1e30]))
        note = "extreme finite values"
    return Case("oip", "ModelInfer", "oip.values", model, infer_request(model, arrays), note=note)


@st.composite
def oip_batch_limits(draw) -> Case:
    """Batches of 0, the row limit, just over it; inputs whose batch sizes differ."""
    model = draw(st.sampled_from(MODELS))
    rows = draw(st.sampled_from([0, 1, MAX_COUNT, MAX_COUNT + 1, MAX_ROWS, MAX_ROWS + 1, 4097]))
    arrays = valid_arrays(model, max(rows, 1), draw(seeds))
    if rows == 0:
        arrays = {n: a[:0] for n, a in arrays.items()}
    mismatch = len(arrays) > 1 and draw(st.booleans())
    if mismatch:
        first = next(iter(arrays))
        arrays[first] = arrays[first][: max(rows - 1, 0)] if rows > 1 else np.concatenate([arrays[first]] * 2)
    request = infer_request(model, arrays, typed=draw(st.integers(0, 3)) == 0)
    expect = None
    if rows == 0 or rows > MAX_ROWS or mismatch:
        expect = EXPECT_INVALID
    elif model in ("digit-dcgan", "digit-diffusion"):
        expect = EXPECT_VALID if rows <= MAX_COUNT else EXPECT_INVALID
    return Case("oip", "ModelInfer", "oip.batch_limits", model, request, expect=expect,
                note=f"rows {rows}{' mismatched' if mismatch else ''}")


@st.composite
def oip_metadata(draw) -> Case:
    """The server-level RPCs, and the per-model ones with served names."""
    method = draw(st.sampled_from(["ServerLive", "ServerReady", "ServerMetadata", "RepositoryIndex",
                                   "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics"]))
    if method == "RepositoryIndex":
        name = draw(st.one_of(st.just(""), odd_text))
        request = oip.RepositoryIndexRequest(repository_name=name, ready=draw(st.booleans()))
        return Case("oip", method, "oip.metadata", "", request, expect=frozenset({OK}) if not name else EXPECT_NOT_FOUND)
    if method.startswith("Server"):
        return Case("oip", method, "oip.metadata", "", getattr(oip, f"{method}Request")(), expect=frozenset({OK}))
    name = draw(st.sampled_from(MODELS + ("",)))
    request = getattr(oip, f"{method}Request")(name=name, version=draw(st.sampled_from(["", "1"])))
    ok = name != "" or method == "ModelStatistics"
    return Case("oip", method, "oip.metadata", name, request, expect=frozenset({OK}) if ok else EXPECT_NOT_FOUND)


# ---------------------------------------------------------------------------- deepserve.v1


def _transaction(rng, width: int = 30, named: bool = False):
    if named:
        return v1.Transaction(named={n: float(v) for n, v in zip(FEATURE_NAMES, rng.standard_normal(30))})
    return v1.Transaction(features=(rng.standard_normal(width) * 5).tolist())


@st.composite
def v1_valid(draw) -> Case:
    method = draw(st.sampled_from(["Score", "Classify", "Classify", "Generate", "GenerateStream", "Recommend",
                                   "ListModels"]))
    rng = np.random.default_rng(draw(seeds))
    version = draw(st.sampled_from(["", "1"]))
    if method == "Score":
        named = draw(st.booleans())
        request = v1.ScoreRequest(model=draw(st.sampled_from(["", "fraud-autoencoder"])), version=version,
                                  transactions=[_transaction(rng, named=named) for _ in range(draw(st.integers(1, 8)))])
        if draw(st.booleans()):
            request.threshold = draw(st.floats(-1e6, 1e6))
        model = request.model or "fraud-autoencoder"
    elif method == "Classify":
        model = draw(st.sampled_from(["", "digit-classifier", "digit-classifier-robust"]))
        images = []
        for _ in range(draw(st.integers(1, 6))):
            if draw(st.booleans()):
                images.append(v1.Image(pixels=rng.random(64).tolist()))
            else:
                size = draw(st.sampled_from([(8, 8), (28, 28), (1, 1), (64, 32)]))
                mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1", "LA"]))
                images.append(v1.Image(png=pil_png(size, mode, int(rng.integers(0, 2**31)))))
        request = v1.ClassifyRequest(model=model, version=version, images=images, top_k=draw(st.integers(0, 10)))
        model = model or "digit-classifier"
    elif method in ("Generate", "GenerateStream"):
        model = draw(st.sampled_from(["", "digit-diffusion", "digit-dcgan"]))
        request = v1.GenerateRequest(model=model, version=version, count=draw(st.integers(0, 4)))
        if draw(st.booleans()):
            request.label = draw(st.integers(0, 9))
        if draw(st.booleans()):
            request.seed = draw(uint64s)
        if model != "digit-dcgan":
            request.steps = draw(st.integers(0, 8))
            if draw(st.booleans()):
                request.guidance = draw(st.floats(0.0, 20.0, width=32))
            request.sampler = draw(st.sampled_from(["", "ddim", "ddpm"]))
            if method == "GenerateStream":
                request.preview_every = draw(st.integers(0, max(request.steps, 1)))
                if request.steps == 0:
                    request.preview_every = min(request.preview_every, 20)
        else:
            request.sampler = draw(st.sampled_from(["", "gan"]))
            request.steps = draw(st.sampled_from([0, 1]))
        model = model or "digit-diffusion"
    elif method == "Recommend":
        request = v1.RecommendRequest(model=draw(st.sampled_from(["", "graph-recommender"])), version=version,
                                      k=draw(st.integers(0, MAX_K)))
        if draw(st.booleans()):
            request.user = draw(st.integers(0, NUM_USERS - 1))
        else:
            request.neighbors.extend(draw(st.lists(st.integers(0, NUM_USERS - 1), min_size=1, max_size=20)))
        if draw(st.booleans()):
            request.exclude_known = draw(st.booleans())
        model = "graph-recommender"
    else:
        request, model = v1.ListModelsRequest(), ""
    return Case("v1", method, "v1.valid", model, request, expect=EXPECT_VALID)


@st.composite
def v1_score(draw) -> Case:
    """Transactions that are missing, short, long, named wrong, both forms, NaN, huge; thresholds."""
    rng = np.random.default_rng(draw(seeds))
    kind = draw(st.sampled_from(["width", "named", "both", "neither", "mixed", "nonfinite", "threshold", "many",
                                 "overflow"]))
    rows = draw(st.integers(1, 4))
    request = v1.ScoreRequest(model=draw(st.sampled_from(["", "fraud-autoencoder"])))
    expect = EXPECT_INVALID
    if kind == "width":
        width = draw(st.sampled_from([0, 1, 29, 31, 300, 100_000]))
        request.transactions.extend([_transaction(rng, width) for _ in range(rows)])
        if width == 0:
            request.transactions[0].ClearField("features")
    elif kind == "named":
        names = draw(st.lists(st.one_of(st.sampled_from(FEATURE_NAMES), st.text(max_size=8)), max_size=40))
        request.transactions.add(named={n: 0.5 for n in names})
        if set(names) == set(FEATURE_NAMES):
            expect = EXPECT_VALID
    elif kind == "both":
        t = _transaction(rng)
        t.named.update({"Time": 1.0})
        request.transactions.append(t)
    elif kind == "neither":
        request.transactions.extend([_transaction(rng)] * (rows - 1) + [v1.Transaction()])
    elif kind == "mixed":
        request.transactions.extend([_transaction(rng), _transaction(rng, named=True)])
    elif kind == "nonfinite":
        t = _transaction(rng, named=draw(st.booleans()))
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300]))  # 1e300 is inf as float32
        if t.named:
            t.named[draw(st.sampled_from(FEATURE_NAMES))] = bad
        else:
            t.features[draw(st.integers(0, 29))] = bad
        request.transactions.append(t)
    elif kind == "threshold":
        request.transactions.append(_transaction(rng))
        request.threshold = draw(doubles)
        expect = EXPECT_VALID if math.isfinite(request.threshold) else EXPECT_INVALID
    elif kind == "many":
        count = draw(st.sampled_from([MAX_ROWS, MAX_ROWS + 1, 10_000]))
        row = _transaction(rng)
        request.transactions.extend([row] * count)
        expect = EXPECT_VALID if count <= MAX_ROWS else EXPECT_INVALID
    else:  # many empty transactions: a flood of tiny messages
        request.transactions.extend([v1.Transaction()] * draw(st.sampled_from([1000, 100_000])))
    return Case("v1", "Score", "v1.score", "fraud-autoencoder", request, expect=expect, note=kind)


@st.composite
def v1_classify(draw) -> Case:
    """Pixel counts and ranges, both or neither form, top_k, image counts."""
    rng = np.random.default_rng(draw(seeds))
    kind = draw(st.sampled_from(["count", "range", "both", "neither", "top_k", "many", "empty"]))
    model = draw(st.sampled_from(["", "digit-classifier", "digit-classifier-robust"]))
    request = v1.ClassifyRequest(model=model)
    expect = EXPECT_INVALID
    if kind == "count":
        n = draw(st.sampled_from([1, 63, 65, 784, 100_000]))
        request.images.add(pixels=rng.random(n).tolist())
    elif kind == "range":
        pixels = rng.random(64)
        pixels[draw(st.integers(0, 63))] = draw(st.sampled_from([-1e-6, 1.0000001, 2.0, -1.0, math.nan, math.inf, 1e39]))
        request.images.add(pixels=pixels.tolist())
    elif kind == "both":
        request.images.add(pixels=rng.random(64).tolist(), png=pil_png((8, 8), "L", 0))
    elif kind == "neither":
        request.images.add(pixels=rng.random(64).tolist())
        request.images.add()
    elif kind == "top_k":
        request.images.add(pixels=rng.random(64).tolist())
        request.top_k = draw(st.sampled_from([0, 1, 10, 11, 2**31, 2**32 - 1]))
        expect = EXPECT_VALID if request.top_k <= 10 else EXPECT_INVALID
    elif kind == "many":
        count = draw(st.sampled_from([MAX_ROWS, MAX_ROWS + 1, 5000]))
        image = v1.Image(pixels=rng.random(64).tolist()) if draw(st.booleans()) else v1.Image(png=pil_png((8, 8), "L", 1))
        request.images.extend([image] * count)
        expect = EXPECT_VALID if count <= MAX_ROWS else EXPECT_INVALID
    return Case("v1", "Classify", "v1.classify", model or "digit-classifier", request, expect=expect, note=kind)


@st.composite
def v1_generate(draw) -> Case:
    """Generation options at, inside and beyond their limits, for both generators."""
    model = draw(st.sampled_from(["", "digit-diffusion", "digit-dcgan"]))
    method = draw(st.sampled_from(["Generate", "GenerateStream"]))
    request = v1.GenerateRequest(model=model)
    if draw(st.booleans()):
        request.label = draw(st.sampled_from([-(2**31), -2, -1, 0, 9, 10, 11, 2**31 - 1]))
    request.count = draw(st.sampled_from([0, 1, 2, 3, 64, 65, 1000, 2**32 - 1]))
    if draw(st.booleans()):
        request.seed = draw(uint64s)
    request.steps = draw(st.sampled_from([0, 1, 2, 5, 20, 50, 1000, 1001, 2**32 - 1]))
    if draw(st.booleans()):
        request.guidance = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0, 7.5, 20.0, 20.5, 3e38]))
    request.sampler = draw(st.one_of(st.sampled_from(["", "ddim", "ddpm", "gan", "DDIM", "euler"]), odd_text))
    request.preview_every = draw(st.sampled_from([0, 0, 1, 5, 1001, 2**32 - 1]))
    return Case("v1", method, "v1.generate", model or "digit-diffusion", request)


@st.composite
def v1_recommend(draw) -> Case:
    """User and neighbour ids unknown, negative, huge, duplicated, too many; k beyond its range."""
    request = v1.RecommendRequest(model=draw(st.sampled_from(["", "graph-recommender"])))
    ids = st.one_of(st.sampled_from([INT64_MIN, -2, -1, 0, 1, 4999, 5000, 2**31, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX))
    if draw(st.booleans()):
        request.user = draw(ids)
    kind = draw(st.sampled_from(["few", "duplicates", "limit", "over", "flood"]))
    if kind == "few":
        request.neighbors.extend(draw(st.lists(ids, max_size=6)))
    elif kind == "duplicates":
        request.neighbors.extend([draw(st.integers(0, NUM_USERS - 1))] * draw(st.sampled_from([2, 1024, 5000])))
    else:
        count = {"limit": MAX_NEIGHBORS, "over": MAX_NEIGHBORS + 1, "flood": 200_000}[kind]
        request.neighbors.extend(np.random.default_rng(draw(seeds)).integers(0, NUM_USERS, count).tolist())
    request.k = draw(st.sampled_from([0, 1, 100, 101, 2**31, 2**32 - 1]))
    if draw(st.booleans()):
        request.exclude_known = draw(st.booleans())
    expect = EXPECT_INVALID if kind in ("over", "flood") or request.k > MAX_K else None
    return Case("v1", "Recommend", "v1.recommend", "graph-recommender", request, expect=expect, note=kind)


V1_METHODS = {"Score": ("fraud-autoencoder", "anomaly"), "Classify": ("digit-classifier", "classifier"),
              "Generate": ("digit-diffusion", "generator"), "GenerateStream": ("digit-diffusion", "generator"),
              "Recommend": ("graph-recommender", "recommender")}
KINDS = {"fraud-autoencoder": "anomaly", "digit-classifier": "classifier", "digit-classifier-robust": "classifier",
         "digit-dcgan": "generator", "digit-diffusion": "generator", "graph-recommender": "recommender"}


def version_is(version: str) -> str:
    """"served" ("" or "1"), "other" (certainly not version 1), or "unclear" ("01", " 1": a server
    may read them as 1 or refuse them)."""
    if version in ("", "1"):
        return "served"
    try:
        return "unclear" if int(version) == 1 else "other"
    except ValueError:
        return "other"


def v1_request(method: str, model: str, version: str, rng):
    """A request to ``method`` that is valid but for its model and version."""
    if method == "Score":
        return v1.ScoreRequest(model=model, version=version, transactions=[_transaction(rng)])
    if method == "Classify":
        return v1.ClassifyRequest(model=model, version=version, images=[v1.Image(pixels=rng.random(64).tolist())])
    if method in ("Generate", "GenerateStream"):
        return v1.GenerateRequest(model=model, version=version, steps=0 if model == "digit-dcgan" else 2)
    return v1.RecommendRequest(model=model, version=version, user=int(rng.integers(0, NUM_USERS)))


@st.composite
def v1_model_version(draw) -> Case:
    """Unknown models and versions, and served models of the wrong kind, on every typed RPC."""
    method = draw(st.sampled_from(sorted(V1_METHODS)))
    name, version = draw(model_names), draw(versions)
    request = v1_request(method, name, version, np.random.default_rng(draw(seeds)))
    resolved = name or V1_METHODS[method][0]
    if resolved not in KINDS:
        expect = EXPECT_NOT_FOUND
    elif version_is(version) != "served":
        expect = EXPECT_NOT_FOUND if version_is(version) == "other" else None
    elif KINDS[resolved] != V1_METHODS[method][1]:
        expect = EXPECT_INVALID
    else:
        expect = EXPECT_VALID
    return Case("v1", method, "v1.model_version", name, request, expect=expect)


# ---------------------------------------------------------------------------- hostile PNGs


def pil_png(size: tuple[int, int], mode: str, seed: int) -> bytes:
    """A well-formed PNG that Pillow writes (any mode)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), "L").convert(mode)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def other_formats() -> dict[str, bytes]:
    """The same small image in the formats Pillow reads besides PNG (each must be refused)."""
    from PIL import Image

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    out = {}
    for fmt in ("GIF", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA", "PCX"):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
        except (OSError, KeyError, ValueError):
            continue
        out[fmt] = buffer.getvalue()
    return out


CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
VALID_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SANE_SIDE = 4096  # images larger than this (the models take 8x8) must be refused, not decoded
FULL_DATA_LIMIT = 200 * 1024 * 1024  # largest pixel data built (all zeros: a decompression bomb)


def chunk(kind: bytes, data: bytes, crc_ok: bool = True, length: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data) if length is None else length) + kind + data + struct.pack(
        ">I", crc if crc_ok else crc ^ 0xDEADBEEF)


@functools.lru_cache(maxsize=64)
def zero_pixels(row_bytes: int, height: int) -> bytes:
    """zlib of ``height`` all-zero rows (filter byte + pixels): a few hundred KB for 144 MB."""
    compressor = zlib.compressobj(9)
    row = b"\0" * row_bytes
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return b"".join(parts)


@dataclass
class PngSpec:
    width: int
    height: int
    depth: int = 8
    color: int = 0
    interlace: int = 0
    compression: int = 0
    filter_method: int = 0
    data: str = "full"  # full | tiny | none | garbage | split | extra
    plte: bool = True
    trns: bool = False
    bad_crc: str = ""  # "", IHDR, PLTE, IDAT, IEND
    truncate: float = 0.0  # keep this fraction of the file (0: all)
    ancillary: str = ""  # "", ztxt_bomb, iccp_bomb, text_huge_length, unknown_critical
    iend: bool = True
    image_end: int = 0  # set by build(): where the last IDAT chunk ends
    size: int = 0  # set by build(): the file's length

    def row_bytes(self) -> int:
        return 1 + (self.width * CHANNELS.get(self.color, 1) * self.depth + 7) // 8

    def pixel_bytes(self) -> int:
        return self.row_bytes() * self.height

    def broken(self) -> list[str]:
        """Why a correct PNG reader must refuse this file (empty: it may decode it). Call after
        :meth:`build`. What readers commonly let pass (a missing or damaged IEND after complete
        image data, surplus image data) is not counted."""
        why = []
        if self.color not in CHANNELS or self.depth not in VALID_DEPTHS.get(self.color, ()):
            why.append("invalid color type / bit depth")
        if self.compression or self.filter_method or self.interlace not in (0, 1):
            why.append("invalid IHDR method byte")
        if self.width == 0 or self.height == 0:
            why.append("zero size")
        if self.color == 3 and not self.plte:
            why.append("palette image without PLTE")
        if self.bad_crc == "IHDR" or (self.bad_crc == "PLTE" and self.color == 3 and self.plte) or (
                self.bad_crc == "IDAT" and self.data != "none"):
            why.append(f"bad {self.bad_crc} CRC")
        # Adam7 adds a filter byte per row of each pass, so interlaced data is longer than the
        # `full` (non-interlaced) data built; except one pixel wide, where every row is in one
        # pass exactly once and the sizes are equal: such a file is whole, and valid.
        if self.data in ("none", "garbage") or (self.data == "tiny" and self.pixel_bytes() > 100) or (
                self.interlace == 1 and self.width > 1 and self.data in ("full", "split")):
            why.append("missing or short image data")
        if self.truncate and self.size < self.image_end:
            why.append("truncated inside the image data")
        if self.ancillary in ("iccp_bomb", "text_huge_length", "unknown_critical"):
            why.append(self.ancillary)
        return why

    def sane_size(self) -> bool:
        return 1 <= self.width <= MAX_SANE_SIDE and 1 <= self.height <= MAX_SANE_SIDE

    def build(self) -> bytes:
        header = struct.pack(">IIBBBBB", self.width, self.height, self.depth, self.color, self.compression,
                             self.filter_method, self.interlace)
        parts = [PNG_SIGNATURE, chunk(b"IHDR", header, self.bad_crc != "IHDR")]
        if self.ancillary == "iccp_bomb":
            parts.append(chunk(b"iCCP", b"icc\0\0" + zero_pixels(1 << 16, 256)))  # 16 MB profile
        if self.ancillary == "ztxt_bomb":
            parts.append(chunk(b"zTXt", b"Comment\0\0" + zero_pixels(1 << 16, 256)))
        if self.ancillary == "text_huge_length":
            parts.append(chunk(b"tEXt", b"a\0b", length=0x7FFFFFFF))
        if self.ancillary == "unknown_critical":
            parts.append(chunk(b"ABCD", b"\0" * 8))  # an uppercase first letter: critical, must be understood
        if self.color == 3 and self.plte:
            parts.append(chunk(b"PLTE", bytes(range(48)) * 16, self.bad_crc != "PLTE"))
        if self.trns:
            parts.append(chunk(b"tRNS", b"\0\x01" if self.color == 0 else b"\0" * 6 if self.color == 2 else b"\x80" * 16))
        if self.data in ("full", "split", "extra"):
            pixels = zero_pixels(self.row_bytes(), self.height)
            if self.data == "extra":
                pixels = zlib.compress(b"\0" * (self.row_bytes() * (self.height + 100)))
        elif self.data == "tiny":
            pixels = zlib.compress(b"\0" * 100)
        elif self.data == "garbage":
            pixels = b"\x78\x9c" + bytes(range(256))
        else:
            pixels = b""
        if self.data == "split" and len(pixels) > 2:
            half = len(pixels) // 2
            parts += [chunk(b"IDAT", pixels[:half], self.bad_crc != "IDAT"), chunk(b"IDAT", pixels[half:])]
        elif self.data != "none":
            parts.append(chunk(b"IDAT", pixels, self.bad_crc != "IDAT"))
        self.image_end = sum(map(len, parts))
        if self.iend:
            parts.append(chunk(b"IEND", b"", self.bad_crc != "IEND"))
        data = b"".join(parts)
        if self.truncate:
            data = data[: int(len(data) * self.truncate)]
        self.size = len(data)
        return data


SIDES = (0, 1, 8, 28, 64, 1000, 4096, 4097, 12000, 100000, 2**31 - 1, 2**32 - 1)


@st.composite
def png_specs(draw) -> PngSpec:
    color = draw(st.sampled_from([0, 0, 2, 3, 4, 6, 1, 5, 7]))
    depth = draw(st.sampled_from(VALID_DEPTHS.get(color, (8,)) + (8, 3, 0, 32)))
    w, h = draw(st.sampled_from(SIDES)), draw(st.sampled_from(SIDES))
    if draw(st.booleans()):  # half of them small: the header and chunk abuse matter there
        w, h = draw(st.sampled_from((1, 8, 28))), draw(st.sampled_from((1, 8, 28)))
    spec = PngSpec(
        w, h, depth, color,
        interlace=draw(st.sampled_from([0, 0, 0, 1, 2])),
        compression=draw(st.sampled_from([0, 0, 0, 0, 1])),
        filter_method=draw(st.sampled_from([0, 0, 0, 0, 1])),
        data=draw(st.sampled_from(["full", "full", "full", "tiny", "none", "garbage", "split", "extra"])),
        plte=draw(st.booleans()) or color != 3,
        trns=draw(st.integers(0, 4)) == 0,
        bad_crc=draw(st.sampled_from(["", "", "", "", "IHDR", "PLTE", "IDAT", "IEND"])),
        truncate=draw(st.sampled_from([0.0] * 6 + [0.1, 0.5, 0.9, 0.99])),
        ancillary=draw(st.sampled_from([""] * 6 + ["ztxt_bomb", "iccp_bomb", "text_huge_length", "unknown_critical"])),
        iend=draw(st.integers(0, 7)) != 0,
    )
    if spec.data in ("full", "split", "extra") and spec.pixel_bytes() > FULL_DATA_LIMIT:
        spec.data = "tiny"  # too big to build: the header declares it, the data is a stub
    return spec


@st.composite
def v1_png(draw) -> Case:
    """Hostile PNGs for Classify: not PNG, truncated, bad CRCs, huge declared sizes, decompression
    bombs, palette/alpha/16-bit variants, zero sizes."""
    kind = draw(st.sampled_from(["spec", "spec", "spec", "spec", "other_format", "prefix", "mutated", "bomb"]))
    model = draw(st.sampled_from(["", "digit-classifier", "digit-classifier-robust"]))
    expect = EXPECT_INVALID
    if kind == "other_format":
        fmt = draw(st.sampled_from(sorted(other_formats())))
        data, note = other_formats()[fmt], f"a {fmt} file"
    elif kind == "prefix":
        data = draw(st.sampled_from([b"", b"\x89", PNG_SIGNATURE, PNG_SIGNATURE + b"\0" * 8, b"GIF89a", b"\xff\xd8\xff",
                                     b"BM", b"II*\0", b"RIFF\0\0\0\0WEBPVP8 ", b"\0" * 64, b"<svg/>", b"%PDF-1.4"]))
        note = f"starts {data[:16]!r}"
        if not data:
            expect = EXPECT_INVALID  # neither form set
    elif kind == "mutated":
        good = bytearray(pil_png((8, 8), draw(st.sampled_from(["L", "RGB", "P", "RGBA"])), draw(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            good[draw(st.integers(8, len(good) - 1))] ^= 1 << draw(st.integers(0, 7))
        data, note, expect = bytes(good), "a Pillow PNG with flipped bits", None
    elif kind == "bomb":
        side = draw(st.sampled_from([(12000, 12000), (100000, 1), (1, 100000), (100000, 1000), (16384, 8192)]))
        spec = PngSpec(*side, depth=draw(st.sampled_from([8, 1])), color=0)
        data, note = spec.build(), f"{side[0]}x{side[1]} all-zero pixels, {spec.pixel_bytes() >> 20} MiB inflated"
    else:
        spec = draw(png_specs())
        data = spec.build()
        note = (f"{spec.width}x{spec.height} color {spec.color} depth {spec.depth} interlace {spec.interlace} "
                f"data {spec.data} crc {spec.bad_crc or 'ok'} truncate {spec.truncate} {spec.ancillary} "
                f"iend {spec.iend} comp {spec.compression} filter {spec.filter_method} plte {spec.plte} trns {spec.trns}")
        broken = spec.broken()
        note += f" broken: {', '.join(broken)}" if broken else ""
        expect = EXPECT_INVALID if broken or not spec.sane_size() else None
    return png_case(data, f"{kind}: {note}", expect, model, good_before=draw(st.sampled_from([0, 0, 0, 1, 3])))


def png_case(data: bytes, note: str, expect, model: str = "", good_before: int = 0) -> Case:
    """Classify with the PNG ``data``, after ``good_before`` good images."""
    images = [v1.Image(pixels=[0.5] * 64)] * good_before + [v1.Image(png=data)]
    return Case("v1", "Classify", "v1.png", model or "digit-classifier", v1.ClassifyRequest(model=model, images=images),
                expect=expect, note=f"{note} ({len(data)} bytes)")


# ---------------------------------------------------------------------------- every RPC: UTF-8, wire, size


UTF8_FIELDS = (
    ("oip", "ModelInfer", "model_name"), ("oip", "ModelInfer", "model_version"), ("oip", "ModelInfer", "id"),
    ("oip", "ModelInfer", "input_name"), ("oip", "ModelInfer", "datatype"), ("oip", "ModelInfer", "param_key"),
    ("oip", "ModelInfer", "param_value"), ("oip", "ModelInfer", "output_name"),
    ("oip", "ModelInfer", "input_param_key"), ("oip", "ModelMetadata", "name"), ("oip", "ModelReady", "name"),
    ("oip", "ModelReady", "version"), ("oip", "ModelConfig", "name"), ("oip", "ModelStatistics", "name"),
    ("oip", "RepositoryIndex", "repository_name"), ("v1", "Score", "model"), ("v1", "Score", "version"),
    ("v1", "Score", "named_key"), ("v1", "Classify", "model"), ("v1", "Generate", "model"),
    ("v1", "Generate", "sampler"), ("v1", "GenerateStream", "sampler"), ("v1", "Recommend", "model"),
    ("v1", "Recommend", "version"), ("health", "Check", "service"),
)


def utf8_case(api: str, method: str, fieldname: str, model: str, bad: bytes) -> Case:
    """``method``'s request with the string field ``fieldname`` holding ``bad`` (invalid UTF-8):
    protobuf refuses to build such a message, so it goes as wire bytes."""
    mark = placeholder_for(bad)
    if method == "ModelInfer":
        message = infer_request(model, valid_arrays(model, 1, 0))
        if fieldname in ("model_name", "model_version", "id"):
            setattr(message, fieldname, mark)
        elif fieldname == "input_name":
            message.inputs[0].name = mark
        elif fieldname == "datatype":
            message.inputs[0].datatype = mark
        elif fieldname == "param_key":
            message.parameters[mark].int64_param = 1
        elif fieldname == "param_value":
            message.parameters["sampler" if "digit-d" in model else "threshold"].string_param = mark
        elif fieldname == "output_name":
            message.outputs.add(name=mark)
        else:
            message.inputs[0].parameters[mark].bool_param = True
    elif api == "oip":
        message = getattr(oip, f"{method}Request")(**{fieldname: mark})
    elif method == "Score":
        message = v1.ScoreRequest(transactions=[_transaction(np.random.default_rng(0), named=fieldname == "named_key")])
        if fieldname == "named_key":
            message.transactions[0].named[mark] = 1.0
        else:
            setattr(message, fieldname, mark)
    elif method == "Classify":
        message = v1.ClassifyRequest(model=mark, images=[v1.Image(pixels=[0.5] * 64)])
    elif method in ("Generate", "GenerateStream"):
        message = v1.GenerateRequest(steps=2, **{fieldname: mark})
    elif method == "Recommend":
        message = v1.RecommendRequest(user=1, **{fieldname: mark})
    else:
        from grpc_health.v1 import health_pb2

        message = health_pb2.HealthCheckRequest(service=mark)
    return Case(api, method, "utf8", model if method == "ModelInfer" else "", wire=with_bytes(message, mark, bad),
                expect=EXPECT_INVALID, note=f"{method} with {fieldname} = {bad!r}")


@st.composite
def invalid_utf8(draw) -> Case:
    """Invalid UTF-8 in string fields: names, versions, datatypes, parameter keys and values,
    map keys, ids."""
    api, method, fieldname = draw(st.sampled_from(UTF8_FIELDS))
    return utf8_case(api, method, fieldname, draw(st.sampled_from(MODELS)), draw(bad_utf8()))


def _sample_messages(rng) -> dict[tuple[str, str], bytes]:
    model = "fraud-autoencoder"
    return {
        ("oip", "ModelInfer"): infer_request(model, valid_arrays(model, 1, 0)).SerializeToString(),
        ("oip", "ModelMetadata"): oip.ModelMetadataRequest(name=model).SerializeToString(),
        ("oip", "ModelReady"): oip.ModelReadyRequest(name=model, version="1").SerializeToString(),
        ("oip", "ModelConfig"): oip.ModelConfigRequest(name="digit-diffusion").SerializeToString(),
        ("oip", "ModelStatistics"): oip.ModelStatisticsRequest(name=model).SerializeToString(),
        ("oip", "RepositoryIndex"): oip.RepositoryIndexRequest(ready=True).SerializeToString(),
        ("oip", "ServerReady"): b"",
        ("v1", "Score"): v1.ScoreRequest(transactions=[_transaction(rng)], threshold=0.5).SerializeToString(),
        ("v1", "Classify"): v1.ClassifyRequest(images=[v1.Image(pixels=[0.5] * 64)], top_k=3).SerializeToString(),
        ("v1", "Generate"): v1.GenerateRequest(model="digit-dcgan", label=3, count=2, seed=7).SerializeToString(),
        ("v1", "GenerateStream"): v1.GenerateRequest(steps=2, count=1, seed=7, preview_every=1).SerializeToString(),
        ("v1", "Recommend"): v1.RecommendRequest(user=1, neighbors=[2, 3], k=5).SerializeToString(),
        ("v1", "ListModels"): b"",
    }


@st.composite
def malformed_wire(draw) -> Case:
    """Protobuf encodings that are corrupt or strange: truncated, bit-flipped, wrong wire types,
    lengths past the end, overlong varints, deep groups, unknown fields, random bytes."""
    samples = _sample_messages(np.random.default_rng(0))
    api, method = draw(st.sampled_from(sorted(samples)))
    data = bytearray(samples[(api, method)])
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "bad_field", "random", "unknown_fields"]))
    if kind == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif kind == "flip" and data:
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "bad_field":
        data += draw(st.sampled_from([
            tag(1, 0) + varint(5),  # a string field sent as a varint
            tag(3, 2) + varint(2**31) + b"abc",  # a length far past the end
            tag(3, 2) + varint(2**64 - 1),
            tag(1, 0) + b"\xff" * 11,  # an overlong varint
            tag(7, 5) + b"\0\0",  # a truncated fixed32
            tag(0, 0) + b"\0",  # field number 0
            tag(2**29 - 1, 0) + b"\x01",  # the largest field number
            tag(19000, 0) + b"\x01",  # a reserved field number
            tag(9, 3) * 200 + tag(9, 4) * 200,  # nested groups, deeper than the recursion limit
            tag(9, 3) * 50 + tag(9, 4) * 50,
            tag(9, 4),  # an end group without a start
            tag(9, 6) + b"\0",  # wire type 6 does not exist
        ]))
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=256)))
    else:  # unknown fields of every wire type: a newer client's message, to be ignored
        data += tag(99, 0) + varint(draw(st.integers(0, 2**64 - 1))) + length_delimited(100, b"hello") + \
            tag(101, 1) + b"\0" * 8 + tag(102, 5) + b"\0" * 4
    expect = frozenset({OK}) if kind == "unknown_fields" and method in ("ServerReady", "ListModels",
                                                                          "ModelMetadata", "ModelReady") else None
    return Case(api, method, "wire", "", wire=bytes(data), expect=expect, note=kind)


OVERSIZE_METHODS = (("oip", "ModelInfer"), ("v1", "Classify"), ("v1", "Score"), ("oip", "ModelMetadata"))


@st.composite
def oversized(draw, max_message_bytes: int) -> Case:
    """Messages just over (and at) the server's message limit, built as wire bytes when sent."""
    delta = draw(st.one_of(st.sampled_from([1, 2, 100, 4096, 65536, 0, -1, -1000]), st.integers(-4096, 1 << 20)))
    return oversize_case(*draw(st.sampled_from(OVERSIZE_METHODS)), max_message_bytes, delta)


def oversize_case(api: str, method: str, max_message_bytes: int, delta: int) -> Case:
    """A ``method`` request of exactly ``max_message_bytes + delta`` bytes (one huge field)."""
    target = max_message_bytes + delta
    head = {
        ("oip", "ModelInfer"): infer_request("fraud-autoencoder", valid_arrays("fraud-autoencoder", 1, 0))
        .SerializeToString(),
        ("v1", "Classify"): v1.ClassifyRequest(model="digit-classifier").SerializeToString(),
        ("v1", "Score"): b"",
        ("oip", "ModelMetadata"): b"",
    }[(api, method)]

    nested = method == "Classify"  # the PNG sits in an Image inside the request

    def field_len(size: int) -> int:  # the bytes the added field takes, for a payload of ``size``
        inner = 1 + len(varint(size)) + size
        return 1 + len(varint(inner)) + inner if nested else inner

    def build() -> bytes:
        size = max(target - len(head) - 16, 0)
        for _ in range(4):  # the length prefixes' own size moves with the size: settle it
            size += target - len(head) - field_len(size)
        payload = b"\0" * size if method != "ModelMetadata" else b"1" * size
        # A raw entry, a PNG, an unknown field (legal, skipped: only the size is wrong), a version.
        number = {"ModelInfer": 7, "Classify": 2, "Score": 15, "ModelMetadata": 2}[method]
        data = length_delimited(number, payload)
        if nested:
            data = length_delimited(3, data)  # images / transactions
        assert len(head) + len(data) == target, (len(head) + len(data), target)
        return head + data

    expect = frozenset({EXHAUSTED}) if delta > 0 else None
    return Case(api, method, "oversize", "", build=build, expect=expect,
                note=f"{method} message of {target} bytes (limit {max_message_bytes}, {delta:+d})")


@st.composite
def short_deadlines(draw) -> Case:
    """Valid, heavier requests with deadlines too short to meet, from the client or as Triton's
    ``timeout`` parameter (microseconds)."""
    kind = draw(st.sampled_from(["client", "client", "timeout_parameter"]))
    which = draw(st.sampled_from(["fraud", "classifier-robust", "diffusion", "v1-generate", "v1-stream", "v1-classify"]))
    rng = draw(seeds)
    if which == "fraud":
        case = Case("oip", "ModelInfer", "deadline", "fraud-autoencoder",
                    infer_request("fraud-autoencoder", valid_arrays("fraud-autoencoder", MAX_ROWS, rng)))
    elif which == "classifier-robust":
        case = Case("oip", "ModelInfer", "deadline", "digit-classifier-robust",
                    infer_request("digit-classifier-robust", valid_arrays("digit-classifier-robust", MAX_ROWS, rng)))
    elif which == "diffusion":
        request = infer_request("digit-diffusion", valid_arrays("digit-diffusion", 8, rng))
        request.parameters["steps"].int64_param = 50
        case = Case("oip", "ModelInfer", "deadline", "digit-diffusion", request)
    elif which in ("v1-generate", "v1-stream"):
        case = Case("v1", "Generate" if which == "v1-generate" else "GenerateStream", "deadline", "digit-diffusion",
                    v1.GenerateRequest(count=8, steps=50, preview_every=10 if which == "v1-stream" else 0))
    else:
        case = Case("v1", "Classify", "deadline", "digit-classifier",
                    v1.ClassifyRequest(images=[v1.Image(pixels=[0.5] * 64)] * MAX_ROWS))
    if kind == "timeout_parameter" and case.method == "ModelInfer":
        case.message.parameters["timeout"].int64_param = draw(st.sampled_from([1, 10, 100, 1000]))
        case.note = f"timeout parameter {case.message.parameters['timeout'].int64_param} us"
    else:
        case.timeout = draw(st.sampled_from([0.001, 0.005, 0.02, 0.1]))
    return case


@st.composite
def health_checks(draw) -> Case:
    from grpc_health.v1 import health_pb2

    service = draw(st.one_of(st.sampled_from(("",) + MODELS), model_names))
    known = service in ("",) + MODELS
    return Case("health", "Check", "health", service, health_pb2.HealthCheckRequest(service=service),
                expect=frozenset({OK}) if known else EXPECT_NOT_FOUND)


# ---------------------------------------------------------------------------- pinned cases


def _tensor_case(category: str, model: str, name: str, datatype: str, shape, raw: bytes | None, note: str,
                 expect=EXPECT_INVALID) -> Case:
    arrays = valid_arrays(model, 1, 0)
    request = _rebuild(model, arrays, name, lambda r: add_tensor(r, name, datatype, shape, raw))
    if raw is None:  # typed contents (empty) for this input: the others go typed too
        request = oip.ModelInferRequest(model_name=model)
        for n, a in arrays.items():
            t = add_tensor(request, n, datatype if n == name else SIGNATURES[model][n][0], shape if n == name else a.shape)
            if n != name:
                getattr(t.contents, RIGHT_FIELD[SIGNATURES[model][n][0]]).extend(a.ravel().tolist())
    return Case("oip", "ModelInfer", category, model, request, expect=expect, note=note)


def pinned(max_message_bytes: int) -> dict[str, list[Case]]:
    """Cases every run sends (hypothesis's explicit examples): issue 12's own reproducers and
    the sharpest of each category, so that the small seeded run always covers them."""
    fraud = "fraud-autoencoder"
    return {
        "oip.shape": [
            _tensor_case("oip.shape", fraud, "transactions", "FP32", [0, 4611686018427387904], b"", "issue 12"),
            _tensor_case("oip.shape", fraud, "transactions", "FP32", [2**31, 2**31], b"", "int64 product 2^62"),
            _tensor_case("oip.shape", fraud, "transactions", "FP32", [2**32, 2**32], None, "product overflows int64"),
            _tensor_case("oip.shape", "graph-recommender", "neighbors", "INT64", [-1, 2], b"", "negative dimension"),
        ],
        "oip.bytes_flood": [
            Case("oip", "ModelInfer", "oip.bytes_flood", fraud, build=lambda: _rebuild(
                fraud, valid_arrays(fraud, 1, 0), "transactions",
                lambda r: add_tensor(r, "transactions", "BYTES", [1_000_000], b"\0" * 4_000_000)).SerializeToString(),
                 expect=EXPECT_INVALID, note="ModelInfer fraud-autoencoder 'transactions' BYTES [1000000] of empty elements"),
            _tensor_case("oip.bytes_flood", fraud, "transactions", "BYTES", [1], struct.pack("<I", 0xFFFFFFFF) + b"x",
                         "a 4 GiB length prefix"),
            _tensor_case("oip.bytes_flood", fraud, "transactions", "BYTES", [2], b"\1\0\0\0x\1\0", "a truncated prefix"),
        ],
        "v1.png": [
            png_case(PngSpec(12000, 12000).build(), "issue 12: 12000x12000 all-zero grayscale", EXPECT_INVALID),
            png_case(PngSpec(100000, 1).build(), "100000x1 grayscale", EXPECT_INVALID),
            png_case(PngSpec(100000, 100000, data="tiny").build(), "100000x100000 declared, 100 bytes of data",
                     EXPECT_INVALID, model="digit-classifier-robust"),
            png_case(PngSpec(2**31 - 1, 1, data="tiny").build(), "2^31-1 x 1 declared", EXPECT_INVALID),
            png_case(PngSpec(0, 0, data="tiny").build(), "0x0", EXPECT_INVALID),
            png_case(PngSpec(8, 8, bad_crc="IHDR").build(), "8x8 with a bad IHDR CRC", EXPECT_INVALID),
            png_case(PngSpec(8, 8, bad_crc="IDAT").build(), "8x8 with a bad IDAT CRC", EXPECT_INVALID),
            png_case(PngSpec(8, 8, color=3, plte=False).build(), "palette image without PLTE", EXPECT_INVALID),
            png_case(PngSpec(8, 8, depth=16).build(), "16-bit grayscale 8x8", None),
            png_case(other_formats()["GIF"], "a GIF", EXPECT_INVALID),
        ],
        "utf8": [
            utf8_case("oip", "ModelInfer", "model_name", fraud, b"ab\xffzz"),
            utf8_case("oip", "ModelReady", "name", fraud, b"ab\xffzz"),
            utf8_case("v1", "Score", "model", fraud, b"ab\xc3\x28zz"),
            utf8_case("oip", "ModelInfer", "param_key", fraud, b"ab\xed\xa0\x80zz"),
        ],
        "wire": [Case("oip", "ModelInfer", "wire", "", wire=b"\x0a\x10abc", note="truncated string field")],
        "oversize": [oversize_case("oip", "ModelInfer", max_message_bytes, 1),
                     oversize_case("v1", "Classify", max_message_bytes, 1)],
    }


# ---------------------------------------------------------------------------- the categories


@dataclass
class Category:
    strategy: st.SearchStrategy[Case]
    weight: int  # its share of a run's requests
    pinned: list = field(default_factory=list)  # cases sent in every run


def categories(max_message_bytes: int) -> dict[str, Category]:
    """Every category: its strategy, its weight and its pinned cases.

    Args:
        max_message_bytes: the server's message limit (the oversize category goes just past it).
    """
    weights = {
        "oip.valid": (oip_valid(), 10),
        "oip.datatype": (oip_datatype(), 6),
        "oip.shape": (oip_shape(), 8),
        "oip.byte_length": (oip_byte_length(), 4),
        "oip.typed_contents": (oip_typed_contents(), 6),
        "oip.nonfinite": (oip_nonfinite(), 4),
        "oip.bytes_flood": (oip_bytes_flood(), 4),
        "oip.names": (oip_names(), 5),
        "oip.model_version": (oip_model_version(), 5),
        "oip.parameters": (oip_parameters(), 8),
        "oip.values": (oip_values(), 5),
        "oip.batch_limits": (oip_batch_limits(), 3),
        "oip.metadata": (oip_metadata(), 3),
        "v1.valid": (v1_valid(), 10),
        "v1.score": (v1_score(), 5),
        "v1.classify": (v1_classify(), 4),
        "v1.png": (v1_png(), 8),
        "v1.generate": (v1_generate(), 5),
        "v1.recommend": (v1_recommend(), 4),
        "v1.model_version": (v1_model_version(), 4),
        "utf8": (invalid_utf8(), 5),
        "wire": (malformed_wire(), 6),
        "oversize": (oversized(max_message_bytes), 1),
        "deadline": (short_deadlines(), 2),
        "health": (health_checks(), 1),
    }
    extra = pinned(max_message_bytes)
    return {name: Category(strategy, weight, extra.get(name, [])) for name, (strategy, weight) in weights.items()}
