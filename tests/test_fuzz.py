"""Fuzzed bad input: seglab never crashes on it, and every refusal is a clear error naming the file.

* Images: a few thousand files mutated deterministically (fixed seed) from small seed images
  (PNG, APNG, JPEG, TIFF, BMP, GIF, WebP, PGM in odd modes, label maps, and formats Pillow
  recognises by content such as TGA, ICO, QOI or JPEG 2000) go through ``decode_image`` and
  ``read_label_map``: each gives a valid array or an ``InputError`` naming the file.
* Weak labels (hypothesis): point and box tables with arbitrary cells and label-map arrays
  of arbitrary dtypes, shapes and values: valid rows/maps or an ``InputError`` naming the file.
* Manifests: malicious YAML (python tags, alias bombs, duplicate keys, odd tags), paths
  escaping the data root and URLs: a ``ManifestError`` naming the key, ``seglab validate``
  exits 2 without a traceback, and a canary proves no code ran.
* Checkpoints that would run code when unpickled, or are torn: refused by every loader,
  with an error naming the file; the canary proves nothing ran.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, features
from typer.testing import CliRunner

from seglab.cli.app import app
from seglab.pipeline.base.errors import InputError, ManifestError
from seglab.pipeline.manifest import load_manifest
from seglab.stages.parts.imageio import decode_image
from seglab.stages.parts.weak import (
    assign_to_images,
    label_dtype,
    rasterize_points,
    read_box_table,
    read_label_map,
    read_point_table,
    validate_boxes,
    validate_points,
)

SEED = 20240611
H, W = 24, 32
MAX_PIXELS = 1_000_000  # a 1000x1000 declared size still passes the check and is then decoded
LABEL_CLASSES = frozenset({0, 1, 2})
UNLABELLED = 255
KINDS = ("truncate", "byteflip", "header", "empty", "wrong_ext", "huge_size")

cli = CliRunner()


# =============================================================== images: the seeds


@dataclass(frozen=True)
class SeedFile:
    name: str
    ext: str
    data: bytes
    fmt: str  # the container, for the size patches: PNG, JPEG, TIFF, BMP, GIF, WEBP, PGM


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow does not write them)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _label_array(rng: np.random.Generator) -> np.ndarray:
    labels = np.full((H, W), UNLABELLED, np.uint8)
    labels[3:9, 4:15] = 1
    labels[14, :] = 2
    labels[18:22, 20:30] = 0
    labels[rng.integers(0, H, 20), rng.integers(0, W, 20)] = rng.choice([0, 1, 2], 20)
    return labels


def seed_files() -> list[SeedFile]:
    """~50 small (24x32) images: every format seglab may meet, in the odd modes, and label maps."""
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[:H, :W]
    photo = np.stack([xx * 8, yy * 10, (xx + yy) * 4], axis=-1) + rng.integers(0, 40, (H, W, 3))
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(photo)
    alpha = Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    gray = rgb.convert("L")
    la = gray.copy()
    la.putalpha(alpha)
    palette = rgb.quantize(16)
    sixteen = Image.fromarray(photo[..., 0].astype(np.uint16) * 257)
    int32 = Image.fromarray(photo[..., 1].astype(np.int32) * 1000 - 50_000)
    floats = Image.fromarray(photo[..., 2].astype(np.float32) / 255)
    labels = _label_array(rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate on display
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]

    label_p = Image.fromarray(labels, mode="L").convert("P")
    label_p.putpalette([(i * 53) % 256 for i in range(768)])
    seeds = [
        ("png_rgb", "PNG", _save(rgb, "PNG")),
        ("png_rgba", "PNG", _save(rgba, "PNG")),
        ("png_l", "PNG", _save(gray, "PNG")),
        ("png_la", "PNG", _save(la, "PNG")),
        ("png_p_trns", "PNG", _save(palette, "PNG", transparency=0)),
        ("png_1", "PNG", _save(gray.convert("1"), "PNG")),
        ("png_i16", "PNG", _save(sixteen, "PNG")),
        ("png_rgb16", "PNG", _png_16bit_rgb(photo.astype(np.uint16) * 257)),
        ("png_interlaced", "PNG", _save(rgb, "PNG", optimize=False, interlace=1)),
        ("png_exif", "PNG", _save(rgb, "PNG", exif=exif)),
        ("apng", "PNG", _save(frames[0], "PNG", save_all=True, append_images=frames[1:])),
        ("jpeg_rgb", "JPEG", _save(rgb, "JPEG", quality=90)),
        ("jpeg_l", "JPEG", _save(gray, "JPEG")),
        ("jpeg_cmyk", "JPEG", _save(rgb.convert("CMYK"), "JPEG")),
        ("jpeg_exif", "JPEG", _save(rgb, "JPEG", exif=exif)),
        ("jpeg_progressive", "JPEG", _save(rgb, "JPEG", progressive=True)),
        ("tiff_rgb", "TIFF", _save(rgb, "TIFF")),
        ("tiff_lzw", "TIFF", _save(rgb, "TIFF", compression="tiff_lzw")),
        ("tiff_deflate_rgba", "TIFF", _save(rgba, "TIFF", compression="tiff_adobe_deflate")),
        ("tiff_i", "TIFF", _save(int32, "TIFF")),
        ("tiff_f", "TIFF", _save(floats, "TIFF")),
        ("tiff_i16", "TIFF", _save(sixteen, "TIFF")),
        ("tiff_cmyk", "TIFF", _save(rgb.convert("CMYK"), "TIFF")),
        ("tiff_la", "TIFF", _save(la, "TIFF")),
        ("tiff_1", "TIFF", _save(gray.convert("1"), "TIFF")),
        ("tiff_p", "TIFF", _save(palette, "TIFF")),
        ("tiff_multipage", "TIFF", _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
        ("bmp_rgb", "BMP", _save(rgb, "BMP")),
        ("bmp_rgba", "BMP", _save(rgba, "BMP")),
        ("bmp_l", "BMP", _save(gray, "BMP")),
        ("bmp_p", "BMP", _save(palette, "BMP")),
        ("bmp_1", "BMP", _save(gray.convert("1"), "BMP")),
        ("gif_p_trns", "GIF", _save(palette, "GIF", transparency=0)),
        ("gif_l", "GIF", _save(gray, "GIF")),
        ("gif_multi", "GIF", _save(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        ("webp_lossy", "WEBP", _save(rgb, "WEBP", quality=80)),
        ("webp_lossless", "WEBP", _save(rgb, "WEBP", lossless=True)),
        ("webp_rgba", "WEBP", _save(rgba, "WEBP")),
        ("pgm_16bit", "PGM", f"P5\n{W} {H}\n65535\n".encode() + (photo[..., 0].astype(">u2") * 257).tobytes()),
        # label maps: class ids 0..2 and the unlabelled value 255, as scribble files are made
        ("label_png_l", "PNG", _save(Image.fromarray(labels), "PNG")),
        ("label_png_p", "PNG", _save(label_p, "PNG")),
        ("label_png_i16", "PNG", _save(Image.fromarray(labels.astype(np.uint16)), "PNG")),
        ("label_png_1", "PNG", _save(Image.fromarray(labels == 1), "PNG")),
        ("label_bmp_l", "BMP", _save(Image.fromarray(labels), "BMP")),
        ("label_tiff_l", "TIFF", _save(Image.fromarray(labels), "TIFF")),
        ("label_tiff_i16", "TIFF", _save(Image.fromarray(labels.astype(np.uint16)), "TIFF")),
        ("label_gif_p", "GIF", _save(label_p, "GIF", optimize=False)),  # keep the palette indices
    ]
    # formats seglab does not list but Pillow recognises by content, whatever the file is named
    codecs = {"JPEG2000": "jpg_2000", "AVIF": "avif"}  # Pillow builds may lack these
    for fmt, image in (
        ("TGA", rgba),
        ("ICO", rgba),
        ("PCX", rgb),
        ("SGI", rgb),
        ("QOI", rgb),
        ("PPM", rgb),
        ("DDS", rgb),
        ("IM", rgb),
        ("XBM", gray.convert("1")),
        ("DIB", rgb),
        ("MPO", rgb),
        ("JPEG2000", rgb),
        ("AVIF", rgb),
    ):
        if fmt in Image.SAVE and (fmt not in codecs or features.check(codecs[fmt])):
            seeds.append((f"other_{fmt.lower()}", fmt, _save(image, fmt)))
    ext = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp", "PGM": ".pgm"}
    return [SeedFile(name, ext.get(fmt, ".png"), data, fmt) for name, fmt, data in seeds]


# =============================================================== images: the mutations


def _png_fix_crc(data: bytearray, start: int) -> None:
    """Recompute the CRC of the PNG chunk starting at ``start`` (its length field)."""
    length = struct.unpack(">I", data[start : start + 4])[0]
    body = data[start + 4 : start + 8 + length]
    data[start + 8 + length : start + 12 + length] = struct.pack(">I", zlib.crc32(body))


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset of the length field, chunk type, body length) of every whole chunk."""
    chunks, at = [], 8
    while at + 12 <= len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        if at + 12 + length > len(data):
            break
        chunks.append((at, bytes(data[at + 4 : at + 8]), length))
        at += 12 + length
    return chunks


def _gif_descriptor(data: bytes) -> int | None:
    """Offset of the first image descriptor (the 0x2C byte) of a GIF."""
    at = 13
    if data[10] & 0x80:
        at += 3 * 2 ** ((data[10] & 7) + 1)
    while at < len(data):
        if data[at] == 0x2C:
            return at
        if data[at] != 0x21:
            return None
        at += 2
        while at < len(data) and data[at]:
            at += data[at] + 1
        at += 1
    return None


def _tiff_size_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of the first IFD's ImageWidth and ImageLength values."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    fields = []
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag in (256, 257):
            fields.append((entry + 8, order + ("H" if kind == 3 else "I")))
    return fields


def declare_size(seed: SeedFile, width: int, height: int) -> bytes | None:
    """The seed with its header's width and height replaced (checksums fixed, so the
    decoder believes them); None when the format has no such field to patch."""
    data = bytearray(seed.data)
    if seed.fmt == "PNG":
        data[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        _png_fix_crc(data, 8)
        for at, kind, _ in _png_chunks(data):  # APNG frames declare their size too
            if kind == b"fcTL":
                data[at + 12 : at + 20] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
                _png_fix_crc(data, at)
    elif seed.fmt == "GIF":
        w16, h16 = width & 0xFFFF, height & 0xFFFF
        data[6:10] = struct.pack("<HH", w16, h16)
        at = _gif_descriptor(data)
        if at is not None:
            data[at + 5 : at + 9] = struct.pack("<HH", w16, h16)
    elif seed.fmt == "BMP":
        data[18:26] = struct.pack("<ii", max(min(width, 2**31 - 1), -(2**31)), max(min(height, 2**31 - 1), -(2**31)))
    elif seed.fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0:
                data[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                break
    elif seed.fmt == "TIFF":
        for (at, fmt), value in zip(_tiff_size_fields(bytes(data)), (width, height)):
            mask = 0xFFFF if fmt[1] == "H" else 0xFFFFFFFF
            data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value & mask)
    elif seed.fmt == "WEBP":
        kind = bytes(data[12:16])
        if kind == b"VP8X":  # canvas size minus one, 24 bits each
            data[24:30] = b"".join(((v - 1) & 0xFFFFFF).to_bytes(3, "little") for v in (width, height))
        elif kind == b"VP8 ":
            data[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            bits = (bits & ~0xFFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
            data[21:25] = bits.to_bytes(4, "little")
    elif seed.fmt == "PGM":
        data = bytearray(data.replace(f"{W} {H}".encode(), f"{width} {height}".encode(), 1))
    return bytes(data)


HUGE_SIZES = [
    (65535, 65535),
    (2**31 - 1, 1),
    (1, 2**31 - 1),
    (2**32 - 1, 2**32 - 1),
    (100_000, 100_000),
    (1000, 1000),
    (W * 30, H * 30),
    (0, H),
    (W, 0),
    (W + 1, H),
    (W, -H),
    (-1, -1),
]
JUNK = [
    b"hello, this is not an image\n",
    b"<html><body>404 Not Found</body></html>",
    b'{"image": "a.png"}',
    b"PK\x03\x04" + bytes(40),
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"BM" + bytes(60),
    b"II*\x00" + bytes(12),
    b"\xff\xd8\xff\xe0",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"\x00" * 64,
    b" \n\t\r" * 8,
]
EXTS = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"]


@dataclass(frozen=True)
class Mutation:
    kind: str
    name: str  # the file name: seed, kind, index and extension
    note: str  # what was done, for failure messages
    data: bytes


def mutations(seed: SeedFile, rng: np.random.Generator, scale: int) -> list[Mutation]:
    """Deterministic mutations of one seed; ``scale`` multiplies the random ones."""
    out: list[Mutation] = []
    data = seed.data
    size = len(data)

    def add(kind: str, note: str, content: bytes, ext: str = seed.ext) -> None:
        out.append(Mutation(kind, f"{seed.name}-{kind}-{len(out):04d}{ext}", note, content))

    cuts = sorted({size - 1, size - 2, size // 2, *rng.integers(1, size, 14 * scale).tolist()})
    for cut in cuts:
        add("truncate", f"first {cut} of {size} bytes", data[:cut])
    for _ in range(18 * scale):
        mutated = bytearray(data)
        count = int(rng.integers(1, 51))
        positions = rng.integers(0, size, count)
        for at in positions:
            mutated[at] ^= int(rng.integers(1, 256))
        add("byteflip", f"{count} bytes xor-ed at {sorted(positions.tolist())[:8]}...", bytes(mutated))
    for _ in range(6 * scale):  # raw header bytes: magic, sizes, flags, offsets
        mutated = bytearray(data)
        span = min(size, 64)
        positions = rng.integers(0, span, int(rng.integers(1, 5)))
        for at in positions:
            mutated[at] = int(rng.integers(0, 256))
        add("header", f"header bytes {sorted(positions.tolist())} set at random", bytes(mutated))
    if seed.fmt == "PNG":  # chunk fields the decoder trusts once the CRC matches
        chunks = _png_chunks(data)
        for _ in range(4 * scale):
            mutated = bytearray(data)
            at, kind, length = chunks[int(rng.integers(0, len(chunks)))]
            if length and rng.random() < 0.6:
                where = at + 8 + int(rng.integers(0, length))
                mutated[where] = int(rng.integers(0, 256))
                note = f"{kind.decode()} body byte {where - at - 8} set, CRC fixed"
            else:
                mutated[at : at + 4] = struct.pack(">I", int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, length + 7])))
                note = f"{kind.decode()} length field changed"
            if at + 12 + struct.unpack(">I", mutated[at : at + 4])[0] <= size:
                _png_fix_crc(mutated, at)
            add("header", note, bytes(mutated))
        ihdr = bytearray(data)  # impossible bit depth / colour type / method combinations
        ihdr[24:29] = bytes(int(v) for v in rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 16, 255], 5))
        _png_fix_crc(ihdr, 8)
        add("header", f"IHDR depth/type/methods = {list(ihdr[24:29])}, CRC fixed", bytes(ihdr))
    add("empty", "zero-length file", b"")
    add("empty", "zero-length file, other extension", b"", EXTS[int(rng.integers(0, len(EXTS)))])
    same = {seed.ext, {".jpg": ".jpeg", ".tif": ".tiff"}.get(seed.ext, seed.ext)}
    others = [e for e in EXTS if e not in same]
    other = others[int(rng.integers(0, len(others)))]
    add("wrong_ext", f"valid {seed.fmt} bytes named {other}", data, other)
    junk = JUNK[int(rng.integers(0, len(JUNK)))]
    add("wrong_ext", f"not an image ({junk[:12]!r}...) named {seed.ext}", junk)
    noise = rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes()
    add("wrong_ext", f"random bytes named {seed.ext}", noise)
    for width, height in HUGE_SIZES:
        patched = declare_size(seed, width, height)
        if patched is not None and patched != data:
            add("huge_size", f"{seed.fmt} header declares {width}x{height}", patched)
    return out


def corpus(scale: int) -> list[Mutation]:
    rng = np.random.default_rng(SEED)
    return [m for seed in seed_files() for m in mutations(seed, rng, scale)]


def _check_image(out) -> str | None:
    if not (
        isinstance(out, np.ndarray)
        and out.dtype == np.uint8
        and out.ndim == 3
        and out.shape[2] == 3
        and out.shape[0] > 0
        and out.shape[1] > 0
        and out.flags.c_contiguous
    ):
        return f"returned {type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
    return None


def _check_label_map(out) -> str | None:
    if not (isinstance(out, np.ndarray) and out.dtype.kind in "ui" and out.shape == (H, W)):
        return f"returned {type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
    if not set(np.unique(out).tolist()) <= LABEL_CLASSES | {UNLABELLED}:
        return f"returned unknown values {sorted(set(np.unique(out).tolist()) - LABEL_CLASSES - {UNLABELLED})}"
    return None


READERS = {
    "decode_image": (lambda path: decode_image(path, max_pixels=MAX_PIXELS), _check_image),
    "read_label_map": (
        lambda path: read_label_map(path, expected_hw=(H, W), class_ids=LABEL_CLASSES, unlabelled=UNLABELLED),
        _check_label_map,
    ),
}


def fuzz_images(folder: Path, scale: int) -> tuple[dict, list[str], int]:
    """Write every mutation to ``folder`` and read it with every reader.

    -> (outcomes: kind -> reader -> Counter of 'valid' / 'InputError', every offence, mutation count).
    """
    outcomes: dict = defaultdict(lambda: defaultdict(Counter))
    offences: list[str] = []
    mutated = corpus(scale)
    for mutation in mutated:
        path = folder / mutation.name
        path.write_bytes(mutation.data)
        for reader, (read, check) in READERS.items():
            try:
                out = read(path)
            except InputError as exc:
                if exc.path != str(path) or str(path) not in str(exc) or not exc.problem.strip():
                    offences.append(
                        f"{mutation.name} ({mutation.note}) {reader}: InputError without the file's path: {exc}"
                    )
                outcomes[mutation.kind][reader]["InputError"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - exactly what this test hunts
                offences.append(f"{mutation.name} ({mutation.note}) {reader}: {type(exc).__name__}: {exc}")
                outcomes[mutation.kind][reader]["crash"] += 1
                continue
            if (wrong := check(out)) is not None:
                offences.append(f"{mutation.name} ({mutation.note}) {reader}: {wrong}")
            outcomes[mutation.kind][reader]["valid"] += 1
    return outcomes, offences, len(mutated)


def _assert_fuzz(outcomes: dict, offences: list[str], total: int, minimum: int) -> None:
    summary = {kind: {reader: dict(counts) for reader, counts in readers.items()} for kind, readers in outcomes.items()}
    assert not offences, (
        f"{len(offences)} bad outcomes (want a valid array or InputError naming the file):\n"
        + "\n".join(offences)
        + f"\noutcomes: {summary}"
    )
    assert total >= minimum, f"only {total} mutations"
    assert set(outcomes) == set(KINDS), summary
    for kind in KINDS:  # every kind of mutation really breaks files, for both readers
        for reader in READERS:
            assert outcomes[kind][reader]["InputError"] > 0, f"{kind} never refused by {reader}: {summary}"
    # and some files survive: a wrong extension never matters when the content is an image
    assert outcomes["wrong_ext"]["decode_image"]["valid"] > 0 and outcomes["byteflip"]["decode_image"]["valid"] > 0
    print(f"{total} mutations:", summary)  # shown with -rP or -s


@pytest.mark.filterwarnings("ignore")  # Pillow warns about some corrupt metadata; the outcome is what counts
def test_seed_images_decode(tmp_path):
    for seed in seed_files():
        path = tmp_path / f"{seed.name}{seed.ext}"
        path.write_bytes(seed.data)
        assert _check_image(decode_image(path, max_pixels=MAX_PIXELS)) is None, seed.name
        if seed.name.startswith("label_"):
            assert _check_label_map(READERS["read_label_map"][0](path)) is None, seed.name


@pytest.mark.filterwarnings("ignore")
def test_mutated_images_decode_or_raise_input_error_naming_the_file(tmp_path):
    outcomes, offences, total = fuzz_images(tmp_path, scale=1)
    _assert_fuzz(outcomes, offences, total, minimum=2000)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_many_more_mutated_images(tmp_path):
    """The long variant (20,000+ mutations): ``python -m pytest -m slow tests/test_fuzz.py``."""
    outcomes, offences, total = fuzz_images(tmp_path, scale=10)
    _assert_fuzz(outcomes, offences, total, minimum=20_000)


# =============================================================== weak labels (hypothesis)

TABLE_HW = (20, 30)
POINT_COLUMNS = ("image", "x", "y", "class")
BOX_COLUMNS = ("image", "x0", "y0", "x1", "y1", "class")
DATASET = ["a.jpg", "d/b.jpg", "e/a.jpg", "c.png"]
ODD_TEXT = [
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "",
    " ",
    "0x10",
    "1_000",
    "\u0663",
    "+1",
    "-0",
    "1,5",
    "None",
    "null",
    "true",
    "\ufeff1",
    "1\x00",
    "  7  ",
    "9" * 5000,
    "1e308",
    "3.0",
    "2",
]
NUMBER = st.one_of(
    st.integers(-3, 40), st.floats(-5, 45), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True)
)
CELL = st.one_of(NUMBER, NUMBER.map(str), st.sampled_from(ODD_TEXT), st.text(max_size=8), st.none(), st.booleans())
JSON_CELL = st.one_of(CELL, st.lists(NUMBER, max_size=2), st.dictionaries(st.text(max_size=3), NUMBER, max_size=2))
IMAGE_CELL = st.one_of(
    st.sampled_from(
        [
            *DATASET,
            "./a.jpg",
            "d\\b.jpg",
            "../x.jpg",
            "/etc/passwd",
            "a.jpg\x00",
            "c:/x.png",
            "a.jpg/",
            "e//a.jpg",
            " c.png ",
        ]
    ),
    st.text(max_size=10),
    NUMBER,
)
# raw files no writer produces: readers must refuse them, not crash
RAW_TABLES = [
    b"",
    b"\xef\xbb\xbf",
    b"\xff\xfe" + "image,x,y,class\n".encode("utf-16-le"),
    b"\x00" * 10,
    b"[" * 50_000,
    b"{" * 50_000,
    b"[1" + b"0" * 5000 + b"]",
    b"null",
    b"42",
    b'"points"',
    b"[[]]",
    b'{"points": {"image": "a.jpg"}}',
    b'{"points": [1, 2]}',
    b'image,x,y,class\n"a.jpg,1,2,1\n',
    b"image,x,y,class\n" + b"a" * 200_000 + b",1,2,1\n",
    b"\x89PNG\r\n\x1a\n" + bytes(30),
    b"image\tx\ty\tclass\na.jpg\t1\t2\t1\n",
    b"image;x;y;class\na.jpg;1;2;1\n",
]


GOOD_CELL = {
    "image": st.sampled_from(DATASET),
    "class": st.integers(0, 5),
    "number": st.one_of(
        st.floats(0, 19.99).map(lambda v: round(v, 2)),
        st.integers(0, 19),
        st.floats(-2, 35).map(lambda v: round(v, 2)),
        st.integers(-1, 31),
    ),
}


@st.composite
def table_file(draw) -> tuple[str, str, bytes]:
    """-> (kind 'points' | 'boxes', suffix '.csv' | '.json', file bytes).

    Mostly plausible tables (every column, plausible values, some out of bounds or of an
    unknown class), with now and then a column missing, an extra or duplicated column, a
    wild cell, a ragged CSV row, an odd JSON wrapper or encoding; or a raw file as is."""
    kind = draw(st.sampled_from(["points", "boxes"]))
    suffix = draw(st.sampled_from([".csv", ".json"]))
    if draw(st.integers(0, 9)) == 0:
        return kind, suffix, draw(st.sampled_from(RAW_TABLES))
    required = POINT_COLUMNS if kind == "points" else BOX_COLUMNS
    columns = [c for c in required if draw(st.integers(0, 39))]  # now and then a column is missing
    if draw(st.integers(0, 3)) == 0:
        columns.append(draw(st.sampled_from(["note", "x", "class", "Image", " y ", "", "\0extra"])))
    columns = draw(st.permutations(columns))
    wild = JSON_CELL if suffix == ".json" else CELL
    rows = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3, 4, 6]))):
        good = {column: draw(GOOD_CELL.get(column.strip(), GOOD_CELL["number"])) for column in columns}
        for low, high in (("x0", "x1"), ("y0", "y1")):  # boxes: mostly in order, now and then not
            if low in good and high in good and draw(st.integers(0, 5)):
                good[low], good[high] = sorted((good[low], good[high]))
                good[high] += 1 if good[low] == good[high] else 0
        rows.append(
            [draw(st.one_of(IMAGE_CELL, wild)) if draw(st.integers(0, 39)) == 0 else good[column] for column in columns]
        )
    if suffix == ".json":
        records = [dict(zip(columns, row)) for row in rows]
        wrap = draw(st.sampled_from(["list"] * 4 + ["object"] * 3 + ["junk"]))
        document = records if wrap == "list" else {kind: records} if wrap == "object" else {"rows": records}
        text = json.dumps(document, allow_nan=True, default=str)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in rows:  # now and then a ragged row: a cell added or dropped at the end
            extra = draw(st.sampled_from([0] * 20 + [1, -1]))
            writer.writerow((row + ["7"] * extra) if extra >= 0 else row[:extra])
        text = buffer.getvalue()
    encoding = draw(st.sampled_from(["utf-8"] * 12 + ["utf-8-sig", "utf-8-sig", "utf-16", "latin-1"]))
    return kind, suffix, text.encode(encoding, errors="replace")


def _assert_names(exc: InputError, path: Path) -> None:
    assert exc.path == str(path) and str(path) in str(exc) and exc.problem.strip(), str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=table_file(), class_ids=st.frozensets(st.integers(0, 5), min_size=3, max_size=6))
def test_point_and_box_tables_give_valid_rows_or_an_input_error_naming_the_file(tmp_path_factory, table, class_ids):
    kind, suffix, content = table
    path = tmp_path_factory.mktemp("table") / f"{kind}{suffix}"
    path.write_bytes(content)
    for happened in _read_and_validate(path, kind, class_ids):
        event(happened)


def _read_and_validate(path: Path, kind: str, class_ids: frozenset[int]) -> list[str]:
    """Read a table and validate every image's rows: valid rows or InputErrors naming
    ``path``. -> what happened, e.g. ['table read', 'rows valid', 'rows refused']."""
    read, validate, width = (
        (read_point_table, validate_points, 3) if kind == "points" else (read_box_table, validate_boxes, 5)
    )
    try:
        rows_by_image = read(path)
    except InputError as exc:
        _assert_names(exc, path)
        return ["table refused"]
    happened = ["table read"]
    assert rows_by_image and all(rows for rows in rows_by_image.values())
    height, width_px = TABLE_HW
    for image, rows in rows_by_image.items():
        assert isinstance(image, str) and image and not image.startswith("/") and ".." not in image.split("/")
        try:
            values = validate(rows, path_for_errors=path, image_hw=TABLE_HW, class_ids=class_ids, image=image)
        except InputError as exc:
            _assert_names(exc, path)
            happened.append("rows refused")
            continue
        happened.append("rows valid")
        assert values.dtype == np.float32 and values.shape == (len(rows), width) and np.isfinite(values).all()
        assert set(values[:, -1].astype(int).tolist()) <= class_ids
        if kind == "points":
            x, y = values[:, 0], values[:, 1]
            assert ((x >= 0) & (x < width_px) & (y >= 0) & (y < height)).all()
            raster = rasterize_points(values, TABLE_HW, 255, np.uint8)
            assert raster.shape == TABLE_HW and set(np.unique(raster).tolist()) <= class_ids | {255}
        else:
            x0, y0, x1, y1 = values[:, :4].T
            assert ((0 <= x0) & (x0 < x1) & (x1 <= width_px) & (0 <= y0) & (y0 < y1) & (y1 <= height)).all()
    try:
        assigned = assign_to_images(rows_by_image, DATASET, path_for_errors=path)
    except InputError as exc:
        _assert_names(exc, path)
    else:
        assert set(assigned) <= set(DATASET)
    return happened


@pytest.mark.parametrize("suffix", [".csv", ".json"])
@pytest.mark.parametrize("content", RAW_TABLES, ids=range(len(RAW_TABLES)))
def test_raw_table_files_are_refused_with_the_file_named(tmp_path, content, suffix):
    for kind in ("points", "boxes"):
        path = tmp_path / f"{kind}{suffix}"
        path.write_bytes(content)
        _read_and_validate(path, kind, frozenset({0, 1, 2}))


LABEL_DTYPES = [np.uint8, np.uint8, np.uint16, np.uint16, np.int32, np.bool_, np.float32, np.int16, np.uint32, np.int64]


@st.composite
def label_map_case(draw):
    """-> (class ids, unlabelled value, array, expected (H, W), format). Mostly arrays of
    class ids and the unlabelled value at the expected size; now and then any value, a
    wrong size, several channels, floats, negative or 32-bit values."""
    class_ids = draw(st.frozensets(st.sampled_from([0, 1, 2, 7, 255, 300, 65534]), min_size=1, max_size=4))
    unlabelled = draw(st.sampled_from([v for v in (255, 0, 65535, 9) if v not in class_ids]))
    dtype = np.dtype(draw(st.sampled_from(LABEL_DTYPES)))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    shape = draw(st.sampled_from([(h, w)] * 6 + [(h, w, 3), (h, w, 4), (h, w, 2)]))
    if dtype == np.bool_:
        elements = st.booleans()
    elif dtype.kind == "f":
        elements = st.one_of(
            st.sampled_from(sorted(class_ids | {unlabelled})).map(float),
            st.floats(allow_nan=True, allow_infinity=True, width=32),
        )
    else:
        info = np.iinfo(dtype)
        pool = [v for v in sorted(class_ids | {unlabelled}) if info.min <= v <= info.max] or [0]
        wild = st.one_of(st.sampled_from(pool), st.integers(int(info.min), int(info.max)))
        elements = st.sampled_from(pool) if draw(st.integers(0, 3)) else wild
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    expected_hw = draw(st.sampled_from([(h, w)] * 6 + [(w, h), (h + 1, w)]))
    fmt = draw(st.sampled_from(["PNG", "PNG", "PNG", "TIFF", "TIFF", "BMP", "GIF", "WEBP", "JPEG"]))
    return class_ids, unlabelled, array, expected_hw, fmt


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=label_map_case())
def test_label_map_arrays_give_a_valid_map_or_an_input_error_naming_the_file(tmp_path_factory, case):
    class_ids, unlabelled, array, expected_hw, fmt = case
    try:
        image = Image.fromarray(array)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
    except (TypeError, ValueError, OSError, KeyError):
        assume(False)  # Pillow cannot write this array in this format: no file to read
    path = tmp_path_factory.mktemp("map") / "label.png"
    path.write_bytes(buffer.getvalue())
    try:
        out = read_label_map(path, expected_hw=expected_hw, class_ids=class_ids, unlabelled=unlabelled)
    except InputError as exc:
        _assert_names(exc, path)
        event("label map refused")
        return
    event("label map valid")
    assert out.dtype == label_dtype(class_ids, unlabelled) and out.shape == tuple(expected_hw)
    assert out.flags.c_contiguous and set(np.unique(out).tolist()) <= class_ids | {unlabelled}
    assert (out != unlabelled).any()
    if fmt in ("PNG", "TIFF") and array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        np.testing.assert_array_equal(out, array)  # lossless formats give the values back exactly


# =============================================================== manifests


def _refused(manifest: Path, *, enumerate: bool = False) -> ManifestError:
    """The manifest is refused with a ManifestError (by the loader, or when its images are
    listed), and ``seglab validate`` exits 2 with the problem and no traceback."""
    from seglab.pipeline.units import enumerate_units

    with pytest.raises(ManifestError) as info:
        loaded = load_manifest(manifest)
        if enumerate:
            enumerate_units(loaded)
    result = cli.invoke(app, ["validate", str(manifest)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    return info.value


def _first_problem(error: ManifestError, location: str) -> str:
    found = [message for loc, message in error.problems if loc == location]
    assert found, f"no problem at {location!r}: {error.problems}"
    return found[0]


PYTHON_TAGS = [  # (name, YAML, whether yaml.unsafe_load of it would touch the canary)
    ("apply-os-system", "run: !!python/object/apply:os.system [\"touch '{canary}'\"]\n", True),
    ("apply-subprocess", "run:\n  name: !!python/object/apply:subprocess.check_call [[touch, '{canary}']]\n", True),
    ("apply-io-open", "run: !!python/object/apply:io.open ['{canary}', w]\n", True),
    ("as-a-key", "? !!python/object/apply:os.system [\"touch '{canary}'\"]\n: 1\nrun: {{name: x}}\n", True),
    ("document-tag", "--- !!python/object/apply:os.system [\"touch '{canary}'\"]\n", True),
    (
        "nested-in-data",
        "run: {{name: x}}\ndata:\n  images: {{glob: !!python/object/apply:os.system [\"touch '{canary}'\"]}}\n",
        True,
    ),
    (
        "in-a-list",
        "run: {{name: x}}\ndata: {{classes: [!!python/object/apply:os.system [\"touch '{canary}'\"]]}}\n",
        True,
    ),
    ("python-name", "run: !!python/name:os.system\n", False),
    ("python-module", "run: !!python/module:os\n", False),
    ("object-new", "run: !!python/object/new:collections.OrderedDict [[[name, x]]]\n", False),
    ("local-tag", "run: !include /etc/passwd\n", False),
]


@pytest.mark.parametrize(("name", "text", "live"), PYTHON_TAGS, ids=[case[0] for case in PYTHON_TAGS])
def test_python_tags_are_refused_and_run_nothing(tmp_path, name, text, live):
    canary = tmp_path / "canary"
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text.format(canary=canary))
    error = _refused(manifest)
    assert "not valid YAML" in str(error) and "constructor" in str(error)
    assert not canary.exists()
    if live:  # the payload is real: an unsafe loader would have run it
        import yaml

        yaml.unsafe_load(manifest.read_text())
        assert canary.exists()


def _billion_laughs(levels: int = 9) -> str:
    names = "abcdefghijklmnop"[:levels]
    lines = [f"{names[0]}: &{names[0]} [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast_without_being_expanded(tiny):
    # 9**9 = 387 million strings once expanded; data.classes would make pydantic walk them
    tiny.write_text(_billion_laughs() + tiny.read_text().replace("  classes:\n", "  classes: *i\n  unused:\n", 1))
    started = time.perf_counter()
    error = _refused(tiny)
    assert time.perf_counter() - started < 2.0
    assert "alias bomb" in str(error) and "refused" in str(error)


def test_recursive_alias_is_refused(tiny):
    tiny.write_text("loop: &loop [*loop]\n" + tiny.read_text().replace("name: tiny", "name: *loop", 1))
    assert "recursive alias" in str(_refused(tiny))


def test_duplicate_keys_nested_and_in_flow_mappings_are_refused(tiny):
    original = tiny.read_text()
    tiny.write_text(original.replace("  root: data\n", "  root: data\n  root: /\n", 1))
    assert "duplicate key 'root'" in str(_refused(tiny))
    tiny.write_text(original.replace("ingest: {batch_size: 2}", "ingest: {batch_size: 2, batch_size: 4096}"))
    assert "duplicate key 'batch_size'" in str(_refused(tiny))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"null\n",
        b"42\n",
        b"'just text'\n",
        b"- a\n- b\n",
        b"--- {}\n--- {}\n",
        b"\xff\xfe\x00r\x00u\x00n\x00",
        b"run: {name: x}\x00\n",
        b"\t- a\n",
    ],
    ids=["empty", "null", "number", "string", "list", "two-documents", "utf16", "nul", "tab"],
)
def test_documents_that_are_not_a_mapping_are_refused(tmp_path, content):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_bytes(content)
    error = _refused(manifest)
    assert error.path == str(manifest) and str(manifest) in str(error)


MANIFEST_TOKENS = [
    "&a ",
    "*a",
    "!!",
    "!!python/object/apply:os.system ['true']",
    ":",
    ": ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "? ",
    "<<: ",
    "%YAML 1.1\n",
    "\t",
    "\x00",
    "2024-13-45",
    "!!int x",
    "!!float x",
    "!!binary @",
    "!!timestamp x",
    "!!set",
    "~",
    "..",
    "../",
    "/",
    "s3://",
    "'",
    '"',
    "#",
    "\n",
    "  ",
    "---\n",
    "\ufeff",
    "1e999",
    "-.inf",
    "0x",
    "&b [*b]",
    "99999999999999999999999",
    "\\",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 3), st.sampled_from(MANIFEST_TOKENS)), min_size=1, max_size=6
    )
)
def test_mutated_manifests_load_or_raise_a_manifest_error(tiny, edits):
    """Random edits of a valid manifest: a Manifest or a ManifestError, never another exception."""
    text = tiny.read_text()
    for where, deleted, token in edits:
        at = int(where * len(text))
        text = text[:at] + token + text[at + deleted :]
    mutated = tiny.parent / "mutated.yaml"
    mutated.write_text(text)
    try:
        load_manifest(mutated)
    except ManifestError as exc:
        assert exc.path == str(mutated) and exc.problems


# ---------------------------------------------------------------- paths escaping the data root


def _with_images(manifest: Path, source: str) -> None:
    manifest.write_text(manifest.read_text().replace('  images: {glob: "images/*.png"}', f"  images: {source}", 1))


@pytest.mark.parametrize(
    "glob", ["../*.png", "../data/images/*.png", "images/../../*.png", "{root}/images/*.png", "/etc/*"]
)
def test_image_globs_escaping_the_data_root_are_refused(tiny, glob):
    _with_images(tiny, f"{{glob: '{glob.format(root=tiny.parent / 'data')}'}}")
    error = _refused(tiny, enumerate=True)
    assert any(loc.startswith("data.images") for loc, _ in error.problems), error.problems


@pytest.mark.parametrize("entry", ["../outside.png", "images/../../outside.png", "{outside}", "link.png"])
def test_image_list_entries_escaping_the_data_root_are_refused(tiny, entry):
    outside = tiny.parent / "outside.png"
    outside.write_bytes((tiny.parent / "data" / "images" / "img00.png").read_bytes())
    (tiny.parent / "data" / "link.png").symlink_to(outside)  # a symlink inside the root pointing out of it
    (tiny.parent / "data" / "list.txt").write_text(f"images/img00.png\n{entry.format(outside=outside)}\n")
    _with_images(tiny, "{list: list.txt}")
    error = _refused(tiny, enumerate=True)
    assert "outside the data root" in _first_problem(error, "data.images")


def test_index_files_may_lie_outside_the_data_root_but_their_entries_may_not(tiny):
    # issue 16: a subset of a read-only dataset is a list kept elsewhere (it was refused before)
    from seglab.pipeline.units import enumerate_units

    (tiny.parent / "list.txt").write_text("images/img00.png\n")
    _with_images(tiny, "{list: ../list.txt}")
    assert [u.id for u in enumerate_units(load_manifest(tiny))] == ["images__img00.png"]
    (tiny.parent / "list.txt").write_text("images/img00.png\n../list.txt\n")
    assert "outside the data root" in _first_problem(_refused(tiny, enumerate=True), "data.images")


@pytest.mark.parametrize("masks", ["gold-link", "~", "~/gold", "gold/../../gold"])
def test_gold_masks_escaping_the_data_root_are_refused(tiny, masks):
    (tiny.parent / "gold").mkdir()
    (tiny.parent / "data" / "gold-link").symlink_to(tiny.parent / "gold", target_is_directory=True)
    tiny.write_text(
        tiny.read_text().replace(
            "store:\n", f"  evaluation: {{images: {{glob: 'images/*.png'}}, masks: '{masks}'}}\nstore:\n", 1
        )
    )
    assert "outside the data root" in _first_problem(_refused(tiny), "data.evaluation.masks")


def test_glob_matching_a_symlink_that_points_outside_the_data_root_is_refused(tiny):
    outside = tiny.parent / "secret.png"
    outside.write_bytes((tiny.parent / "data" / "images" / "img00.png").read_bytes())
    (tiny.parent / "data" / "images" / "zz-link.png").symlink_to(outside)
    problem = _first_problem(_refused(tiny, enumerate=True), "data.images.glob")
    assert "zz-link.png" in problem and "outside the data root" in problem


# ---------------------------------------------------------------- URLs


URL_SCHEMES = ["http://", "https://", "s3://", "file://", "ftp://"]


def _url_in(manifest: Path, key: str, url: str) -> str:
    """Put ``url`` where ``key`` says; -> the location the problem must be reported at."""
    text = manifest.read_text()
    data = manifest.parent / "data"
    if key == "data.root":
        text = text.replace("  root: data\n", f"  root: '{url}'\n", 1)
    elif key in ("data.images.list", "data.images.parquet", "data.images.glob"):
        text = text.replace('  images: {glob: "images/*.png"}', f"  images: {{{key.rsplit('.', 1)[1]}: '{url}'}}", 1)
    elif key == "list entry":
        (data / "list.txt").write_text(f"images/img00.png\n{url}\n")
        text = text.replace('  images: {glob: "images/*.png"}', "  images: {list: list.txt}", 1)
        key = "data.images"
    elif key == "parquet entry":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"path": ["images/img00.png", url]}), data / "index.parquet")
        text = text.replace('  images: {glob: "images/*.png"}', "  images: {parquet: index.parquet}", 1)
        key = "data.images"
    elif key == "data.weak.path":
        text = text.replace("path: data/scribbles", f"path: '{url}'", 1)
    elif key == "data.evaluation.masks":
        text = text.replace("store:\n", f"  evaluation: {{images: {{glob: 'images/*.png'}}, masks: '{url}'}}\nstore:\n")
    elif key == "store.path":
        text = text.replace("  path: run.zarr", f"  path: '{url}'", 1)
    elif key == "backend.sam.checkpoint":
        text += f"backend: {{name: sam, checkpoint: '{url}'}}\n"
    manifest.write_text(text)
    return key


URL_KEYS = [
    "data.root",
    "data.images.list",
    "data.images.parquet",
    "data.images.glob",
    "list entry",
    "parquet entry",
    "data.weak.path",
    "data.evaluation.masks",
    "store.path",
    "backend.sam.checkpoint",
]


STORE_SCHEMES = ("s3://", "file://")
"""What store.path accepts besides paths (pipeline/core/objects.py)."""
ACCEPTED = {"store.path": STORE_SCHEMES, "data.root": ("s3://",)}
"""URLs that are no refusal where they are: data.root may be a bucket (tests/test_data_urls.py;
the file:// URL here names no absolute path, which is refused)."""


@pytest.mark.parametrize(
    "key, scheme",
    [(k, s) for k in URL_KEYS for s in URL_SCHEMES if s not in ACCEPTED.get(k, ())],
)
def test_urls_are_refused_wherever_a_path_is_expected(tiny, key, scheme):
    url = f"{scheme}example.com/bucket/images/a.png"
    location = _url_in(tiny, key, url)
    error = _refused(tiny, enumerate=True)
    assert "URL" in _first_problem(error, location) and url in _first_problem(error, location)
    assert location in cli.invoke(app, ["validate", str(tiny)]).output


# =============================================================== checkpoints


class _RunsCode:
    """Unpickling this runs code: it touches ``canary`` (three ways)."""

    def __init__(self, canary: Path, how: str):
        self.canary, self.how = str(canary), how

    def __reduce__(self):
        if self.how == "touch":
            return Path.touch, (Path(self.canary),)
        if self.how == "system":
            return os.system, (f"touch '{self.canary}'",)
        return exec, (f"open({self.canary!r}, 'w').close()",)


def malicious_checkpoints(folder: Path, canary: Path) -> list[Path]:
    """Checkpoints whose unpickling would touch ``canary``: torch's zip format (flat and
    nested under 'model' / 'teacher', as SAM2 and retrain checkpoints are), its legacy
    format, and a bare pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for how in ("touch", "system", "exec"):
        payload = _RunsCode(canary, how)
        for layout, state in (
            ("flat", {"image_encoder.pos_embed": payload, "w": torch.zeros(2)}),
            ("model", {"model": {"w": payload}}),
            ("teacher", {"teacher": {"w": payload}}),
        ):
            torch.save(state, folder / f"zip-{how}-{layout}.pt")
            paths.append(folder / f"zip-{how}-{layout}.pt")
        torch.save({"w": payload}, folder / f"legacy-{how}.pt", _use_new_zipfile_serialization=False)
        with open(folder / f"pickle-{how}.pt", "wb") as handle:
            pickle.dump({"w": payload}, handle, protocol=2)
        paths += [folder / f"legacy-{how}.pt", folder / f"pickle-{how}.pt"]
    return paths


def torn_checkpoints(folder: Path, valid: bytes) -> list[Path]:
    """The valid checkpoint bytes cut short, plus an empty file and a text file."""
    folder.mkdir(parents=True, exist_ok=True)
    cuts = {
        "empty": b"",
        "10-bytes": valid[:10],
        "half": valid[: len(valid) // 2],
        "all-but-1": valid[:-1],
        "text": b"this is not a checkpoint\n",
    }
    for name, data in cuts.items():
        (folder / f"torn-{name}.pt").write_bytes(data)
    return [folder / f"torn-{name}.pt" for name in cuts]


def test_the_malicious_checkpoints_are_live(tmp_path):
    """What the loaders must refuse really runs code when unpickled without weights_only."""
    for path in malicious_checkpoints(tmp_path / "ckpt", tmp_path / "canary"):
        assert not (tmp_path / "canary").exists()
        torch.load(path, weights_only=False) if not path.name.startswith("pickle") else pickle.loads(path.read_bytes())
        assert (tmp_path / "canary").exists(), path.name
        (tmp_path / "canary").unlink()


def _refuses(load, path: Path, message: str) -> None:
    with pytest.raises(InputError) as info:
        load(path)
    assert info.value.path == str(path) and str(path) in str(info.value), str(info.value)
    assert message in info.value.problem, str(info.value)
    assert "\x1b[" not in str(info.value) and "weights_only=False" not in str(info.value)


TINY_SAM = dict(
    model="custom", encoder={"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}, precision="fp32"
)


def test_sam_checkpoint_loader_refuses_code_and_torn_files(tmp_path):
    from seglab.workers.model_configs import SamConfig
    from seglab.workers.sam import SamBackend, build_sam_architecture

    def load(path):
        return SamBackend(SamConfig(checkpoint=str(path), **TINY_SAM)).model

    canary = tmp_path / "canary"
    for path in malicious_checkpoints(tmp_path / "evil", canary):
        _refuses(load, path, "not a safe tensor checkpoint")
    buffer = io.BytesIO()
    torch.save(build_sam_architecture(SamConfig(checkpoint="x", **TINY_SAM)).state_dict(), buffer)
    for path in torn_checkpoints(tmp_path / "torn", buffer.getvalue()):
        _refuses(load, path, "checkpoint")
    assert not canary.exists()


def test_sam2_checkpoint_loader_refuses_code_and_torn_files(tmp_path):
    from seglab.workers.model_configs import Sam2Config
    from seglab.workers.sam2 import Sam2Backend

    def load(path):
        return Sam2Backend(Sam2Config(checkpoint=str(path))).model

    canary = tmp_path / "canary"
    evil = malicious_checkpoints(tmp_path / "evil", canary)
    for path in [p for p in evil if p.name in ("zip-touch-model.pt", "zip-system-flat.pt", "legacy-exec.pt")]:
        _refuses(load, path, "not a safe tensor checkpoint")  # each one builds SAM2 (~1 s): a few suffice
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(4)}}, buffer)
    for path in torn_checkpoints(tmp_path / "torn", buffer.getvalue())[::2]:
        _refuses(load, path, "checkpoint")
    assert not canary.exists()


def test_segmenter_checkpoint_loader_refuses_code_and_torn_files(tmp_path):
    from seglab.workers.segmenter import Segmenter, TeacherPredictor

    def load(path):
        return TeacherPredictor(str(path), "lraspp_mobilenet_v3_large", 3, (32, 32))

    canary = tmp_path / "canary"
    for path in malicious_checkpoints(tmp_path / "evil", canary):
        _refuses(load, path, "not a safe tensor checkpoint")
    good = {"teacher": Segmenter("lraspp_mobilenet_v3_large", 3).state_dict()}
    torch.save(good, tmp_path / "good.pt")
    assert load(tmp_path / "good.pt")(np.zeros((20, 30, 3), np.uint8)).shape == (3, 32, 32)
    for path in torn_checkpoints(tmp_path / "torn", (tmp_path / "good.pt").read_bytes()):
        _refuses(load, path, "checkpoint")
    assert not canary.exists()


def test_training_resume_skips_malicious_and_torn_checkpoints(tmp_path):
    from seglab.pipeline.core.objects import Objects
    from seglab.workers.trainer import latest_checkpoint, save_checkpoint

    canary = tmp_path / "canary"
    folder = tmp_path / "checkpoints"
    save_checkpoint(Objects(str(folder)), 0, {"epoch": 0, "w": torch.zeros(2)})
    bad = malicious_checkpoints(tmp_path / "evil", canary)
    bad += torn_checkpoints(tmp_path / "torn", (folder / "epoch-0000.pt").read_bytes())
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # loads as tensors, but is no training state
    torch.save({"epoch": "7"}, tmp_path / "string-epoch.pt")
    bad += [tmp_path / "tensor.pt", tmp_path / "string-epoch.pt"]
    for path in bad:
        (folder / "epoch-0001.pt").write_bytes(path.read_bytes())  # the newest epoch is bad: resume from 0
        found = latest_checkpoint(Objects(str(folder)))
        assert found is not None and found[0] == "epoch-0000.pt" and found[1]["epoch"] == 0, path.name
    (folder / "epoch-0000.pt").write_bytes(bad[0].read_bytes())
    assert latest_checkpoint(Objects(str(folder))) is None
    assert not canary.exists()
