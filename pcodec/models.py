"""Registry of shipped weights (models/manifest.json) and loading them for coding.

A weights file holds the network state, its training config and the integer entropy tables
derived from it at export time (so every machine codes the hyper-latent with the same table,
whatever its float arithmetic). Streams name their model id and carry the weights digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from . import container, quant
from .errors import ModelError, RuntimeIOError, UsageError

Z_RANGE = 64  # hyper-latent symbols -Z_RANGE..Z_RANGE; the two ends are escapes
Z_TABLE_TOTAL = 1 << 16


def models_dir() -> Path:
    """PCODEC_MODELS, else the shipped models (shipped_models_dir)."""
    if "PCODEC_MODELS" in os.environ:
        return Path(os.environ["PCODEC_MODELS"])
    return shipped_models_dir()


def shipped_models_dir() -> Path:
    """The weights an installed package carries (pcodec/weights, from models/ at build
    time), else the source tree's models/."""
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


def tile_margin(design: str) -> int:
    """Tiles' context in latents: at least the synthesis's receptive field (gdn5: 4; pu with
    (1, 2, 2) blocks: 9.25, whose far taps weigh little, so 8)."""
    return 4 if design == "gdn5" else 8


@dataclass
class LoadedModel:
    model_id: str
    digest: bytes
    state: dict  # the network's state dict, numpy arrays
    synthesis: object  # inference.Network: g_s in float32, numpy (decoding needs no torch)
    hyper_synthesis: object  # inference.Network: h_s in float64: the prior must be reproducible
    unit: np.ndarray  # (M,) grid unit per channel
    int_steps: np.ndarray  # (L, M) integer steps
    z_table: np.ndarray  # (N, 2*Z_RANGE+1) integer frequencies
    config: dict
    order_offsets: np.ndarray | None = None  # (M,) added to coding-order keys (weights since r4)
    scale_offsets: np.ndarray | None = None  # (L, M) σ table steps each layer codes with
    # (L,) quant.reconstruct's spread for the intervals each layer sets (calibration.py;
    # quant.RECONSTRUCTION_SPREAD for every layer in weights made before it)
    reconstruction_spreads: np.ndarray | None = None
    # (L,) order-key thresholds below which a refinement waits for the next layer
    # (coding.deferred; calibration.fit_defer_keys); None: every layer refines all it can
    defer_keys: np.ndarray | None = None
    # inference.post_filter: f(x̂, layer) after the synthesis (postfilter.py); None: none
    post_filter: object = None
    # The file sizes (bpp) at which its streams' quality layers end (format 3; the rest of
    # the stream is one more layer); None: the quantization layers are the quality layers
    layer_bpp: tuple | None = None
    _network: object = None

    @property
    def layers(self) -> int:
        return self.int_steps.shape[0]

    @property
    def network(self):
        """transforms.Transforms in torch (g_a and h_a for encoding; all four), built on
        first use: only encoding and GPU decoding import torch."""
        if self._network is None:
            import torch

            from .transforms import Transforms

            state = {key: torch.from_numpy(value) for key, value in self.state.items()}
            self._network = Transforms(self.config["N"], self.config["M"], state,
                                       self.design, tuple(self.config.get("blocks", (1, 1, 1))))
        return self._network

    @property
    def scale_shift(self) -> int:
        """σ's table is quant.SCALES × 2^scale_shift (quant.scale_shift_for); 0 in weights
        made before the shift."""
        shift = self.state.get("scale_shift")
        return 0 if shift is None else int(shift)

    @cached_property
    def scales(self) -> np.ndarray:
        return quant.SCALES * 2.0 ** self.scale_shift  # exact: a power of two

    @property
    def design(self) -> str:
        return self.config.get("design", "gdn5")

    @property
    def margin(self) -> int:
        return tile_margin(self.design)

    @property
    def on_cpu(self) -> bool:
        return self._network is None or self._network.on_cpu


def load_weights_file(path: Path, model_id: str | None = None) -> LoadedModel:
    from . import inference, ptfile
    from .quant import DEFAULT_SPREAD_INDEX, RECONSTRUCTION_SPREADS, integer_steps

    path = Path(path)
    try:
        raw = path.read_bytes()
        saved = ptfile.load(path)
        config, state, z_table = saved["config"], saved["model"], saved["z_table"]
        synthesis = inference.synthesis(state, config.get("design", "gdn5"))
        hyper_synthesis = inference.hyper_synthesis(state)
        post_filter = inference.post_filter(state)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
            pickle.UnpicklingError) as error:
        raise RuntimeIOError(f"cannot load model weights {path}: {error}") from None
    unit, int_steps = integer_steps(state["log_steps"].astype(np.float64))
    offsets = saved.get("order_offsets")  # absent in weights made before the offsets
    scale_offsets = saved.get("scale_offsets")  # absent before the per-layer calibration
    if scale_offsets is not None and np.shape(scale_offsets) != int_steps.shape:
        raise RuntimeIOError(f"cannot load model weights {path}: scale offsets of shape "
                             f"{np.shape(scale_offsets)}, not {int_steps.shape}")
    spreads = saved.get("reconstruction_spreads")  # absent before their calibration
    if spreads is not None and (np.shape(spreads) != int_steps.shape[:1] or not np.all(
            (0 <= spreads) & (spreads < len(RECONSTRUCTION_SPREADS)))):
        raise RuntimeIOError(f"cannot load model weights {path}: reconstruction spreads of "
                             f"shape {np.shape(spreads)}, not ({len(int_steps)},), or out of range")
    layer_bpp = saved.get("layer_bpp")  # absent in weights whose layers are the sections
    if layer_bpp is not None and not (0 < len(layer_bpp) < container.MAX_LAYERS and all(
            0 < a < b for a, b in zip(layer_bpp, list(layer_bpp[1:]) + [float("inf")]))):
        raise RuntimeIOError(f"cannot load model weights {path}: layer rates {layer_bpp!r} "
                             "are not increasing and positive")
    defer_keys = saved.get("defer_keys")  # absent before the layers' thresholds
    if defer_keys is not None and np.shape(defer_keys) != int_steps.shape[:1]:
        raise RuntimeIOError(f"cannot load model weights {path}: deferral thresholds of shape "
                             f"{np.shape(defer_keys)}, not ({len(int_steps)},)")
    return LoadedModel(model_id or path.stem, hashlib.sha256(raw).digest(), state, synthesis,
                       hyper_synthesis, unit, int_steps, z_table.astype(np.int64), config,
                       None if offsets is None else offsets.astype(np.int64),
                       None if scale_offsets is None else scale_offsets.astype(np.int64),
                       RECONSTRUCTION_SPREADS[np.full(len(int_steps), DEFAULT_SPREAD_INDEX)
                                              if spreads is None else np.asarray(spreads)],
                       None if defer_keys is None else np.asarray(defer_keys, np.int64),
                       post_filter, None if layer_bpp is None else tuple(map(float, layer_bpp)))


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
        model.network.place(device)  # the synthesis then runs there too, in torch
    return model
