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
                 conditional_mean: bool = True):
    """(bytes, PSNR) after the hyper-latent and after every layer, one entropy decode for all."""
    data = data or engine.encode(model, image)
    header, payloads, partial = engine.read_stream(model, data)
    points = []
    for layers, state in engine.decode_latents(model, header, payloads, partial):
        size = len(container.repack(header, payloads[:layers + 1], partial[:layers + 1]))
        pixels = engine.synthesize(model, state, header.height, header.width, conditional_mean)
        points.append((size, psnr(pixels, image)))
    return points


def evaluate_weights(weights_path: Path, folder: Path, limit: int | None = None,
                     conditional_mean: bool = True) -> dict:
    """Mean bpp and PSNR per layer (layers 1..L) over the images of a folder."""
    from .models import load_weights_file

    model = load_weights_file(weights_path)
    bpp, quality = [], []
    for path in image_files(folder, limit):
        image = read_image(str(path), 1 << 30)
        pixels = image.shape[0] * image.shape[1]
        points = layer_points(model, image, conditional_mean=conditional_mean)[1:]
        bpp.append([8 * size / pixels for size, _ in points])
        quality.append([p for _, p in points])
    return {"images": len(bpp), "bpp": [round(float(v), 4) for v in np.mean(bpp, axis=0)],
            "psnr": [round(float(v), 3) for v in np.mean(quality, axis=0)]}
