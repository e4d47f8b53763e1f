"""The four transforms of the mean-scale hyperprior, defined once, and a plain-torch GDN for
inference: coding needs no compressai import (it pulls in torchvision and torch_geometric,
seconds of start-up), training builds the same layers with compressai's GDN.

Three designs of g_a/g_s (h_a is the same in all; h_s's hidden layers are M wide for gdn5 and
N wide for the others):
- "gdn5": Ballé/Minnen's 5x5 stride-2 convolutions with GDN (every model up to -r6).
- "pu": a pixel-unshuffle x4 stem, 3x3 convolutions and residual blocks (GELU) at 1/4, 1/8
  and 1/16 of the resolution, pixel-shuffle upsampling in g_s. About the same MACs per pixel
  as gdn5 at N=128 but 2-4x faster on CPU (3x3 convolutions on channels-last are oneDNN's
  fast path, 5x5 stride-2 and GDN are not) and much faster again in bf16 on AMX.
  Every stage keeps a linear path (the residual identity, the strided or shuffled linear
  convolution).
- "pux": pu with AuxT's wavelet shortcut (Li et al., ICLR 2025) beside each of its three
  resolution stages: a Haar DWT, a learned per-subband scale and a near-orthogonal 1x1
  projection, added to the stage's output. About 2x pu's training progress per CPU-hour in
  a one-hour pilot, though a step costs 1.4x (docs/pu320.md).

Inference runs channels-last (oneDNN's fast path). The synthesis runs in bfloat16 where the
CPU has native bf16 (as training did), except its last layer: that output is the image
itself, and bf16's 8-bit mantissa would move pixels by up to half a level. Measured on a
768x512 synthesis, one thread: float32 1.9 s, channels-last float32 1.0 s, this ≈ 0.25 s;
PSNR within 0.02 dB of float32 (-r5 on Kodak: 0.015 dB). The analysis stays float32: in
bf16 it was 3x faster but cost 0.02 dB at the finest layer, and a stream is encoded once
and decoded many times.
The prior (h_s) is not here: it runs in float64 for bit-exact coding.
"""

from __future__ import annotations

import torch
from torch import nn

DESIGNS = ("gdn5", "pu", "pux")


def conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )


class ResidualBlock(nn.Module):
    """x + conv(GELU(conv(x))), 3x3 both."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv(channels, channels, 3, 1)
        self.conv2 = conv(channels, channels, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(nn.functional.gelu(self.conv1(x)))


class ToPixels(nn.Module):
    """The synthesis's last layer: a 3x3 convolution to 3·r² channels and a pixel shuffle
    by r (kept apart so inference can run it in float32)."""

    def __init__(self, cin: int, factor: int = 4):
        super().__init__()
        self.conv = conv(cin, 3 * factor * factor, 3, 1)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.conv(x), self.factor)


def upsample(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, 4 * cout, 3, 1), nn.PixelShuffle(2))


# The orthonormal 2x2 Haar filters LL, LH, HL, HH on the pixels (a b / c d) of each block.
_HAAR = 0.5 * torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, -1.0]],
                            [[1.0, 1.0], [-1.0, -1.0]], [[1.0, -1.0], [-1.0, 1.0]]])


def _haar_filters(channels: int, like: torch.Tensor) -> torch.Tensor:
    return _HAAR.to(like.device, like.dtype).repeat(channels, 1, 1).unsqueeze(1)


def haar(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2x2 Haar analysis: (B, C, H, W) → (B, 4C, H/2, W/2), each channel's LL,
    LH, HL, HH next to each other (AuxT's order); its inverse is its transpose."""
    return nn.functional.conv2d(x, _haar_filters(x.shape[1], x), stride=2, groups=x.shape[1])


class WaveletShortcut(nn.Module):
    """AuxT's linear shortcut (Li et al., ICLR 2025) beside a stage that changes resolution
    by 2^levels: Haar DWT `levels` times (every subband split again), a learned scale per
    subband channel and a 1x1 projection kept near orthogonal (orthogonality_penalty);
    `up` mirrors it for the synthesis: projection, scale, inverse DWT.

    All three are linear, so they run as one convolution whose kernel is composed each step
    from the projection, the scales and the fixed Haar basis: a 2^levels stride-2^levels
    convolution down, a 1x1 convolution and a pixel shuffle up. Same function, same
    parameters; a pux320 training step went from 14.4 to 24.5 crops/s (`pcodec train
    --measure`, bf16 on AMX; 28.2 without the shortcuts), the Haar steps having run as
    grouped convolutions, slow backward."""

    def __init__(self, cin: int, cout: int, levels: int, up: bool = False):
        super().__init__()
        self.levels, self.up = levels, up
        narrow = cout if up else cin
        wide = narrow * 4 ** levels
        self.scale = nn.Parameter(torch.ones(wide))
        self.proj = nn.Conv2d(cin, wide, 1, bias=False) if up else nn.Conv2d(wide, cout, 1, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        # (wide, narrow·P·P): the subbands of each pixel of a P×P patch (c, i, j), P = 2^levels
        patch = torch.eye(wide).view(wide, narrow, 2 ** levels, 2 ** levels)
        for _ in range(levels):
            patch = haar(patch)
        self.register_buffer("basis", patch.reshape(wide, wide).T.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = 2 ** self.levels
        weight = self.proj.weight.flatten(1)
        if self.up:  # x·(s ⊙ W)·Hᵀ: a 1x1 convolution to the patches' pixels, then a shuffle
            kernel = self.basis.T @ (self.scale[:, None] * weight)
            return nn.functional.pixel_shuffle(
                nn.functional.conv2d(x, kernel[:, :, None, None]), size)
        kernel = (weight * self.scale) @ self.basis
        return nn.functional.conv2d(x, kernel.view(len(kernel), -1, size, size), stride=size)

    def orthogonality_penalty(self) -> torch.Tensor:
        """‖WWᵀ − I‖² over the projection's shorter side."""
        w = self.proj.weight.flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return ((gram - torch.eye(len(gram), device=w.device, dtype=w.dtype)) ** 2).sum()


class Stage(nn.Module):
    """A non-linear stage and the linear wavelet shortcut beside it: main(x) + aux(x)."""

    def __init__(self, main: nn.Sequential, aux: WaveletShortcut):
        super().__init__()
        self.main, self.aux = main, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.aux(x)


def pu_transforms(N: int, M: int, blocks: tuple[int, int, int]) -> dict[str, nn.Sequential]:
    """g_a, g_s of the "pu" design; `blocks` residual blocks at 1/4, 1/8, 1/16."""
    def stack(count):
        return [ResidualBlock(N) for _ in range(count)]

    return {
        "g_a": nn.Sequential(
            nn.PixelUnshuffle(4), conv(48, N, 3, 1), *stack(blocks[0]),
            conv(N, N, 3, 2), *stack(blocks[1]),
            conv(N, N, 3, 2), *stack(blocks[2]), conv(N, M, 3, 1)),
        "g_s": nn.Sequential(
            conv(M, N, 3, 1), *stack(blocks[2]), upsample(N, N),
            *stack(blocks[1]), upsample(N, N), *stack(blocks[0]), ToPixels(N)),
    }


def pux_transforms(N: int, M: int, blocks: tuple[int, int, int]) -> dict[str, nn.Sequential]:
    """The pu design with an AuxT wavelet shortcut beside each of its three resolution
    stages (the stem's x4 counts as two Haar levels); the latent's own convolutions stay
    plain, so y's scale is set by g_a[-1] and g_s[0] as in pu."""
    def stack(count):
        return [ResidualBlock(N) for _ in range(count)]

    return {
        "g_a": nn.Sequential(
            Stage(nn.Sequential(nn.PixelUnshuffle(4), conv(48, N, 3, 1), *stack(blocks[0])),
                  WaveletShortcut(3, N, 2)),
            Stage(nn.Sequential(conv(N, N, 3, 2), *stack(blocks[1])), WaveletShortcut(N, N, 1)),
            Stage(nn.Sequential(conv(N, N, 3, 2), *stack(blocks[2])), WaveletShortcut(N, N, 1)),
            conv(N, M, 3, 1)),
        "g_s": nn.Sequential(
            conv(M, N, 3, 1),
            Stage(nn.Sequential(*stack(blocks[2]), upsample(N, N)), WaveletShortcut(N, N, 1, True)),
            Stage(nn.Sequential(*stack(blocks[1]), upsample(N, N)), WaveletShortcut(N, N, 1, True)),
            Stage(nn.Sequential(*stack(blocks[0]), ToPixels(N)), WaveletShortcut(N, 3, 2, True))),
    }


def build_transforms(N: int, M: int, gdn, design: str = "gdn5",
                     blocks: tuple[int, int, int] = (1, 1, 1)) -> dict[str, nn.Sequential]:
    """g_a, g_s (gdn5: with `gdn(channels, inverse=...)`), h_a and h_s (Minnen et al. 2018)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown transform design {design!r} (known: {', '.join(DESIGNS)})")
    # h_s's hidden widths: Minnen's M and 3M/2 for gdn5; N and 3N/2 for pu, whose M = 320
    # would make the prior (run in float64 when coding) cost as much as g_s itself.
    hidden = (M, M * 3 // 2) if design == "gdn5" else (N, N * 3 // 2)
    hyper = {
        "h_a": nn.Sequential(
            conv(M, N, 3, 1), nn.LeakyReLU(inplace=True), conv(N, N), nn.LeakyReLU(inplace=True),
            conv(N, N)),
        "h_s": nn.Sequential(
            deconv(N, hidden[0]), nn.LeakyReLU(inplace=True), deconv(*hidden),
            nn.LeakyReLU(inplace=True), conv(hidden[1], M * 2, 3, 1)),
    }
    if design == "pu":
        return {**pu_transforms(N, M, tuple(blocks)), **hyper}
    if design == "pux":
        return {**pux_transforms(N, M, tuple(blocks)), **hyper}
    return {
        "g_a": nn.Sequential(conv(3, N), gdn(N), conv(N, N), gdn(N), conv(N, N), gdn(N), conv(N, M)),
        "g_s": nn.Sequential(
            deconv(M, N), gdn(N, inverse=True), deconv(N, N), gdn(N, inverse=True),
            deconv(N, N), gdn(N, inverse=True), deconv(N, 3)),
        **hyper,
    }


class PlainGDN(nn.Module):
    """(I)GDN with its effective β and γ stored directly: x / sqrt(β + γ * x²)."""

    def __init__(self, channels: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(torch.zeros(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = nn.functional.conv2d(x * x, self.gamma, self.beta)
        return x * torch.sqrt(norm) if self.inverse else x * torch.rsqrt(norm)


def _effective(value: torch.Tensor, bound: torch.Tensor, pedestal: torch.Tensor) -> torch.Tensor:
    """compressai's NonNegativeParametrizer: max(value, bound)² − pedestal."""
    return torch.maximum(value, bound) ** 2 - pedestal


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class SubPixelDeconv(nn.Module):
    """A 5x5 stride-2 transposed convolution rewritten as a 3x3 convolution to 4x the
    channels and a pixel shuffle: the same sums, ~5x faster in float32 on CPU (oneDNN's
    transposed convolution to 3 channels is slow)."""

    def __init__(self, deconv: nn.ConvTranspose2d):
        super().__init__()
        from .inference import subpixel_weight

        kernel = deconv.weight.shape[2]
        assert kernel == 5 and deconv.stride == (2, 2) and deconv.padding == (2, 2)
        # The numpy decoder's rewrite, (3, 3, Cin, 4·Cout), in torch's (4·Cout, Cin, 3, 3).
        rewritten = subpixel_weight(deconv.weight.detach().cpu().double().numpy(), "float32")
        weight = torch.from_numpy(rewritten.transpose(3, 2, 0, 1).copy()).to(deconv.weight)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(deconv.bias.repeat_interleave(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(nn.functional.conv2d(x, self.weight, self.bias, padding=1), 2)


class Transforms(nn.Module):
    """Inference-only transforms loaded from a training state dict."""

    def __init__(self, N: int, M: int, state_dict: dict[str, torch.Tensor], design: str = "gdn5",
                 blocks: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        for name, module in build_transforms(N, M, PlainGDN, design, blocks).items():
            setattr(self, name, module)
        converted = {}
        for key, value in state_dict.items():
            if key.split(".")[0] not in ("g_a", "g_s", "h_a", "h_s") or "_reparam." in key:
                continue
            if key.endswith((".beta", ".gamma")):
                prefix = key.rsplit(".", 1)[0] + "." + key.rsplit(".", 1)[1] + "_reparam."
                value = _effective(value, state_dict[prefix + "lower_bound.bound"],
                                   state_dict[prefix + "pedestal"])
                if key.endswith(".gamma"):
                    value = value.reshape(value.shape[0], value.shape[1], 1, 1)
            converted[key] = value
        self.load_state_dict(converted)
        self.eval()
        self.bf16 = native_bf16()
        self.g_s_body = self.g_s[:-1].to(memory_format=torch.channels_last)
        last = self.g_s[-1]
        self.g_s_last = (last if isinstance(last, (ToPixels, Stage)) else SubPixelDeconv(last)).to(
            memory_format=torch.channels_last)
        self.g_a.to(memory_format=torch.channels_last)
        # Grad mode is per thread: torch.no_grad() in the caller does not reach the tiles'
        # worker threads, which recorded autograd graphs and held every activation (a 4K
        # decode peaked at 9 GB with 2 threads against 1.6 GB with 1).
        self.requires_grad_(False)
        self.device = torch.device("cpu")
        from .postfilter import from_state

        self.post_filter = from_state(state_dict)  # None: weights without one

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def place(self, device: str):
        """Run the transforms on another device (e.g. "cuda"). Inputs and outputs stay on
        the CPU, where everything that decides probabilities is computed, so streams are the
        same format and decode anywhere."""
        self.device = torch.device(device)
        for module in (self.g_a, self.g_s_body, self.g_s_last, self.post_filter):
            if module is not None:  # h_a, h_s stay on the CPU
                module.to(self.device)
        if self.device.type == "cuda":
            self.bf16 = torch.cuda.is_bf16_supported()
        return self

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """g_a: (1, 3, H, W) in [0, 1] → y, float32."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.g_a(x).contiguous().cpu()

    def synthesis(self, y: torch.Tensor, post_layer: float | torch.Tensor | None = None
                  ) -> torch.Tensor:
        """g_s: ŷ (B, M, h, w) → (B, 3, H, W) images in [0, 1] (not clamped), float32; then
        the post-filter with the gains at `post_layer` (postfilter.PostFilter; one position,
        or one per image) where the weights have one and it is given."""
        y = y.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.g_s_body(y)
        x = self.g_s_last(hidden.float())
        if post_layer is not None and self.post_filter is not None:
            position = torch.as_tensor(post_layer, dtype=torch.float32, device=self.device)
            x = self.post_filter(x, position.expand(len(x)))
        return x.contiguous().cpu()
