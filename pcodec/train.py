"""Training loop: one variable-rate model for all quantization layers, resumable at any step.

Every image of a batch is trained at one randomly drawn layer l with loss
λ_l·255²·MSE + bpp (DeepHQ's ladder objective, sampled instead of summed so a step costs one
synthesis pass). `train_only=synthesis` fine-tunes the synthesis alone on distortion, every
layer's bytes fixed. Checkpoints hold the optimizer state and live outside the repository;
`export` writes weights without it plus a manifest to models/.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

# CompressAI's MSE ladder (quality 1..8), one λ per layer, coarse → fine.
LAMBDA_LADDER = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932, 0.18)


@dataclass(frozen=True)
class TrainConfig:
    name: str = "hp128"
    N: int = 128
    M: int = 192
    design: str = "gdn5"  # transforms.DESIGNS
    blocks: tuple = (1, 1, 1)  # "pu": residual blocks at 1/4, 1/8, 1/16
    # "ladder": every crop at a layer of the nested quantizer (the coder's true nested rate).
    # "base": single-rate at the finest λ, one reconstruction per crop, straight-through
    # rounding on the unit grid (DeepHQ trains its base first, then the layers); the ladder's
    # steps start at the unit grid for the finest layer and 1.65x coarser per layer above.
    stage: str = "ladder"
    patch: int = 128
    batch: int = 8
    # The schedule a run from scratch follows (what the campaign taught, see the manifest):
    # 5e-4 after a warm-up, then one cosine decay to lr_final over the rest of the steps —
    # the evaluation moved little at a constant rate and a lot during each decay.
    steps: int = 30000
    lr: float = 5e-4
    lr_final: float = 1e-5
    decay_start: int = 4000  # step at which the learning rate starts its cosine decay
    decay_steps: int = 26000
    aux_lr: float = 1e-3
    # The step sizes learn this much faster than the weights: at the base rate Adam moves a
    # log-step by ≈ lr per step, thousands of steps to follow a changed objective.
    step_lr_scale: float = 10.0
    clip: float = 1.0
    # Exponential moving average of the weights (0: off); evaluation and export use it. At
    # batch 4 the weights wander: on 6 Kodak images, checkpoints 3,400 steps apart at lr 1e-4
    # measured +8.2 % and +13.5 % BD-rate against -r5, their plain average +4.4 %.
    ema_decay: float = 0.9995
    # Mean step of the finest layer, held fixed after every update (0: free). y/c with every
    # step/c codes the same, so nothing else sets y's scale, and under Adam it grew: the median
    # prior σ on kodim01 was 11.7 at step 40,000, 24 at 47,000, 62 at 55,500 and 47 again
    # 2,800 steps after a rescale to 29, past the coder's σ table (≤ 64) each time. Holding
    # the step scale pins y's (by rescaling y after every update). -r5's finest mean step is
    # 7.0. Opt-in (--set finest_step=7.0) until a run has shown it stable.
    finest_step: float = 0.0
    lambdas: tuple = LAMBDA_LADDER
    # "synthesis": fine-tune g_s alone from --init weights. The encoder, prior and steps stay
    # fixed, so every layer of every file keeps its bytes exactly; the loss is the mean over
    # layers of log MSE (= mean PSNR, what a BD-rate with fixed rates rewards), where the
    # ladder's λ·MSE gave the finest two layers 75 % of the gradient.
    train_only: str = ""
    synthesis_layers: int = 4  # layers per crop in each synthesis step (crops share g_a's pass)
    # Distinct layers each crop is trained at per step, through one analysis pass (1: one
    # random layer per crop). With one layer per crop a batch of 4 sees half the ladder, and
    # which layers it drew set the gradient (layer losses span 41x); at 8 every step follows
    # the whole ladder's objective for its crops.
    layers_per_crop: int = 1
    # Each crop also at the finest layer, beside its layers_per_crop − 1 sampled ones (the
    # ladder stage from a base: the finest layer's quality stays anchored).
    keep_finest: bool = False
    # bf16 transforms, fp32 entropy models — only where the CPU has native bf16: on an AMD
    # EPYC without AVX-512 (the 2026-12-02 work) a step of 4 × 256² took 23.7 s with it, 2.95 s without.
    autocast: bool = True
    channels_last: bool = True
    compile: bool = False  # torch.compile: 13 % faster steps, minutes of warm-up per run
    threads: int = 2
    # "cuda": the transforms, entropy models and optimizer on a GPU (bf16 autocast where it has
    # it); data, checkpoints, evaluation and export stay on the CPU.
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 2000
    eval_images: int = 24
    notes: dict = field(default_factory=dict)


MAX_SKIPS_IN_A_ROW = 20  # non-finite batches in a row: the weights are gone, roll back
MAX_ROLLBACKS = 3  # to the last checkpoint, per process; then stop


# The finest λ of this ladder reaches 40 dB on Kodak with a fully trained M = 320 model.
PU_LADDER = (0.00045, 0.00117, 0.00304, 0.00791, 0.02056, 0.05346, 0.139, 0.3614)

CONFIGS = {
    "hp128": TrainConfig(),
    # Pixel-unshuffle/residual transforms, M = 320; the base stage (continue with
    # --init base weights --set stage=ladder).
    "pu320": TrainConfig(name="pu320", M=320, design="pu", blocks=(1, 2, 2), patch=256, batch=8,
                         stage="base", lambdas=PU_LADDER, steps=12000, lr=3e-4, lr_final=1e-5,
                         decay_start=9000, decay_steps=3000, ema_decay=0.999,
                         checkpoint_every=100, eval_every=3000, eval_images=6),
    # Tiny config for tests and smoke runs.
    "tiny": TrainConfig(name="tiny", N=16, M=24, patch=64, batch=2, checkpoint_every=5,
                        eval_every=10**9),
}


def network_config(config: TrainConfig):
    from .network import NetworkConfig

    layers = len(config.lambdas)
    if config.design == "gdn5":
        return NetworkConfig(N=config.N, M=config.M, layers=layers)
    # The base stage quantizes y − μ on the unit grid: that is the finest layer's step.
    return NetworkConfig(N=config.N, M=config.M, layers=layers, design=config.design,
                         blocks=tuple(config.blocks), finest_step=1.0,
                         coarsest_step=1.65 ** (layers - 1))


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from its saved form (tuples come back from JSON/pickle as lists)."""
    known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    for key in ("lambdas", "blocks"):
        if key in known:
            known[key] = tuple(known[key])
    return TrainConfig(**known)


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < 200:  # short warm-up: GDN is fragile under a large first step
        return config.lr * (step + 1) / 200
    if step < config.decay_start:
        return config.lr
    progress = min(1.0, (step - config.decay_start) / config.decay_steps)
    return config.lr_final + 0.5 * (config.lr - config.lr_final) * (1 + math.cos(math.pi * progress))


REWARM_STEPS = 1000


def rewarmed(rate: float, resumed_rate: float | None, steps_since_resume: int) -> float:
    """The rate after a resume: a schedule that asks for more than the run last used climbs
    to it geometrically over REWARM_STEPS. The 2026-12-02 work resumed a run decayed to 8e-6 at 1e-4
    directly: non-finite batches 93 steps later and a loss of 5.5 (3.4 before)."""
    if resumed_rate is None or rate <= resumed_rate or steps_since_resume >= REWARM_STEPS:
        return rate
    return resumed_rate * (rate / resumed_rate) ** (steps_since_resume / REWARM_STEPS)


class PatchSampler:
    """All training images decoded once into memory; random crops and flips per batch."""

    def __init__(self, folder: Path, patch: int, seed: int):
        from PIL import Image

        files = sorted(p for p in Path(folder).iterdir()
                       if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp"})
        self.images = []
        for path in files:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            if min(array.shape[:2]) >= patch:
                self.images.append(array)
        if not self.images:
            raise SystemExit(f"no training images of at least {patch}x{patch} in {folder}")
        self.patch = patch
        self.reseed(seed)

    def reseed(self, seed):
        """Another stream of crops from the same decoded images (a rollback draws one)."""
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> np.ndarray:
        out = np.empty((size, self.patch, self.patch, 3), dtype=np.uint8)
        for i in range(size):
            image = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(image.shape[0] - self.patch + 1)
            left = self.rng.integers(image.shape[1] - self.patch + 1)
            crop = image[top:top + self.patch, left:left + self.patch]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[i] = crop
        return out


def rd_loss(x, x_hat, y_likelihoods, z_likelihoods, lambdas):
    """Per-image λ·255²·MSE + bpp averaged over the batch; also returns the parts."""
    import torch

    pixels = x.shape[2] * x.shape[3]
    bits = (-torch.log2(y_likelihoods).sum((1, 2, 3)) - torch.log2(z_likelihoods).sum((1, 2, 3)))
    bpp = bits / pixels
    mse = ((x - x_hat) ** 2).mean((1, 2, 3))
    return (lambdas * 255**2 * mse + bpp).mean(), bpp.detach(), mse.detach()


def load_optimizer_state(optimizer, params, saved: dict):
    """Adam state from a checkpoint; one written before the step sizes had their own group
    (a single group over `params`) is carried over parameter by parameter."""
    import torch

    if len(saved["param_groups"]) == len(optimizer.param_groups):
        optimizer.load_state_dict(saved)
        return
    legacy = torch.optim.Adam(params)
    legacy.load_state_dict(saved)
    for param in params:
        if param in legacy.state:
            optimizer.state[param] = legacy.state[param]


def save_atomic(obj, path: Path):
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: TrainConfig, data: Path, run_dir: Path, steps: int, init_weights: Path | None,
          kodak: Path | None, log=sys.stderr, minutes: float | None = None):
    """Train until `steps` total steps, or for `minutes` of wall time (then checkpoint and
    return: a chunk of a longer run); resumes from run_dir/checkpoint.pt when present."""
    import torch

    from .network import HyperpriorNetwork
    from .transforms import native_bf16

    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device=cuda: this torch sees no CUDA device")
    chunk_ends = None if minutes is None else time.monotonic() + 60 * minutes
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    torch.manual_seed(config.seed)  # the same initial weights on every run of a config
    # On its device before the optimizer sees it: restored Adam state follows the parameters.
    model = HyperpriorNetwork(network_config(config)).to(device)
    synthesis_only = config.train_only == "synthesis"
    if config.stage not in ("ladder", "base"):
        raise SystemExit(f"stage={config.stage!r}: 'ladder' or 'base'")
    base_stage = config.stage == "base"
    if config.train_only not in ("", "synthesis"):
        raise SystemExit(f"train_only={config.train_only!r}: only 'synthesis' is known")
    if synthesis_only and init_weights is None and not checkpoint_path.exists():
        raise SystemExit("train_only=synthesis fine-tunes trained weights: give --init")
    if synthesis_only and config.finest_step > 0:  # it rescales y: the bytes would move
        raise SystemExit("finest_step rescales the encoder's y: not with train_only=synthesis")
    main_params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    aux_params = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    if synthesis_only:
        main_params = list(model.g_s.parameters())
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("g_s."))
        optimizer = torch.optim.Adam([{"params": main_params, "lr_scale": 1.0}], lr=config.lr)
    else:
        optimizer = torch.optim.Adam(
            [{"params": [p for p in main_params if p is not model.log_steps], "lr_scale": 1.0},
             {"params": [model.log_steps], "lr_scale": config.step_lr_scale}], lr=config.lr)
    aux_optimizer = torch.optim.Adam(aux_params, lr=config.aux_lr)
    state = {"step": 0, "seconds": 0.0, "images": 0, "history": []}
    saved_average = None

    def restore():
        checkpoint = torch.load(checkpoint_path, weights_only=False, map_location="cpu")
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, main_params, checkpoint["optimizer"])
        # The saved groups carry the run's old settings; a resume with --set takes the new.
        for group, scale in zip(optimizer.param_groups, (1.0, config.step_lr_scale)):
            group["lr_scale"] = scale
        aux_optimizer.load_state_dict(checkpoint["aux_optimizer"])
        return checkpoint["state"], checkpoint.get("ema")

    resumed_step, resumed_rate = 0, None
    if checkpoint_path.exists():
        state, saved_average = restore()
        resumed_step = state["step"]
        resumed_rate = state["history"][-1]["lr"] if state["history"] else None
        print(f"resumed {checkpoint_path} at step {state['step']}", file=log)
    elif init_weights is not None:
        weights = torch.load(init_weights, weights_only=False)
        init_state = weights["model"]
        # Tolerate parameters an older architecture had and this one dropped (e.g. DeepHQ's
        # dequantization gains), never missing ones.
        missing, unexpected = model.load_state_dict(init_state, strict=False)
        if missing:
            raise SystemExit(f"{init_weights} lacks parameters: {', '.join(missing)}")
        if unexpected:
            print(f"ignored parameters from {init_weights}: {', '.join(unexpected)}", file=log)
        state.update({k: weights["state"][k] for k in ("step", "seconds", "images", "history")})
        print(f"started from weights {init_weights} (step {state['step']}) with a fresh optimizer",
              file=log)
    hold_steps(model, config, log)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    average = None
    if config.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # Starts as a copy of the current weights (its first update copies).
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        if saved_average is not None:
            average.load_state_dict(saved_average)
            hold_steps(average.module, config, log)
    forward = torch.compile(model) if config.compile else model
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16()
    autocast = config.autocast and native
    if config.autocast and not autocast:
        print(f"this {device.type.upper()} has no native bf16: training in float32", file=log)
    sampler = PatchSampler(data, config.patch, config.seed + state["step"])
    lambdas_all = torch.tensor(config.lambdas, device=device)
    layer_rng = random.Random(config.seed * 7919 + state["step"])
    log_path = run_dir / "train.log"

    def new_window():  # statistics between two log lines
        zeros = np.zeros(len(config.lambdas))
        return {"loss": 0.0, "n": 0, "images": 0, "bpp": zeros.copy(), "mse": zeros.copy(),
                "count": zeros.copy(), "grad_norm": [], "started": time.perf_counter()}

    def save_checkpoint():
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "aux_optimizer": aux_optimizer.state_dict(), "state": state,
                     "config": asdict(config),
                     **({"ema": average.state_dict()} if average is not None else {})},
                    checkpoint_path)

    window = new_window()
    model.train()
    skipped_in_a_row, rollbacks = 0, 0
    while state["step"] < steps:
        if chunk_ends is not None and time.monotonic() > chunk_ends:
            save_checkpoint()
            print(f"chunk of {minutes} minutes done at step {state['step']}: checkpoint saved",
                  file=log, flush=True)
            break
        step_start = time.perf_counter()
        lr = rewarmed(learning_rate(config, state["step"]), resumed_rate,
                      state["step"] - resumed_step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = torch.from_numpy(sampler.batch(config.batch)).to(device).permute(0, 3, 1, 2)
        batch = batch.float() / 255
        if config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        if synthesis_only:
            layers = torch.tensor(layer_rng.sample(range(1, len(config.lambdas) + 1),
                                                   config.synthesis_layers), device=device)
            x_hat, layer_of = model.synthesis_pass(batch, layers, autocast=autocast)
            target = batch.repeat(len(layers), 1, 1, 1)
            mse = ((target - x_hat) ** 2).mean((1, 2, 3))
            loss = torch.log10(mse.clamp(min=1e-10)).mean()
            mse, bpp = mse.detach(), torch.zeros_like(mse)
        elif base_stage:
            layer_of = torch.full((config.batch,), len(config.lambdas), device=device)
            x_hat, y_lik, z_lik = model.forward_base(batch, autocast=autocast)
            batch_lambdas = lambdas_all[layer_of - 1]
            loss, bpp, mse = rd_loss(batch, x_hat, y_lik, z_lik, batch_lambdas)
        else:
            layer_of = draw_layers(layer_rng, len(config.lambdas), config.batch,
                                   config.layers_per_crop, config.keep_finest).to(device)
            x_hat, y_lik, z_lik = forward(batch, layer_of, autocast=autocast)
            batch_lambdas = lambdas_all[layer_of - 1]
            loss, bpp, mse = rd_loss(batch.repeat(config.layers_per_crop, 1, 1, 1), x_hat, y_lik,
                                     z_lik, batch_lambdas)
        optimizer.zero_grad(set_to_none=True)
        # A rare bad batch must not poison the weights: skip it when its loss or its gradient
        # is not finite (a NaN gradient can come with a finite loss, and the norm clip passes
        # it on to every weight). The 2026-11-30 work's run skipped every batch from step 30,926 on, its
        # weights most likely NaN; it now stops instead of spinning.
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(main_params, config.clip))
            finite = math.isfinite(grad_norm)
        if not finite:
            state["skipped"] = state.get("skipped", 0) + 1
            skipped_in_a_row += 1
            if skipped_in_a_row < MAX_SKIPS_IN_A_ROW:
                continue
            if rollbacks == MAX_ROLLBACKS or not checkpoint_path.exists():
                raise SystemExit(f"training diverged: {skipped_in_a_row} non-finite batches in a "
                                 f"row at step {state['step']}; resume from the checkpoint, "
                                 f"perhaps with a lower --set lr=")
            # Unattended runs (the 2026-12-02 work's stopped at 61,772; a rerun of the same batches went
            # past it): back to the last checkpoint, on other batches.
            rollbacks += 1
            diverged_at, skipped = state["step"], state["skipped"]
            state, saved_average = restore()
            state["skipped"] = skipped
            if average is not None and saved_average is not None:
                average.load_state_dict(saved_average)
            state["rollbacks"] = state.get("rollbacks", 0) + 1
            sampler.reseed([config.seed, state["step"], state["rollbacks"]])
            layer_rng = random.Random(f"{config.seed} {state['step']} {state['rollbacks']}")
            skipped_in_a_row = 0
            window = new_window()
            print(f"{MAX_SKIPS_IN_A_ROW} non-finite batches in a row at step {diverged_at}: back "
                  f"to the checkpoint at step {state['step']}, other batches "
                  f"(rollback {rollbacks} of {MAX_ROLLBACKS})", file=log, flush=True)
            continue
        skipped_in_a_row = 0
        optimizer.step()
        if not synthesis_only:  # the hyper-latent's quantiles are frozen with the rest
            aux_optimizer.zero_grad(set_to_none=True)
            aux_loss = model.aux_loss()
            if torch.isfinite(aux_loss):
                aux_loss.backward()
                aux_optimizer.step()
        hold_steps(model, config)
        if average is not None:
            average.update_parameters(model)

        state["step"] += 1
        state["images"] += len(batch)  # crops, whatever the layers per crop
        state["seconds"] += time.perf_counter() - step_start
        # The log keeps the unweighted loss, comparable across runs (synthesis: log10 MSE).
        unweighted = loss.detach() if synthesis_only else (batch_lambdas * 255**2 * mse + bpp).mean()
        window["loss"] += float(unweighted)
        window["n"] += 1
        window["images"] += len(batch)
        window["grad_norm"].append(grad_norm)
        for layer, b, m in zip(layer_of.tolist(), bpp.tolist(), mse.tolist()):
            window["bpp"][layer - 1] += b
            window["mse"][layer - 1] += m
            window["count"][layer - 1] += 1
        if state["step"] % config.checkpoint_every == 0 or state["step"] == steps:
            elapsed = time.perf_counter() - window["started"]
            count = np.maximum(window["count"], 1)
            psnr = np.where(window["count"] > 0,
                            -10 * np.log10(np.maximum(window["mse"] / count, 1e-10)), np.nan)
            record = {
                "step": state["step"], "hours": round(state["seconds"] / 3600, 4),
                "lr": lr, "loss": round(window["loss"] / window["n"], 4),
                **({"objective": "synthesis"} if synthesis_only else {}),
                **({"stage": "base"} if base_stage else {}),
                "numerics": "bf16 autocast (transforms)" if autocast else "float32",
                "images_per_s": round(window["images"] / elapsed, 2),
                "bpp": [round(float(v), 4) for v in (window["bpp"] / count)],
                "psnr": [round(float(v), 2) for v in psnr],
                # before clipping: a spike here is the step that disturbed a run
                "grad_norm_median_max": [round(float(np.median(window["grad_norm"])), 4),
                                         round(max(window["grad_norm"]), 4)],
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {record['step']} | {record['images_per_s']} img/s | loss "
                  f"{record['loss']} | layer bpp/psnr "
                  + " ".join(f"{b:.2f}/{p:.1f}" for b, p in zip(record["bpp"], record["psnr"])),
                  file=log, flush=True)
            state["history"].append(record)
            save_checkpoint()
            window = new_window()
        if kodak is not None and state["step"] % config.eval_every == 0:
            # The running weights too: their distance to the average is the case for it.
            evaluate_and_record(model, config, state, kodak, run_dir, log, "raw")
            if average is not None:
                evaluate_and_record(average.module, config, state, kodak, run_dir, log, "ema")
    return model, state


def draw_layers(rng: random.Random, layers: int, crops: int, per_crop: int,
                keep_finest: bool = False):
    """The layer of each row of a training step: one random layer per crop (per_crop = 1), or
    `per_crop` layers per crop dealt from shuffled decks of the ladder, so that a step sees
    each layer once before any twice (2 crops × 4: the whole ladder every step). With
    `keep_finest`, each crop's first row is the finest layer and the others are dealt from the
    rest of the ladder (per_crop − 1 of them). Row k·crops + b holds crop b, the order
    network.forward repeats in."""
    import torch

    if keep_finest:
        if per_crop < 2:
            raise SystemExit("keep_finest needs layers_per_crop of at least 2")
        rest = draw_layers(rng, layers - 1, crops, per_crop - 1) if (layers - 1) % (
            per_crop - 1) == 0 else torch.tensor([rng.randrange(layers - 1) + 1
                                                  for _ in range(crops * (per_crop - 1))])
        return torch.cat([torch.full((crops,), layers), rest])
    if per_crop == 1:
        return torch.tensor([rng.randrange(layers) + 1 for _ in range(crops)])
    if not 1 <= per_crop <= layers or layers % per_crop:
        raise SystemExit(f"layers_per_crop={per_crop}: a divisor of the {layers} layers")
    dealt = []
    while len(dealt) < crops * per_crop:
        dealt += rng.sample(range(1, layers + 1), layers)
    # A divisor of the deck's size: no crop's share straddles two decks, so its layers differ.
    return torch.tensor([dealt[b * per_crop + k] for k in range(per_crop) for b in range(crops)])


def hold_steps(model, config: TrainConfig, log=None):
    """The opt-in hold on the steps, after every update: the finest mean step, by rescaling y,
    not just the steps (shifting the log-steps alone made the quantizer finer against y at
    every update, and both runs that did it diverged)."""
    hold_finest_step(model, config.finest_step, log)


def hold_finest_step(model, finest_step: float, log=None):
    """Rescale y so the finest layer's mean step is `finest_step`: the same codec up to the σ
    clamps (network.rescale_latent), so holding it changes the scale of y, not what it codes."""
    if finest_step <= 0:
        return
    c = math.exp(float(model.log_steps.detach()[-1].mean())) / finest_step
    if abs(c - 1) > 1e-9:
        model.rescale_latent(c)
        if log is not None and abs(c - 1) > 1e-3:
            print(f"rescaled y by 1/{c:.4g} to hold the finest mean step at {finest_step}",
                  file=log)


def evaluate_and_record(model, config, state, kodak, run_dir, log, weights="raw"):
    """Real-bitstream evaluation on Kodak: every layer of actual .pcb files."""
    from .evaluate import evaluate_weights

    model.eval()
    weights_path = run_dir / f"eval-{state['step']}.pt"
    export_weights(model, config, state, weights_path)
    result = evaluate_weights(weights_path, kodak, limit=config.eval_images)
    weights_path.unlink()
    model.train()
    record = {"step": state["step"], "hours": round(state["seconds"] / 3600, 4),
              "weights": weights, **result}
    with open(run_dir / "eval.log", "a") as f:
        f.write(json.dumps(record) + "\n")
    print("eval step {} {} | {}".format(state["step"], weights, " ".join(
        f"{b:.3f}/{p:.2f}" for b, p in zip(result["bpp"], result["psnr"]))), file=log, flush=True)


THROUGHPUT_OPTIONS = [
    {}, {"autocast": False}, {"channels_last": False}, {"batch": 16}, {"patch": 256, "batch": 2},
    {"N": 96, "M": 128}, {"M": 320}, {"compile": True},
]


def measure_throughput(options=THROUGHPUT_OPTIONS, steps: int = 6, log=sys.stderr) -> list[dict]:
    """Training steps per second for variations of the hp128 config (random data, so only
    compute is timed): the table behind the choice of config."""
    import torch

    from .network import HyperpriorNetwork, NetworkConfig

    base = CONFIGS["hp128"]
    torch.set_num_threads(base.threads)
    rows = []
    for option in options:
        config = replace(base, **option)
        torch.manual_seed(0)
        model = HyperpriorNetwork(NetworkConfig(N=config.N, M=config.M))
        memory = torch.channels_last if config.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory)
        forward = torch.compile(model) if config.compile else model
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        lambdas = torch.tensor(config.lambdas)
        times = []
        for _ in range(steps + 2):
            x = torch.rand(config.batch, 3, config.patch, config.patch).contiguous(
                memory_format=memory)
            layer_of = torch.randint(1, len(config.lambdas) + 1, (config.batch,))
            start = time.perf_counter()
            x_hat, y_lik, z_lik = forward(x, layer_of, autocast=config.autocast)
            loss, _, _ = rd_loss(x, x_hat, y_lik, z_lik, lambdas[layer_of - 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times[2:]))
        row = {"option": option or "hp128 (bf16, channels_last, batch 8, 128²)",
               "s_per_step": round(seconds, 3),
               "images_per_s": round(config.batch / seconds, 1),
               "megapixels_per_s": round(config.batch * config.patch**2 / seconds / 1e6, 3)}
        rows.append(row)
        print(json.dumps(row), file=log, flush=True)
    return rows


def export_weights(model, config: TrainConfig, state: dict, path: Path,
                   gain_data: Path | None = None):
    """Weights without optimizer state, plus what is needed to know how they were made.
    With `gain_data` (a folder of photos), also the coding order's per-channel offsets."""
    import torch

    from .models import hyper_latent_table, load_weights_file

    state_dict = {k: compact(v.detach().float().cpu().contiguous())
                  for k, v in model.state_dict().items()}
    z_table = torch.from_numpy(hyper_latent_table(model.entropy_bottleneck))
    saved = {"model": state_dict, "z_table": z_table, "config": asdict(config),
             "state": json.loads(json.dumps(
                 {k: state[k] for k in ("step", "seconds", "images", "history")},
                 default=float))}
    save_atomic(saved, path)
    if gain_data is not None:  # measured through the inference transforms the codec runs
        from .channel_gain import channel_gains, order_offsets, training_crops

        gains = channel_gains(load_weights_file(path), training_crops(gain_data))
        saved["order_offsets"] = torch.from_numpy(order_offsets(gains))
        save_atomic(saved, path)


# Convolution kernels this large are stored in float16: a model with M = 320 has 12.6 M
# parameters, 51 MB in float32, and weights files must stay under 30 MB. Every machine widens
# the same stored values to float32/float64 the same way, so coding stays bit-exact; a
# kernel's relative rounding is 2^-11. Small tensors (steps, GDN, biases, the hyper-latent's
# model) keep float32.
HALF_PRECISION_MIN_ELEMENTS = 100_000


def compact(tensor):
    if tensor.dim() == 4 and tensor.numel() >= HALF_PRECISION_MIN_ELEMENTS:
        return tensor.half()
    return tensor


def export_checkpoint(checkpoint_path: Path, path: Path, gain_data: Path | None = None):
    """Weights file from a training checkpoint (drops the optimizer state); the moving
    average of the weights when the run kept one."""
    import torch

    from .network import HyperpriorNetwork

    checkpoint = torch.load(checkpoint_path, weights_only=False, map_location="cpu")
    config = config_from_dict(checkpoint["config"])
    model = HyperpriorNetwork(network_config(config))
    # An AveragedModel's state is the module's under "module." plus a step count.
    average = {k.removeprefix("module."): v for k, v in checkpoint.get("ema", {}).items()
               if k != "n_averaged"}
    model.load_state_dict(average or checkpoint["model"])
    export_weights(model, config, checkpoint["state"], path, gain_data)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="pcodec train", description="Train a pcodec model.")
    parser.add_argument("--config", default="hp128", choices=sorted(CONFIGS))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/train"))
    parser.add_argument("--kodak", type=Path, default=None)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="checkpoints and logs (default ~/.cache/pcodec/runs/CONFIG)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train until this total step count (default: the config's)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from exported weights with a fresh optimizer")
    parser.add_argument("--set", action="append", default=[],
                        help="override a config field, e.g. --set lr=1e-4")
    parser.add_argument("--export", metavar="MODEL_ID", default=None,
                        help="export the run's checkpoint to models/MODEL_ID.pt (no training)")
    parser.add_argument("--note", default=None, help="free text for the manifest (with --export)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this many minutes with a checkpoint (a chunk of a run)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="where to train (default: the config's, cpu)")
    parser.add_argument("--measure", action="store_true",
                        help="time training steps for the config variations and exit")
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    run_dir = args.run_dir or Path.home() / ".cache" / "pcodec" / "runs" / config.name
    if args.measure:
        measure_throughput()
        return
    if args.export:
        entry = export_model(run_dir, args.export, args.kodak, "pcodec train --config "
                             f"{config.name} --data {args.data} --kodak {args.kodak}",
                             note=args.note, gain_data=args.data)
        print(json.dumps(entry.get("kodak", {})), file=sys.stderr)
        return
    for item in args.set:
        key, value = item.split("=", 1)
        config = replace(config, **{key: parse_setting(getattr(config, key), value)})
    if args.device:
        config = replace(config, device=args.device)
    train(config, args.data, run_dir, args.steps or config.steps, args.init, args.kodak,
          minutes=args.minutes)


def parse_setting(current, value: str):
    """A --set value in the type of the field it replaces (a tuple: comma-separated)."""
    if isinstance(current, bool):
        return value.lower() in {"1", "true", "yes"}
    if isinstance(current, tuple):
        kind = type(current[0]) if current else float
        return tuple(kind(item) for item in value.split(","))
    return type(current)(value)


def export_model(run_dir: Path, model_id: str, kodak: Path | None, command: str,
                 models_folder: Path | None = None, note: str | None = None,
                 gain_data: Path | None = None):
    """Weights without optimizer state → models/ID.pt (with the coding order's channel
    offsets measured on photos in `gain_data`), Kodak figures from real streams, the
    manifest entry and the learning-curve plot."""
    import datetime
    import hashlib

    from .evaluate import evaluate_weights
    from .models import models_dir

    folder = models_folder or models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / f"{model_id}.pt"
    export_checkpoint(run_dir / "checkpoint.pt", weights_path, gain_data)
    import torch

    saved = torch.load(weights_path, weights_only=True)
    state, config = saved["state"], saved["config"]
    history = state["history"]
    recent = [r["images_per_s"] for r in history[-20:]]
    entry = {
        "file": weights_path.name,
        "sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "bytes": weights_path.stat().st_size,
        "architecture": f"mean-scale hyperprior N={config['N']} M={config['M']}, "
                        f"{len(config['lambdas'])}-layer learned nested quantizer",
        "config": config,
        "training": {
            "data": "../shared/data/train (638 natural photos, see its SOURCES.md)",
            "steps": state["step"], "images_seen": state["images"],
            "cpu_hours": round(state["seconds"] / 3600, 3),
            "lambda_ladder": list(config["lambdas"]),
            "throughput_images_per_s": round(float(np.median(recent)), 2) if recent else None,
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
            "command": command,
        },
    }
    if note:
        entry["training"]["note"] = note
    if gain_data is not None:
        entry["coding_order"] = ("keys weighted by each channel's synthesis gain "
                                 f"(channel_gain.py), measured on photos of {gain_data}")
    if kodak is not None:
        entry["kodak"] = {**evaluate_weights(weights_path, kodak, with_midpoint=True),
                          "measured": datetime.date.today().isoformat(),
                          "how": "real .pcb files, every layer, RGB PSNR, bpp of whole files"}
    evals_path = run_dir / "eval.log"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] \
        if evals_path.exists() else []
    entry["training"]["kodak_evaluations"] = evals
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    manifest["models"][model_id] = entry
    manifest["default"] = model_id
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    plot_learning_curve(history, evals, folder / f"{model_id}-learning-curve.png")
    return entry


def plot_learning_curve(history: list[dict], evals: list[dict], path: Path):
    """Training loss and Kodak PSNR per layer (real streams) against CPU hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rd = [r for r in history if r.get("objective") != "synthesis"]
    left.plot([r["hours"] for r in rd], [r["loss"] for r in rd], lw=0.8)
    tuned = [r["hours"] for r in history if r.get("objective") == "synthesis"]
    if tuned:  # its loss (log10 MSE) is another quantity: the phase is shown, not plotted
        left.axvspan(min(tuned), max(tuned), color="C1", alpha=0.2,
                     label="synthesis fine-tuned alone")
        left.legend(fontsize=7)
    left.set_xlabel("CPU hours (2 cores)")
    left.set_ylabel("training loss (mean λ·255²·MSE + bpp)")
    left.set_yscale("log")
    left.grid(alpha=0.3)
    if evals:
        for weights, style in (("raw", "-"), ("ema", "--")):
            chosen = [e for e in evals if e.get("weights", "raw") == weights]
            for layer in range(len(chosen[-1]["psnr"]) if chosen else 0):
                right.plot([e["hours"] for e in chosen], [e["psnr"][layer] for e in chosen],
                           style, marker=".", color=f"C{layer}",
                           label=f"layer {layer + 1}" + (" (average)" if weights == "ema" else ""))
        right.legend(fontsize=6, ncol=2)
    right.set_xlabel("CPU hours (2 cores)")
    right.set_ylabel("Kodak PSNR (dB), real .pcb files")
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

if __name__ == "__main__":
    main()
