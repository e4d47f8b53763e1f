"""Rate–distortion of real .pcb streams: every layer, and byte cuts, of actual files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import container, engine
from .imageio import read_image
from .quant import SCALES, layers_in_use


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
        pixels = engine.synthesize(model, state, header.height, header.width, layers=layers)
        point = (size, psnr(pixels, image))
        if with_midpoint:
            midpoint = engine.synthesize(model, state, header.height, header.width, False, layers)
            point += (psnr(midpoint, image),)
        points.append(point)
    return points


def quality_layer_points(model, image: np.ndarray, data: bytes):
    """(bytes, PSNR) of each quality layer of a stream whose layers are formed by rate
    (format 3): the stream's prefix where the layer ends, as `decode --layers` decodes it."""
    header, header_length = container.parse_header(data)
    sizes = [header_length + end for end in header.layer_ends]
    return [(size, psnr(pixels, image)) for size, pixels in engine.decode_prefixes(model, data, sizes)]


def prior_scale_saturation(model, data: bytes) -> float:
    """The fraction of latent elements whose prior σ is the top of the coder's table
    (quant.SCALE_MAX). Training clamps σ there too, with no gradient beyond it, so a latent
    grown past it codes against a prior that no longer follows the image: gdn320 at step
    74,026 had 93 % of kodim01's σ there (docs/gdn320.md). A healthy model has almost none."""
    header, payloads, partial = engine.read_stream(model, data, layers=0)
    _, state = next(engine.decode_latents(model, header, payloads, partial))
    return float(np.mean(state.scale_index == len(SCALES) - 1))


def evaluate_weights(weights_path: Path, folder: Path, limit: int | None = None,
                     with_midpoint: bool = False) -> dict:
    """Mean bpp and PSNR per layer (layers 1..L) over the images of a folder, the share of
    prior scales at the table's top, and how many channels each refinement layer can refine
    at all (quant.layers_in_use: from the steps). Weights whose streams form their layers
    by rate: per quality layer (an image with fewer, its whole stream in the missing ones)."""
    from .models import load_weights_file

    model = load_weights_file(weights_path)
    rows, saturation = [], []
    for path in image_files(folder, limit):
        image = read_image(str(path), 1 << 30)
        pixels = image.shape[0] * image.shape[1]
        data = engine.encode(model, image)
        if model.layer_bpp:
            points = quality_layer_points(model, image, data)
            points += points[-1:] * (engine.most_layers(model) - len(points))
        else:
            points = layer_points(model, image, data, with_midpoint=with_midpoint)[1:]
        rows.append([(8 * p[0] / pixels,) + p[1:] for p in points])
        saturation.append(prior_scale_saturation(model, data))
    mean = np.mean(rows, axis=0)  # (layers, fields)
    result = {"images": len(rows), "bpp": [round(float(v), 4) for v in mean[:, 0]],
              "psnr": [round(float(v), 3) for v in mean[:, 1]],
              "prior_scale_at_max": round(float(np.mean(saturation)), 4)}
    result["layers_in_use"] = layers_in_use(model.int_steps)
    if with_midpoint and not model.layer_bpp:
        result["psnr_midpoint_reconstruction"] = [round(float(v), 3) for v in mean[:, 2]]
    return result


def ideal_bits(lower: np.ndarray, upper: np.ndarray, sigma: np.ndarray) -> float:
    """-log2 of N(0, sigma)'s mass on each [lower, upper], summed: the code length an ideal
    coder spends (intervals mirrored to the negative side, where Φ keeps its precision)."""
    from scipy.special import ndtr

    mirror = (lower + upper) > 0
    low = np.where(mirror, -upper, lower) / sigma
    high = np.where(mirror, -lower, upper) / sigma
    mass = np.maximum(ndtr(high) - ndtr(low), 1e-300)
    return float(-np.log2(mass).sum())


def _uniform_point(model, image: np.ndarray, mu, channel, y_units, sigma, step):
    """PSNR and ideal code length of y* quantized on a plain grid of `step` (grid units per
    element) centred on the prior mean, reconstructed at the conditional mean."""
    from . import quant

    q = np.floor(y_units / step + 0.5)
    lower, upper = (q - 0.5) * step, (q + 0.5) * step
    y_star = quant.reconstruct(lower, upper, sigma, np.ones(len(q), bool))
    y_hat = mu + (y_star * model.unit[channel]).reshape(mu.shape)
    pixels = engine._render(model, y_hat.astype(np.float32), *image.shape[:2])
    return psnr(pixels, image), ideal_bits(lower, upper, sigma)


def unquantized_psnr(model, image: np.ndarray) -> float:
    """PSNR of g_s(g_a(x)) with y not quantized at all: the transforms' own ceiling, which no
    layer can pass however fine its steps."""
    y, _ = engine.analyse(model, image)
    return psnr(engine._render(model, y.astype(np.float32), *image.shape[:2]), image)


def nesting_cost(model, image: np.ndarray, iterations: int = 8) -> list[dict]:
    """What the embedded (nested) quantizer costs against a plain one, per layer.

    For each layer: the ideal code length of the nested intervals the real decoder holds and
    its PSNR, and the code length of a uniform quantizer (cells a·s_l centred on the prior
    mean, conditional-mean reconstruction, same transforms and prior) with `a` bisected to the
    same PSNR. The difference is the price of progressivity paid in the quantizer alone.
    """
    data = engine.encode(model, image)
    header, payloads, partial = engine.read_stream(model, data)
    height, width = image.shape[:2]
    hyper_bits = 8 * len(payloads[0])
    y, _ = engine.analyse(model, image)
    latents = engine.decode_latents(model, header, payloads, partial)
    _, state = next(latents)  # after the hyper-latent: the prior
    mu, channel, sigma = state.mu, state.channel, state.sigma_units(model)
    y_units = (y - mu).reshape(-1) / model.unit[channel]
    rows = []
    for layers, state in latents:
        coded = state.coded
        nested_bits = ideal_bits(state.lower[coded].astype(np.float64),
                                 state.upper[coded].astype(np.float64), sigma[coded])
        target = psnr(engine.synthesize(model, state, height, width), image)
        base_step = model.int_steps[layers - 1][channel].astype(np.float64)
        low, high = np.log(0.25), np.log(4.0)  # log a; PSNR falls as the step grows
        samples = []
        for log_a in [low, high] + [None] * iterations:
            if log_a is None:
                log_a = (low + high) / 2
            samples.append(_uniform_point(model, image, mu, channel, y_units, sigma,
                                          np.exp(log_a) * base_step))
            if len(samples) > 2:
                low, high = (log_a, high) if samples[-1][0] > target else (low, log_a)
        (q1, b1), (q2, b2) = sorted(samples, key=lambda s: abs(s[0] - target))[:2]
        weight = 0.0 if q1 == q2 else (target - q1) / (q2 - q1)  # log-rate linear in PSNR
        uniform_bits = float(np.exp2(np.log2(b1) + weight * (np.log2(b2) - np.log2(b1))))
        rows.append({"layer": layers, "psnr": target,
                     "nested_bpp": (nested_bits + hyper_bits) / (height * width),
                     "uniform_bpp": (uniform_bits + hyper_bits) / (height * width)})
    return rows
