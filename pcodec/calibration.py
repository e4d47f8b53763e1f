"""What each layer codes and reconstructs with, fitted to the layer at export: the σ it codes
with (per-layer, per-channel offsets in steps of the prior's scale table) and the spread of the
prior its intervals are reconstructed under.

The prior's σ is trained on the rate of the whole nested interval, which telescopes to the
finest layer's, so nothing asks it to fit the coarse partitions. gdn320 (2026-12-05) coded
layer 1 of kodim01 in 0.275 bpp with σ × 0.7 against 0.323 with σ itself: most layer-1
elements fall in the zero cell, and a Gaussian σ fitted to heavy-tailed values is too wide for
it. Each layer renormalises the prior to its parent interval, so a layer may code with any σ
both sides agree on, and which sub-interval holds an element does not depend on σ: each
layer's rate depends on its own offsets only, and each (layer, channel) offset is fitted
apart, by the ideal code length of training crops through the coder's own partition.

The decoder reconstructs an element at the mean of its interval under N(μ, s·σ). The spread s
training uses (2) is not what the pixels want from every model: gdn320's images were better at
the intervals' midpoints from layer 2 on. Each layer's s is fitted by the pixel error of the
decoder's own images, one layer after another. Minimising the latent's squared error instead
(per channel) chose narrower spreads and lost 10 points of BD-rate on Kodak: shrinking toward
μ biases neighbouring elements alike, and the synthesis adds those errors up.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import coding, engine, quant

# Fitted on centre crops of this many training photos, of this size (gdn320, 2026-12-05: 12
# crops of 512² took 30 s and gave the per-layer gains measured on Kodak in docs/gdn320.md).
CALIBRATION_CROPS = (12, 512)
# Candidate offsets in table steps (one step: σ × 1.081): σ × 0.46 … × 1.6.
OFFSETS = np.arange(-10, 7)
# A refinement layer defers the refinements whose order key is below this percentile of its
# keys on the calibration crops (coding.deferred): chosen on Kodak, docs/gdn320.md.
DEFER_PERCENTILE = 80
_FAR = 1 << 40  # beyond any prior's reach, as layer 1's escape cells


def _encoder_state(model, image: np.ndarray):
    """The state after the hyper-latent and the latent in grid units, as the encoder has them
    before its first layer (engine.encode)."""
    y, z_hat = engine.analyse(model, image)
    state, _ = coding.new_state(model, z_hat)
    return state, (y - state.mu).reshape(-1) / model.unit[state.channel]


def layer_intervals(model, image: np.ndarray):
    """Per layer: (channel, scale index, parent lower, parent upper, lower, upper) of the
    elements that layer refines, through the coder's own partition (σ plays no part in it)."""
    state, y_units = _encoder_state(model, image)
    layers = []
    for layer in range(model.layers):
        lower, upper, coded = state.lower.copy(), state.upper.copy(), state.coded.copy()
        coding.encode_layer(model, state, layer, y_units)
        lower[~coded], upper[~coded] = -_FAR, _FAR
        split = (state.lower != lower) | (state.upper != upper)
        layers.append((state.channel[split], state.scale_index[split], lower[split], upper[split],
                       state.lower[split], state.upper[split]))
    return layers


def code_lengths(model, channel, scale_index, parent_lower, parent_upper, lower, upper,
                 offset: int) -> np.ndarray:
    """Bits of each element's sub-interval given its parent, coded with σ moved by `offset`."""
    index = np.clip(scale_index.astype(np.int64) + offset, 0, len(quant.SCALES) - 1)
    bounds = np.stack([parent_lower, lower, upper, parent_upper], axis=1)
    mass = quant.interval_probabilities(bounds, model.scales[index] / model.unit[channel])[:, 1]
    return -np.log2(np.maximum(mass, 1e-300))


def fit_scale_offsets(model, images: list[np.ndarray]) -> np.ndarray:
    """(L, M) offsets minimising each layer's code length over the images, channel by channel
    (0 where a channel is never refined)."""
    channels = len(model.unit)
    bits = np.zeros((model.layers, channels, len(OFFSETS)))
    for image in images:
        for layer, intervals in enumerate(layer_intervals(model, image)):
            for k, offset in enumerate(OFFSETS):
                lengths = code_lengths(model, *intervals, offset)
                bits[layer, :, k] += np.bincount(intervals[0], lengths, minlength=channels)
    best = OFFSETS[np.argmin(bits, axis=2)]
    return np.where(bits.any(axis=2), best, 0).astype(np.int64)


def fit_defer_keys(model, images: list[np.ndarray], percentile: float = DEFER_PERCENTILE) -> np.ndarray:
    """(L,) coding.deferred's thresholds: for each refinement layer but the last, the key
    below which `percentile` % of its candidates fall over the images when no layer defers
    (the first and last entries, which no rule reads, the lowest key)."""
    plain = replace(model, defer_keys=None)
    keys = [[] for _ in range(model.layers)]
    for image in images:
        state, y_units = _encoder_state(plain, image)
        for layer in range(plain.layers):
            if 0 < layer < plain.layers - 1:
                keys[layer].append(coding.refinement_candidates(plain, state, layer)[1])
            coding.encode_layer(plain, state, layer, y_units)
    thresholds = np.full(plain.layers, np.iinfo(np.int64).min, np.int64)
    for layer, found in enumerate(keys):
        found = np.concatenate(found) if found else np.zeros(0, np.int64)
        if len(found):
            thresholds[layer] = int(np.percentile(found, percentile, method="lower"))
    return thresholds


def fit_reconstruction_spreads(model, images: list[np.ndarray]) -> np.ndarray:
    """(L,) indexes into quant.RECONSTRUCTION_SPREADS: for the intervals each layer sets, the
    spread whose images (post-filtered, where the weights have a filter: what the decoder
    shows) have the least pixel error over the images, layer after layer (the image after
    layer l holds intervals of layers 1..l, the earlier ones already chosen)."""
    states = []
    for image in images:
        states.append((image, *_encoder_state(model, image)))
    chosen = np.full(model.layers, quant.DEFAULT_SPREAD_INDEX, np.int64)
    for layer in range(model.layers):
        errors = np.zeros(len(quant.RECONSTRUCTION_SPREADS))
        for image, state, y_units in states:
            coding.encode_layer(model, state, layer, y_units)
            for k in range(len(errors)):
                chosen[layer] = k
                trial = replace(model, reconstruction_spreads=quant.RECONSTRUCTION_SPREADS[chosen])
                pixels = engine.synthesize(trial, state, *image.shape[:2], layers=layer + 1)
                errors[k] += np.sum((pixels.astype(np.float64) - image) ** 2)
        chosen[layer] = int(np.argmin(errors))
    return chosen
