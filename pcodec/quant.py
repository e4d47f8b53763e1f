"""The quantization hierarchy in integers: what the encoder and decoder must agree on bit for bit.

Every latent channel c has a grid unit g_c (a fraction of its finest step) and integer step
sizes s_l[c] in that unit. An element's state is its current interval [lower, upper) in grid
units, relative to the prior mean mu (the codec works on y* = y - mu):

- layer 1 is a uniform grid: index q puts y* in [q*s1 - s1//2, q*s1 - s1//2 + s1), with no
  clipping range, so no value is ever lost;
- each later layer splits the interval into sub-intervals of width s_l centred on it and
  clipped at its bounds; a sliver narrower than SLIVER*s_l at the edges makes the split
  "stretched" instead: 2m+1 equal sub-intervals (DeepHQ's boundary-aware split). Intervals
  narrower than s_l are not split and cost nothing.

The probability of each sub-interval is the prior's Gaussian mass on it renormalised by the
parent interval's mass, computed in float64 from integer bounds and a table scale with
detmath's basic-operation arithmetic (never numpy's or scipy's transcendental kernels), so
both sides build identical tables on any machine. No torch here.
"""

from __future__ import annotations

import math

import numpy as np

from . import detmath

SLIVER_NUM, SLIVER_DEN = 3, 10  # slivers < 0.3 step are merged (DeepHQ's boundary-aware rule)
SLIVER = SLIVER_NUM / SLIVER_DEN  # the same rule in floats, as training applies it
SCALE_MIN, SCALE_MAX = 0.04, 64.0  # the prior's σ range: the coder's table, and training's clamp
KEY_UNITS_PER_BIT = 16  # coding-order keys are whole 1/16 bits of log2 on both sides
FINEST_STEP_UNITS = 16  # the finest layer's step in grid units: sets the integer resolution
MAX_SPLIT = 64  # most sub-intervals one split may produce (bounded by the step ratios)
# Reconstruction takes the conditional mean under a prior twice as wide as the coded one: the
# prior is overconfident inside coarse intervals, so its own mean pulls values too far toward
# mu. 2026-12-02, -r5 streams, BD-rate against spread 1 (chosen on 8 training photos, where
# 1.25/1.5/2/3/midpoint gave -1.12/-1.55/-1.71/-1.48/-0.91 %): 24 Kodak images -1.29/-1.82/
# -2.07/-1.92/-1.36 %. Pixels only: the stream and its probability tables do not use it.
RECONSTRUCTION_SPREAD = 2.0
# The spreads a weights file may choose per layer (calibration.py), by index;
# inf is the interval's midpoint. Part of the weights format: append only.
RECONSTRUCTION_SPREADS = np.array([1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, np.inf])
# RECONSTRUCTION_SPREAD's index: what weights without their own spreads use
DEFAULT_SPREAD_INDEX = int(np.flatnonzero(RECONSTRUCTION_SPREADS == RECONSTRUCTION_SPREAD)[0])


_LN2 = 0.6931471805599453


def scale_table(minimum: float = SCALE_MIN, maximum: float = SCALE_MAX,
                levels: int = 96) -> np.ndarray:
    """Log-spaced prior scales; sigma is snapped to it so both sides use identical values."""
    low, high = detmath.log2(np.float64(minimum)), detmath.log2(np.float64(maximum))
    fraction = np.arange(levels, dtype=np.float64) / (levels - 1)
    return detmath.exp((low + (high - low) * fraction) * _LN2)


SCALES = scale_table()
_SCALE_EDGES = np.sqrt(SCALES[1:] * SCALES[:-1])  # geometric midpoints between table entries

# A model's table is SCALES × 2^shift, its "scale_shift" (a buffer in its weights, 0 when
# absent). y/c with every step, μ and σ divided by c codes the same, so nothing fixes y's
# scale and under Adam it drifts: gdn320's finest step grew from 1.9 to 56 in 58,000 steps and
# 93 % of kodim01's σ sat at the table's top, where training's clamp gives them no gradient.
# Training moves the shift with the finest step instead (train.follow_latent_scale), so the
# table keeps its place around the latent without touching the weights (rescaling y instead
# changed the layers around it by 7x, and both runs that did it worsened by the step).
SCALE_REFERENCE_STEP = 8.0  # finest mean step the base table suits (-r5, -r6: 7-8)


def scale_shift_for(finest_step: float, current: int) -> int:
    """The shift for a latent whose finest layer's mean step is `finest_step`: the nearest
    octave from SCALE_REFERENCE_STEP, never below 0 (models below it, the pu designs among
    them, keep the base table), moved only once the step is 0.75 octave away (no flapping)."""
    exact = math.log2(finest_step / SCALE_REFERENCE_STEP)
    if abs(exact - current) <= 0.75:
        return current
    return max(0, round(exact))


def scale_indexes(sigma: np.ndarray) -> np.ndarray:
    return np.searchsorted(_SCALE_EDGES, sigma).astype(np.int16)


EDGE_MARGIN = 1e-9  # relative: 10^4 times the float64 prior's disagreement between machines


def near_scale_edge(sigma: np.ndarray) -> np.ndarray:
    """Whether each σ lies within EDGE_MARGIN (relative) of a scale-table edge, where another
    machine's rounding could snap it to the neighbouring scale."""
    index = np.minimum(np.searchsorted(_SCALE_EDGES, sigma), len(_SCALE_EDGES) - 1)
    below = _SCALE_EDGES[np.maximum(index - 1, 0)]
    above = _SCALE_EDGES[index]
    return (np.abs(sigma - below) <= EDGE_MARGIN * below) | (np.abs(sigma - above) <= EDGE_MARGIN * above)


def integer_steps(log_steps: np.ndarray):
    """Learned log step sizes (L, M) → per-channel grid unit (M,) and integer steps (L, M)."""
    steps = detmath.exp(np.asarray(log_steps, dtype=np.float64))
    unit = steps.min(axis=0) / FINEST_STEP_UNITS
    int_steps = np.maximum(np.round(steps / unit), 1).astype(np.int64)
    return unit, int_steps


def first_layer_interval(q: np.ndarray, step: np.ndarray):
    lower = q * step - step // 2
    return lower, lower + step


def first_layer_index(y_units: np.ndarray, step: np.ndarray) -> np.ndarray:
    return np.floor((y_units + step // 2) / step).astype(np.int64)


def split_counts(lower: np.ndarray, upper: np.ndarray, step: np.ndarray):
    """Number of sub-intervals (1 = no split) and whether the split is stretched."""
    width = upper - lower
    excess = width - step
    full = np.where(excess >= 0, excess // (2 * step), 0)
    remainder = excess - full * 2 * step
    stretched = SLIVER_DEN * remainder < SLIVER_NUM * 2 * step
    count = np.where(stretched, 2 * full + 1, 2 * full + 3)
    count = np.where(excess < 0, 1, count)
    return np.minimum(count, MAX_SPLIT), stretched


def splits(lower: np.ndarray, upper: np.ndarray, step: np.ndarray) -> np.ndarray:
    """split_counts(...)[0] > 1 in one comparison: an interval is split unless the part
    beyond one step is a sliver (or nothing) that the boundary-aware rule merges."""
    return SLIVER_DEN * (upper - lower - step) >= SLIVER_NUM * 2 * step


def split_bounds(lower, upper, step, count, stretched, width_out: int) -> np.ndarray:
    """Boundaries (E, width_out+1) of every element's sub-intervals; entries past an element's
    count repeat its upper bound (zero-width, zero-probability padding).

    Centred split: bound k is (lower + upper + (2k - count)·step) // 2, which lies at or
    beyond the interval's ends for k = 0 and k ≥ count, so a clip to [lower, upper] gives
    the ends and the padding. Stretched split: lower + k·width // count (rare, done apart).
    """
    k = np.arange(width_out + 1, dtype=np.int64)
    bounds = (2 * k[None, :] - count[:, None]) * step[:, None]
    bounds += (lower + upper)[:, None]
    bounds >>= 1  # floor division by 2
    rows = np.nonzero(stretched)[0]
    if len(rows):
        bounds[rows] = lower[rows, None] + (k * (upper - lower)[rows, None]) // count[rows, None]
    np.clip(bounds, lower[:, None], upper[:, None], out=bounds)
    if width_out >= MAX_SPLIT:  # a split capped at MAX_SPLIT cells: the end cells take the rest
        capped = np.nonzero(count == MAX_SPLIT)[0]
        bounds[capped, 0] = lower[capped]
        bounds[capped, MAX_SPLIT:] = upper[capped, None]
    return bounds


def layers_in_use(int_steps: np.ndarray) -> dict:
    """Per refinement layer (2..L): the fraction of channels in which it splits any interval
    the layers before it can leave, and in which it splits the interval holding the prior mean
    (where most elements are). A uniform layer-1 cell is split only when the next step is at
    most 1/1.6 of it (a closer step would leave slivers, which the boundary-aware rule
    merges), so a layer whose step ratio drifts below that adds nothing in that channel; and
    in training such a step gets no gradient of its own (it returns only if the layer above
    moves)."""
    layers, channels = int_steps.shape
    channel = np.arange(channels)
    lower = -(int_steps[0] // 2)
    upper = lower + int_steps[0]
    any_split, mean_split = [], []
    for layer in range(1, layers):
        step = int_steps[layer, channel]
        count, stretched = split_counts(lower, upper, step)
        split = count > 1
        holds_mean = (lower <= 0) & (upper > 0)
        any_split.append(len(np.unique(channel[split])) / channels)
        mean_split.append(len(np.unique(channel[split & holds_mean])) / channels)
        bounds = split_bounds(lower, upper, step, count, stretched, int(count.max()))
        cells = np.stack([np.repeat(channel, bounds.shape[1] - 1), bounds[:, :-1].ravel(),
                          bounds[:, 1:].ravel()], axis=1)
        cells = np.unique(cells[cells[:, 2] > cells[:, 1]], axis=0)  # distinct cells only
        channel, lower, upper = cells[:, 0], cells[:, 1], cells[:, 2]
    return {"channels_split_any": [round(v, 3) for v in any_split],
            "channels_split_at_mean": [round(v, 3) for v in mean_split]}


def sub_interval_index(bounds: np.ndarray, count: np.ndarray, y_units: np.ndarray) -> np.ndarray:
    inner = bounds[:, 1:-1] <= y_units[:, None]
    index = inner.sum(axis=1)
    return np.minimum(index, count - 1)


def interval_probabilities(bounds: np.ndarray, sigma_units: np.ndarray) -> np.ndarray:
    """Renormalised Gaussian mass of each sub-interval (rows sum to 1).

    Each cell's mass is a difference of tail masses Φ(-|x|) on its own side of the mean (1
    minus both tails for the cell holding the mean), so no mass is a difference of two numbers
    near 1, and Φ keeps its relative precision down to about -37σ. Beyond that it underflows;
    there each cell gets the density at its edge nearest the mean, which decays the same way.
    """
    edges = bounds / sigma_units[:, None]
    tails = detmath.normal_tail(edges)
    low, high = edges[:, :-1], edges[:, 1:]
    low_tail, high_tail = tails[:, :-1], tails[:, 1:]
    mass = np.where(low >= 0, low_tail - high_tail,
                    np.where(high <= 0, high_tail - low_tail, (1.0 - low_tail) - high_tail))
    np.maximum(mass, 0.0, out=mass)
    total = detmath.row_sum(mass)[:, None]
    good = total[:, 0] > 1e-300
    if good.all():
        return mass / total
    nearest = np.where(low >= 0, low, np.where(high <= 0, high, 0.0))
    log_density = -0.5 * nearest * nearest
    tail = detmath.exp(log_density - log_density.max(axis=1, keepdims=True))
    tail = tail * (np.diff(bounds, axis=1) > 0)
    tail = tail / np.maximum(detmath.row_sum(tail)[:, None], 1e-300)
    return np.where(good[:, None], mass / np.where(good[:, None], total, 1), tail)


FIRST_LAYER_WINDOW = 16  # layer-1 symbols -W..W; ±W are escapes (|q| ≥ W), excess coded apart
_ESCAPE_EDGE = 1 << 40  # an escape cell's far edge: beyond any prior's reach


def first_layer_bounds(step: np.ndarray) -> np.ndarray:
    """(E, 2W+2) cell edges of layer 1's symbols: the cells of q = -(W-1)..W-1 between two
    escape cells reaching out to ±2^40 grid units."""
    q = np.arange(-(FIRST_LAYER_WINDOW - 1), FIRST_LAYER_WINDOW)
    lower = q[None, :] * step[:, None] - (step // 2)[:, None]
    far = np.full((len(step), 1), _ESCAPE_EDGE, dtype=np.int64)
    return np.concatenate([-far, lower, lower[:, -1:] + step[:, None], far], axis=1)


def refinement_priority(bounds: np.ndarray, probabilities: np.ndarray, unit: np.ndarray,
                        offset: np.ndarray | None = None) -> np.ndarray:
    """Integer key: expected distortion drop per expected bit of coding this element now.

    The key is quantised to 1/16 of a bit of log2 so that encoder and decoder sort
    identically even if their float sums differ in the last ulp. `offset` (integers in the
    same unit, e.g. log2 of a channel's synthesis gain) is added exactly.
    """
    mids = (bounds[:, 1:] + bounds[:, :-1]).astype(np.float64) * (0.5 * unit[:, None])
    mean = detmath.row_sum(probabilities * mids)[:, None]
    distortion_drop = detmath.row_sum(probabilities * np.square(mids - mean))
    p = np.maximum(probabilities, 1e-300)
    bits = -detmath.row_sum(probabilities * detmath.log2(p))
    ratio = distortion_drop / np.maximum(bits, 1e-6)
    key = np.floor(detmath.log2(np.maximum(ratio, 1e-30)) * KEY_UNITS_PER_BIT).astype(np.int64)
    return key if offset is None else key + offset


def coding_order(priority: np.ndarray) -> np.ndarray:
    """Highest priority first; ties in element order (stable), known to both sides."""
    if len(priority) and -(1 << 15) < priority.min() and priority.max() < 1 << 15:
        return np.argsort(-priority.astype(np.int16), kind="stable")  # radix sort: 6× faster
    return np.argsort(-priority, kind="stable")


def log_ndtr(x: np.ndarray) -> np.ndarray:
    """log Φ(x) in float64 from Numerical Recipes' erfc (detmath.normal_tail's), taken in
    the log domain so that no tail underflows: absolute error ~1e-7, smooth in x, so that
    differences between nearby points are closer still. For reconstruct() only, which shapes
    pixels and not the stream (numpy's own exp and log are fine here); it replaces
    scipy.special.log_ndtr, whose import took 0.12 s of every decode call."""
    z = np.abs(x) * detmath.SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    poly = np.zeros_like(t)
    for c in detmath.ERFC_COEFFICIENTS[:0:-1]:
        poly = (poly + c) * t
    log_tail = np.log(0.5 * t) - z * z + (poly + detmath.ERFC_COEFFICIENTS[0])  # log Φ(−|x|)
    return np.where(x < 0, log_tail, np.log1p(-np.exp(log_tail)))


def reconstruct(lower, upper, sigma_units, coded, conditional_mean: bool = True,
                spread=RECONSTRUCTION_SPREAD) -> np.ndarray:
    """Value of y* (grid units) from its interval: the conditional mean inside the interval
    under N(0, spread * sigma) (spread: a number or one per element; inf, or
    conditional_mean False: the midpoint); elements never coded take the prior mean 0."""
    lower = lower.astype(np.float64)
    upper = upper.astype(np.float64)
    midpoint = (lower + upper) / 2
    at_midpoint = ~np.isfinite(spread)
    if not conditional_mean or np.all(at_midpoint):
        return np.where(coded, midpoint, 0.0)
    sigma_units = sigma_units * np.where(at_midpoint, 1.0, spread)
    # E[x | a<x<b] for x ~ N(0, s) = s (φ(a) - φ(b)) / (Φ(b) - Φ(a)), all divided by Φ(b) in
    # the log domain (after mirroring to the negative side) so tail intervals stay finite.
    mirror = midpoint > 0
    a = np.where(mirror, -upper, lower) / sigma_units
    b = np.where(mirror, -lower, upper) / sigma_units
    log_norm = log_ndtr(b)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mass = -np.expm1(log_ndtr(a) - log_norm)
        half_log_2pi = 0.5 * np.log(2 * np.pi)
        density = (np.exp(-0.5 * a * a - half_log_2pi - log_norm)
                   - np.exp(-0.5 * b * b - half_log_2pi - log_norm))
        mean = sigma_units * density / mass
    # On the negative side the mean lies at or above the midpoint (a density rising toward 0);
    # log_ndtr's 1e-7 could put it ~5e-5 below in a narrow interval near the mean.
    mean = np.maximum(mean, -np.abs(midpoint))
    mean = np.where(mirror, -mean, mean)
    ok = np.isfinite(mean) & (mean >= lower) & (mean <= upper) & ~at_midpoint
    return np.where(coded, np.where(ok, mean, midpoint), 0.0)


def first_layer_priority(sigma_units: np.ndarray, step_units: np.ndarray, unit: np.ndarray,
                         offset: np.ndarray | None = None) -> np.ndarray:
    """Layer-1 key (same meaning as refinement_priority) for a uniform grid on N(0, σ),
    computed on the cells within ±6σ (±64 at most) of each row's mean. Meant for a table of
    (scale, channel) pairs, not for every element. Rows are computed in groups of equal
    width: most need a few cells, and 129 for every row cost 0.75 s of each start-up."""
    cells = np.minimum(64, np.ceil(6 * sigma_units / step_units) + 2).astype(np.int64)
    keys = np.zeros(len(cells), np.int64)
    for count in np.unique(cells):
        rows = np.nonzero(cells == count)[0]
        q = np.arange(-count, count + 1)
        lower = q[None, :] * step_units[rows, None] - (step_units[rows] // 2)[:, None]
        bounds = np.concatenate([lower, lower[:, -1:] + step_units[rows, None]], axis=1)
        probabilities = interval_probabilities(bounds, sigma_units[rows])
        keys[rows] = refinement_priority(bounds, probabilities, unit[rows],
                                         None if offset is None else offset[rows])
    return keys
