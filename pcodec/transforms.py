"""The four transforms of the mean-scale hyperprior, defined once, and a plain-torch GDN for
inference: coding needs no compressai import (it pulls in torchvision and torch_geometric,
seconds of start-up), training builds the same layers with compressai's GDN."""

from __future__ import annotations

import torch
from torch import nn


def conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def deconv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(
        cin, cout, kernel, stride=stride, padding=kernel // 2, output_padding=stride - 1
    )


def build_transforms(N: int, M: int, gdn) -> dict[str, nn.Sequential]:
    """g_a, g_s (with `gdn(channels, inverse=...)`), h_a and h_s (Minnen et al. 2018)."""
    return {
        "g_a": nn.Sequential(conv(3, N), gdn(N), conv(N, N), gdn(N), conv(N, N), gdn(N), conv(N, M)),
        "g_s": nn.Sequential(
            deconv(M, N), gdn(N, inverse=True), deconv(N, N), gdn(N, inverse=True),
            deconv(N, N), gdn(N, inverse=True), deconv(N, 3)),
        "h_a": nn.Sequential(
            conv(M, N, 3, 1), nn.LeakyReLU(inplace=True), conv(N, N), nn.LeakyReLU(inplace=True),
            conv(N, N)),
        "h_s": nn.Sequential(
            deconv(N, M), nn.LeakyReLU(inplace=True), deconv(M, M * 3 // 2),
            nn.LeakyReLU(inplace=True), conv(M * 3 // 2, M * 2, 3, 1)),
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


class Transforms(nn.Module):
    """Inference-only transforms loaded from a training state dict."""

    def __init__(self, N: int, M: int, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        for name, module in build_transforms(N, M, PlainGDN).items():
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
