"""Untrusted PNGs: judged by their header before decoding, refused as INVALID_ARGUMENT when
they are not PNG, too large, broken or bombs; the good ones decode in any colour mode."""

from __future__ import annotations

import io
import re
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from deepserve.errors import InvalidInput
from deepserve.images import MAX_CHUNKS, decode_png, encode_png, png_size
from deepserve.proto import deepserve_pb2 as v1

pytestmark = pytest.mark.timeout(60)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares width x height, with whatever image data follows: a few
    hundred bytes on the wire, however large it claims to be."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")


def _png(mode: str, size=(8, 8), **save) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size, dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (*size, 4), dtype=np.uint8), mode="RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "1", "I;16"])
def test_every_colour_mode_decodes(mode):
    pixels = decode_png(_png(mode), (8, 8), 64, "image 0")
    assert pixels.shape == (8, 8) and pixels.dtype == np.float32 and 0 <= pixels.min() <= pixels.max() <= 1


def test_generated_pngs_round_trip():
    image = np.random.default_rng(1).random((1, 8, 8), dtype=np.float32)
    back = decode_png(encode_png(image), (8, 8), 64, "x")
    assert np.abs(back - image[0]).max() <= 0.5 / 255 + 1e-6


HOSTILE = {
    "a GIF": (b"GIF89a" + b"\0" * 40, "only PNG is accepted"),
    "a JPEG": (b"\xff\xd8\xff\xe0" + b"\0" * 40, "only PNG is accepted"),
    "empty": (b"", "only PNG is accepted"),
    "only the signature": (b"\x89PNG\r\n\x1a\n", "truncated"),
    "12000 x 12000 declared": (_png_declaring(12000, 12000), "12000x12000 PNG"),
    "100000 x 1 declared": (_png_declaring(100000, 1), "100000x1 PNG"),
    "0 x 0 declared": (_png_declaring(0, 0), "0x0 PNG"),
    "no image data": (_png_declaring(8, 8, idat=b"\x78\x9c"), "not a readable PNG"),
    "truncated": (_png("L")[:-30], "not a readable PNG"),
    "corrupt image data": (_png_declaring(8, 8, idat=b"\x78\x9c" + b"\xff" * 40), "not a readable PNG"),
    "a wrong IDAT checksum": (_png_declaring(8, 8)[:-16] + b"\0\0\0\0" + _png_declaring(8, 8)[-12:],
                              "not a readable PNG"),
    "IHDR not first": (b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"a\0b") + _chunk(b"IHDR", b"\0" * 13),
                       "must start with its IHDR"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_pngs_are_invalid_input(case):
    data, message = HOSTILE[case]
    with pytest.raises(InvalidInput, match=message):
        decode_png(data, (8, 8), 64, "image 0")


def _bad_crc(chunk: bytes) -> bytes:
    return chunk[:-4] + struct.pack(">I", zlib.crc32(chunk[4:-4]) ^ 0xDEADBEEF)


def _structured(*, colour=0, depth=8, compression=0, filter_method=0, interlace=0, plte=True, before_idat=(),
                idat=None, after_idat=(), iend=True, tail=b"") -> bytes:
    """An 8x8 PNG built chunk by chunk, whole and valid unless an argument says otherwise:
    the image data is complete (eight all-zero rows), so only the named defect is wrong."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, depth, colour, compression, filter_method, interlace)
    row = 1 + (8 * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1) * depth + 7) // 8  # filter byte + pixels
    chunks = [_chunk(b"IHDR", ihdr)]
    if colour == 3 and plte:
        chunks.append(_chunk(b"PLTE", bytes(range(48))))
    chunks += list(before_idat)
    chunks.append(_chunk(b"IDAT", zlib.compress(b"\0" * row * 8)) if idat is None else idat)
    chunks += list(after_idat)
    if iend:
        chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + tail


def test_the_structured_pngs_are_valid_unless_broken():
    for colour, depth in ((0, 8), (0, 1), (0, 16), (2, 8), (3, 8), (3, 2), (4, 8), (6, 16)):
        assert decode_png(_structured(colour=colour, depth=depth), (8, 8), 64, "x").shape == (8, 8)
    assert decode_png(_structured(before_idat=[_chunk(b"tEXt", b"a\0b")], after_idat=[_chunk(b"tIME", b"\0" * 7)]),
                      (8, 8), 64, "x").shape == (8, 8)
    split = zlib.compress(b"\0" * 72)
    assert decode_png(_structured(idat=_chunk(b"IDAT", split[:10]) + _chunk(b"IDAT", split[10:])),
                      (8, 8), 64, "x").shape == (8, 8)


# Files Pillow decodes without a word (fuzz run, issue 12): only their chunk structure is wrong.
MALFORMED = {
    "a palette image without PLTE": (_structured(colour=3, plte=False), "palette image without a PLTE chunk"),
    "a bad IDAT CRC": (_structured(idat=_bad_crc(_chunk(b"IDAT", zlib.compress(b"\0" * 72)))),
                       "the IDAT chunk's CRC does not match"),
    "compression method 1": (_structured(compression=1), "compression method 1"),
    "filter method 1": (_structured(filter_method=1), "filter method 1"),
    "interlace method 2": (_structured(interlace=2), "interlace method 2"),
    "an unknown critical chunk": (_structured(before_idat=[_chunk(b"ABCD", b"\0" * 8)]),
                                  "an unknown critical chunk ABCD"),
    "colour type 2 at 4 bits": (_structured(colour=2, depth=4), "colour type 2 with bit depth 4"),
    "colour type 5": (_structured(colour=5), "colour type 5"),
    "a bad IHDR CRC": (b"\x89PNG\r\n\x1a\n" + _bad_crc(_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))),
                       "the IHDR chunk's CRC"),
    "a bad CRC on an ancillary chunk": (_structured(before_idat=[_bad_crc(_chunk(b"tEXt", b"a\0b"))]),
                                        "the tEXt chunk's CRC"),
    "a chunk longer than the file": (_structured(before_idat=[struct.pack(">I", 0x7FFFFFFF) + b"tEXta\0b\0\0\0\0"]),
                                     "the tEXt chunk is truncated"),
    "a chunk type that is not letters": (_structured(before_idat=[_chunk(b"t\0Xt", b"")]), "not four ASCII letters"),
    "a PLTE in a grayscale image": (_structured(before_idat=[_chunk(b"PLTE", bytes(6))]), "a PLTE chunk where"),
    "a PLTE after the image data": (_structured(colour=2, after_idat=[_chunk(b"PLTE", bytes(6))]),
                                    "a PLTE chunk where"),
    "a PLTE of 4 bytes": (_structured(colour=3, plte=False, before_idat=[_chunk(b"PLTE", bytes(4))]),
                          "a PLTE chunk of 4 bytes"),
    "IDAT chunks apart": (_structured(idat=_chunk(b"IDAT", zlib.compress(b"\0" * 72)[:10]) + _chunk(b"tEXt", b"a\0b")
                                      + _chunk(b"IDAT", zlib.compress(b"\0" * 72)[10:])), "not consecutive"),
    "no IDAT": (_structured(idat=b""), "no image data"),
    "no IEND": (_structured(iend=False), "no IEND chunk"),
    "bytes after IEND": (_structured(tail=b"\0" * 16), "data after the IEND chunk"),
    "a second IHDR": (_structured(before_idat=[_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))]),
                      "a second IHDR"),
    "too many chunks": (_structured(before_idat=[_chunk(b"tEXt", b"a\0b")] * MAX_CHUNKS), f"more than {MAX_CHUNKS}"),
    # Well-formed chunks around too little image data: Pillow's full load refuses it.
    "image data that ends short": (_structured(idat=_chunk(b"IDAT", zlib.compress(b"\0" * 40))), "OSError"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_chunk_structure_is_invalid_input(case):
    data, message = MALFORMED[case]
    with pytest.raises(InvalidInput, match=f"image 0: not a readable PNG \\(.*{re.escape(message)}"):
        decode_png(data, (8, 8), 64, "image 0")


def test_a_decompression_bomb_in_a_text_chunk_is_refused():
    """8x8 pixels, and a zTXt chunk of 64 KB that inflates to 100 MB."""
    bomb = zlib.compress(b"\0" * 100_000_000, 9)
    good = _png("L")
    data = good[:33] + _chunk(b"zTXt", b"comment\0\0" + bomb) + good[33:]
    assert len(data) < 200_000 and png_size(data, "x") == (8, 8)
    with pytest.raises(InvalidInput, match="not a readable PNG"):
        decode_png(data, (8, 8), 64, "image 0")
    assert PngImagePlugin.MAX_TEXT_CHUNK <= 1 << 20  # Pillow's own bound, which this relies on


def test_served_classify_refuses_a_huge_png_from_its_header(client):
    """issue 12: a 12000x12000 PNG used to be decoded on the gateway's event loop (~0.6 s)."""
    with pytest.raises(grpc.RpcError) as failed:
        client.classifier.Classify(v1.ClassifyRequest(images=[v1.Image(png=_png_declaring(12000, 12000))]),
                                   timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: a 12000x12000 PNG; this model takes images of at most 64x64 pixels" in failed.value.details()
    ok = client.classifier.Classify(v1.ClassifyRequest(images=[v1.Image(png=_png("RGB", (64, 64)))]), timeout=10)
    assert len(ok.results[0].top) == 3
