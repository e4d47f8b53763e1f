"""Rate–distortion of real .pcb streams: every layer, and byte cuts, of actual files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import container, engine
from .imageio import read_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse > 0 else 100.0


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes)
    return files[:limit] if limit else files


def layer_points(model, image: np.ndarray, data: bytes | None = None,
                 with_midpoint: bool = False):
    """(bytes, PSNR[, PSNR of midpoint reconstruction]) after the hyper-latent and after
    every layer, one entropy decode for all."""
    data = data or engine.encode(model, image)
    header, payloads, partial = engine.read_stream(model, data)
    points = []
    for layers, state in engine.decode_latents(model, header, payloads, partial):
        size = len(container.repack(header, payloads[:layers + 1], partial[:layers + 1]))
        pixels = engine.synthesize(model, state, header.height, header.width)
        point = (size, psnr(pixels, image))
        if with_midpoint:
            midpoint = engine.synthesize(model, state, header.height, header.width, False)
            point += (psnr(midpoint, image),)
        points.append(point)
    return points


def evaluate_weights(weights_path: Path, folder: Path, limit: int | None = None,
                     with_midpoint: bool = False) -> dict:
    """Mean bpp and PSNR per layer (layers 1..L) over the images of a folder."""
    from .models import load_weights_file

    model = load_weights_file(weights_path)
    rows = []
    for path in image_files(folder, limit):
        image = read_image(str(path), 1 << 30)
        pixels = image.shape[0] * image.shape[1]
        points = layer_points(model, image, with_midpoint=with_midpoint)[1:]
        rows.append([(8 * p[0] / pixels,) + p[1:] for p in points])
    mean = np.mean(rows, axis=0)  # (layers, fields)
    result = {"images": len(rows), "bpp": [round(float(v), 4) for v in mean[:, 0]],
              "psnr": [round(float(v), 3) for v in mean[:, 1]]}
    if with_midpoint:
        result["psnr_midpoint_reconstruction"] = [round(float(v), 3) for v in mean[:, 2]]
    return result
