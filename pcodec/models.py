"""Registry of shipped weights (models/manifest.json) and loading them for coding.

A weights file holds the network state, its training config and the integer entropy tables
derived from it at export time (so every machine codes the hyper-latent with the same table,
whatever its float arithmetic). Streams name their model id and carry the weights digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ModelError, RuntimeIOError, UsageError

Z_RANGE = 64  # hyper-latent symbols -Z_RANGE..Z_RANGE; the two ends are escapes
Z_TABLE_TOTAL = 1 << 16


def models_dir() -> Path:
    """PCODEC_MODELS, else the weights an installed package carries (pcodec/weights, from
    models/ at build time), else the source tree's models/."""
    if "PCODEC_MODELS" in os.environ:
        return Path(os.environ["PCODEC_MODELS"])
    here = Path(__file__).resolve().parent
    installed = here / "weights"
    return installed if (installed / "manifest.json").exists() else here.parent / "models"


def manifest() -> dict:
    path = models_dir() / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeIOError(f"no model manifest at {path} (set PCODEC_MODELS)") from None


def hyper_latent_table(entropy_bottleneck) -> np.ndarray:
    """Integer frequencies (N, 2*Z_RANGE+1) of each hyper-latent channel, every entry ≥ 1,
    the two end entries holding the tail masses (escape symbols)."""
    import copy

    import torch

    eb = copy.deepcopy(entropy_bottleneck).cpu().double()
    channels = eb.matrices[0].shape[0]
    values = torch.arange(-Z_RANGE, Z_RANGE + 1, dtype=torch.float64)
    inputs = values.view(1, 1, -1).repeat(channels, 1, 1)
    with torch.no_grad():
        cdf_upper = torch.sigmoid(eb._logits_cumulative(inputs + 0.5, stop_gradient=True))
        cdf_lower = torch.sigmoid(eb._logits_cumulative(inputs - 0.5, stop_gradient=True))
    mass = (cdf_upper - cdf_lower)[:, 0, :].numpy()
    mass[:, 0] = cdf_upper[:, 0, 0].numpy()  # everything below -Z_RANGE + 0.5
    mass[:, -1] = 1 - cdf_lower[:, 0, -1].numpy()  # everything above Z_RANGE - 0.5
    mass = np.maximum(mass, 0) + 1e-12
    mass /= mass.sum(axis=1, keepdims=True)
    counts = np.maximum(np.floor(mass * (Z_TABLE_TOTAL - mass.shape[1])), 0).astype(np.int64) + 1
    counts[np.arange(len(counts)), counts.argmax(axis=1)] += Z_TABLE_TOTAL - counts.sum(axis=1)
    return counts


@dataclass
class LoadedModel:
    model_id: str
    digest: bytes
    network: object  # transforms.Transforms: g_a, g_s, h_a, h_s in float32
    hyper_synthesis: object  # float64 copy of network.h_s: the prior must be reproducible
    unit: np.ndarray  # (M,) grid unit per channel
    int_steps: np.ndarray  # (L, M) integer steps
    z_table: np.ndarray  # (N, 2*Z_RANGE+1) integer frequencies
    config: dict
    order_offsets: np.ndarray | None = None  # (M,) added to coding-order keys (weights since r4)

    @property
    def layers(self) -> int:
        return self.int_steps.shape[0]


def load_weights_file(path: Path, model_id: str | None = None) -> LoadedModel:
    import copy

    import torch

    from .quant import integer_steps
    from .transforms import Transforms

    path = Path(path)
    try:
        raw = path.read_bytes()
        saved = torch.load(path, weights_only=True, map_location="cpu")
        config, state = saved["config"], saved["model"]
        network = Transforms(config["N"], config["M"], state, config.get("design", "gdn5"),
                             tuple(config.get("blocks", (1, 1, 1))))
        z_table = saved["z_table"].numpy()
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise RuntimeIOError(f"cannot load model weights {path}: {error}") from None
    hyper_synthesis = copy.deepcopy(network.h_s).double().requires_grad_(False)
    unit, int_steps = integer_steps(state["log_steps"].double().numpy())
    offsets = saved.get("order_offsets")  # absent in weights made before the offsets
    return LoadedModel(model_id or path.stem, hashlib.sha256(raw).digest(), network,
                       hyper_synthesis, unit, int_steps, z_table, config,
                       None if offsets is None else offsets.numpy().astype(np.int64))


@lru_cache(maxsize=4)
def load(model_id: str | None = None, device: str = "cpu") -> LoadedModel:
    """A registered model by id (default: the manifest's default), its transforms on
    `device` ("cpu" or "cuda"; the prior and the coder always run on the CPU)."""
    registry = manifest()
    entries = registry["models"]
    model_id = model_id or registry["default"]
    if model_id not in entries:
        retired = registry.get("retired", {}).get(model_id)
        where = f"; {retired}" if retired else ""
        raise ModelError(f"model {model_id!r} is not installed (this pcodec has: "
                         f"{', '.join(sorted(entries))}){where}")
    path = models_dir() / entries[model_id]["file"]
    if not path.exists():
        raise RuntimeIOError(f"model weights {path} are missing")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch sees no CUDA device")
    model = load_weights_file(path, model_id)
    if device != "cpu":
        model.network.place(device)
    return model
