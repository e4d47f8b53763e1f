"""A filter after the synthesis, told the layer: x̂ + r(x̂, layer), trained alone with the
codec frozen (every byte of every stream stays as it was), on images decoded exactly as the
decoder decodes them.

g_s is trained for every layer at once, so the coarse layers' images keep blocking and
ringing that a small filter can take out, and the fine layers' need a lighter touch: one
filter for every layer gained 0.05 dB on Kodak, the same filter with a learned gain per
layer on each hidden channel and on the residual 0.34 dB (docs/gdn320.md). The filter runs
at half resolution (pixel-unshuffle by 2): 3x3 convolutions 12 → W → W → W → 12, leaky ReLU,
about 22 kMAC per pixel at W = 64, a quarter of the synthesis's.

`pcodec train --post-filter` trains one (train_post_filter); the codec runs it in numpy
(inference.post_filter) and, on a GPU, in torch (PostFilter). With `--set
post_synthesis_lr=R` the synthesis g_s trains with it, on the latents the decoder
reconstructs: still no byte of any stream changes."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import UsageError

LEAKY_SLOPE = 0.01
HIDDEN_CONVS = 3  # head and two body convolutions, each followed by a per-layer gain
COARSE_CONVS = 3  # the coarse branch's 1x1 in and two 3x3 convolutions, likewise


class PostFilter(nn.Module):
    """x̂ + r(x̂, position) on (B, 3, H, W) images in [0, 1], H and W even (multiples of 4
    with a coarse branch); `position` (B,) the 0-based layer whose gains apply (between two
    layers, a float: their gains interpolated, as for a cut inside a layer). The last
    convolution starts at zero: training starts from the codec as it is.

    `coarse` > 0 adds a branch at a quarter of the resolution after the hidden convolutions
    (pixel-unshuffle by 2 and a 1x1 convolution to `coarse` channels, two 3x3 convolutions,
    a 1x1 convolution and pixel shuffle back, added to their output before the tail): about
    18 pixels of reach each side instead of 8, for ~13 kMAC per pixel at 96. Its way back
    starts at zero, so a filter without the branch is where a branch starts from."""

    def __init__(self, layers: int, width: int = 64, coarse: int = 0):
        super().__init__()
        self.head = nn.Conv2d(12, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.tail = nn.Conv2d(width, 12, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)
        self.gains = nn.Parameter(torch.ones(layers, HIDDEN_CONVS, width))
        self.out_gains = nn.Parameter(torch.ones(layers, 12))
        if coarse:
            self.down = nn.Conv2d(4 * width, coarse, 1)
            self.coarse = nn.ModuleList(nn.Conv2d(coarse, coarse, 3, padding=1)
                                        for _ in range(2))
            self.up = nn.Conv2d(coarse, 4 * width, 1)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.coarse_gains = nn.Parameter(torch.ones(layers, COARSE_CONVS, coarse))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        position = position.float()
        low = position.floor().long().clamp(max=len(self.gains) - 1)
        high = (low + 1).clamp(max=len(self.gains) - 1)
        share = (position - low)[:, None]

        def at_position(table):  # (layers, k, C) → (B, k, C, 1, 1)
            return torch.lerp(table[low], table[high], share[:, :, None])[..., None, None]
        gains = at_position(self.gains)
        out_gains = torch.lerp(self.out_gains[low], self.out_gains[high], share)
        hidden = F.pixel_unshuffle(x, 2)
        for index, conv in enumerate((self.head, *self.body)):
            hidden = F.leaky_relu(conv(hidden) * gains[:, index], LEAKY_SLOPE)
        if hasattr(self, "coarse"):
            coarse_gains = at_position(self.coarse_gains)
            low_res = F.pixel_unshuffle(hidden, 2)
            for index, conv in enumerate((self.down, *self.coarse)):
                low_res = F.leaky_relu(conv(low_res) * coarse_gains[:, index], LEAKY_SLOPE)
            hidden = hidden + F.pixel_shuffle(self.up(low_res), 2)
        residual = self.tail(hidden) * out_gains[:, :, None, None]
        return x + F.pixel_shuffle(residual, 2)


def from_state(state: dict) -> PostFilter | None:
    """The filter of a weights file's state dict (keys "post."), or None."""
    if "post.gains" not in state:
        return None
    layers, _, width = state["post.gains"].shape
    coarse = state["post.coarse_gains"].shape[-1] if "post.coarse_gains" in state else 0
    module = PostFilter(layers, width, coarse)
    module.load_state_dict({k.removeprefix("post."): torch.as_tensor(v).float()
                            for k, v in state.items() if k.startswith("post.")})
    return module.eval().requires_grad_(False)


def kept_layers(crops: np.ndarray, layers: int, per_crop: int) -> np.ndarray:
    """(n, per_crop) 0-based layers whose rows the crops of a set at these indexes keep,
    ascending: per_crop of the `layers`, evenly spaced and turning from crop to crop, so that
    every layer is kept about as often (all of them at per_crop = layers)."""
    offsets = np.arange(per_crop) * layers // per_crop
    return np.sort((np.asarray(crops)[:, None] + offsets[None, :]) % layers, axis=1)


def decoded_rows(model, crops: np.ndarray, keep: np.ndarray | None = None,
                 latents: bool = False):
    """For each crop (n, P, P, 3) uint8: its stream's image after each layer in its row of
    `keep` (None: every layer), as the decoder makes it before the filter (float16,
    (n, kept, 3, P, P)), deferral and integer steps included. Only kept layers are
    synthesised. `latents`: the reconstructed latent ŷ the synthesis reads instead
    ((n, kept, M, P/16, P/16)), for training the synthesis with the filter."""
    from . import engine

    if keep is None:
        keep = kept_layers(np.arange(len(crops)), model.layers, model.layers)
    size = crops.shape[1:3]
    shape = (model.config["M"], size[0] // 16, size[1] // 16) if latents else (3, *size)
    out = np.empty((len(crops), keep.shape[1], *shape), np.float16)
    for index, crop in enumerate(crops):
        slot = {layer + 1: k for k, layer in enumerate(keep[index])}
        header, payloads, partial = engine.read_stream(model, engine.encode(model, crop))
        for layers, state in engine.decode_latents(model, header, payloads, partial):
            if layers in slot:
                y_hat = engine._reconstruct_latent(model, state, True)
                out[index, slot[layers]] = y_hat if latents else engine.synthesis_float(model, y_hat)
    return out


# The recipe of the probe that chose this design (docs/gdn320.md): 1,024 training crops of
# 256², every layer of each; 16 rows of 128² a step, each at a random layer; Adam at 1e-3
# after 200 warm-up steps, cosine to 2e-5 over 15,000 steps; loss the mean log10 MSE, so that
# every layer counts by its relative gain, as a BD-rate does.
CROPS, CROP_SIZE, ROW_SIZE, BATCH = 1024, 256, 128, 16
LR, FINAL_LR, WARMUP, STEPS = 1e-3, 2e-5, 200, 15_000
# A filter that goes on from the one its weights carry (with a coarse branch added) starts
# its cosine lower, so as not to undo what that one learnt.
WARM_LR = 5e-4
HELD_OUT = 64  # crops kept out of training to watch the gain per layer
# Latents of context each side of a row when the synthesis trains with the filter, so that
# the row's pixels are computed as the decoder computes them inside a tile, not next to zero
# padding. g_s reaches about two latents, but two cost 3x the time of none per row of 128²
# (bf16 on AMX, 1 thread) and one 1.5x; one leaves only the row's outer pixels short.
SYNTHESIS_MARGIN = 1
CHECKPOINT_SECONDS = 300


_worker_model = None  # each collecting process loads the weights once


def _start_collect_worker(weights: str, parent: int, ignored):
    from .cli import worker_setup
    from .models import load_weights_file

    global _worker_model
    worker_setup(parent, ignored)  # a signal ends it quietly; so does its parent's death
    torch.set_num_threads(1)
    _worker_model = load_weights_file(Path(weights))


def _collect_worker(job) -> np.ndarray:
    crops, indexes, per_crop, latents = job
    layers = _worker_model.layers
    return decoded_rows(_worker_model, crops, kept_layers(indexes, layers, per_crop or layers),
                        latents)


def collect(weights: Path, data: Path, path: Path, crops: int = CROPS,
            crop_size: int = CROP_SIZE, seed: int = 0, workers: int = 2, log=sys.stderr,
            per_crop: int | None = None, latents: bool = False):
    """The training rows (decoded_rows of `crops` random crops of the photos in `data`,
    per_crop layers of each as kept_layers picks them; None: every layer; images, or the
    latents with `latents`) and the crops, saved to `path` (.npz); each worker process
    decodes its share on one thread."""
    from .cli import ignored_stop_signals
    from .train import PatchSampler
    from .worker_processes import QuietStartContext

    originals = PatchSampler(data, crop_size, seed).batch(crops)
    parts = np.array_split(np.arange(crops), max(1, crops // 32))
    started, done, pieces = time.perf_counter(), 0, []
    # A spawned worker's numpy reads its BLAS threads from the environment as it loads.
    os.environ["OMP_NUM_THREADS"] = "1"
    pool = QuietStartContext().Pool(workers, _start_collect_worker,
                                    (str(weights), os.getpid(), ignored_stop_signals()))
    try:
        jobs = [(originals[part], part, per_crop, latents) for part in parts]
        for part, piece in zip(parts, pool.imap(_collect_worker, jobs)):
            pieces.append(piece)
            done += len(part)
            print(f"decoded {done} of {crops} crops ({time.perf_counter() - started:.0f} s)",
                  file=log, flush=True)
    finally:  # done, or a signal or an error: no worker goes on decoding
        pool.terminate()
    rows = np.concatenate(pieces)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, rows=rows, originals=originals)
    tmp.replace(path)
    return rows, originals, time.perf_counter() - started


def rows_sets(weights: Path, data: Path, run_dir: Path, crops: int, crop_size: int,
              state: dict, log, layers: int, per_crop: int | None = None,
              held_out: int = HELD_OUT, latents: int = 0):
    """The decoded rows of `crops` training crops, in sets of CROPS collected with seeds 0,
    1, … (run_dir/post-rows.npz, post-rows-1.npz, …; each collected once, then read back);
    with `latents` (the latent's channels) their latents ŷ instead (post-latents*.npz).
    Returns the training crops' (rows, their layers, originals), per_crop layers of each
    (None: every layer; at half of them the same memory holds twice the crops), and the
    held-out crops' (rows of every layer, originals): the first set's last `held_out`, so
    that gains compare between runs whatever the count of sets. The first set keeps every
    layer for them; its training crops go last."""
    per_crop = per_crop or layers
    sets = -(-crops // CROPS)
    row_shape = (latents, crop_size // 16, crop_size // 16) if latents else (3, crop_size, crop_size)
    rows = np.empty((crops - held_out, per_crop, *row_shape), np.float16)
    row_layers = np.empty((crops - held_out, per_crop), np.int64)
    originals = np.empty((crops - held_out, crop_size, crop_size, 3), np.uint8)
    filled, watch = 0, None
    for seed in (*range(1, sets), 0):
        name = "post-latents" if latents else "post-rows"
        path = run_dir / (f"{name}-{seed}.npz" if seed else f"{name}.npz")
        count = min(CROPS, crops - seed * CROPS)
        if not path.exists():
            state["collect_seconds"] += collect(weights, data, path, count, crop_size, seed,
                                                log=log, per_crop=per_crop if seed else None,
                                                latents=bool(latents))[2]
        saved = np.load(path)
        part_rows, part_originals = saved["rows"], saved["originals"]
        # A set collected for a run on more crops gives its first `count`.
        indexes = np.arange(min(len(part_rows), count))
        stored = kept_layers(indexes, layers, part_rows.shape[1])
        if not seed:
            watch = (part_rows[len(indexes) - held_out:len(indexes)].copy(),
                     part_originals[len(indexes) - held_out:len(indexes)])
            indexes = indexes[:len(indexes) - held_out]
        wanted = kept_layers(indexes, layers, per_crop)
        match = stored[indexes, None, :] == wanted[:, :, None]
        if not match.any(axis=2).all():
            raise UsageError(f"{path} keeps {part_rows.shape[1]} layers of each crop: fewer than "
                             f"the {per_crop} asked for (--set post_crop_layers)")
        slots = match.argmax(axis=2)
        for start in range(0, len(indexes), 64):  # a crop group at a time: small temporaries
            group = indexes[start:start + 64]
            rows[filled:filled + len(group)] = part_rows[group[:, None], slots[start:start + 64]]
            filled += len(group)
        row_layers[filled - len(indexes):filled] = wanted
        originals[filled - len(indexes):filled] = part_originals[indexes]
        del saved, part_rows
    return (rows[:filled], row_layers[:filled], originals[:filled]), watch


def learning_rate(step: int, steps: int, peak: float = LR) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / max(1, steps - WARMUP))
    return FINAL_LR + 0.5 * (peak - FINAL_LR) * (1 + math.cos(math.pi * progress))


def held_out_gains(module: PostFilter, rows: torch.Tensor, originals: torch.Tensor,
                   autocast: bool, synthesis: nn.Module | None = None,
                   base: torch.Tensor | None = None,
                   synthesis_autocast: bool = True) -> list[float]:
    """Mean PSNR gain (dB) per layer of the filter on held-out crops, on clamped images,
    over the unfiltered images: the rows, or with `synthesis` (rows are then latents; in
    bf16 only with `synthesis_autocast` too) its images filtered against `base`, the codec's
    own synthesis's."""
    gains = []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for layer in range(rows.shape[1]):
            before, after = [], []
            for start in range(0, len(rows), 8):
                x_hat = rows[start:start + 8, layer].float()
                if synthesis is not None:
                    x_hat = synthesis_of(synthesis, x_hat, synthesis_autocast).float()
                reference = x_hat if base is None else base[start:start + 8, layer].float()
                x = originals[start:start + 8].float() / 255
                filtered = module(x_hat, torch.full((len(x_hat),), layer)).float()
                before.append(((reference.clamp(0, 1) - x) ** 2).mean((1, 2, 3)))
                after.append(((filtered.clamp(0, 1) - x) ** 2).mean((1, 2, 3)))
            before, after = torch.cat(before), torch.cat(after)
            gains.append(round(float(10 * torch.log10(before / after).mean()), 3))
    return gains


def trainable_synthesis(codec) -> nn.Module:
    """The codec's g_s as training builds it (compressai's GDN with its reparametrised β and
    γ), from its weights: what a fine-tune updates and export writes back."""
    from .network import compressai_modules
    from .transforms import build_transforms

    _, GDN = compressai_modules()
    config = codec.config
    g_s = build_transforms(config["N"], config["M"], GDN, codec.design,
                           tuple(config.get("blocks", (1, 1, 1))))["g_s"]
    g_s.load_state_dict({key.removeprefix("g_s."): torch.as_tensor(value).float()
                         for key, value in codec.state.items() if key.startswith("g_s.")})
    return g_s.to(memory_format=torch.channels_last)


def synthesis_of(g_s: nn.Module, y: torch.Tensor, autocast: bool) -> torch.Tensor:
    """g_s(y) for latents (B, M, h, w), in bf16 autocast only with `autocast` (inside a
    caller's autocast too: the synthesis may keep float32 while the filter runs in bf16)."""
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return g_s(y.contiguous(memory_format=torch.channels_last))


def synthesized(g_s: nn.Module, latents: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Images (n, layers, 3, 16h, 16w) float16 of latent rows (n, layers, M, h, w)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(latents), 8):
            part = latents[start:start + 8]
            images = synthesis_of(g_s, part.flatten(0, 1).float(), autocast)
            out.append(images.float().unflatten(0, part.shape[:2]).half())
    return torch.cat(out)


def train_post_filter(weights: Path, data: Path, run_dir: Path, steps: int = STEPS,
                      width: int = 64, threads: int = 2, minutes: float | None = None,
                      log=sys.stderr, crops: int = CROPS, crop_size: int = CROP_SIZE,
                      row_size: int = ROW_SIZE, held_out: int = HELD_OUT, coarse: int = 0,
                      per_crop: int | None = None, synthesis_lr: float = 0.0,
                      lr: float = 0.0, synthesis_float32: bool = False):
    """Train a post-filter for the codec of `weights`, frozen; resumes from
    run_dir/post-checkpoint.pt. Returns when `steps` are done or after `minutes`. Weights
    that carry a filter already: it goes on from that one (at WARM_LR; with `coarse`, a
    coarse branch added where it has none), its codec decoding the rows without it. More
    than CROPS `crops` are collected in seeded sets, `per_crop` layers of each (rows_sets).
    `lr`: the filter's peak rate (0: LR, or WARM_LR for a filter that goes on).

    `synthesis_lr` > 0 trains the codec's synthesis g_s with the filter, at that peak rate
    (the filter's schedule scaled), on the latents the decoder reconstructs (every byte of
    every stream stays as it was; the g_s of the rows' images was the one being trained),
    in float32 with `synthesis_float32` where the host would run it in bf16."""
    from .export import machine_name, save_atomic
    from .models import load_weights_file
    from .train import StopAfterStep
    from .transforms import native_bf16

    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "post-checkpoint.pt"
    codec = load_weights_file(weights)
    layers, earlier = codec.layers, from_state(codec.state)
    if earlier is not None:  # its shape, with a branch where it has one or one is asked for
        width = earlier.gains.shape[-1]
        coarse = coarse or (earlier.coarse_gains.shape[-1] if hasattr(earlier, "coarse") else 0)
    module = PostFilter(layers, width, coarse)
    if earlier is not None:  # only a new branch's weights are missing
        module.load_state_dict(earlier.state_dict(), strict=False)
    module = module.to(memory_format=torch.channels_last).requires_grad_(True)
    peak = lr or (LR if earlier is None else WARM_LR)
    groups = [{"params": list(module.parameters()), "peak": peak}]
    synthesis = trainable_synthesis(codec).requires_grad_(True) if synthesis_lr else None
    if synthesis is not None:
        groups.append({"params": list(synthesis.parameters()), "peak": synthesis_lr})
    optimizer = torch.optim.Adam(groups, lr=peak)
    state = {"step": 0, "seconds": 0.0, "collect_seconds": 0.0, "history": [],
             "weights": str(Path(weights).resolve()), "crops": crops, "width": width,
             "coarse": coarse, "warm_start": earlier is not None, "row_size": row_size,
             "layers_per_crop": per_crop or layers, "host": machine_name(),
             "synthesis_lr": synthesis_lr}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, weights_only=False)
        if bool(saved.get("synthesis")) != bool(synthesis_lr):
            raise UsageError(f"{checkpoint_path} was trained with{'out' if synthesis_lr else ''}"
                             " the synthesis: resume it as it was started (post_synthesis_lr)")
        module.load_state_dict(saved["module"])
        if synthesis is not None:
            synthesis.load_state_dict(saved["synthesis"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"resumed {checkpoint_path} at step {state['step']}", file=log, flush=True)
    (rows, row_layers, originals), (watch_rows, watch_originals) = rows_sets(
        weights, data, run_dir, crops, crop_size, state, log, layers, per_crop, held_out,
        codec.config["M"] if synthesis is not None else 0)
    crop_size = originals.shape[1]
    train_rows, watch_rows = torch.from_numpy(rows), torch.from_numpy(watch_rows)
    train_originals = torch.from_numpy(originals).permute(0, 3, 1, 2).contiguous()
    watch_originals = torch.from_numpy(watch_originals).permute(0, 3, 1, 2).contiguous()
    del originals  # its channels-first copy is the one kept (1.6 GB at 8,192 crops)
    autocast = native_bf16()
    state["numerics"] = "bf16" if autocast else "float32"
    synthesis_autocast = autocast and not synthesis_float32
    if synthesis is not None:
        state["numerics"] += f", synthesis {'bf16' if synthesis_autocast else 'float32'}"
    rng = np.random.default_rng([state["step"], len(state["history"])])
    watch_base = None  # the codec's own unfiltered images of the held-out latents
    if synthesis is not None:
        watch_base = synthesized(trainable_synthesis(codec).eval(), watch_rows,
                                 synthesis_autocast)
        # A row's latents are synthesised with `margin` latents of context each side.
        margin = min(SYNTHESIS_MARGIN, (crop_size - row_size) // 32)
        latent_rows = row_size // 16 + 2 * margin

    def save():
        save_atomic({"module": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "synthesis": None if synthesis is None else synthesis.state_dict(),
                     "state": state}, checkpoint_path)

    chunk_ends = None if minutes is None else time.monotonic() + 60 * minutes
    last_save, window, window_start = time.monotonic(), [], time.perf_counter()
    with StopAfterStep() as stop:
        while state["step"] < steps:
            stop.save_if_stopped(save, state["step"], log)
            if chunk_ends is not None and time.monotonic() > chunk_ends:
                break
            stop.in_step = True
            started = time.perf_counter()
            crop = rng.integers(len(train_rows), size=BATCH)
            slot = rng.integers(train_rows.shape[1], size=BATCH)
            layer = row_layers[crop, slot]
            if synthesis is None:
                # Even offsets: the decoder's pixel-unshuffle cells start on even pixels too.
                top, left = 2 * rng.integers((crop_size - row_size) // 2 + 1, size=(2, BATCH))
                x_hat = torch.stack([train_rows[c, k, :, t:t + row_size, s:s + row_size]
                                     for c, k, t, s in zip(crop, slot, top, left)]).float()
                inner = 0
            else:  # a window of latents; the row is its middle once synthesised
                top, left = rng.integers(crop_size // 16 - latent_rows + 1, size=(2, BATCH))
                y_hat = torch.stack([train_rows[c, k, :, t:t + latent_rows, s:s + latent_rows]
                                     for c, k, t, s in zip(crop, slot, top, left)]).float()
                top, left, inner = 16 * (top + margin), 16 * (left + margin), 16 * margin
            x = torch.stack([train_originals[c, :, t:t + row_size, s:s + row_size]
                             for c, t, s in zip(crop, top, left)]).float() / 255
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], steps, peak) * group["peak"] / peak
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                if synthesis is not None:
                    x_hat = synthesis_of(synthesis, y_hat, synthesis_autocast)
                filtered = module(x_hat.contiguous(memory_format=torch.channels_last),
                                  torch.from_numpy(layer))
            filtered = filtered[:, :, inner:inner + row_size, inner:inner + row_size]
            loss = torch.log10(((filtered.float() - x) ** 2).mean((1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            state["seconds"] += time.perf_counter() - started
            window.append(float(loss.detach()))
            stop.in_step = False
            if state["step"] % 500 == 0 or state["step"] == steps:
                record = {"step": state["step"], "loss": round(float(np.mean(window)), 4),
                          "lr": learning_rate(state["step"], steps, peak),
                          "rows_per_s": round(BATCH * len(window)
                                              / (time.perf_counter() - window_start), 1),
                          "hours": round(state["seconds"] / 3600, 3)}
                if state["step"] % 2500 == 0 or state["step"] == steps:
                    record["held_out_gain_db"] = held_out_gains(
                        module, watch_rows, watch_originals, autocast, synthesis, watch_base,
                        synthesis_autocast)
                state["history"].append(record)
                print(json.dumps(record), file=log, flush=True)
                window, window_start = [], time.perf_counter()
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save()
                last_save = time.monotonic()
    save()
    print(f"post-filter at step {state['step']} of {steps}: checkpoint saved", file=log,
          flush=True)
    return state


def training_hours(post_filter: dict) -> float:
    """Hours of a filter's training and of decoding its rows, with those of the filters it
    went on from."""
    hours = post_filter["hours"] + post_filter["decoding_hours"]
    return hours + (training_hours(post_filter["continues"]) if "continues" in post_filter else 0)


def export_post_filter(run_dir: Path, path: Path) -> dict:
    """The frozen codec's weights file with the run's filter added (keys "post.", float32),
    its g_s replaced where the run trained it, and how it was trained ("post_filter"); its
    streams' bytes are those of the codec's."""
    from .export import LAYER_BPP, compact, save_atomic

    checkpoint = torch.load(run_dir / "post-checkpoint.pt", weights_only=False)
    state = checkpoint["state"]
    saved = torch.load(state["weights"], weights_only=False)
    saved["model"].update({f"post.{key}": value.detach().float().contiguous()
                           for key, value in checkpoint["module"].items()})
    if checkpoint.get("synthesis"):  # g_s trained with the filter, stored as export stores it
        saved["model"].update({f"g_s.{key}": compact(value.detach().float().contiguous())
                               for key, value in checkpoint["synthesis"].items()})
    saved["layer_bpp"] = list(LAYER_BPP)
    history = state["history"]
    earlier = saved.get("post_filter") if state.get("warm_start") else None
    saved["post_filter"] = {
        "base_weights": Path(state["weights"]).name, "width": state["width"],
        "coarse": state.get("coarse", 0),
        "crops": state["crops"], "steps": state["step"], "rows_per_step": BATCH,
        "row_size": state.get("row_size", ROW_SIZE), "hours": round(state["seconds"] / 3600, 3),
        "layers_per_crop": state.get("layers_per_crop"),
        "decoding_hours": round(state["collect_seconds"] / 3600, 3),
        "rows_per_s": float(np.median([r["rows_per_s"] for r in history[-10:]])) if history else None,
        "host": state["host"], "numerics": state.get("numerics"),
        "held_out_gain_db": next((r["held_out_gain_db"] for r in reversed(history)
                                  if "held_out_gain_db" in r), None)}
    if state.get("synthesis_lr"):
        saved["post_filter"]["synthesis_lr"] = state["synthesis_lr"]
    if earlier is not None:  # the filter it went on from, and so on back
        saved["post_filter"]["continues"] = earlier
    save_atomic(saved, path)
    return saved["post_filter"]
