"""encode(image) → .pcb bytes and decode(bytes) → image: the one place that joins the
transforms (on tiles, in threads), the section coding (coding.py) and the container."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import container, quant
from .coding import (
    CHUNK,
    LatentState,
    decode_hyper,
    decode_layer,
    encode_hyper,
    encode_layer,
    new_state,
    plan_layer,
    thread_count,
)
from .errors import StreamError, UsageError
from .models import LoadedModel

PAD_MULTIPLE = 64  # the transforms downsample by 64 in all (16 for y, 4 more for z)
TILE_LATENTS = 32  # transforms run on tiles of 32x32 latents (512x512 pixels) ...
TILE_MARGIN = 4  # ... with 4 latents (64 pixels) of context around each
# Above a megapixel, smaller tiles: 44 % more transform work in the margins, a few % of a
# large image's coding time, and a 4K synthesis on 2 threads peaks 0.2 GB lower.
LARGE_IMAGE_LATENTS, TILE_LATENTS_LARGE = 64 * 64, 16


def _torch():
    import torch

    return torch


def pad_image(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    pad_h, pad_w = (-height) % PAD_MULTIPLE, (-width) % PAD_MULTIPLE
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# -- public API ----------------------------------------------------------------------------

STAGE_SECONDS: dict[str, float] = {}  # wall time per stage, accumulated (bench-speed reads it)


@contextmanager
def stage(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def single_threaded():
    """torch ops single-threaded inside; yields the thread count to use for parallel tiles."""
    torch = _torch()
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield workers
    finally:
        torch.set_num_threads(workers)


@contextmanager
def blas_single_threaded():
    """numpy's BLAS single-threaded inside; yields the thread count to use for parallel tiles.
    OpenBLAS's sums depend on its thread count: a 384x256 decode with 1 thread and with 2
    differed by 1 in 6 pixel values (AMD EPYC, 2026-12-05), so a decode in a pipe (where a
    parent had set OMP_NUM_THREADS=1) and one in a shell disagreed."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield thread_count()  # OMP_NUM_THREADS where set: `-j` workers share the cores


def _splits(size: int, tile: int) -> list[tuple[int, int]]:
    count = -(-size // tile)
    edges = [size * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def tiled(transform, source, factor: float, tile: int | None = None, margin: int = TILE_MARGIN,
          parallel: bool = True, threads=single_threaded):
    """Run a convolutional transform over a (1, C, H, W) tensor in overlapping tiles.

    Tiles are at most `tile` latents a side (a latent is 16 pixels), with `margin` latents of context
    on each side, more than the transforms' receptive field, so each tile's centre equals the
    untiled result and memory stays bounded for any image size. `factor` is the transform's
    scale in latents per source unit: 1/16 for the analysis, 16 for the synthesis.
    `parallel=False` runs the tiles one by one, as they are (a GPU does).

    Each tile runs single-threaded (`threads`: torch's, or numpy's BLAS with
    blas_single_threaded) and tiles run in parallel on the thread count it yields: a
    multi-threaded convolution sums in an order that depends on the thread count, which
    would change a pixel here and there; this way the result depends only on the image size.
    """
    per_latent = 16 if factor < 1 else 1  # source units per latent
    out_per_latent = 16 if factor > 1 else 1
    height, width = source.shape[2] // per_latent, source.shape[3] // per_latent
    if tile is None:  # a function of the image size only, like everything else here
        tile = TILE_LATENTS if height * width <= LARGE_IMAGE_LATENTS else TILE_LATENTS_LARGE
    # Equal tiles of at most `tile` latents (48 → 24 + 24, not 32 + 16): tiles run in
    # parallel, and the largest one sets the time.
    rows, cols = _splits(height, tile), _splits(width, tile)
    boxes = [(top, left, bottom, right) for top, bottom in rows for left, right in cols]

    def run(box):
        top, left, bottom, right = box
        t0, l0 = max(0, top - margin), max(0, left - margin)
        t1, l1 = min(height, bottom + margin), min(width, right + margin)
        piece = transform(source[:, :, t0 * per_latent:t1 * per_latent,
                                 l0 * per_latent:l1 * per_latent])
        return piece[:, :, (top - t0) * out_per_latent:(bottom - t0) * out_per_latent,
                     (left - l0) * out_per_latent:(right - l0) * out_per_latent]

    output = None

    def place(box, piece):  # each tile goes into the output as it arrives: bounded memory
        nonlocal output
        if output is None:
            shape = (1, piece.shape[1], height * out_per_latent, width * out_per_latent)
            output = (np.empty(shape, piece.dtype) if isinstance(piece, np.ndarray)
                      else piece.new_empty(shape))
        top, left, bottom, right = box
        output[:, :, top * out_per_latent:bottom * out_per_latent,
               left * out_per_latent:right * out_per_latent] = piece

    if not parallel:
        for box in boxes:
            place(box, run(box))
        return output
    with threads() as workers:
        if len(boxes) == 1 or workers == 1:
            for box in boxes:
                place(box, run(box))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(boxes))) as pool:
                for box, piece in zip(boxes, pool.map(run, boxes)):
                    place(box, piece)
            if height * width > LARGE_IMAGE_LATENTS:  # 14 ms a call, worth it above 1 MP
                _release_freed_memory()
    return output


@lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _release_freed_memory():
    """Give the worker threads' freed heap back to the system (glibc keeps a heap per
    thread and holds on to what the tiles freed: 0.3 GB after a 4K analysis)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def analyse(model: LoadedModel, image: np.ndarray, refine: int = 0, layers: int | None = None):
    """Analysis transforms: y and the rounded hyper-latent ẑ of an (H, W, 3) uint8 image;
    `refine` steps of refine.refine on y, for a stream of `layers` layers."""
    torch = _torch()
    x = torch.from_numpy(pad_image(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = tiled(model.network.analysis, x, 1 / 16, margin=model.margin,
                  parallel=model.on_cpu)
        if refine:
            from .refine import refine as refine_latent

            y = refine_latent(model, x, y, refine, layers)
        del x
        with single_threaded():  # small, and thread-count independent like the rest
            z = model.network.h_a(y)
    return y[0].double().numpy(), np.round(z[0].numpy()).astype(np.int64)


def layer_rates(model: LoadedModel, layer_bpp=None) -> tuple:
    """Where a stream's quality layers end, as file sizes in bpp: `layer_bpp`, else the
    model's; empty: they are the quantization layers."""
    return tuple(model.layer_bpp or ()) if layer_bpp is None else tuple(layer_bpp)


def most_layers(model: LoadedModel, layer_bpp=None) -> int:
    """The most quality layers a stream of this model (with these rates) can have."""
    rates = layer_rates(model, layer_bpp)
    return len(rates) + 1 if rates else model.layers


def encode(model: LoadedModel, image: np.ndarray, layers: int | None = None,
           refine: int = 0, layer_bpp=None) -> bytes:
    """The stream of an image (its first `layers` layers), its latent refined by `refine`
    gradient steps (refine.py; 0: the analysis transform's own). Its quality layers end at
    the file sizes `layer_bpp` (bits per pixel; default the model's, container.pack), or are
    the quantization layers (`layer_bpp` empty, or a model without rates)."""
    height, width = image.shape[:2]
    sizes = [int(rate * height * width / 8) for rate in layer_rates(model, layer_bpp)]
    with stage("analysis transforms"):
        y, z_hat = analyse(model, image, refine, None if sizes else layers)
    with stage("prior (h_s, float64)"):
        state, fragile = new_state(model, z_hat)
    with stage("hyper-latent coding"):
        sections = [encode_hyper(model, z_hat, state, fragile)]
    y_units = (y - state.mu).reshape(-1) / model.unit[state.channel]
    del y
    with stage("layer coding (tables + range coder)"):
        for layer in range(model.layers if sizes else layers or model.layers):
            sections.append(encode_layer(model, state, layer, y_units))
    data = container.pack(width, height, model.model_id,
                          model.digest[: container.DIGEST_BYTES], sections, sizes)
    return container.truncate(data, layers) if sizes and layers is not None else data


def latent_shapes(model: LoadedModel, height: int, width: int):
    padded_h, padded_w = height + (-height) % PAD_MULTIPLE, width + (-width) % PAD_MULTIPLE
    return ((model.config["N"], padded_h // 64, padded_w // 64),
            (model.config["M"], padded_h // 16, padded_w // 16))


def check_model(model: LoadedModel, header: container.Header):
    if header.weights_digest != model.digest[: container.DIGEST_BYTES]:
        raise StreamError(f"stream was made with different weights for model "
                          f"{header.model_id!r} (digest {header.weights_digest.hex()}, "
                          f"this pcodec has {model.digest[:container.DIGEST_BYTES].hex()})")
    if header.coded_layers > model.layers:
        raise StreamError(f"stream claims {header.coded_layers} layers; model has {model.layers}")


def decode_latents(model: LoadedModel, header: container.Header, payloads, partial):
    """Entropy-decode the sections in order, yielding (layers decoded, state) after the
    hyper-latent and after each layer; the state is updated in place."""
    z_shape, y_shape = latent_shapes(model, header.height, header.width)
    # A cut hyper-latent section is not used: a few more ẑ symbols change the prior of every
    # element and need not improve the image; the image of the most probable ẑ does for now.
    hyper = payloads[0] if payloads and not partial[0] else None
    with stage("hyper-latent coding"):
        z_hat, overrides = decode_hyper(model, hyper, z_shape, int(np.prod(y_shape)))
    with stage("prior (h_s, float64)"):
        state, _ = new_state(model, z_hat, overrides)
    if state.mu.shape != y_shape:
        raise StreamError("corrupt stream: latent shape mismatch")
    yield 0, state
    for index in range(1, len(payloads)):
        with stage("layer coding (tables + range coder)"):
            decode_layer(model, state, index - 1, payloads[index], not partial[index])
        yield index, state


def synthesize(model: LoadedModel, state: LatentState, height: int, width: int,
               conditional_mean: bool = True, layers: int | None = None) -> np.ndarray:
    """Pixels of the intervals in `state`, which holds `layers` whole layers and the share
    of the next one it records (None: no post-filter)."""
    return _render(model, _reconstruct_latent(model, state, conditional_mean), height, width,
                   None if layers is None else layers + state.share)


def post_filter_position(model: LoadedModel, layers: float | None) -> float | None:
    """Where the post-filter's gains are taken after `layers` layers (whole ones plus the
    share of a cut one): 0-based, between two layers' gains inside a layer (a cut image is
    between theirs: a cut near the end of layer 5 with layer 4's gains lost up to 0.45 dB
    on Kodak), the first's before any layer; None without a filter."""
    if layers is None or model.post_filter is None:
        return None
    return min(max(layers, 1), model.layers) - 1


def synthesis_float(model: LoadedModel, y_hat: np.ndarray,
                    layers: float | None = None) -> np.ndarray:
    """The image (3, 16h, 16w) of the reconstructed latent (M, h, w), float32 in [0, 1] (not
    clamped), post-filtered for `layers` layers (None: not): numpy on the CPU (no torch),
    torch where the model was placed on a GPU. The filter runs inside each tile, whose
    margin covers its context too (8 pixels, 18 with a coarse branch)."""
    post = post_filter_position(model, layers)
    with stage("synthesis transform"):
        if model.on_cpu:
            def synthesis(piece):  # (1, M, h, w) → (1, 3, 16h, 16w), channels-last inside
                x = model.synthesis(piece[0].transpose(1, 2, 0))
                if post is not None:
                    x = model.post_filter(x, post)
                return x.transpose(2, 0, 1)[None]

            return tiled(synthesis, y_hat[None], 16, margin=model.margin,
                         threads=blas_single_threaded)[0]
        torch = _torch()
        with torch.no_grad():
            return tiled(lambda piece: model.network.synthesis(piece, post),
                         torch.from_numpy(y_hat)[None], 16, margin=model.margin,
                         parallel=False)[0].numpy()


def _render(model: LoadedModel, y_hat: np.ndarray, height: int, width: int,
            layers: float | None = None) -> np.ndarray:
    """Pixels (height, width, 3) uint8 from the reconstructed latent (M, h, w)."""
    x = synthesis_float(model, y_hat, layers)
    with stage("synthesis transform"):
        x *= 255  # in place: large images
        x += 0.5
        pixels = np.clip(x, 0, 255, out=x).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0)[:height, :width])


def _reconstruct_latent(model: LoadedModel, state: LatentState, conditional_mean: bool):
    """ŷ (M, h, w) float32 from the intervals."""
    with stage("reconstruction"):
        y_hat = state.mu.reshape(-1).copy()
        for start in range(0, len(y_hat), CHUNK * 4):
            part = slice(start, start + CHUNK * 4)
            depth, channel = state.depth[part], state.channel[part]
            spread = model.reconstruction_spreads[np.maximum(depth, 1) - 1]
            y_star = quant.reconstruct(state.lower[part], state.upper[part],
                                       state.sigma_units(model, part), depth > 0,
                                       conditional_mean, spread) * model.unit[channel]
            y_hat[part] += y_star.astype(np.float32)
        # A damaged stream with valid CRCs can decode absurd values; keep them finite.
        y_hat = np.nan_to_num(y_hat, posinf=1e4, neginf=-1e4).clip(-1e4, 1e4)
    return y_hat.reshape(state.mu.shape)


def decode_prefixes(model: LoadedModel, data: bytes, sizes):
    """Images of the first `size` bytes of a stream for many sizes, sharing the decoding of
    the layers they have in common. Yields (size, pixels) in increasing size."""
    header, header_length = container.parse_header(data)
    check_model(model, header)
    payloads, _ = container.split_sections(data, header, header_length)
    ends = header_length + np.cumsum([len(p) for p in payloads])
    sizes = sorted(int(s) for s in sizes)
    for size in sizes:
        if size < header_length:
            raise UsageError(f"--bytes {size} is below this stream's header ({header_length} bytes)")
    z_shape, y_shape = latent_shapes(model, header.height, header.width)
    before_hyper = [s for s in sizes if s < ends[0]]
    if before_hyper:
        pixels = synthesize(model, new_state(model, decode_hyper(model, None, z_shape, 0)[0])[0],
                            header.height, header.width, layers=0)
        for size in before_hyper:
            yield size, pixels
    state, _ = new_state(model, *decode_hyper(model, payloads[0], z_shape, int(np.prod(y_shape))))
    pending = [s for s in sizes if s >= ends[0]]
    for index in range(1, len(payloads) + 1):
        if not pending:
            return
        if pending[0] == ends[index - 1]:  # cuts right after a complete section
            pixels = synthesize(model, state, header.height, header.width, layers=index - 1)
            while pending and pending[0] == ends[index - 1]:
                yield pending.pop(0), pixels
        if index == len(payloads):
            break
        inside = [s for s in pending if s < ends[index]]
        if inside:
            plan = plan_layer(model, state, index - 1)
            for size in inside:
                cut = state.copy()
                decode_layer(model, cut, index - 1, payloads[index][: size - ends[index - 1]],
                              False, plan)
                yield size, synthesize(model, cut, header.height, header.width, layers=index - 1)
            pending = pending[len(inside):]
            decode_layer(model, state, index - 1, payloads[index], True, plan)
        else:
            decode_layer(model, state, index - 1, payloads[index], True)
    for size in pending:  # beyond the end: the whole stream
        yield size, synthesize(model, state, header.height, header.width,
                               layers=len(payloads) - 1)


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


def whole_layers(partial: list[bool]) -> int:
    """How many layers a stream's sections hold whole (`partial`: ẑ's, then each layer's)."""
    return max(0, len(partial) - 1 - (len(partial) > 1 and partial[-1]))


@dataclass
class Decoded:
    """An image and the part of the stream it was decoded from."""

    pixels: np.ndarray  # (H, W, 3) uint8
    header: container.Header
    payloads: list[bytes]  # the sections used: ẑ, then one per layer
    partial: list[bool]  # whether each was cut inside

    @property
    def layers(self) -> int:
        """Quality layers it was decoded from, the last possibly in part."""
        return self._reach[0]

    @property
    def last_layer_cut(self) -> bool:
        """Whether the last of those layers was decoded in part."""
        return self._reach[1]

    @property
    def _reach(self) -> tuple[int, bool]:
        if self.header.layer_ends:
            return self.header.layers_within(sum(len(p) for p in self.payloads))
        return max(0, len(self.payloads) - 1), len(self.partial) > 1 and self.partial[-1]

    @property
    def bytes_used(self) -> int:
        return len(container.pack_header(self.header)) + sum(len(p) for p in self.payloads)


def decode(model: LoadedModel, data: bytes, layers: int | None = None,
           max_bytes: int | None = None, allow_partial: bool = False,
           conditional_mean: bool = True,
           max_pixels: int = container.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image from a stream, or from its first `layers` layers / first `max_bytes` bytes."""
    return decode_detailed(model, data, layers, max_bytes, allow_partial, conditional_mean,
                           max_pixels).pixels


def decode_detailed(model: LoadedModel, data: bytes, layers: int | None = None,
                    max_bytes: int | None = None, allow_partial: bool = False,
                    conditional_mean: bool = True,
                    max_pixels: int = container.DEFAULT_MAX_PIXELS) -> Decoded:
    """decode(), with the header and the sections it used."""
    header, payloads, partial = read_stream(model, data, layers, max_bytes, allow_partial,
                                            max_pixels)
    *_, (_, state) = decode_latents(model, header, payloads, partial)  # the final state
    y_hat = _reconstruct_latent(model, state, conditional_mean)
    layers = whole_layers(partial) + state.share
    del state  # the intervals are done with: ~0.2 GB for a 4K image, freed before synthesis
    pixels = _render(model, y_hat, header.height, header.width, layers)
    return Decoded(pixels, header, payloads, partial)
