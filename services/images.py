"""Untrusted images in, generated images out: PNG only, judged by its header before decoding,
and decoded and encoded off the event loop.

A PNG states its width and height in its first 24 bytes (the IHDR chunk). A 136 KB PNG can
declare 12000 x 12000 pixels: decoding it takes the better part of a second and 144 MB, on
whichever thread does it. So :func:`decode_png` refuses a file whose declared size exceeds
the caller's bound before PIL reads a pixel.

Pillow is a lenient reader: it checks no CRC of the image data, ignores the header's method
bytes and unknown critical chunks, and makes up a palette a palette image lacks. So the file's
chunk structure is checked first, against the PNG specification (:func:`check_png`), and only
a well-formed file reaches Pillow, which must then read all of it: anything either refuses is
the client's ``INVALID_ARGUMENT``. The pixel work itself runs in :class:`Offloaded`, a small
thread pool with a bound on waiting jobs.
"""

from __future__ import annotations

import asyncio
import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import numpy as np

from deepserve.errors import InvalidInput, Overloaded

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")  # chunk length, chunk type, width, height
_IHDR_FIELDS = struct.Struct(">IIBBBBB")  # width, height, bit depth, colour type, compression, filter, interlace
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; then the data and its CRC-32 (of type + data)

# Colour type -> the bit depths it allows (PNG specification, 11.2.2).
BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")  # all a decoder must understand
MAX_CHUNKS = 4096  # a well-made PNG of the sizes served has a handful; this bounds the walk

T = TypeVar("T")


def png_size(data: bytes, what: str) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, without decoding it.

    Raises:
        InvalidInput: not a PNG, or no header.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInput(f"{what}: expected a PNG file (it starts with {PNG_SIGNATURE!r}); only PNG is accepted")
    if len(data) < len(PNG_SIGNATURE) + _IHDR.size:
        raise InvalidInput(f"{what}: a truncated PNG (no complete header)")
    length, kind, width, height = _IHDR.unpack_from(data, len(PNG_SIGNATURE))
    if kind != b"IHDR" or length != 13:
        raise InvalidInput(f"{what}: a PNG must start with its IHDR header chunk")
    return width, height


def check_png(data: bytes, what: str) -> None:
    """Refuse a PNG whose chunk structure is not what the specification requires.

    Checked: the signature, then IHDR first, with a bit depth its colour type allows,
    compression and filter method 0 and interlace method 0 or 1; every chunk whole, with a
    correct CRC; no critical chunk besides IHDR, PLTE, IDAT and IEND; PLTE (1..256 colours)
    before the image data, present for palette images, absent from grayscale ones; the IDAT
    chunks consecutive; IEND last, with nothing after it; at most :data:`MAX_CHUNKS` chunks.

    Raises:
        InvalidInput: naming the first problem found.
    """
    def refuse(problem: str) -> InvalidInput:
        return InvalidInput(f"{what}: not a readable PNG ({problem})")

    png_size(data, what)  # the signature, and IHDR first
    view = memoryview(data)  # CRCs over slices of it copy nothing
    seen: set[bytes] = set()  # the chunk types met so far
    last, count, colour = b"", 0, -1
    offset = len(PNG_SIGNATURE)
    while offset < len(data):
        if count == MAX_CHUNKS:
            raise refuse(f"more than {MAX_CHUNKS} chunks")
        if last == b"IEND":
            raise refuse("data after the IEND chunk")
        if offset + _CHUNK_HEAD.size + 4 > len(data):
            raise refuse("truncated inside a chunk header")
        length, kind = _CHUNK_HEAD.unpack_from(data, offset)
        if not kind.isalpha():
            raise refuse(f"a chunk type that is not four ASCII letters: {kind!r}")
        name = kind.decode("ascii")
        end = offset + _CHUNK_HEAD.size + length
        if length > 0x7FFFFFFF or end + 4 > len(data):
            raise refuse(f"the {name} chunk is truncated (it declares {length} bytes)")
        if zlib.crc32(view[offset + 4:end]) != struct.unpack_from(">I", data, end)[0]:  # over type + data
            raise refuse(f"the {name} chunk's CRC does not match its data")
        critical = not kind[0] & 0x20  # an upper-case first letter: a decoder must understand it
        if critical and kind not in CRITICAL_CHUNKS:
            raise refuse(f"an unknown critical chunk {name}")
        if kind == b"IHDR":
            if seen:
                raise refuse("a second IHDR chunk")
            _, _, depth, colour, compression, filter_method, interlace = _IHDR_FIELDS.unpack_from(data, offset + 8)
            if depth not in BIT_DEPTHS.get(colour, ()):
                raise refuse(f"colour type {colour} with bit depth {depth}")
            if compression != 0 or filter_method != 0 or interlace not in (0, 1):
                raise refuse(f"compression method {compression}, filter method {filter_method}, interlace "
                             f"method {interlace}; PNG defines 0, 0 and 0 or 1")
        elif kind == b"PLTE":
            if colour in (0, 4) or {b"PLTE", b"IDAT"} & seen:
                raise refuse("a PLTE chunk where none may be (a grayscale image, a second one, or after "
                             "the image data)")
            if length % 3 or not 1 <= length // 3 <= 256:
                raise refuse(f"a PLTE chunk of {length} bytes (1..256 colours of 3 bytes each)")
        elif kind == b"IDAT" and b"IDAT" in seen and last != b"IDAT":
            raise refuse("IDAT chunks that are not consecutive")
        seen.add(kind)
        last, count, offset = kind, count + 1, end + 4
    if colour == 3 and b"PLTE" not in seen:
        raise refuse("a palette image without a PLTE chunk")
    if b"IDAT" not in seen:
        raise refuse("no image data (IDAT chunk)")
    if last != b"IEND":
        raise refuse("no IEND chunk at the end")


def decode_png(data: bytes, size: tuple[int, int], max_side: int, what: str) -> np.ndarray:
    """A PNG (any colour mode) as grayscale ``size`` (width, height) float32 in [0, 1].

    Args:
        data: the file's bytes.
        size: the model's (width, height): the image is resized to it.
        max_side: the largest width or height accepted, checked from the header first.
        what: names the image in messages ("image 3").

    Raises:
        InvalidInput: not a PNG, too large, malformed (:func:`check_png`), or unreadable
            (image data that is short or corrupt, a bomb).
    """
    from PIL import Image

    width, height = png_size(data, what)
    if not (1 <= width <= max_side and 1 <= height <= max_side):
        raise InvalidInput(f"{what}: a {width}x{height} PNG; this model takes images of at most "
                           f"{max_side}x{max_side} pixels")
    check_png(data, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                if img.size != (width, height):
                    raise ValueError("the header's size is not the image's")
                # Every pixel now: with Pillow's LOAD_TRUNCATED_IMAGES off (its default, never
                # changed here), image data that ends short or does not inflate raises.
                img.load()
                gray = img.convert("L").resize(size, Image.Resampling.BILINEAR)
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure to read them is the client's
        raise InvalidInput(f"{what}: not a readable PNG ({exc.__class__.__name__})") from None
    return np.asarray(gray, dtype=np.float32) / 255.0


def encode_png(image: np.ndarray) -> bytes:
    """A (1, H, W) image in [0, 1] as an 8-bit grayscale PNG (deterministic bytes)."""
    from PIL import Image

    pixels = np.round(np.clip(image[0], 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class Offloaded:
    """A few threads for CPU work that must not hold the event loop (PNG decoding and
    encoding), with a bound on the jobs waiting or running: beyond it, ``RESOURCE_EXHAUSTED``.

    Args:
        threads: worker threads (PIL releases the GIL while it inflates and deflates).
        max_jobs: jobs running or queued at once.
    """

    def __init__(self, threads: int = 2, max_jobs: int = 64):
        self.max_jobs = max_jobs
        self.jobs = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="images")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.jobs >= self.max_jobs:
            raise Overloaded(f"{self.jobs} image jobs are waiting; retry with backoff")
        self.jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.jobs -= 1
