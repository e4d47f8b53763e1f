"""encode(image) → .pcb bytes and decode(bytes) → image: the one place that joins the network,
the quantization hierarchy, the entropy coder and the container.

Stream sections: the hyper-latent ẑ (factorized prior table), then one section per layer.
Within a section, elements are coded in decreasing order of expected distortion drop per
expected bit, an order both sides compute from the prior, so a cut anywhere in a section
refines the most valuable elements first at no side cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import container, entropy, quant
from .errors import StreamError, UsageError
from .models import Z_RANGE, LoadedModel

PAD_MULTIPLE = 64  # the transforms downsample by 64 in all (16 for y, 4 more for z)
FIRST_LAYER_RANGE = 1024  # layer-1 symbols -R..R; ±R are escapes followed by the excess
ESCAPE_BITS = 16  # excess of an escape coded as two uniform 16-bit halves


@dataclass
class LatentState:
    """What both sides know about the latent after some sections: the prior and intervals."""

    mu: np.ndarray  # (M, h, w) prior mean
    scale_index: np.ndarray  # (E,) index into quant.SCALES
    channel: np.ndarray  # (E,) channel of each element (flattened C, H, W order)
    sigma_units: np.ndarray  # (E,) prior scale in grid units
    lower: np.ndarray  # (E,) interval bounds in grid units; meaningful where coded
    upper: np.ndarray
    coded: np.ndarray  # (E,) bool: element has an interval


def _torch():
    import torch

    return torch


def pad_image(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % PAD_MULTIPLE, (-width) % PAD_MULTIPLE
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _first_layer_priority_table(model: LoadedModel) -> np.ndarray:
    """(scale levels, M) layer-1 keys; one entry per (scale, channel) pair."""
    cached = getattr(model, "_first_layer_keys", None)
    if cached is None:
        levels, channels = len(quant.SCALES), len(model.unit)
        scale_index = np.repeat(np.arange(levels), channels)
        channel = np.tile(np.arange(channels), levels)
        cached = quant.first_layer_priority(
            scale_index, model.int_steps[0][channel], model.unit[channel]).reshape(levels, channels)
        model._first_layer_keys = cached
    return cached


def _prior(model: LoadedModel, z_hat: np.ndarray):
    """μ and the snapped scales from ẑ, in float64 on the CPU (both sides must agree)."""
    torch = _torch()
    with torch.no_grad():
        params = model.hyper_synthesis(torch.from_numpy(z_hat.astype(np.float64))[None])[0]
    scales, means = params.chunk(2, 0)
    sigma = np.maximum(np.abs(scales.numpy()), quant.SCALES[0])
    return means.numpy(), quant.scale_indexes(sigma.reshape(-1))


def _new_state(model: LoadedModel, z_hat: np.ndarray) -> LatentState:
    mu, scale_index = _prior(model, z_hat)
    channels = mu.shape[0]
    count = mu.size
    channel = np.repeat(np.arange(channels), mu.shape[1] * mu.shape[2])
    return LatentState(
        mu=mu, scale_index=scale_index, channel=channel,
        sigma_units=quant.SCALES[scale_index] / model.unit[channel],
        lower=np.zeros(count, np.int64), upper=np.zeros(count, np.int64),
        coded=np.zeros(count, bool))


# -- hyper-latent section ------------------------------------------------------------------

def _z_models(model: LoadedModel, shape):
    channels, height, width = shape
    channel = np.repeat(np.arange(channels), height * width)
    return entropy.Model(probabilities=model.z_table[channel].astype(np.float64))


def _encode_hyper(model: LoadedModel, z_hat: np.ndarray) -> bytes:
    values = z_hat.reshape(-1).astype(np.int64)
    symbols = np.clip(values, -Z_RANGE, Z_RANGE)
    escaped = np.abs(values) >= Z_RANGE
    parts = [(_z_models(model, z_hat.shape), symbols + Z_RANGE)]
    parts += entropy.encode_uniform(np.abs(values[escaped]) - Z_RANGE, ESCAPE_BITS)
    return entropy.encode(parts)


def _decode_hyper(model: LoadedModel, data: bytes | None, shape) -> np.ndarray:
    """ẑ from its (complete) section; without one, every symbol takes its table's mode."""
    channels, height, width = shape
    mode = (np.argmax(model.z_table, axis=1) - Z_RANGE).repeat(height * width)
    if data is None:
        return mode.reshape(shape)
    z_model = _z_models(model, shape)
    (symbols,) = entropy.decode(data, [z_model])
    values = symbols - Z_RANGE
    escaped = np.nonzero(np.abs(values) >= Z_RANGE)[0]
    if len(escaped):
        excess_models = [p[0] for p in entropy.encode_uniform(np.zeros(len(escaped)), ESCAPE_BITS)]
        _, high, low = entropy.decode(data, [z_model] + excess_models)
        values[escaped] = np.sign(values[escaped]) * (Z_RANGE + ((high << ESCAPE_BITS) | low))
    return values.reshape(shape)


# -- layer sections ------------------------------------------------------------------------

@dataclass
class LayerPlan:
    """The elements a layer codes, in coding order, with their probability models."""

    elements: np.ndarray
    bounds: np.ndarray | None  # refinement layers: sub-interval boundaries per element
    counts: np.ndarray | None
    model: entropy.Model


def _plan_layer(model: LoadedModel, state: LatentState, layer: int) -> LayerPlan:
    """Both sides call this with the same state and get the same plan."""
    if layer == 0:
        keys = _first_layer_priority_table(model)[state.scale_index, state.channel]
        order = quant.coding_order(keys)
        stds = state.sigma_units[order] / model.int_steps[0][state.channel[order]]
        return LayerPlan(order, None, None,
                         entropy.Model(gaussian_range=FIRST_LAYER_RANGE, stds=stds))
    step = model.int_steps[layer][state.channel]
    counts, stretched = quant.split_counts(state.lower, state.upper, step)
    candidates = np.nonzero(state.coded & (counts > 1))[0]
    width = int(counts[candidates].max()) if len(candidates) else 1
    bounds = quant.split_bounds(state.lower[candidates], state.upper[candidates],
                                step[candidates], counts[candidates], stretched[candidates], width)
    probabilities = quant.interval_probabilities(bounds, state.sigma_units[candidates])
    keys = quant.refinement_priority(bounds, probabilities, model.unit[state.channel[candidates]])
    order = quant.coding_order(keys)
    return LayerPlan(candidates[order], bounds[order], counts[candidates][order],
                     entropy.Model(probabilities=probabilities[order]))


def _apply_first_layer(model, state, elements, q):
    step = model.int_steps[0][state.channel[elements]]
    lower, upper = quant.first_layer_interval(q, step)
    state.lower[elements], state.upper[elements] = lower, upper
    state.coded[elements] = True


def _apply_refinement(state, plan, symbols):
    decoded = len(symbols)
    rows = np.arange(decoded)
    elements = plan.elements[:decoded]
    state.lower[elements] = plan.bounds[rows, symbols]
    state.upper[elements] = plan.bounds[rows, symbols + 1]


def _encode_layer(model: LoadedModel, state: LatentState, layer: int, y_units: np.ndarray) -> bytes:
    plan = _plan_layer(model, state, layer)
    values = y_units[plan.elements]
    if layer == 0:
        q = quant.first_layer_index(values, model.int_steps[0][state.channel[plan.elements]])
        symbols = np.clip(q, -FIRST_LAYER_RANGE, FIRST_LAYER_RANGE)
        escaped = np.abs(q) >= FIRST_LAYER_RANGE
        excess = np.minimum(np.abs(q[escaped]) - FIRST_LAYER_RANGE, (1 << 2 * ESCAPE_BITS) - 1)
        q[escaped] = np.sign(q[escaped]) * (FIRST_LAYER_RANGE + excess)
        _apply_first_layer(model, state, plan.elements, q)
        parts = [(plan.model, symbols)] + entropy.encode_uniform(excess, ESCAPE_BITS)
    else:
        symbols = quant.sub_interval_index(plan.bounds, plan.counts, values)
        _apply_refinement(state, plan, symbols)
        parts = [(plan.model, symbols)]
    return entropy.encode(parts)


def _decode_layer(model: LoadedModel, state: LatentState, layer: int, data: bytes,
                  complete: bool):
    plan = _plan_layer(model, state, layer)
    if layer == 0:
        (symbols,) = entropy.decode(data, [plan.model], complete)
        escaped = np.nonzero(np.abs(symbols) >= FIRST_LAYER_RANGE)[0]
        if len(escaped):
            excess_models = [p[0] for p in entropy.encode_uniform(np.zeros(len(escaped)), ESCAPE_BITS)]
            decoded = entropy.decode(data, [plan.model] + excess_models, complete)
            if len(symbols) == len(plan.elements) and all(
                    len(d) == len(escaped) for d in decoded[1:]):
                excess = (decoded[1] << ESCAPE_BITS) | decoded[2]
                symbols[escaped] = np.sign(symbols[escaped]) * (FIRST_LAYER_RANGE + excess)
            else:  # the prefix ends before the escapes' excess: those stay uncoded
                symbols = symbols[: escaped[0]]
        _apply_first_layer(model, state, plan.elements[: len(symbols)], symbols)
    else:
        (symbols,) = entropy.decode(data, [plan.model], complete)
        if complete and len(symbols) and (symbols.min() < 0 or np.any(
                symbols >= plan.counts[: len(symbols)])):
            raise StreamError(f"corrupt stream: impossible symbol in layer {layer + 1}")
        symbols = np.minimum(symbols, plan.counts[: len(symbols)] - 1)
        _apply_refinement(state, plan, symbols)


# -- public API ----------------------------------------------------------------------------

def analyse(model: LoadedModel, image: np.ndarray):
    """Analysis transforms: y and the rounded hyper-latent ẑ of an (H, W, 3) uint8 image."""
    torch = _torch()
    x = torch.from_numpy(pad_image(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = model.network.g_a(x)
        z = model.network.h_a(y)
    return y[0].double().numpy(), np.round(z[0].numpy()).astype(np.int64)


def encode(model: LoadedModel, image: np.ndarray, layers: int | None = None) -> bytes:
    height, width = image.shape[:2]
    y, z_hat = analyse(model, image)
    sections = [_encode_hyper(model, z_hat)]
    state = _new_state(model, z_hat)
    y_units = (y - state.mu).reshape(-1) / model.unit[state.channel]
    for layer in range(layers or model.layers):
        sections.append(_encode_layer(model, state, layer, y_units))
    return container.pack(width, height, model.model_id,
                          model.digest[: container.DIGEST_BYTES], sections)


def latent_shapes(model: LoadedModel, height: int, width: int):
    padded_h, padded_w = height + (-height) % PAD_MULTIPLE, width + (-width) % PAD_MULTIPLE
    return ((model.config["N"], padded_h // 64, padded_w // 64),
            (model.config["M"], padded_h // 16, padded_w // 16))


def check_model(model: LoadedModel, header: container.Header):
    if header.weights_digest != model.digest[: container.DIGEST_BYTES]:
        raise StreamError(f"stream was made with different weights for model "
                          f"{header.model_id!r} (digest {header.weights_digest.hex()}, "
                          f"this pcodec has {model.digest[:container.DIGEST_BYTES].hex()})")
    if header.layers > model.layers:
        raise StreamError(f"stream claims {header.layers} layers; model has {model.layers}")


def decode_latents(model: LoadedModel, header: container.Header, payloads, partial):
    """Entropy-decode the sections in order, yielding (layers decoded, state) after the
    hyper-latent and after each layer; the state is updated in place."""
    z_shape, y_shape = latent_shapes(model, header.height, header.width)
    # A cut hyper-latent section is not used: a few more ẑ symbols change the prior of every
    # element and need not improve the image; the image of the most probable ẑ does for now.
    hyper = payloads[0] if payloads and not partial[0] else None
    z_hat = _decode_hyper(model, hyper, z_shape)
    state = _new_state(model, z_hat)
    if state.mu.shape != y_shape:
        raise StreamError("corrupt stream: latent shape mismatch")
    yield 0, state
    for index in range(1, len(payloads)):
        _decode_layer(model, state, index - 1, payloads[index], not partial[index])
        yield index, state


def synthesize(model: LoadedModel, state: LatentState, height: int, width: int,
               conditional_mean: bool = True) -> np.ndarray:
    torch = _torch()
    y_star = quant.reconstruct(state.lower, state.upper, state.sigma_units, state.coded,
                               conditional_mean) * model.unit[state.channel]
    # A damaged stream with valid CRCs can decode absurd values; keep them finite.
    y_hat = np.nan_to_num(state.mu + y_star.reshape(state.mu.shape),
                          posinf=1e4, neginf=-1e4).clip(-1e4, 1e4)
    with torch.no_grad():
        x = model.network.g_s(torch.from_numpy(y_hat.astype(np.float32))[None])
    pixels = torch.clamp(x[0] * 255 + 0.5, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(pixels[:height, :width])


def read_stream(model: LoadedModel, data: bytes, layers: int | None = None,
                max_bytes: int | None = None, allow_partial: bool = False,
                max_pixels: int = container.DEFAULT_MAX_PIXELS):
    """Header and the sections to decode. max_bytes decodes the first bytes of the stream as
    they are (a raw prefix, as a partial download would give); allow_partial also accepts a
    stream cut short or damaged, as far as it is intact."""
    header, header_length = container.parse_header(data, max_pixels)
    check_model(model, header)
    if max_bytes is not None:
        if max_bytes < header_length:
            raise UsageError(f"--bytes {max_bytes} is below this stream's header ({header_length} bytes)")
        data = data[:max_bytes]
    payloads, partial = container.split_sections(
        data, header, header_length, cut_ok=allow_partial or max_bytes is not None,
        damage_ok=allow_partial)
    payloads, partial = container.cut(header, payloads, partial, layers)
    return header, payloads, partial


def decode(model: LoadedModel, data: bytes, layers: int | None = None,
           max_bytes: int | None = None, allow_partial: bool = False,
           conditional_mean: bool = True,
           max_pixels: int = container.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image from a stream, or from its first `layers` layers / first `max_bytes` bytes."""
    header, payloads, partial = read_stream(model, data, layers, max_bytes, allow_partial,
                                            max_pixels)
    state = None
    for _, state in decode_latents(model, header, payloads, partial):
        pass
    return synthesize(model, state, header.height, header.width, conditional_mean)
