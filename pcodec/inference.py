"""The decoder's two transforms in numpy, from the weights' state dict: the prior h_s in
float64 (both sides must snap σ alike) and the synthesis g_s in float32. Decoding imports no
torch, which was 2.1 s of a 2.5 s decode call.

Arrays are channels-last (H, W, C), so every convolution is a few large matrix products on
numpy's BLAS. A 5x5 stride-2 transposed convolution is run phase by phase: each of the four
output phases reads 3 or 2 input rows and columns (25 taps in all, where a 3x3 convolution to
4x the channels and a pixel shuffle, transforms.SubPixelDeconv in torch, computes 36 with 11
of them zero). The layers mirror transforms.build_transforms; a test checks both designs
against torch.
"""

from __future__ import annotations

import numpy as np

LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default, as build_transforms uses it


FEW_OUTPUTS = 32  # up to this many output channels a convolution is one matrix product
TAP_BLOCK_BYTES = 4 << 20  # the taps of a block of output rows: about 4 MB at a time


def _padded_rows(x: np.ndarray) -> tuple[np.ndarray, int]:
    """x (H, W, C) zero-padded by one pixel (and a spare row below for the last block's
    slabs), flattened to ((H + 3) · (W + 2), C), and its row length W + 2."""
    height, width, channels = x.shape
    padded = np.zeros((height + 3, width + 2, channels), x.dtype)
    padded[1:height + 1, 1:width + 1] = x
    return padded.reshape(-1, channels), width + 2


def _row_blocks(height: int, row_bytes: int):
    """(top, rows) of blocks of output rows whose working arrays (row_bytes per output row)
    take about TAP_BLOCK_BYTES: worked on block by block, they stay in the cache between the
    products and sums that read them, 1.2-1.5x faster than whole-image arrays
    (single-threaded; the products are the same, so are the outputs)."""
    block = max(1, TAP_BLOCK_BYTES // row_bytes)
    for top in range(0, height, block):
        yield top, min(block, height - top)


def _taps(flat: np.ndarray, row: int, top: int, rows: int) -> np.ndarray:
    """The three horizontal taps side by side ((rows + 2) · row, 3·C) for output rows
    top … top + rows: tap row dy is the contiguous slab starting dy · row further."""
    start, count = top * row, (rows + 2) * row
    return np.concatenate([flat[start + dx:start + dx + count] for dx in range(3)], axis=1)


def conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Stride-1 3x3 convolution with zero padding 1: x (H, W, Cin), weight (3, 3, Cin, Cout).

    The input is padded and flattened, and its three horizontal taps are put side by side
    (3·Cin wide); tap row dy is then the contiguous slab starting dy·(W+2) rows further, so
    the convolution is three matrix products per block of rows (the two wrapped-around
    columns of each output row are dropped at the end). Faster than nine products of Cin
    (1.3-2x on numpy's OpenBLAS) and than a full unfold, whose copy is 9x the input. With
    few output channels, one product of the unpadded taps gives all nine taps' outputs,
    summed from shifted slices."""
    height, width, channels = x.shape
    outputs = weight.shape[3]
    flat, row = _padded_rows(x)
    out = np.empty((height * row, outputs), x.dtype)
    if outputs <= FEW_OUTPUTS:
        weight = weight.transpose(2, 0, 1, 3).reshape(channels, 9 * outputs)
        for top, rows in _row_blocks(height, row * 9 * outputs * x.itemsize):
            start, count = top * row, rows * row
            every = np.matmul(flat[start:start + count + 2 * row + 2], weight)
            block = out[start:start + count]
            block[:] = every[:count, :outputs]
            for tap in range(1, 9):
                shift = (tap // 3) * row + tap % 3
                block += every[shift:shift + count, tap * outputs:(tap + 1) * outputs]
    else:
        weight = weight.reshape(3, 3 * channels, outputs)
        for top, rows in _row_blocks(height, row * 3 * channels * x.itemsize):
            taps, block = _taps(flat, row, top, rows), out[top * row:(top + rows) * row]
            np.matmul(taps[:rows * row], weight[0], out=block)
            for dy in (1, 2):
                block += np.matmul(taps[dy * row:(dy + rows) * row], weight[dy])
    out += bias
    return out.reshape(height, row, -1)[:, :width]


def pixel_shuffle(x: np.ndarray, factor: int) -> np.ndarray:
    """torch's pixel_shuffle in channels-last: channel c·r² + i·r + j → (row·r + i, col·r + j)."""
    height, width, channels = x.shape
    out = channels // (factor * factor)
    x = x.reshape(height, width, out, factor, factor).transpose(0, 3, 1, 4, 2)
    return x.reshape(height * factor, width * factor, out)


def conv_weight(weight: np.ndarray, dtype) -> np.ndarray:
    """torch's (Cout, Cin, 3, 3) as (3, 3, Cin, Cout)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0), dtype=dtype)


def subpixel_weight(weight: np.ndarray, dtype) -> np.ndarray:
    """A 5x5 stride-2 transposed convolution's (Cin, Cout, 5, 5), padding 2 and output
    padding 1, as the (3, 3, Cin, 4·Cout) weights of a 3x3 convolution whose pixel shuffle by
    2 gives the same output: out[2r + a] sums x[r + d]·w[a + 2 − 2d] for d in −1..1."""
    cin, cout = weight.shape[:2]
    result = np.zeros((3, 3, cin, cout, 2, 2), np.float64)
    for a in range(2):
        for b in range(2):
            for du in (-1, 0, 1):
                for dv in (-1, 0, 1):
                    ku, kv = a + 2 - 2 * du, b + 2 - 2 * dv
                    if 0 <= ku < 5 and 0 <= kv < 5:
                        result[du + 1, dv + 1, :, :, a, b] = weight[:, :, ku, kv]
    return result.reshape(3, 3, cin, cout * 4).astype(dtype)


def phase_weights(weight: np.ndarray, dtype) -> dict:
    """A 5x5 stride-2 transposed convolution's (Cin, Cout, 5, 5), padding 2 and output
    padding 1, as the blocks deconv5x5 multiplies: for output column phase b and tap row dy,
    (taps·Cin, row phases·Cout), the taps those phases read (out[2r + a] sums
    x[r + d]·w[a + 2 − 2d]: phase 0 reads d = −1, 0, 1, phase 1 only d = 0, 1)."""
    cin, cout = weight.shape[:2]
    blocks = {}
    for b in range(2):
        columns = (0, 1, 2) if b == 0 else (1, 2)  # dx = d + 1
        for dy in range(3):
            row_phases = (0,) if dy == 0 else (0, 1)
            block = np.zeros((len(columns), cin, len(row_phases), cout), np.float64)
            for i, dx in enumerate(columns):
                for j, a in enumerate(row_phases):
                    block[i, :, j, :] = weight[:, :, a + 4 - 2 * dy, b + 4 - 2 * dx]
            blocks[b, dy] = np.ascontiguousarray(
                block.reshape(len(columns) * cin, len(row_phases) * cout), dtype)
    return blocks


def deconv5x5(x: np.ndarray, blocks: dict, bias: np.ndarray) -> np.ndarray:
    """The transposed convolution of phase_weights' blocks: x (H, W, Cin) → (2H, 2W, Cout).

    The taps are laid out as in conv3x3 (three horizontal taps side by side, tap row dy a
    contiguous slab, block of rows by block); column phase 1 skips the first tap's Cin
    columns, and tap row 0 feeds row phase 0 only: six matrix products of 25 taps in all."""
    height, width, channels = x.shape
    outputs = len(bias)
    flat, row = _padded_rows(x)
    out = np.empty((height, 2, width, 2, outputs), x.dtype)
    for top, rows in _row_blocks(height, row * 3 * channels * x.itemsize):
        taps, count = _taps(flat, row, top, rows), rows * row
        for b in range(2):
            first = 0 if b == 0 else channels
            both = np.matmul(taps[row:row + count, first:], blocks[b, 1])  # [a = 0 | a = 1]
            both += np.matmul(taps[2 * row:2 * row + count, first:], blocks[b, 2])
            both[:, :outputs] += np.matmul(taps[:count, first:], blocks[b, 0])
            out[top:top + rows, :, :, b] = (both.reshape(rows, row, 2, outputs)[:, :width]
                                            .transpose(0, 2, 1, 3))
    out += bias
    return out.reshape(2 * height, 2 * width, outputs)


# erf(z) = 1 − t·(a1 + t·(a2 + … + t·a5))·exp(−z²), t = 1/(1 + p·z), z ≥ 0: Abramowitz and
# Stegun 7.1.26, |error| ≤ 1.5e-7, float32's own resolution (scipy.special.erf in float32 is
# no closer to the float64 GELU: 4.5e-7 at most either way). Importing scipy.special took
# 0.12 s of every decode call.
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027,
                                       1.061405429))


GELU_BLOCK = 1 << 15  # elements per pass: 128 KB, so the ~20 passes stay in the core's cache


def gelu(x: np.ndarray) -> np.ndarray:
    """torch's exact GELU, x·Φ(x) = x·(1 + erf(x/√2))/2, in float32, block by block (pux320's
    GELUs at 768×512: 39 ms, against 53 ms in whole-array passes)."""
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, len(flat), GELU_BLOCK):
        out[start:start + GELU_BLOCK] = _gelu_block(flat[start:start + GELU_BLOCK])
    return out.reshape(x.shape)


def _gelu_block(x: np.ndarray) -> np.ndarray:
    z = np.abs(x)
    z *= np.float32(2 ** -0.5)
    t = _ERF_P * z
    t += 1
    np.reciprocal(t, out=t)
    tail = _ERF_A[4] * t
    for a in _ERF_A[3::-1]:
        tail += a
        tail *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    tail *= np.exp(z, out=z)
    tail *= np.float32(0.5)  # (1 − erf(|x|/√2))/2: Φ(−|x|)
    return x * np.where(x >= 0, 1 - tail, tail)


class Network:
    """A sequence of channels-last layers run on one (H, W, C) array."""

    def __init__(self, layers: list, dtype):
        self.layers, self.dtype = layers, dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, self.dtype)
        for layer in self.layers:
            x = layer(x)
        return x


def _conv(state, key, dtype):
    weight, bias = conv_weight(state[key + ".weight"], dtype), state[key + ".bias"].astype(dtype)
    return lambda x: conv3x3(x, weight, bias)


def _deconv(state, key, dtype):
    weight, bias = state[key + ".weight"], state[key + ".bias"].astype(dtype)
    if 4 * len(bias) <= FEW_OUTPUTS:  # to pixels: conv3x3's one product beats six thin ones
        subpixel = subpixel_weight(weight, dtype)
        return lambda x: pixel_shuffle(conv3x3(x, subpixel, np.repeat(bias, 4)), 2)
    blocks = phase_weights(weight, dtype)
    return lambda x: deconv5x5(x, blocks, bias)


def _leaky_relu(x):
    return np.maximum(x, LEAKY_SLOPE * x)


def _effective(state, key):
    """compressai's NonNegativeParametrizer: max(value, bound)² − pedestal."""
    bound = state[key + "_reparam.lower_bound.bound"]
    return (np.maximum(state[key], bound) ** 2 - state[key + "_reparam.pedestal"]).astype(np.float32)


def _inverse_gdn(state, key):
    beta, gamma = _effective(state, key + ".beta"), _effective(state, key + ".gamma")
    gamma_t = np.ascontiguousarray(gamma.reshape(len(beta), len(beta)).T)

    def run(x):
        norm = np.matmul((x * x).reshape(-1, x.shape[-1]), gamma_t)
        norm += beta
        return x * np.sqrt(norm, out=norm).reshape(x.shape)
    return run


def _residual(state, key, dtype):
    first, second = _conv(state, key + ".conv1", dtype), _conv(state, key + ".conv2", dtype)
    return lambda x: x + second(gelu(first(x)))


def hyper_synthesis(state: dict) -> Network:
    """h_s in float64: ẑ (h, w, N) → (4h, 4w, 2M), scales then means."""
    dtype = np.float64
    return Network([_deconv(state, "h_s.0", dtype), _leaky_relu, _deconv(state, "h_s.2", dtype),
                    _leaky_relu, _conv(state, "h_s.4", dtype)], dtype)


def synthesis(state: dict, design: str) -> Network:
    """g_s in float32: ŷ (h, w, M) → (16h, 16w, 3), pixels in [0, 1] (not clamped); "pu" and
    "pux" are read off the state dict's keys."""
    dtype = np.float32
    if design == "gdn5":
        return Network([_deconv(state, "g_s.0", dtype), _inverse_gdn(state, "g_s.1"),
                        _deconv(state, "g_s.2", dtype), _inverse_gdn(state, "g_s.3"),
                        _deconv(state, "g_s.4", dtype), _inverse_gdn(state, "g_s.5"),
                        _deconv(state, "g_s.6", dtype)], dtype)
    return Network(_sequence(state, "g_s", dtype)[0], dtype)


def _sequence(state: dict, prefix: str, dtype):
    """The layers of the nn.Sequential at `prefix` in the pu and pux designs
    (transforms.pu_transforms, pux_transforms), and its output channels."""
    layers, index, channels = [], 0, None
    while any(key.startswith(f"{prefix}.{index}.") for key in state):
        key = f"{prefix}.{index}"
        if key + ".weight" in state:
            layers.append(_conv(state, key, dtype))
            channels = len(state[key + ".bias"])
        elif key + ".conv1.weight" in state:
            layers.append(_residual(state, key, dtype))
        elif key + ".0.weight" in state:  # upsample: a convolution and a pixel shuffle by 2
            conv = _conv(state, key + ".0", dtype)
            layers.append(lambda x, conv=conv: pixel_shuffle(conv(x), 2))
            channels = len(state[key + ".0.bias"]) // 4
        elif key + ".conv.weight" in state:  # ToPixels: a convolution and a pixel shuffle by 4
            conv = _conv(state, key + ".conv", dtype)
            layers.append(lambda x, conv=conv: pixel_shuffle(conv(x), 4))
            channels = len(state[key + ".conv.bias"]) // 16
        else:  # a pux Stage: its main layers plus the wavelet shortcut beside them
            main, channels = _sequence(state, key + ".main", dtype)
            shortcut = _wavelet_up(state, key + ".aux", channels, dtype)
            layers.append(lambda x, main=Network(main, dtype), shortcut=shortcut:
                          main(x) + shortcut(x))
        index += 1
    return layers, channels


def pixel_unshuffle(x: np.ndarray, factor: int) -> np.ndarray:
    """torch's pixel_unshuffle in channels-last, pixel_shuffle's inverse."""
    height, width, channels = x.shape
    x = x.reshape(height // factor, factor, width // factor, factor, channels)
    return x.transpose(0, 2, 4, 1, 3).reshape(height // factor, width // factor, -1)


def post_filter(state: dict):
    """postfilter.PostFilter in float32 channels-last, or None for weights without one:
    f(x̂ (H, W, 3), position) → x̂ + r, with the gains of layer `position` (0-based; between
    two layers, the gains interpolated). The gains are folded into the convolutions' weights
    and biases (a gain scales a whole output channel), each layer's once."""
    if "post.gains" not in state:
        return None
    keys = ["post.head", "post.body.0", "post.body.1", "post.tail"]
    # Per layer, one row of gains per convolution (each as wide as its output).
    gain_tables = [*state["post.gains"].transpose(1, 0, 2), state["post.out_gains"]]
    coarse = "post.coarse_gains" in state
    if coarse:  # the branch's convolutions after the tail's; 1x1 weights as (1, 1, Cin, Cout)
        keys += ["post.down", "post.coarse.0", "post.coarse.1"]
        gain_tables += [*state["post.coarse_gains"].transpose(1, 0, 2)]
        up = (conv_weight(state["post.up.weight"], np.float32)[0, 0],
              state["post.up.bias"].astype(np.float32))
    weights = [(conv_weight(state[key + ".weight"], np.float64),
                state[key + ".bias"].astype(np.float64)) for key in keys]
    gain_tables = [table.astype(np.float64) for table in gain_tables]
    layers = len(gain_tables[0])

    def folded(low, high=None, share=0.0):
        scales = [table[low] if high is None else (1 - share) * table[low] + share * table[high]
                  for table in gain_tables]
        return [((weight * scale).astype(np.float32), (bias * scale).astype(np.float32))
                for (weight, bias), scale in zip(weights, scales)]
    per_layer = [folded(layer) for layer in range(layers)]

    def run(x: np.ndarray, position: float) -> np.ndarray:
        low = min(int(position), layers - 1)
        share = position - low
        convs = per_layer[low] if share == 0 else folded(low, min(low + 1, layers - 1), share)
        hidden = pixel_unshuffle(np.asarray(x, np.float32), 2)
        for weight, bias in convs[:3]:
            hidden = _leaky_relu(conv3x3(hidden, weight, bias))
        if coarse:
            (down, down_bias), *branch = convs[4:]
            low_res = pixel_unshuffle(hidden, 2)
            low_res = _leaky_relu(np.matmul(low_res, down[0, 0]) + down_bias)
            for weight, bias in branch:
                low_res = _leaky_relu(conv3x3(low_res, weight, bias))
            hidden = hidden + pixel_shuffle(np.matmul(low_res, up[0]) + up[1], 2)
        tail_weight, tail_bias = convs[3]
        return x + pixel_shuffle(conv3x3(hidden, tail_weight, tail_bias), 2)
    return run


def inverse_haar(x: np.ndarray) -> np.ndarray:
    """The inverse (the transpose) of transforms.haar in channels-last: (H, W, 4C), each
    channel's LL, LH, HL, HH next to each other → (2H, 2W, C)."""
    ll, lh, hl, hh = (x[:, :, k::4] for k in range(4))
    out = np.empty((2 * x.shape[0], 2 * x.shape[1], x.shape[2] // 4), x.dtype)
    out[0::2, 0::2] = 0.5 * (ll + lh + hl + hh)
    out[0::2, 1::2] = 0.5 * (ll - lh + hl - hh)
    out[1::2, 0::2] = 0.5 * (ll + lh - hl - hh)
    out[1::2, 1::2] = 0.5 * (ll - lh - hl + hh)
    return out


def _wavelet_up(state, key, channels, dtype):
    """transforms.WaveletShortcut(up=True): projection, scale, inverse Haar to `channels`,
    folded into one matrix product and a rearrangement (as the torch module does)."""
    projection = state[key + ".proj.weight"]  # (wide, cin, 1, 1)
    wide = projection.shape[0]
    levels = int(round(np.log(wide / channels) / np.log(4)))
    assert channels * 4 ** levels == wide, (key, wide, channels)
    size = 2 ** levels
    # What each subband channel becomes: the inverse Haar of a unit impulse, a size × size
    # patch of `channels` (rows k·size … of the transformed identity).
    patches = np.eye(wide, dtype=np.float64)[:, None, :]
    for _ in range(levels):
        patches = inverse_haar(patches)
    patches = patches.reshape(wide, size, size, channels).reshape(wide, wide)
    # x·(W·s)·patches: the scale and the projection fold in too.
    matrix = np.ascontiguousarray(
        (projection[:, :, 0, 0] * state[key + ".scale"][:, None]).T @ patches, dtype=dtype)

    def run(x):
        height, width = x.shape[:2]
        y = np.matmul(x.reshape(-1, x.shape[-1]), matrix)
        y = y.reshape(height, width, size, size, channels).transpose(0, 2, 1, 3, 4)
        return y.reshape(height * size, width * size, channels)
    return run
