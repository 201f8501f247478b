"""Decode image files for the ``ingest`` stage, refusing anything unsafe or broken.

``decode_image`` returns the pixels seglab works on: a C-contiguous, writeable
``uint8`` array of shape ``(H, W, 3)``, axis order (row, column, channel), channels R, G, B.

Files are named by a local path or by the URL of an object (``s3://bucket/key``,
``gs://...``, read through obstore); every message names the one or the other.

Rules (shared with the weak-label readers through ``open_checked``):

* The file's *content* decides the format; its extension is ignored. PostScript (EPS)
  is refused before decoding: Pillow renders it by running Ghostscript, an interpreter that
  untrusted files must not reach.
* The declared size is checked before any pixel is decoded: ``width * height`` above
  ``max_pixels`` is refused as a possible decompression bomb. Pillow's own bomb guard
  (``Image.MAX_IMAGE_PIXELS``) still applies on top: its hard error, and its warning
  when the caller's warning filters turn it into an exception, become ``InputError``.
* Truncated or corrupt files are refused (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set).
* The EXIF orientation is applied, so arrays match what an image viewer displays.
* Multi-frame files (GIF, APNG, multi-page TIFF): the first frame only.

Colour handling in ``decode_image``:

* RGB as is; L, P, 1, CMYK, YCbCr and other Pillow modes through ``Image.convert("RGB")``.
* Alpha (RGBA, LA, PA, palette transparency) is dropped, not composited: every pixel keeps
  the colour stored under it, whatever its opacity.
* 16-bit samples (I;16*, and mode I from PNG/PNM files, where it holds 16-bit samples) are
  scaled by the range of the bit depth, ``round(v * 255 / 65535)``, never clipped.
  16-bit RGB(A) PNGs are reduced to 8 bits by Pillow itself (high byte).
* Mode I from other formats (32-bit integers) and mode F (floats) have no fixed range:
  the image's own finite min..max is stretched to 0..255 (a constant image becomes 0;
  NaN and infinities become 0).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seglab.pipeline.base.errors import InputError, TransientError
from seglab.pipeline.base.objecturl import exists, is_object_url, read_bytes

#: formats whose mode "I" images hold 16-bit samples (Pillow widens them to int32)
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
#: formats Pillow decodes by running an external program on the file
_EXTERNAL_DECODER_FORMATS = frozenset({"EPS"})


def read_file_bytes(path: Path | str) -> bytes:
    """Whole file (or object) contents. Missing/unreadable files -> InputError; other I/O
    failures (which may go away on a retry: an unreachable endpoint) -> TransientError."""
    try:
        return read_bytes(path)
    except OSError as exc:
        _raise_read_failure(path, exc)


def file_exists(path: Path | str) -> bool:
    """Whether a file (or object) is at ``path``; TransientError when an object store cannot say."""
    try:
        return exists(path)
    except OSError as exc:
        _raise_read_failure(path, exc)


def _raise_read_failure(path: Path | str, exc: OSError) -> NoReturn:
    failure = _read_failure(path, exc)
    raise failure from (exc if isinstance(failure, TransientError) else None)


def _read_failure(path: Path | str, exc: OSError) -> InputError | TransientError:
    """What reading ``path`` failing with ``exc`` is: one line naming ``path``."""
    remote = is_object_url(path)
    if isinstance(exc, FileNotFoundError):
        return InputError(path, exc.strerror if remote and exc.strerror else "file not found")
    if isinstance(exc, IsADirectoryError):
        return InputError(path, "is a directory, not a file")
    if isinstance(exc, PermissionError):
        if remote:
            return InputError(path, f"permission denied: these credentials may not read the object ({exc.strerror})")
        return InputError(path, "permission denied: the file is not readable by this user")
    if remote:
        return TransientError(f"{path}: could not read the object ({exc.strerror})")
    return TransientError(f"{path}: could not read the file ({exc})")


def _describe_decode_failure(exc: Exception) -> str:
    if isinstance(exc, _BOMB_ERRORS):
        return f"refused by Pillow's decompression-bomb guard ({exc})"
    if isinstance(exc, UnidentifiedImageError):
        return (
            "not an image Pillow can read (the content matches no known format; "
            "the file extension is not used to decide)"
        )
    if "truncated" in str(exc).lower():
        return "the file is truncated (incomplete download or copy?); replace it with a complete copy"
    return f"corrupt or unsupported image data ({type(exc).__name__}: {exc})"


def _check_size(
    path: Path | str, width: int, height: int, max_pixels: int, expected_hw: tuple[int, int] | None
) -> None:
    if width <= 0 or height <= 0:
        raise InputError(path, f"declared size {width}x{height} has a zero dimension")
    if expected_hw is not None and sorted((width, height)) != sorted(expected_hw):
        eh, ew = expected_hw
        raise InputError(path, f"is {width}x{height} pixels (width x height) but its image is {ew}x{eh}")
    if width * height > max_pixels:
        raise InputError(
            path,
            f"declared size {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (ingest.max_pixels, which bounds a worker's memory; or a "
            f"decompression bomb): downscale the image or raise the limit",
        )


def open_checked(
    path: Path | str, *, max_pixels: int, expected_hw: tuple[int, int] | None = None, data: bytes | None = None
) -> tuple[Image.Image, str]:
    """Open, size-check and fully decode the first frame of an image file.

    expected_hw: (H, W) the image must have after EXIF orientation (used for label maps).
    data: the file's content when the caller read it already (``path`` then names it in messages).
    Returns (the frame with EXIF orientation applied, in whatever mode the file has;
    the format Pillow detected, e.g. "PNG"). Every decoding problem -> InputError.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data = read_file_bytes(path) if data is None else data
    if not data:
        raise InputError(path, "file is empty (0 bytes)")
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        fmt = image.format or ""
        if fmt in _EXTERNAL_DECODER_FORMATS:
            raise InputError(
                path,
                f"is {fmt} (PostScript), which is refused: decoding it would run Ghostscript "
                f"on the file; convert it to PNG or TIFF first",
            )
        declared_size = image.size
        _check_size(path, *declared_size, max_pixels, expected_hw)
        image.load()
        image = ImageOps.exif_transpose(image)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise many types on bad data
        raise InputError(path, _describe_decode_failure(exc)) from exc
    width, height = image.size  # a few formats (ICO, JPEG draft) settle their size on load
    if width * height > max_pixels:
        _check_size(path, width, height, max_pixels, None)
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        eh, ew = expected_hw
        rotated = (width, height) != declared_size
        why = " after applying its EXIF orientation" if rotated else ""
        hint = "; fix or remove its orientation tag" if rotated else ""
        raise InputError(path, f"is {width}x{height} pixels (width x height){why}, but its image is {ew}x{eh}{hint}")
    return image, fmt


def scale_16bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Any-shape 16-bit samples (0..65535) -> uint8, round(v * 255 / 65535) exactly."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def stretch_to_8bit(path: Path | str, values: np.ndarray) -> np.ndarray:
    """Any-shape numbers -> uint8 with the finite min..max mapped onto 0..255.

    A constant image maps to 0; NaN and infinities map to 0.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        raise InputError(path, "has no finite pixel values (all NaN or infinite)")
    low, high = data[finite].min(), data[finite].max()
    out = np.zeros(data.shape, dtype=np.uint8)
    if high > low:
        out[finite] = np.rint((data[finite] - low) * (255.0 / (high - low))).astype(np.uint8)
    return out


def _to_rgb8(path: Path | str, image: Image.Image, fmt: str) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        pixels = np.array(image, dtype=np.uint8)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        samples = np.asarray(image)
        unsigned_16 = samples.dtype.kind == "u" and samples.dtype.itemsize == 2
        widened_16 = mode == "I" and fmt in _SIXTEEN_BIT_I_FORMATS and samples.min() >= 0 and samples.max() <= 65535
        if unsigned_16 or widened_16:
            gray = scale_16bit_to_8bit(samples)
        else:
            gray = stretch_to_8bit(path, samples)
        pixels = np.repeat(gray[..., None], 3, axis=-1)
    else:
        try:
            pixels = np.array(image.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as exc:
            raise InputError(path, f"colour mode {mode} cannot be converted to RGB ({exc})") from exc
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise InputError(path, f"decoded to an array of shape {pixels.shape}, expected (H, W, 3) with H, W > 0")
    return np.ascontiguousarray(pixels)


def decode_image(path: Path | str, *, max_pixels: int, data: bytes | None = None) -> np.ndarray:
    """Decode one image file (a path or an object's URL; ``data``: its content, when read
    already) -> uint8 [H, W, 3] RGB, C-contiguous and writeable.

    H and W are the displayed size (after EXIF orientation). Raises InputError for a
    missing, empty, truncated, corrupt, oversized (``W * H > max_pixels``) or
    unconvertible file; the message says what is wrong.
    """
    image, fmt = open_checked(path, max_pixels=max_pixels, data=data)
    return _to_rgb8(path, image, fmt)
