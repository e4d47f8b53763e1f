"""The sections of a stream: what both sides know of the latent (LatentState), the float64
prior that sets every probability, and the coding of the hyper-latent and of each layer with
its probability tables and element order. engine.py joins this to the transforms.

Stream sections: the hyper-latent ẑ (factorized prior table), then one section per layer.
Within a section, elements are coded in decreasing order of expected distortion drop per
expected bit, an order both sides compute from the prior, so a cut anywhere in a section
refines the most valuable elements first at no side cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import entropy, quant
from .errors import StreamError
from .models import Z_RANGE, LoadedModel

FIRST_LAYER_RANGE = quant.FIRST_LAYER_WINDOW  # layer-1 symbols -R..R; ±R are escapes
ESCAPE_BITS = 16  # excess of an escape coded as two uniform 16-bit halves


CHUNK = 1 << 15  # elements whose probability tables are built at a time (bounds memory)
TABLE_CACHE_ELEMENTS = 1 << 20  # up to this many elements a layer's tables are built once
SCALE_INDEX_BITS = (len(quant.SCALES) - 1).bit_length()  # a scale index's field in a row key


@dataclass
class LatentState:
    """What both sides know about the latent after some sections: the prior and intervals."""

    mu: np.ndarray  # (M, h, w) prior mean, float32
    scale_index: np.ndarray  # (E,) index into quant.SCALES
    channel: np.ndarray  # (E,) channel of each element (flattened C, H, W order)
    lower: np.ndarray  # (E,) interval bounds in grid units; meaningful where coded
    upper: np.ndarray
    depth: np.ndarray  # (E,) uint8: the layer (1-based) that set the interval; 0: none yet
    # The share of its planned elements that the last layer decoded when its section was cut
    # inside (0 after a whole section): how far the image is towards that layer's, which
    # the post-filter's gains follow (engine.post_filter_position).
    share: float = 0.0

    @property
    def coded(self) -> np.ndarray:
        """(E,) bool: element has an interval."""
        return self.depth > 0

    def copy(self) -> LatentState:
        """A copy whose intervals can be refined independently (the prior is shared)."""
        return LatentState(self.mu, self.scale_index, self.channel, self.lower.copy(),
                           self.upper.copy(), self.depth.copy(), self.share)

    def sigma_units(self, model: LoadedModel, elements=slice(None)) -> np.ndarray:
        """Prior scale in grid units (from the snapped table value)."""
        return model.scales[self.scale_index[elements]] / model.unit[self.channel[elements]]


def _channel_offsets(model: LoadedModel, channel: np.ndarray) -> np.ndarray | None:
    """Order-key offsets of these elements' channels (None: weights without offsets)."""
    return None if model.order_offsets is None else model.order_offsets[channel]


def _per_scale_and_channel(model: LoadedModel, name: str, build, scale_index: np.ndarray,
                           channel: np.ndarray) -> np.ndarray:
    """Rows of a table with one row per (scale level, channel) for these pairs. A row is
    built by `build(scale_index, channel)` the first time a pair is asked for and kept on the
    model as `name`: an image uses a fraction of the 96 × M pairs, and building every one
    took 0.08 s of each decode call. Each row depends only on its pair (a test checks it)."""
    levels, channels = len(quant.SCALES), len(model.unit)
    pair = scale_index.astype(np.int64) * channels + channel
    table, built = getattr(model, name, (None, np.zeros(levels * channels, bool)))
    missing = np.unique(pair[~built[pair]])
    if len(missing):
        rows = build(missing // channels, missing % channels)
        if table is None:
            table = np.zeros((levels * channels, *rows.shape[1:]), rows.dtype)
        table[missing] = rows
        built[missing] = True
        setattr(model, name, (table, built))
    return table[pair]


def _first_layer_keys(model: LoadedModel, scale_index: np.ndarray, channel: np.ndarray):
    """Layer-1 coding-order keys of these (scale, channel) pairs."""
    return _per_scale_and_channel(model, "_first_layer_keys", lambda scales, channels: (
        quant.first_layer_priority(model.scales[scales] / model.unit[channels],
                                   model.int_steps[0][channels], model.unit[channels],
                                   _channel_offsets(model, channels))), scale_index, channel)


def _first_layer_rows(model: LoadedModel, state: LatentState, elements: np.ndarray) -> np.ndarray:
    """The layer-1 table (2R+1 symbol probabilities) of each of these elements."""
    channel = state.channel[elements]
    return _per_scale_and_channel(model, "_first_layer_tables", lambda scales, channels: (
        quant.interval_probabilities(quant.first_layer_bounds(model.int_steps[0][channels]),
                                     model.scales[scales] / model.unit[channels])),
        coding_scale_index(model, 0, state.scale_index[elements], channel), channel)


def coding_scale_index(model: LoadedModel, layer: int, scale_index: np.ndarray,
                       channel: np.ndarray) -> np.ndarray:
    """The σ a layer codes with: the prior's snapped scale moved by the model's per-layer,
    per-channel offset in table steps (calibration.py; none in weights made before them).
    The reconstruction keeps the prior's own σ."""
    if model.scale_offsets is None:
        return scale_index
    shifted = scale_index + model.scale_offsets[layer][channel]
    return np.clip(shifted, 0, len(quant.SCALES) - 1).astype(scale_index.dtype)


PRIOR_BAND = 8  # h_s runs on bands of 8 ẑ rows (32 latent rows) ...
PRIOR_MARGIN = 3  # ... with 3 rows of context each side: more than h_s's reach (2 rows)


def _hyper_synthesis_bands(model: LoadedModel, z_hat: np.ndarray, band: int = PRIOR_BAND):
    """h_s in float64 (numpy) over row bands of ẑ, band by band, at a fraction of the memory
    of one pass over a large image. The bands give the one-pass σ to ~1e-13 (BLAS picks its
    kernels by shape and CPU) and the same snapped scales (a test checks it); what the two
    sides must share is only those, and the scale overrides in the stream cover any σ that
    close to a table edge. Yields (2M, rows, w) pieces: scales, then means."""
    z = z_hat.transpose(1, 2, 0).astype(np.float64)
    height = z.shape[0]
    for top in range(0, height, band):
        bottom = min(height, top + band)
        t0, t1 = max(0, top - PRIOR_MARGIN), min(height, bottom + PRIOR_MARGIN)
        piece = model.hyper_synthesis(z[t0:t1])
        yield piece[(top - t0) * 4:(bottom - t0) * 4].transpose(2, 0, 1)


def hyper_synthesis_banded(model: LoadedModel, z_hat: np.ndarray, band: int = PRIOR_BAND):
    return np.concatenate(list(_hyper_synthesis_bands(model, z_hat, band)), axis=1)


def _prior(model: LoadedModel, z_hat: np.ndarray):
    """μ (float32), the snapped scale indexes and the elements whose σ lies within
    quant.EDGE_MARGIN of a table edge, from ẑ, computed in float64 on the CPU; band by band,
    so no full-size float64 array is ever held."""
    means, indexes, fragile = [], [], []
    for piece in _hyper_synthesis_bands(model, z_hat):
        scales, mu = np.split(piece, 2, axis=0)
        # Snapped on the base table: dividing by 2^shift is exact, so both sides agree.
        sigma = np.maximum(np.abs(scales) * 0.5 ** model.scale_shift, quant.SCALES[0])
        means.append(mu.astype(np.float32))
        indexes.append(quant.scale_indexes(sigma.reshape(-1)).reshape(sigma.shape))
        fragile.append(quant.near_scale_edge(sigma))
    mu = np.concatenate(means, axis=1)
    return (mu, np.concatenate(indexes, axis=1).reshape(-1),
            np.nonzero(np.concatenate(fragile, axis=1).reshape(-1))[0])


def new_state(model: LoadedModel, z_hat: np.ndarray, overrides=None):
    """The state after the hyper-latent, and the elements whose scale the encoder must send.

    A float64 h_s computed by another machine's BLAS kernels differs by ~1e-13 relative, so
    the two sides snap σ alike unless it lies that close to a table edge. The encoder sends
    its index for every element within quant.EDGE_MARGIN (1e-9) of one, expected 0.008 per
    768x512 image, and the decoder takes those (`overrides`) instead of its own.
    """
    mu, scale_index, fragile = _prior(model, z_hat)
    if overrides is not None:
        elements, indexes = overrides
        scale_index[elements] = indexes
    count = mu.size
    channel = np.repeat(np.arange(mu.shape[0], dtype=np.int32), mu.shape[1] * mu.shape[2])
    state = LatentState(mu=mu, scale_index=scale_index, channel=channel,
                        lower=np.zeros(count, np.int64), upper=np.zeros(count, np.int64),
                        depth=np.zeros(count, np.uint8))
    return state, fragile


# -- hyper-latent section ------------------------------------------------------------------

def _z_tables(model: LoadedModel, shape):
    """(channel of each ẑ element, its frequency table) for chunked coding."""
    channels, height, width = shape
    return np.repeat(np.arange(channels), height * width), model.z_table.astype(np.float64)


def encode_hyper(model: LoadedModel, z_hat: np.ndarray, state: LatentState,
                  fragile: np.ndarray) -> bytes:
    """ẑ's symbols, their escapes' excess, then the scale indexes of the `fragile` elements:
    a flag (1 uniform bit), and when set their count, elements and indexes."""
    values = z_hat.reshape(-1).astype(np.int64)
    channel, table = _z_tables(model, z_hat.shape)
    encoder = entropy.Encoder()
    for start in range(0, len(values), CHUNK):
        part = slice(start, start + CHUNK)
        encoder.categorical(np.clip(values[part], -Z_RANGE, Z_RANGE) + Z_RANGE, table[channel[part]])
    escaped = np.abs(values) >= Z_RANGE
    _encode_excess(encoder, np.abs(values[escaped]) - Z_RANGE)
    encoder.uniform(np.array([int(len(fragile) > 0)]), 2)
    if len(fragile):
        _encode_excess(encoder, np.array([len(fragile)]))
        _encode_excess(encoder, fragile)
        encoder.uniform(state.scale_index[fragile], len(quant.SCALES))
    return encoder.finish()


def decode_hyper(model: LoadedModel, data: bytes | None, shape, elements: int):
    """ẑ from its (complete) section, and the encoder's scale indexes for the elements near a
    table edge (None without a section: then every ẑ symbol takes its table's mode)."""
    channel, table = _z_tables(model, shape)
    if data is None:
        return (np.argmax(model.z_table, axis=1) - Z_RANGE)[channel].reshape(shape), None
    decoder = entropy.Decoder(data)
    values = np.concatenate([decoder.categorical(table[channel[start:start + CHUNK]])
                             for start in range(0, len(channel), CHUNK)]) - Z_RANGE
    escaped = np.nonzero(np.abs(values) >= Z_RANGE)[0]
    excess = _decode_excess(decoder, len(escaped))
    values[escaped] = np.sign(values[escaped]) * (Z_RANGE + excess)
    overrides = (np.zeros(0, np.int64), np.zeros(0, np.int16))
    if decoder.uniform(1, 2)[0]:
        (count,) = _decode_excess(decoder, 1)
        if not 0 < count <= elements:
            raise StreamError("corrupt stream: implausible count of scale overrides")
        fragile = _decode_excess(decoder, int(count))
        if fragile.max() >= elements:
            raise StreamError("corrupt stream: scale override outside the latent")
        overrides = (fragile, decoder.uniform(int(count), len(quant.SCALES)).astype(np.int16))
    return values.reshape(shape), overrides


def _encode_excess(encoder: entropy.Encoder, excess: np.ndarray):
    """Escaped values' excess as two uniform 16-bit halves, after a section's symbols."""
    excess = np.minimum(excess, (1 << 2 * ESCAPE_BITS) - 1)
    encoder.uniform(excess >> ESCAPE_BITS, 1 << ESCAPE_BITS)
    encoder.uniform(excess & ((1 << ESCAPE_BITS) - 1), 1 << ESCAPE_BITS)


def _decode_excess(decoder: entropy.Decoder, count: int) -> np.ndarray:
    high = decoder.uniform(count, 1 << ESCAPE_BITS)
    low = decoder.uniform(count, 1 << ESCAPE_BITS)
    if len(low) < count:
        return None
    return (high << ESCAPE_BITS) | low


# -- layer sections ------------------------------------------------------------------------
#
# Both sides plan a layer identically from the state: which elements it codes and in what
# order. Probability tables are then built chunk by chunk in that order, used to code the
# chunk, and the chunk's intervals updated before the next chunk, so memory stays bounded.

def _first_layer_order(model: LoadedModel, state: LatentState) -> np.ndarray:
    scale_index = coding_scale_index(model, 0, state.scale_index, state.channel)
    return quant.coding_order(_first_layer_keys(model, scale_index, state.channel))


def _distinct_rows(channel, scale_index, lower, upper):
    """One index per distinct (channel, scale, interval) among the elements, and which of
    those each element repeats (any representative will do: equal rows, equal tables)."""
    width = upper - lower
    if not len(channel):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # One int64 per row, each field in just the bits this chunk needs (typically ~42), sorted
    # 16 bits at a time by numpy's radix sort: 2.5x faster than argsort on the int64 keys,
    # which was most of the planning time. Fields that do not fit: np.unique on the rows
    # (15x slower: M = 320 latents took it while the channel field had a fixed 8 bits).
    offset = lower.min()
    channel_bits = int(channel.max()).bit_length()
    width_bits = int(width.max()).bit_length()
    lower_bits = int(lower.max() - offset).bit_length()
    bits = channel_bits + SCALE_INDEX_BITS + width_bits + lower_bits
    if bits > 63:
        rows = np.stack([channel, scale_index, lower, upper], axis=1).astype(np.int64)
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        return first, inverse.reshape(-1)
    key = (channel.astype(np.int64) << SCALE_INDEX_BITS | scale_index) << width_bits | width
    key = key << lower_bits | (lower - offset)
    order = _radix_argsort(key, bits)
    ordered = key[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    inverse = np.empty(len(key), np.int64)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


def _radix_argsort(key: np.ndarray, bits: int) -> np.ndarray:
    """An order sorting non-negative int64 keys of `bits` bits: least significant 16-bit
    digit first, each pass numpy's stable radix sort on uint16."""
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    for shift in range(16, bits, 16):
        digit = (key[order] >> shift) & 0xFFFF
        order = order[np.argsort(digit.astype(np.uint16), kind="stable")]
    return order


def _distinct_tables(model: LoadedModel, state: LatentState, layer: int, elements: np.ndarray):
    """Sub-interval bounds, counts and probabilities at this layer, built once per distinct
    (channel, scale, interval) — all a table depends on. A layer has 4–11 % distinct rows on
    Kodak. Returns the tables, the elements that are distinct rows, and each element's row.
    Rows are computed row by row at the width of the whole set, so they equal the tables
    built for every element (a test checks it bit for bit)."""
    channel, scale_index = state.channel[elements], state.scale_index[elements]
    first, inverse = _distinct_rows(channel, scale_index, state.lower[elements],
                                    state.upper[elements])
    rows, row_channel = elements[first], channel[first]
    step = model.int_steps[layer][row_channel]
    lower, upper = state.lower[rows], state.upper[rows]
    counts, stretched = quant.split_counts(lower, upper, step)
    width = int(counts.max()) if len(counts) else 1
    bounds = quant.split_bounds(lower, upper, step, counts, stretched, width)
    scale_index = coding_scale_index(model, layer, scale_index[first], row_channel)
    probabilities = quant.interval_probabilities(
        bounds, model.scales[scale_index] / model.unit[row_channel])
    return (bounds, counts, probabilities), rows, inverse


def _refinement_tables(model: LoadedModel, state: LatentState, layer: int, elements: np.ndarray):
    """Sub-interval bounds, counts and probabilities of the given elements at this layer."""
    tables, _, inverse = _distinct_tables(model, state, layer, elements)
    return tuple(table[inverse] for table in tables)


def refinement_candidates(model: LoadedModel, state: LatentState, layer: int):
    """Elements whose interval this layer's step splits, their order keys and, when there
    are few enough elements to keep them, their tables chunk by chunk (else None)."""
    candidates = []
    for start in range(0, len(state.lower), CHUNK * 8):  # in slices: bounded temporaries
        part = slice(start, start + CHUNK * 8)
        split = quant.splits(state.lower[part], state.upper[part],
                             model.int_steps[layer][state.channel[part]])
        candidates.append(start + np.nonzero((state.depth[part] > 0) & split)[0])
    candidates = np.concatenate(candidates)
    keep = len(candidates) <= TABLE_CACHE_ELEMENTS

    def chunk_tables(start):
        elements = candidates[start:start + CHUNK]
        tables, rows, inverse = _distinct_tables(model, state, layer, elements)
        channel = state.channel[rows]
        key = quant.refinement_priority(tables[0], tables[2], model.unit[channel],
                                        _channel_offsets(model, channel))
        return key[inverse], (tables, inverse) if keep else None

    # numpy releases the GIL in its array loops: chunks build in parallel on the cores.
    with _thread_pool() as pool:
        results = list(pool.map(chunk_tables, range(0, len(candidates), CHUNK)))
    keys = np.concatenate([key for key, _ in results]) if results else np.zeros(0, np.int64)
    kept = [tables for _, tables in results if tables is not None]
    return candidates, keys, kept if keep else None


def deferred(model: LoadedModel, layer: int, keys: np.ndarray) -> np.ndarray:
    """Which of a layer's candidates wait for the next layer: those whose order key is below
    the layer's threshold (weights with `defer_keys`; never in the first or the last layer).
    Left in, the tail of a layer costs bits for less than the head of the next gives, so
    every complete layer would end on the flattest stretch of the stream's curve; with a
    threshold per layer, each layer ends at a slope, as JPEG 2000's rate allocation forms
    its quality layers. A deferred element keeps its interval, which a later layer's finer
    step then splits."""
    if model.defer_keys is None or layer in (0, model.layers - 1):
        return np.zeros(len(keys), bool)
    return keys < model.defer_keys[layer]


def _refinement_plan(model: LoadedModel, state: LatentState, layer: int):
    """Elements this layer refines, highest expected distortion drop per bit first, and their
    tables when there are few enough elements to keep them (else None: rebuilt per chunk):
    the distinct rows and, per element in coding order, its row."""
    candidates, keys, kept = refinement_candidates(model, state, layer)
    selected = np.nonzero(~deferred(model, layer, keys))[0]
    order = selected[quant.coding_order(keys[selected])]
    del keys
    if not kept:
        return candidates[order], None
    width = max(tables[0].shape[1] for tables, _ in kept)
    first_row = np.cumsum([0] + [len(tables[1]) for tables, _ in kept[:-1]])
    row = np.concatenate([inverse + first for (_, inverse), first in zip(kept, first_row)])
    bounds = np.concatenate([_pad_columns(tables[0], width, edge=True) for tables, _ in kept])
    counts = np.concatenate([tables[1] for tables, _ in kept])
    probabilities = np.concatenate([_pad_columns(tables[2], width - 1) for tables, _ in kept])
    return candidates[order], (bounds, counts, probabilities, row[order])


def thread_count() -> int:
    """Threads for the coder's parallel work: OMP_NUM_THREADS (which numpy's BLAS and torch
    also follow) if set, else the cores this process may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(thread_count())


def _pad_columns(array: np.ndarray, width: int, edge: bool = False) -> np.ndarray:
    """Widen a table to `width` columns (bounds repeat their last column, masses get 0)."""
    extra = width - array.shape[1]
    if extra <= 0:
        return array
    mode = {"mode": "edge"} if edge else {"mode": "constant"}
    return np.pad(array, ((0, 0), (0, extra)), **mode)


def _layer_chunks(model: LoadedModel, state: LatentState, layer: int, plan=None):
    """(elements, bounds, counts, probabilities) chunk by chunk in coding order.

    A chunk's tables are exactly as wide as its largest split: the coder gives every table
    entry some mass, so the width is part of the format and must not depend on whether the
    tables were kept from planning or rebuilt.
    """
    order, tables = plan or _refinement_plan(model, state, layer)
    for start in range(0, len(order), CHUNK):
        elements = order[start:start + CHUNK]
        if tables is None:
            yield (elements, *_refinement_tables(model, state, layer, elements))
            continue
        bounds, counts, probabilities, row = tables
        rows = row[start:start + CHUNK]
        counts = counts[rows]
        width = int(counts.max())
        # Only the chunk's columns are gathered: the kept tables are as wide as the layer's
        # widest split, most chunks' a few columns.
        yield (elements, bounds[:, :width + 1].take(rows, axis=0), counts,
               probabilities[:, :width].take(rows, axis=0))


def encode_layer(model: LoadedModel, state: LatentState, layer: int, y_units: np.ndarray) -> bytes:
    encoder = entropy.Encoder()
    if layer == 0:
        order = _first_layer_order(model, state)
        escapes = []
        for start in range(0, len(order), CHUNK):
            elements = order[start:start + CHUNK]
            step = model.int_steps[0][state.channel[elements]]
            q = quant.first_layer_index(y_units[elements], step)
            encoder.categorical(np.clip(q, -FIRST_LAYER_RANGE, FIRST_LAYER_RANGE) + FIRST_LAYER_RANGE,
                                _first_layer_rows(model, state, elements))
            escaped = np.abs(q) >= FIRST_LAYER_RANGE
            excess = np.minimum(np.abs(q[escaped]) - FIRST_LAYER_RANGE, (1 << 2 * ESCAPE_BITS) - 1)
            q[escaped] = np.sign(q[escaped]) * (FIRST_LAYER_RANGE + excess)
            escapes.append(excess)
            _apply_first_layer(model, state, elements, q)
        _encode_excess(encoder, np.concatenate(escapes))
        return encoder.finish()
    for elements, bounds, counts, probabilities in _layer_chunks(model, state, layer):
        symbols = quant.sub_interval_index(bounds, counts, y_units[elements])
        encoder.categorical(symbols, probabilities)
        _apply_refinement(state, layer, elements, bounds, symbols)
    return encoder.finish()


def plan_layer(model: LoadedModel, state: LatentState, layer: int):
    """What decoding a layer from this state needs before reading any bit: the coding order
    (and tables). Reusable for several cuts of the same layer from copies of the state."""
    if layer == 0:
        return _first_layer_order(model, state)
    return _refinement_plan(model, state, layer)


def decode_layer(model: LoadedModel, state: LatentState, layer: int, data: bytes,
                  complete: bool, plan=None):
    decoder = entropy.Decoder(data, complete)
    if plan is None:
        plan = plan_layer(model, state, layer)
    if layer == 0:
        order = plan
        symbols = []
        for start in range(0, len(order), CHUNK):
            elements = order[start:start + CHUNK]
            symbols.append(decoder.categorical(_first_layer_rows(model, state, elements))
                           - FIRST_LAYER_RANGE)
        symbols = np.concatenate(symbols)
        escaped = np.nonzero(np.abs(symbols) >= FIRST_LAYER_RANGE)[0]
        excess = _decode_excess(decoder, len(escaped)) if len(symbols) == len(order) else None
        if excess is not None:
            symbols[escaped] = np.sign(symbols[escaped]) * (FIRST_LAYER_RANGE + excess)
        elif len(escaped):  # the prefix ends before the escapes' excess: those stay uncoded
            symbols = symbols[: escaped[0]]
        _apply_first_layer(model, state, order[: len(symbols)], symbols)
        state.share = 0.0 if complete else len(symbols) / max(1, len(order))
        return
    decoded = 0
    for elements, bounds, counts, probabilities in _layer_chunks(model, state, layer, plan):
        symbols = decoder.categorical(probabilities)
        if complete and (symbols >= counts).any():
            raise StreamError(f"corrupt stream: impossible symbol in layer {layer + 1}")
        symbols = np.minimum(symbols, counts[: len(symbols)] - 1)
        _apply_refinement(state, layer, elements[: len(symbols)], bounds, symbols)
        decoded += len(symbols)
        if len(symbols) < len(elements):
            break
    state.share = 0.0 if complete else decoded / max(1, len(plan[0]))


def _apply_first_layer(model, state, elements, q):
    lower, upper = quant.first_layer_interval(q, model.int_steps[0][state.channel[elements]])
    state.lower[elements], state.upper[elements] = lower, upper
    state.depth[elements] = 1


def _apply_refinement(state, layer, elements, bounds, symbols):
    # Flat (row-major) positions into the bounds: 2x faster than indexing by (row, symbol).
    flat = np.arange(len(symbols)) * bounds.shape[1] + symbols
    state.lower[elements] = bounds.take(flat)
    state.upper[elements] = bounds.take(flat + 1)
    state.depth[elements] = layer + 1
