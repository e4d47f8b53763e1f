"""Encode-time refinement of the latent (`pcodec encode --refine N`).

The analysis transform maps an image to y in one pass, trained to do well on average; for one
image, N gradient steps on y itself, through the decoder's own synthesis, prior and
quantizer ladder, lower that image's λ_l·255²·MSE_l + bpp_l at every layer l (content-adaptive
latent optimisation: Campos et al. 2019, Yang et al. 2020). Only the encoder changes: a
refined stream is an ordinary stream, decoded as any other.

The loss is the training pass's (network.HyperpriorNetwork.forward): each layer's nested
interval from the model's own integer steps, its rate from the prior's mass on it with y
sliding straight through, the reconstruction the decoder makes of it (the layer's fitted
spread, or the midpoint), the synthesis with the post-filter at that layer's gains where the
weights have one, and ẑ rounded straight through with its rate read off the coder's own
frequency table. Each step samples two layers (seeded: the same image gives the same
stream on the same machine).
"""

from __future__ import annotations

import numpy as np

from .models import Z_RANGE, LoadedModel

LAYERS_PER_STEP = 2  # layers whose loss each step follows (4: twice the time, no clear gain)
STEP_SIZE = 0.01  # Adam's rate, in units of each channel's finest quantizer step
TILE_LATENTS = 64  # y is refined in tiles of up to 64x64 latents (1024x1024 pixels) ...
TILE_MARGIN = 4  # ... each with 4 latents of context, like the transforms' own tiles


def refine(model: LoadedModel, x, y, iterations: int, layers: int | None = None):
    """Refined y (1, M, h, w) for the padded image x (1, 3, 16h, 16w) in [0, 1], from the
    analysis's y, for a stream of the first `layers` layers (default all); tile by tile, so
    that memory is bounded whatever the image size."""
    import torch

    from .engine import _splits

    height, width = y.shape[2:]
    refined = y.clone()
    for top, bottom in _splits(height, TILE_LATENTS):
        for left, right in _splits(width, TILE_LATENTS):
            t0, l0 = max(0, top - TILE_MARGIN), max(0, left - TILE_MARGIN)
            t1, l1 = min(height, bottom + TILE_MARGIN), min(width, right + TILE_MARGIN)
            with torch.enable_grad():
                tile = _refine_tile(model, x[:, :, 16 * t0:16 * t1, 16 * l0:16 * l1],
                                    y[:, :, t0:t1, l0:l1], iterations,
                                    layers or model.layers)
            refined[:, :, top:bottom, left:right] = tile[:, :, top - t0:bottom - t0,
                                                         left - l0:right - l0]
    return refined


def _refine_tile(model: LoadedModel, x, y, iterations: int, layers: int):
    import torch

    from .network import conditional_mean, interval_mass, nested_intervals

    net = model.network
    M = y.shape[1]
    steps = torch.from_numpy(model.int_steps * model.unit[None, :]).float()  # (L, M), y units
    lambdas = torch.tensor(model.config["lambdas"], dtype=torch.float32)
    spreads = torch.from_numpy(model.reconstruction_spreads)
    smallest, largest = float(model.scales[0]), float(model.scales[-1])
    z_bits = _z_code_lengths(model.z_table)
    # Adam on y in units of each channel's finest step, so that one rate suits every model
    scale = steps[-1].view(1, M, 1, 1)
    u = (y / scale).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=STEP_SIZE)
    # The rate falls to 0 along a cosine: the last steps settle instead of jumping between
    # the two sampled layers' pulls.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, iterations))
    pixels = x.shape[2] * x.shape[3]

    def layer_losses(chosen):
        """λ·255²·MSE + bpp of the image at each of the layers `chosen` (1-based)."""
        y_now = u * scale
        z = net.h_a(y_now)
        z_hat = z + (torch.round(z) - z).detach()
        params = net.h_s(z_hat)
        sigma = torch.clamp(torch.abs(params[:, :M]), smallest, largest)
        mu = params[:, M:]
        count = len(chosen)
        y_star = (y_now - mu).repeat(count, 1, 1, 1)
        sigma, mu = sigma.repeat(count, 1, 1, 1), mu.repeat(count, 1, 1, 1)
        lower, upper = nested_intervals(y_star, steps, chosen)
        slide = y_star - y_star.detach()
        mass = torch.clamp(interval_mass(lower + slide, upper + slide, sigma), min=1e-9)
        reconstruction = conditional_mean(lower, upper, sigma,
                                          spreads[chosen - 1].view(-1, 1, 1, 1))
        x_hat = net.synthesis(mu + reconstruction + slide, chosen - 1)  # post-filtered
        bits = -torch.log2(mass).sum((1, 2, 3)) + _z_rate(z, z_bits)
        mse = ((x_hat - x) ** 2).mean((1, 2, 3))
        return lambdas[chosen - 1] * 255**2 * mse + bits / pixels

    # Each layer's loss weighed by the inverse of its value before refining, so that every
    # layer counts by its relative gain, as a BD-rate does: by λ alone the finest layer's loss
    # is ~25x the coarsest's and took nearly all the gradient (kodim01 and kodim23, 40 steps:
    # -3.8 and -7.0 % BD-rate against the unrefined stream, -3.4 and -6.2 % unweighted).
    with torch.no_grad():
        every = torch.arange(1, layers + 1)
        weights = 1 / torch.cat([layer_losses(every[k:k + LAYERS_PER_STEP])
                                 for k in range(0, layers, LAYERS_PER_STEP)])
    generator = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        chosen = torch.randperm(layers, generator=generator)[:LAYERS_PER_STEP] + 1
        loss = (weights[chosen - 1] * layer_losses(chosen)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return (u * scale).detach()


def _z_code_lengths(z_table: np.ndarray):
    """-log2 of each ẑ symbol's probability in the coder's table, (N, 2R+1)."""
    import torch

    table = z_table.astype(np.float64)
    return torch.from_numpy(-np.log2(table / table.sum(axis=1, keepdims=True))).float()


def _z_rate(z, z_bits):
    """ẑ's bits, the code length interpolated between integers so that z gets a gradient."""
    import torch

    position = torch.clamp(z[0] + Z_RANGE, 0, 2 * Z_RANGE)
    below = torch.clamp(torch.floor(position.detach()), max=2 * Z_RANGE - 1).long()
    fraction = position - below
    channels = z_bits.shape[0]
    rows = z_bits[torch.arange(channels).view(-1, 1, 1), below]
    following = z_bits[torch.arange(channels).view(-1, 1, 1), below + 1]
    return ((1 - fraction) * rows + fraction * following).sum()
