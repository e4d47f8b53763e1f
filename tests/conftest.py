import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "parrots.png"


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with edges and some texture: cheap, deterministic, photo-like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([
        128 + 90 * np.sin(xx / 23 + seed) * np.cos(yy / 31),
        128 + 80 * np.cos((xx + yy) / 41),
        128 + 70 * np.sin(yy / 17 - seed),
    ], axis=-1)
    image[(xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(height, width) / 3) ** 2] *= 0.6
    image += rng.normal(0, 6, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def image_folder(folder: Path, count: int, height: int, width: int) -> Path:
    """`count` synthetic photos of height x width as PNGs in a new folder."""
    from PIL import Image

    folder.mkdir()
    for seed in range(count):
        Image.fromarray(synthetic_image(height, width, seed)).save(folder / f"{seed}.png")
    return folder


# Loaded and encoded once for the whole run (cached), shared read-only by the tests.
@lru_cache(maxsize=1)
def _default_model():
    from pcodec import models

    return models.load()


@lru_cache(maxsize=1)
def _sample_image() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(SAMPLE).convert("RGB"))


@lru_cache(maxsize=1)
def _sample_stream() -> bytes:
    from pcodec import engine

    return engine.encode(_default_model(), _sample_image())


@pytest.fixture()
def model():
    return _default_model()


@pytest.fixture()
def sample_image():
    return _sample_image()


@pytest.fixture()
def sample_stream():
    return _sample_stream()


def pytest_configure(config):
    # The suite runs beside other work on 2 cores; keep torch from oversubscribing them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
