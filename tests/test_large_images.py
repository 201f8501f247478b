"""Large images: refused up front above ``ingest.max_pixels``, and processed with the
memory bound the README states ("Large images") below it."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from seglab.pipeline.base.errors import InputError
from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.ingest import Ingest, IngestConfig

#: the README's bound on a worker's peak resident memory, in MiB: A + (B + C_PER_CLASS * C) * MP
A_MIB, B_MIB_PER_MP, C_MIB_PER_MP_CLASS = 400, 80, 12

#: one process, the weight-free backend's stages one after the other on a synthetic H x W image
#: with C scribbled classes; per stage the peak resident memory (VmHWM, reset before each stage)
#: with only that stage's inputs held, as a worker holds them
CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
from seglab.stages.base import ClassTable, Context, Unit
from seglab.stages.embed import Embed, EmbedConfig
from seglab.stages.ingest import Ingest, IngestConfig
from seglab.stages.prompts import Prompts, PromptsConfig
from seglab.stages.refine import Refine, RefineConfig
from seglab.stages.select import Select, SelectConfig
from seglab.workers.weightfree import WeightFreeBackend

h, w, c, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
yy, xx = np.ogrid[:h, :w]
image = np.full((h, w, 3), (100, 120, 90), np.uint8)
image[(yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 3) ** 2 / (w / 4) ** 2 < 1] = (200, 40, 40)
weak = np.full((h, w), 255, np.uint8)
for k in range(c):
    row = int((k + 0.5) * h / c)
    image[row - h // (3 * c): row + h // (3 * c), : w // 2] = (20 * k, 200 - 15 * k, 90)
    weak[row, w // 10: w - w // 10] = k
Image.fromarray(image).save(f"{folder}/im.png", compress_level=1)
Image.fromarray(weak).save(f"{folder}/weak.png")
del image, weak, yy, xx
backend = WeightFreeBackend()
ctx = Context(classes=ClassTable(tuple(range(c)), tuple(map(str, range(c))), 255), weak_kind="scribbles", seed=0,
              backend=backend, unlabelled=255, feature_names=backend.feature_names())
unit = Unit("im", f"{folder}/im.png", weak_map=f"{folder}/weak.png")


def peak_mib(run):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    out = run()
    status = open("/proc/self/status").read()
    return out, int(status.split("VmHWM:")[1].split()[0]) / 1024


def prefixed(stage, arrays):
    return {f"{stage}/{k}": v for k, v in arrays.items()}


peaks = {}
ingest, peaks["ingest"] = peak_mib(lambda: Ingest(IngestConfig()).process(unit, {}, ctx))
embed, peaks["embed"] = peak_mib(lambda: Embed(EmbedConfig()).process(unit, {"ingest/image": ingest["image"]}, ctx))
weak = {"ingest/weak": ingest["weak"], "ingest/boxes": ingest["boxes"], "ingest/image": ingest["image"]}
del ingest
prompts, peaks["prompts"] = peak_mib(lambda: Prompts(PromptsConfig()).process(unit, weak, ctx))
select, peaks["select"] = peak_mib(lambda: Select(SelectConfig()).process(
    unit, {**weak, **prefixed("embed", embed), **prefixed("prompts", prompts)}, ctx))
refine, peaks["refine"] = peak_mib(lambda: Refine(RefineConfig()).process(
    unit, {**weak, **prefixed("embed", embed), **prefixed("select", select)}, ctx))
assert refine["labels"].shape == (h, w) and set(np.unique(select["labels"]).tolist()) == set(range(c))
print(json.dumps(peaks))
"""


def stage_peaks(height: int, width: int, classes: int, folder: Path) -> dict[str, float]:
    """Peak resident memory (MiB) of each stage on a synthetic image, measured in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(height), str(width), str(classes), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def bound_mib(pixels: int, classes: int) -> float:
    return A_MIB + (B_MIB_PER_MP + C_MIB_PER_MP_CLASS * classes) * pixels / 1e6


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds no decodable data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\0" * 100) + chunk(b"IEND", b"")


def test_an_image_above_max_pixels_is_refused_at_ingest_before_decoding(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(png_header(9000, 9000))  # 81 MP; its data is garbage, so decoding would fail otherwise
    ctx = Context(classes=ClassTable((0, 1), ("a", "b"), 255), weak_kind="points", seed=0)
    unit = Unit("scan", str(path), weak_rows=((1.0, 1.0, 1),), weak_source=str(tmp_path / "points.csv"))
    limit = IngestConfig().max_pixels
    with pytest.raises(
        InputError,
        match=rf"9000x9000 = 81000000 pixels exceeds the limit of {limit} "
        r"\(ingest.max_pixels",
    ) as info:
        Ingest(IngestConfig()).process(unit, {}, ctx)
    assert info.value.path == str(path)


def test_a_24_megapixel_photo_is_accepted_by_default():
    assert IngestConfig().max_pixels >= 6000 * 4000


def test_a_large_image_runs_every_stage_within_the_stated_memory_bound(tmp_path):
    height, width, classes = 1500, 2000, 8
    peaks = stage_peaks(height, width, classes, tmp_path)
    bound = bound_mib(height * width, classes)
    assert max(peaks.values()) < bound, (peaks, bound)
    # the encoder no longer grows with the image: the feature work is at a capped resolution
    assert peaks["embed"] - peaks["ingest"] < 0.25 * bound, peaks
