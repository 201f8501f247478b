"""decode_image: every bad file becomes an InputError; modes, bit depths and EXIF are handled."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seglab.pipeline.base.errors import InputError
from seglab.stages.parts.imageio import decode_image, scale_16bit_to_8bit

LIMIT = 10_000_000


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand, so that the IHDR can declare anything."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_rgb_png_round_trip(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


def test_png_with_jpg_extension_is_decoded_by_content(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.jpg", format="PNG")
    np.testing.assert_array_equal(decode_image(tmp_path / "a.jpg", max_pixels=LIMIT), rgb)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, rgb, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.fromarray(rgb).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated") as info:
        decode_image(path, max_pixels=LIMIT)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), "not an image"),
        (png_bytes(0, 10, 8, 0, b""), "zero dimension|corrupt|not an image"),
    ],
)
def test_unreadable_content(tmp_path, content, message):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        decode_image(path, max_pixels=LIMIT)


def test_postscript_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    path = tmp_path / "photo.png"  # the content decides: EPS, whatever the name says
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path, format="EPS")
    with pytest.raises(InputError, match="EPS .*would run Ghostscript") as info:
        decode_image(path, max_pixels=LIMIT)
    assert info.value.path == str(path) and not ran


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found"):
        decode_image(tmp_path / "nope.png", max_pixels=LIMIT)
    with pytest.raises(InputError, match="directory"):
        decode_image(tmp_path, max_pixels=LIMIT)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1, 128, 256, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    out = decode_image(tmp_path / "g.png", max_pixels=LIMIT)
    assert out.shape == (1, 7, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 0, 1, 4, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_image_that_pillow_opens_as_mode_I(tmp_path):
    values = np.array([256, 1000, 32768], dtype=">u2")  # not 0..65535: a min..max stretch would differ
    (tmp_path / "g.pgm").write_bytes(b"P5\n3 1\n65535\n" + values.tobytes())
    assert Image.open(tmp_path / "g.pgm").mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "g.pgm", max_pixels=LIMIT)[0, :, 1], [1, 4, 128])


def test_32bit_int_and_float_images_are_stretched_min_to_max(tmp_path):
    Image.fromarray(np.array([[1000, 1100, 1510]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "i.tif", max_pixels=LIMIT)[0, :, 0], [0, 50, 255])
    Image.fromarray(np.array([[0.0, 0.2, np.nan, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "f.tif", max_pixels=LIMIT)[0, :, 0], [0, 51, 0, 255])


def test_scale_16bit_matches_rounded_formula():
    values = np.arange(65536, dtype=np.uint16)
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(scale_16bit_to_8bit(values), expected)


def test_alpha_is_dropped_not_composited(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", max_pixels=LIMIT)
    assert out.shape == (2, 3, 3)
    assert (out == [10, 20, 30]).all()
    Image.new("LA", (3, 2), (100, 0)).save(tmp_path / "la.png")
    assert (decode_image(tmp_path / "la.png", max_pixels=LIMIT) == 100).all()


def test_palette_image_gives_palette_colours(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="L").convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.save(tmp_path / "p.png")
    out = decode_image(tmp_path / "p.png", max_pixels=LIMIT)
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 255, 0]])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = decode_image(tmp_path / "c.jpg", max_pixels=LIMIT)
    assert out.shape == (16, 16, 3)
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 50


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:8, :8] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "r.jpg", max_pixels=LIMIT)
    assert out.shape == (40, 20, 3)
    assert out[:8, -8:].mean() > 200  # marker now top-right
    assert out[:8, :8].mean() < 50


def test_declared_size_over_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(5000, 5000, 1, 0, b"\0" * 100))  # data is garbage: never decoded
    with pytest.raises(InputError, match=r"5000x5000 = 25000000 pixels exceeds the limit of 1000000"):
        decode_image(path, max_pixels=1_000_000)
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="decompression bomb"):
        decode_image(tmp_path / "small.png", max_pixels=64 * 64 - 1)
    assert decode_image(tmp_path / "small.png", max_pixels=64 * 64).shape == (64, 64, 3)


def test_pillow_bomb_guard_becomes_input_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(60000, 60000, 1, 0, b"\0" * 100))
    with pytest.raises(InputError, match="decompression-bomb guard"):
        decode_image(path, max_pixels=10**12)


@pytest.mark.filterwarnings("error")
def test_pillow_bomb_warning_as_error_becomes_input_error(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(10000, 10000, 1, 0, b"\0" * 100))  # between Pillow's warn and error limits
    with pytest.raises(InputError):
        decode_image(path, max_pixels=10**12)


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "m.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "m.gif").n_frames == 2
    out = decode_image(tmp_path / "m.gif", max_pixels=LIMIT)
    assert out.shape == (6, 8, 3)
    assert (out == [255, 0, 0]).all()


def test_bilevel_image(tmp_path):
    Image.fromarray(np.array([[0, 1]], dtype=bool)).save(tmp_path / "b.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "b.png", max_pixels=LIMIT)[0, :, 0], [0, 255])


_VALID = {}


def _valid_file(fmt: str) -> bytes:
    if fmt not in _VALID:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, fmt)
        _VALID[fmt] = buffer.getvalue()
    return _VALID[fmt]


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP"]),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4),
)
def test_damaged_files_decode_or_raise_input_error_only(tmp_path, fmt, cut, flips):
    data = bytearray(_valid_file(fmt))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = tmp_path / "damaged.img"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    try:
        out = decode_image(path, max_pixels=LIMIT)
    except InputError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
