"""Neural network modules: the mean-scale hyperprior and the learned quantizer parameters.

Only nn.Modules and the differentiable training-time simulation of the quantization
hierarchy live here. The integer bookkeeping that the bitstream relies on is in quant.py;
the float split rule in `nested_quantize` below mirrors `quant.split_bounds` exactly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .quant import (
    DEFAULT_SPREAD_INDEX,
    RECONSTRUCTION_SPREAD,
    RECONSTRUCTION_SPREADS,
    SCALE_MAX,
    SCALE_MIN,
    SLIVER,
    integer_steps,
)
from .transforms import build_transforms

# The prior's σ is clamped to the coder's scale table (quant.SCALES: 0.04 … 64, × 2^shift
# since 2026-12-05: quant.scale_shift_for). Training once clamped only from below: nothing
# fixes the scale of y (y/c, steps/c, μ/c, σ/c code the same), it drifted up at lr 1e-4, and
# by step 56,200 80 % of kodim01's σ were above 64, where the coder snaps them to 64: real
# files got worse while the training loss held.
LIKELIHOOD_MIN = 1e-9
PU_LATENT_GAIN = 8.0
SHORTCUT_PENALTY_WEIGHT = 0.1  # AuxT (Li et al., ICLR 2025): ‖WWᵀ − I‖² at weight 0.1


def compressai_modules():
    """compressai's EntropyBottleneck and GDN, imported on first use: the quantizer's
    functions here also serve encode-time refinement (refine.py), in the codec-only install
    that has no compressai; its import's torch.jit deprecation warning is not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from compressai.entropy_models import EntropyBottleneck
        from compressai.layers import GDN
    return EntropyBottleneck, GDN


@dataclass(frozen=True)
class NetworkConfig:
    N: int = 128  # channels of the transforms and of the hyper-latent
    M: int = 192  # channels of the latent y
    layers: int = 8  # quantization layers of the embedded stream
    # Initial step sizes (learned afterwards), a ratio of 1.65 between layers: below 1.6 the
    # boundary-aware split leaves a uniform cell whole, and a layer that splits nothing gets
    # no gradient to its step.
    coarsest_step: float = 5.4
    finest_step: float = 0.16
    design: str = "gdn5"  # transforms.DESIGNS
    blocks: tuple = (1, 1, 1)  # "pu": residual blocks at 1/4, 1/8, 1/16
    post_filter: int = 0  # width of the post-filter after g_s (postfilter.py); 0: none
    post_coarse: int = 0  # channels of its quarter-resolution branch; 0: none

    def to_dict(self) -> dict:
        return asdict(self)


def gaussian_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x * (2**-0.5))


def conditional_mean(lower: torch.Tensor, upper: torch.Tensor, sigma: torch.Tensor,
                     spread=RECONSTRUCTION_SPREAD) -> torch.Tensor:
    """E[x | lower < x < upper] for x ~ N(0, spread * sigma): what the decoder
    reconstructs (torch mirror of quant.reconstruct; mirrored to the negative side and
    normalised by Φ(b) in the log domain so that tail intervals stay finite). `spread`: a
    number or a tensor broadcast over the elements; inf: the interval's midpoint.

    Computed in float64, as the coder does. An interval hundreds of σ out in the tail (a
    confidently wrong prior: σ 0.04–0.1 and y* 80–450, seen in the 2026-12-02 run) puts -b²/2
    near -5e5, where float32's spacing is 0.03–0.06: the mean came out units away from the
    decoder's (or fell back to the midpoint, 10 units away) and its gradient to σ reached 1e6;
    single batches had gradient norms of 1e7 through the prior into the analysis, and the run
    stopped on non-finite batches. In float64 the mean is the decoder's and that gradient is
    of order 1 (its true value is ~0.002; torch's log_ndtr gradient is exact to 1e-6, which
    the cancellation multiplies by b/σ)."""
    dtype = lower.dtype
    lower, upper = lower.double(), upper.double()
    spread = torch.as_tensor(spread, dtype=torch.float64, device=lower.device)
    at_midpoint = ~torch.isfinite(spread)
    sigma = sigma.double() * torch.where(at_midpoint, 1.0, spread)
    midpoint = (lower + upper) / 2
    mirror = midpoint > 0
    a = torch.where(mirror, -upper, lower) / sigma
    b = torch.where(mirror, -lower, upper) / sigma
    log_norm = torch.special.log_ndtr(b)
    mass = -torch.expm1(torch.special.log_ndtr(a) - log_norm)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    density = (torch.exp(-0.5 * a * a - half_log_2pi - log_norm)
               - torch.exp(-0.5 * b * b - half_log_2pi - log_norm))
    mean = sigma * density / mass.clamp(min=1e-12)
    mean = torch.where(mirror, -mean, mean)
    ok = torch.isfinite(mean) & (mean >= lower) & (mean <= upper) & ~at_midpoint
    return torch.where(ok, mean, midpoint).to(dtype)


def interval_mass(lower: torch.Tensor, upper: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Mass of N(0, sigma) on [lower, upper], computed on the tail side for precision."""
    flip = torch.sign(lower + upper).detach()  # mirror intervals to the negative side
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    lo = torch.minimum(-flip * lower, -flip * upper)
    hi = torch.maximum(-flip * lower, -flip * upper)
    return gaussian_cdf(hi / sigma) - gaussian_cdf(lo / sigma)


def nested_intervals(y_star: torch.Tensor, steps: torch.Tensor, layer_of: torch.Tensor):
    """Interval [lower, upper] of y* after the first layer_of[b] layers: the coder's own
    partition (float mirror of quant.split_counts/split_bounds).

    y_star: (B, M, H, W); steps: (L, M); layer_of: (B,) in 1..L. Which sub-interval holds y*
    is decided without gradient; the bounds are differentiable functions of the step sizes,
    so the steps learn from the partition they really produce.

    Each image's interval gets gradient only from its own layer's steps (the parent interval
    enters detached): otherwise every finer layer's λ pulls the coarse steps finer through
    the nesting, and layer 1's rate drifted from 0.15 to 0.30 bpp in training.

    Layer 1's index q = round(y*/s) also passes gradient to s as in LSQ (Esser et al. 2020):
    ∂bound/∂s = q ± 1/2 - y*/s. Without it an element in the zero cell, the common case at
    the coarsest step, reconstructs to 0 for every s, the loss never sees what a coarser
    step costs, and s grew until layer 1 lost 4 dB (kodim23: 27.4 → 23.5 dB at the same rate).
    """
    decide = y_star.detach()
    step = steps[0].view(1, -1, 1, 1)
    ratio = decide / step
    q = torch.round(ratio.detach()) + (ratio - ratio.detach())  # = round(y*/s), LSQ gradient
    lower, upper = (q - 0.5) * step, (q + 0.5) * step
    picked_lower, picked_upper = lower, upper
    for layer in range(1, int(layer_of.max())):
        lower, upper = split_interval(decide, lower.detach(), upper.detach(),
                                      steps[layer].view(1, -1, 1, 1))
        use = (layer_of > layer).view(-1, 1, 1, 1)
        picked_lower = torch.where(use, lower, picked_lower)
        picked_upper = torch.where(use, upper, picked_upper)
    return picked_lower, picked_upper


def split_interval(y_star, lower, upper, step):
    """One refinement layer: sub-intervals of width `step` centred on [lower, upper], clipped
    at its bounds; if the edge slivers would be narrower than SLIVER·step, 2m+1 equal
    sub-intervals instead ("stretched"); intervals narrower than `step` stay whole."""
    with torch.no_grad():
        width, s = (upper - lower), step
        excess = (width - s) / (2 * s)  # half-steps beyond the central sub-interval
        full = torch.floor(excess).clamp(min=0)
        stretched = (excess - torch.floor(excess)) < SLIVER
        keep = excess < 0
        count_s = 2 * full + 1
        index_s = torch.floor((y_star - lower) / (width / count_s)).clamp(min=0)
        index_s = torch.minimum(index_s, count_s - 1)
        centre = (lower + upper) / 2
        offset = torch.floor((y_star - centre) / s + 0.5)
        offset = torch.maximum(torch.minimum(offset, full + 1), -(full + 1))
    width = upper - lower
    centre = (lower + upper) / 2
    # The offset passes an LSQ gradient to the step, as layer 1's index does (see
    # nested_intervals): the central cell's bounds then move with the step as its error does.
    ratio = (y_star.detach() - centre.detach()) / step
    offset = offset + (ratio - ratio.detach())
    cell = width / (2 * full + 1)
    lower_s = lower + index_s * cell
    lower_n = torch.maximum(lower, centre + (offset - 0.5) * step)
    upper_n = torch.minimum(upper, centre + (offset + 0.5) * step)
    new_lower = torch.where(stretched, lower_s, lower_n)
    new_upper = torch.where(stretched, lower_s + cell, upper_n)
    return torch.where(keep, lower, new_lower), torch.where(keep, upper, new_upper)


class HyperpriorNetwork(nn.Module):
    """Mean-scale hyperprior (Minnen et al. 2018, no context model) with a learned
    hierarchical quantizer: per-layer, per-channel step sizes.

    DeepHQ also learns a dequantization gain per layer and channel on top of midpoint
    reconstruction; here the decoder reconstructs at the conditional mean inside the interval
    under a widened prior, or at its midpoint (each layer's spread: reconstruction_spreads
    below), and training sees exactly that, so no gains are needed and an element's
    reconstruction does not depend on which layer the others have reached (a cut inside a
    layer mixes elements of two layers)."""

    def __init__(self, config: NetworkConfig = NetworkConfig()):
        EntropyBottleneck, GDN = compressai_modules()
        super().__init__()
        self.config = config
        N, M, L = config.N, config.M, config.layers
        for name, module in build_transforms(N, M, GDN, config.design, config.blocks).items():
            setattr(self, name, module)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.post = None
        if config.post_filter:  # keys "post.", as weights files carry it
            from .postfilter import PostFilter

            self.post = PostFilter(L, config.post_filter, config.post_coarse)
        ladder = torch.linspace(math.log(config.coarsest_step), math.log(config.finest_step), L)
        self.log_steps = nn.Parameter(ladder.view(L, 1).repeat(1, M))
        # σ's range is the coder's table × 2^scale_shift (quant.scale_shift_for); a buffer,
        # so that it travels with the weights. Weights made before it load as 0.
        self.register_buffer("scale_shift", torch.zeros(()))
        # The spread each layer's intervals reconstruct with, as indexes into
        # quant.RECONSTRUCTION_SPREADS: the default for every layer until export fits them
        # (calibration.py); train.py sets those of the weights it starts from, so that a
        # fine-tune sees the reconstruction the decoder makes. Not a parameter or buffer:
        # weights files keep them beside the state dict.
        self.reconstruction_spreads = torch.full((L,), DEFAULT_SPREAD_INDEX, dtype=torch.long)
        if config.design in ("pu", "pux"):
            # At PyTorch's default initialisation the pu analysis gives y of std ~0.1, almost
            # all of it rounded to 0 on the unit grid, and Adam takes thousands of steps to
            # grow it. Starting with y 8x larger (and the same codec otherwise): 25 % lower
            # base-stage loss after 300 steps (332 against 446, λ = 0.36, batch 8 × 256²).
            self.rescale_latent(1 / PU_LATENT_GAIN)
            with torch.no_grad():
                self.log_steps.copy_(ladder.view(L, 1).repeat(1, M))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "scale_shift", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def steps(self) -> torch.Tensor:
        return torch.exp(self.log_steps)

    def restore_spreads(self, saved: dict):
        """The reconstruction spreads of a weights file or checkpoint (absent before export
        fitted them: then the default for every layer stays)."""
        spreads = saved.get("reconstruction_spreads")
        if spreads is not None:
            self.reconstruction_spreads = torch.as_tensor(spreads, dtype=torch.long)

    def decoder_steps(self) -> torch.Tensor:
        """The steps the codec codes with: the learned ones on each channel's integer grid
        (quant.integer_steps). Where the steps are frozen (train_only), the intervals are
        then the decoder's own."""
        unit, int_steps = integer_steps(self.log_steps.detach().double().cpu().numpy())
        return torch.from_numpy(int_steps * unit).float().to(self.log_steps.device)

    def spreads_of(self, layer_of: torch.Tensor) -> torch.Tensor:
        """The reconstruction spread of each row's layer, (rows, 1, 1, 1); inf: midpoint."""
        values = torch.from_numpy(RECONSTRUCTION_SPREADS)[self.reconstruction_spreads]
        return values.to(layer_of.device)[layer_of - 1].view(-1, 1, 1, 1)

    def shortcut_penalty(self) -> torch.Tensor:
        """AuxT's orthogonality loss on the wavelet shortcuts' projections (pux), weighted
        as its paper does; 0 for designs without them."""
        from .transforms import WaveletShortcut

        terms = [m.orthogonality_penalty() for m in self.modules() if isinstance(m, WaveletShortcut)]
        return SHORTCUT_PENALTY_WEIGHT * sum(terms) if terms else torch.zeros(())

    def rescale_latent(self, c: float):
        """y → y/c with every step, μ and σ divided by c: the same codec up to the σ clamps.
        Nothing in the loss fixes this scale (train.TrainConfig.finest_step holds it)."""
        with torch.no_grad():
            self.g_a[-1].weight /= c
            self.g_a[-1].bias /= c
            self.g_s[0].weight *= c
            self.h_a[0].weight *= c
            self.h_s[-1].weight /= c
            self.h_s[-1].bias /= c
            self.log_steps -= math.log(c)

    def prior(self, z_hat: torch.Tensor):
        """Mean and scale of the conditional Gaussian of y given the hyper-latent."""
        params = self.h_s(z_hat).float()
        scales, means = params.chunk(2, 1)
        factor = torch.exp2(self.scale_shift)  # a tensor: no device sync on a GPU
        return means, torch.clamp(torch.abs(scales), min=SCALE_MIN * factor, max=SCALE_MAX * factor)

    def analyse(self, x: torch.Tensor, autocast: bool = True):
        """What both training passes start from: y − μ, μ and σ of the prior given the
        straight-through rounded hyper-latent, and the hyper-latent's likelihoods."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = self.g_a(x)
            z = self.h_a(y)
        y, z = y.float(), z.float()
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_hat = z + (torch.round(z) - z).detach()  # straight-through rounding
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            means, scales = self.prior(z_hat)
        return y - means, means, scales, z_likelihoods

    def forward(self, x: torch.Tensor, layer_of: torch.Tensor, autocast: bool = True,
                steps: torch.Tensor | None = None):
        """Training pass. x in [0,1], (B,3,H,W); layer_of (K·B,) in 1..L: row k·B + b is image
        b at layer layer_of[k·B + b] (K > 1: every image at K layers through one analysis
        pass, as synthesis_pass does; the outputs have K·B rows).

        Rate and distortion are those of the coder's own nested intervals (see below), in the
        learned steps or in `steps` (the decoder's, where they are frozen: train_only=analysis).
        """
        y_star, means, scales, z_likelihoods = self.analyse(x, autocast)
        repeats = len(layer_of) // x.shape[0]
        if repeats > 1:  # every layer's file holds the hyper-latent: its bits count in each
            y_star, means, scales, z_likelihoods = (
                t.repeat(repeats, 1, 1, 1) for t in (y_star, means, scales, z_likelihoods))
        lower, upper = nested_intervals(y_star, self.steps() if steps is None else steps, layer_of)
        # Rate: the bits the coder spends for layers 1..l, -log2 of the prior's mass on the
        # final nested interval (the renormalised layer masses telescope to it). Gradient to
        # y as if the interval slid with it (straight-through); to the steps via the bounds.
        slide = y_star - y_star.detach()
        y_likelihoods = torch.clamp(
            interval_mass(lower + slide, upper + slide, scales), min=LIKELIHOOD_MIN)
        # Distortion: the decoder's reconstruction, the conditional mean in the interval.
        y_hat = means + conditional_mean(lower, upper, scales, self.spreads_of(layer_of)) + slide
        return self.synthesis(y_hat, layer_of, autocast), y_likelihoods, z_likelihoods

    def synthesis(self, y_hat: torch.Tensor, layer_of: torch.Tensor, autocast: bool = True):
        """g_s, then the post-filter (if any) with each row's layer's gains, float32."""
        with torch.autocast(y_hat.device.type, dtype=torch.bfloat16, enabled=autocast):
            x_hat = self.g_s(y_hat)
            if self.post is not None:
                x_hat = self.post(x_hat.float(), layer_of - 1)
        return x_hat.float()

    def forward_base(self, x: torch.Tensor, autocast: bool = True):
        """Single-rate training pass (the first of two stages, as DeepHQ trains): y − μ rounded
        to the unit grid, straight-through into the synthesis (one reconstruction per crop);
        the rate from the prior's mass on the unit cell around y − μ plus uniform noise
        ("mixed" quantization, Minnen & Singh 2020). The ladder's steps are not used."""
        y_star, means, scales, z_likelihoods = self.analyse(x, autocast)
        noisy = y_star + torch.empty_like(y_star).uniform_(-0.5, 0.5)
        y_likelihoods = torch.clamp(interval_mass(noisy - 0.5, noisy + 0.5, scales),
                                    min=LIKELIHOOD_MIN)
        y_hat = means + y_star + (torch.round(y_star) - y_star).detach()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            x_hat = self.g_s(y_hat)
        return x_hat.float(), y_likelihoods, z_likelihoods

    def synthesis_pass(self, x: torch.Tensor, layers: torch.Tensor, autocast: bool = True):
        """Fine-tuning pass of the synthesis alone: every image of x reconstructed at each of
        `layers` (K,), as (K·B, 3, H, W) with the layer of each; all but g_s (and the
        post-filter) without gradient.

        The encoder, prior and steps fixed, every layer's bytes are fixed too, so the loss is
        distortion only and whatever it gains is PSNR at the same rate."""
        y_hat, layer_of = self.decoded_latents(x, layers, autocast)
        y_hat = y_hat.contiguous(memory_format=torch.channels_last)
        return self.synthesis(y_hat, layer_of, autocast), layer_of

    @torch.no_grad()
    def decoded_latents(self, x: torch.Tensor, layers: torch.Tensor, autocast: bool = True):
        """ŷ of every image of x at each of `layers` as the decoder reconstructs it: ẑ
        rounded, the codec's integer steps, each layer's reconstruction spread. (K·B, M, h, w)
        and the layer of each row."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = self.g_a(x)
            z = self.h_a(y)
            means, scales = self.prior(torch.round(z.float()))
        y_star = (y.float() - means).repeat(len(layers), 1, 1, 1)
        means, scales = means.repeat(len(layers), 1, 1, 1), scales.repeat(len(layers), 1, 1, 1)
        layer_of = layers.repeat_interleave(x.shape[0])
        lower, upper = nested_intervals(y_star, self.decoder_steps(), layer_of)
        return means + conditional_mean(lower, upper, scales, self.spreads_of(layer_of)), layer_of

    def aux_loss(self) -> torch.Tensor:
        return self.entropy_bottleneck.loss()
