"""The training loop, resumable at any step: one model for all quantization layers (stage
"ladder": each crop at layers drawn from the ladder, loss λ_l·255²·MSE + bpp with the coder's
nested rate) or its single-rate base (stage "base"); `train_only=synthesis` fine-tunes the
synthesis alone on distortion, every layer's bytes fixed; `train_only=analysis` the encoder
alone (g_a, h_a) for the decoder as it is; `train_only=transforms` every weight but the step
ladder, coded with the decoder's own integer steps. Checkpoints hold the optimizer
state and live outside the repository; `--export` writes weights without it (export.py).
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .export import STATE_KEYS, export_checkpoint, export_model, export_weights, machine_name, save_atomic
from .quant import scale_shift_for
from .recipes import CONFIGS, TrainConfig, draw_layers, learning_rate, network_config, parse_setting, rewarmed

# The modules each `train_only` fine-tunes, the rest frozen. The analysis side alone leaves
# the decoder as it is: new files decode with the weights' synthesis and prior unchanged.
# "transforms" is all but the steps: the four transforms and the hyper-latent's model, every
# layer coded as the decoder codes it (integer steps, fitted spreads).
TRAINED_PARTS = {"synthesis": ("g_s.", "post."), "analysis": ("g_a.", "h_a."),
                 "transforms": ("g_a.", "h_a.", "g_s.", "h_s.", "entropy_bottleneck.", "post.")}
MAX_SKIPS_IN_A_ROW = 20  # bad batches in a row: the weights are gone, roll back
SPIKE_WINDOW, SPIKE_FACTOR = 100, 50.0  # a gradient norm 50x the median of the last 100 is bad
MAX_ROLLBACKS = 3  # to the last checkpoint, per process; then stop
# A rollback halves the rate: the pux320 base run at 2e-4, back at its step-7,600 checkpoint,
# diverged again within 10 steps on other batches three times (Adam moved g_s.1's weights
# 0.7 % a step), and went on at 1e-4 from the same state.
ROLLBACK_RATE_FACTOR = 0.5
# A log window whose mean loss is this many times the median of the stage's last records is
# a run diverging before it turns non-finite (that run: 30.6, then 3,687 forty steps on);
# it rolls back without saving a checkpoint. Only over windows of enough crops: a few crops
# at random layers swing the mean loss by 5x.
LOSS_CLIMB_FACTOR, LOSS_CLIMB_RECORDS, LOSS_CLIMB_MIN_CROPS = 2.0, 5, 400
FRESH_OPTIMIZER_RATE = 0.1  # --init: the rate starts at this fraction of the schedule


class StopAfterStep:
    """SIGTERM, SIGHUP or SIGINT while a step runs ends the run after that step, with a
    checkpoint saved, then goes on as the signal would have (the CLI's clean exit 128 + n):
    a run stopped by its job's end or a scheduler loses no steps. Outside a step (loading the
    photos, an evaluation), or at a second signal, the signal acts at once as before; one
    that was ignored (a job started with `&`, nohup) stays ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.pending, self.in_step, self.previous = None, False, {}

    def __enter__(self):
        for signum in self.SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not signal.SIG_IGN:
                self.previous[signum] = handler
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.in_step and self.pending is None:
            self.pending = signum
        else:
            self.deliver(signum)

    def save_if_stopped(self, save, step: int, log):
        """After a step: if a signal came during it, save the checkpoint, say so and act on
        the signal."""
        if self.pending is not None:
            save()
            print(f"stopped by {signal.Signals(self.pending).name} after step {step}: "
                  "checkpoint saved", file=log, flush=True)
            self.deliver(self.pending)

    def deliver(self, signum):
        """Act on the signal as the handler before this one would have."""
        self.pending = None
        handler = self.previous[signum]
        if callable(handler):  # the CLI's and Python's raise; one that returns lets the run on
            handler(signum, None)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


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


def rd_loss(x, x_hat, y_likelihoods, z_likelihoods, lambdas, relative: bool = False):
    """Per-row λ·255²·MSE + bpp averaged over the batch; also returns the parts. `relative`:
    the mean of each row's log instead, so that every crop and layer counts by its relative
    gain, as a BD-rate does (by λ alone the finest layer's loss is ~25x the coarsest's)."""
    import torch

    pixels = x.shape[2] * x.shape[3]
    bits = (-torch.log2(y_likelihoods).sum((1, 2, 3)) - torch.log2(z_likelihoods).sum((1, 2, 3)))
    bpp = bits / pixels
    mse = ((x - x_hat) ** 2).mean((1, 2, 3))
    rows = lambdas * 255**2 * mse + bpp
    return (torch.log(rows) if relative else rows).mean(), bpp.detach(), mse.detach()


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
    source = checkpoint_path if checkpoint_path.exists() else init_weights
    if source is not None and not config.post_filter:  # a fine-tune keeps the filter it has
        # Memory-mapped: only the gains' shapes are read here; the weights load once, below.
        saved = torch.load(source, weights_only=False, map_location="cpu", mmap=True)["model"]
        if "post.gains" in saved:
            coarse = saved.get("post.coarse_gains")
            config = replace(config, post_filter=int(saved["post.gains"].shape[-1]),
                             post_coarse=0 if coarse is None else int(coarse.shape[-1]))
    torch.manual_seed(config.seed)  # the same initial weights on every run of a config
    # On its device before the optimizer sees it: restored Adam state follows the parameters.
    model = HyperpriorNetwork(network_config(config)).to(device)
    synthesis_only = config.train_only == "synthesis"
    # Both train on the decoder's frozen integer steps, each row's loss counting by its log.
    decoder_exact = config.train_only in ("analysis", "transforms")
    if config.stage not in ("ladder", "base"):
        raise SystemExit(f"stage={config.stage!r}: 'ladder' or 'base'")
    base_stage = config.stage == "base"
    if config.train_only and config.train_only not in TRAINED_PARTS:
        raise SystemExit(f"train_only={config.train_only!r}: "
                         + " or ".join(f"'{name}'" for name in TRAINED_PARTS))
    if config.train_only and init_weights is None and not checkpoint_path.exists():
        raise SystemExit(f"train_only={config.train_only} fine-tunes trained weights: give --init")
    if config.train_only and config.finest_step > 0:  # it rescales y through g_a and g_s
        raise SystemExit(f"finest_step rescales y: not with train_only={config.train_only}")
    # Every parameter trains, or those of the fine-tuned parts; the quantiles by their own loss.
    trained = TRAINED_PARTS[config.train_only] if config.train_only else ("",)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trained))
    main_params = [p for n, p in model.named_parameters()
                   if n.startswith(trained) and not n.endswith("quantiles")]
    aux_params = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    quantiles_train = any(p.requires_grad for p in aux_params)  # where the hyper-latent's model does
    if config.train_only:
        optimizer = torch.optim.Adam([{"params": main_params, "lr_scale": 1.0}], lr=config.lr)
    else:
        optimizer = torch.optim.Adam(
            [{"params": [p for p in main_params if p is not model.log_steps], "lr_scale": 1.0},
             {"params": [model.log_steps], "lr_scale": config.step_lr_scale}], lr=config.lr)
    aux_optimizer = torch.optim.Adam(aux_params, lr=config.aux_lr)
    state = {"step": 0, "seconds": 0.0, "gpu_seconds": 0.0, "images": 0, "history": [],
             "host_seconds": {}}
    saved_average = None
    # How the weights' post-filter was trained (postfilter.export_post_filter), carried to
    # the export: its hours are part of what any weights made from these cost.
    filter_record = None

    def restore():
        nonlocal filter_record
        checkpoint = torch.load(checkpoint_path, weights_only=False, map_location="cpu")
        filter_record = checkpoint.get("post_filter")
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, main_params, checkpoint["optimizer"])
        # The saved groups carry the run's old settings; a resume with --set takes the new.
        for group, scale in zip(optimizer.param_groups, (1.0, config.step_lr_scale)):
            group["lr_scale"] = scale
        aux_optimizer.load_state_dict(checkpoint["aux_optimizer"])
        model.restore_spreads(checkpoint)
        return checkpoint["state"], checkpoint.get("ema")

    resumed_step, resumed_rate = 0, None
    if checkpoint_path.exists():
        state, saved_average = restore()
        resumed_step = state["step"]
        # The schedule's units: the recorded rate already carries the rollbacks' factor,
        # which is applied again below.
        resumed_rate = (state["history"][-1]["lr"] / state.get("rate_factor", 1.0)
                        if state["history"] else None)
        print(f"resumed {checkpoint_path} at step {state['step']}"
              + (f", rate ×{state['rate_factor']:g} after rollbacks" if "rate_factor" in state
                 else ""), file=log)
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
        state.update({k: weights["state"][k] for k in STATE_KEYS if k in weights["state"]})
        filter_record = weights.get("post_filter")
        model.restore_spreads(weights)
        if weights["config"].get("stage", "ladder") != config.stage:
            # A new stage runs its own schedule from step 0; hours, crops and the history
            # (each record names its stage) go on counting.
            state["step"] = 0
        # A fresh Adam's first updates are about the rate itself for every weight at once:
        # climb to the schedule from a tenth of it, as after a resume.
        resumed_step = state["step"]
        resumed_rate = FRESH_OPTIMIZER_RATE * learning_rate(config, state["step"])
        print(f"started from weights {init_weights} (step {state['step']}) with a fresh optimizer",
              file=log)
    hold_steps(model, config, log)
    follow_latent_scale(model, config, log)
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
        follow_latent_scale(average.module, config)
    # The codec's integer steps, for a decoder-exact fine-tune: the steps are frozen, so once.
    frozen_steps = model.decoder_steps() if decoder_exact else None
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16()
    host = torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name()
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
                     "reconstruction_spreads": model.reconstruction_spreads,
                     "config": asdict(config),
                     **({"post_filter": filter_record} if filter_record else {}),
                     **({"ema": average.state_dict()} if average is not None else {})},
                    checkpoint_path)

    window = new_window()
    model.train()
    skipped_in_a_row, rollbacks = 0, 0
    recent_norms = collections.deque(maxlen=SPIKE_WINDOW)

    def roll_back(reason: str):
        """Back to the last checkpoint, on other batches, at a lower rate; or stop."""
        nonlocal state, saved_average, layer_rng, skipped_in_a_row, window, rollbacks
        if rollbacks == MAX_ROLLBACKS or not checkpoint_path.exists():
            raise SystemExit(f"training diverged: {reason}; resume from the checkpoint, "
                             f"perhaps with a lower --set lr=")
        # Unattended runs (the 2026-12-02 run stopped at 61,772; a rerun of the same
        # batches went past it): back to the last checkpoint, on other batches.
        rollbacks += 1
        skipped, factor = state.get("skipped", 0), state.get("rate_factor", 1.0)
        state, saved_average = restore()
        state["skipped"] = skipped
        state["rate_factor"] = factor * ROLLBACK_RATE_FACTOR
        if average is not None and saved_average is not None:
            average.load_state_dict(saved_average)
        state["rollbacks"] = state.get("rollbacks", 0) + 1
        sampler.reseed([config.seed, state["step"], state["rollbacks"]])
        layer_rng = random.Random(f"{config.seed} {state['step']} {state['rollbacks']}")
        skipped_in_a_row = 0
        window = new_window()
        print(f"{reason}: back to the checkpoint at step {state['step']}, other batches, rate "
              f"×{state['rate_factor']:g} (rollback {rollbacks} of {MAX_ROLLBACKS})",
              file=log, flush=True)
    with StopAfterStep() as stop:
        while state["step"] < steps:
            stop.save_if_stopped(save_checkpoint, state["step"], log)
            stop.in_step = True
            if chunk_ends is not None and time.monotonic() > chunk_ends:
                save_checkpoint()
                print(f"chunk of {minutes} minutes done at step {state['step']}: checkpoint saved",
                      file=log, flush=True)
                break
            step_start = time.perf_counter()
            lr = rewarmed(learning_rate(config, state["step"]), resumed_rate,
                          state["step"] - resumed_step) * state.get("rate_factor", 1.0)
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
                x_hat, y_lik, z_lik = model(batch, layer_of, autocast=autocast, steps=frozen_steps)
                batch_lambdas = lambdas_all[layer_of - 1]
                loss, bpp, mse = rd_loss(batch.repeat(config.layers_per_crop, 1, 1, 1), x_hat, y_lik,
                                         z_lik, batch_lambdas, relative=decoder_exact)
            if not config.train_only:
                loss = loss + model.shortcut_penalty().to(loss.device)
            optimizer.zero_grad(set_to_none=True)
            # A rare bad batch must not poison the weights: skip it when its loss or its gradient
            # is not finite (a NaN gradient can come with a finite loss, and the norm clip passes
            # it on to every weight). The 2026-11-30 run skipped every batch from step 30,926 on, its
            # weights most likely NaN; it now stops instead of spinning.
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(main_params, config.clip))
                finite = math.isfinite(grad_norm)
            # A finite spike is skipped too: pu320's base run at 3e-4 met one batch whose gradient
            # norm was 5.5e8 against a median of 800 (step ~4,750) and diverged within 100 steps.
            if finite and len(recent_norms) == recent_norms.maxlen:
                finite = grad_norm <= SPIKE_FACTOR * float(np.median(recent_norms))
                if not finite:
                    state["spikes"] = state.get("spikes", 0) + 1
            if finite:
                recent_norms.append(grad_norm)
            if not finite:
                state["skipped"] = state.get("skipped", 0) + 1
                skipped_in_a_row += 1
                if skipped_in_a_row < MAX_SKIPS_IN_A_ROW:
                    continue
                roll_back(f"{MAX_SKIPS_IN_A_ROW} non-finite batches in a row at step {state['step']}")
                continue
            skipped_in_a_row = 0
            optimizer.step()
            if quantiles_train:
                aux_optimizer.zero_grad(set_to_none=True)
                aux_loss = model.aux_loss()
                if torch.isfinite(aux_loss):
                    aux_loss.backward()
                    aux_optimizer.step()
            hold_steps(model, config)
            follow_latent_scale(model, config, log)
            if average is not None:
                average.update_parameters(model)
                follow_latent_scale(average.module, config)

            state["step"] += 1
            state["images"] += len(batch)  # crops, whatever the layers per crop
            step_seconds = time.perf_counter() - step_start
            state["seconds"] += step_seconds
            if device.type == "cuda":
                state["gpu_seconds"] = state.get("gpu_seconds", 0.0) + step_seconds
            hosts = state.setdefault("host_seconds", {})
            hosts[host] = hosts.get(host, 0.0) + step_seconds
            # The log keeps the unweighted loss, comparable across runs (synthesis: log10 MSE).
            unweighted = (loss.detach() if config.train_only == "synthesis"
                          else (batch_lambdas * 255**2 * mse + bpp).mean())
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
                    "device": device.type,
                    "images_per_s": round(window["images"] / elapsed, 2),
                    "bpp": [round(float(v), 4) for v in (window["bpp"] / count)],
                    "psnr": [round(float(v), 2) for v in psnr],
                    # before clipping: a spike here is the step that disturbed a run
                    "grad_norm_median_max": [round(float(np.median(window["grad_norm"])), 4),
                                             round(max(window["grad_norm"]), 4)],
                    "bad_batches_skipped": state.get("skipped", 0),
                }
                earlier = [r["loss"] for r in state["history"]
                           if (r.get("stage"), r.get("objective")) == (record.get("stage"),
                                                                       record.get("objective"))]
                earlier = earlier[-LOSS_CLIMB_RECORDS:]
                if (not synthesis_only and window["images"] >= LOSS_CLIMB_MIN_CROPS
                        and len(earlier) == LOSS_CLIMB_RECORDS
                        and record["loss"] > LOSS_CLIMB_FACTOR * float(np.median(earlier))):
                    roll_back(f"loss {record['loss']:.4g} at step {state['step']} against "
                              f"{float(np.median(earlier)):.4g} before")
                    continue
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
                stop.in_step = False  # minutes long: a signal acts at once
                # The running weights too: their distance to the average is the case for it.
                evaluate_and_record(model, config, state, kodak, run_dir, log, "raw")
                if average is not None:
                    evaluate_and_record(average.module, config, state, kodak, run_dir, log, "ema")
        if stop.pending is not None:  # the last step's checkpoint is saved
            stop.deliver(stop.pending)
    return model, state


def hold_steps(model, config: TrainConfig, log=None):
    """The opt-in hold on the steps, after every update: the finest mean step, by rescaling y,
    not just the steps (shifting the log-steps alone made the quantizer finer against y at
    every update, and both runs that did it diverged)."""
    hold_finest_step(model, config.finest_step, log)


def follow_latent_scale(model, config: TrainConfig, log=None):
    """After every update: move σ's table (the model's scale_shift) to the octave of its
    finest mean step (quant.scale_shift_for). Not when only a part trains (train_only): the
    steps are frozen there, and σ's table is the decoder's."""
    if config.train_only:
        return
    finest = math.exp(float(model.log_steps.detach()[-1].mean()))
    shift = int(model.scale_shift)
    new = scale_shift_for(finest, shift)
    if new != shift:
        model.scale_shift.fill_(new)
        if log is not None:
            print(f"σ's table moved to 2^{new} × its base (finest mean step {finest:.3g})",
                  file=log, flush=True)


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


# The candidates of the design table (README "Training"): variations of pu320's base stage.
THROUGHPUT_OPTIONS = [
    {"design": "gdn5"}, {"blocks": (1, 1, 1)}, {"blocks": (1, 1, 1), "autocast": False}, {},
    {"design": "pux"}, {"blocks": (2, 2, 2)}, {"blocks": (1, 1, 1), "N": 192},
]


def measure_throughput(options=THROUGHPUT_OPTIONS, steps: int = 4, log=sys.stderr) -> list[dict]:
    """Crops per second of full base-stage steps (analysis, prior, entropy models, synthesis,
    backward, Adam) for variations of the pu320 recipe, on random data so that only compute
    is timed: median of `steps` after one warm-up step."""
    import torch

    from .network import HyperpriorNetwork
    from .transforms import native_bf16

    base = CONFIGS["pu320"]
    torch.set_num_threads(base.threads)
    rows = []
    for option in options:
        config = replace(base, **option)
        torch.manual_seed(0)
        model = HyperpriorNetwork(network_config(config)).to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        autocast = config.autocast and native_bf16()
        lambdas = torch.full((config.batch,), config.lambdas[-1])
        times = []
        for _ in range(steps + 1):
            x = torch.rand(config.batch, 3, config.patch, config.patch).contiguous(
                memory_format=torch.channels_last)
            start = time.perf_counter()
            x_hat, y_lik, z_lik = model.forward_base(x, autocast=autocast)
            loss, _, _ = rd_loss(x, x_hat, y_lik, z_lik, lambdas)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times[1:]))
        row = {"option": option or "pu320", "numerics": "bf16" if autocast else "float32",
               "s_per_step": round(seconds, 3), "crops_per_s": round(config.batch / seconds, 1)}
        rows.append(row)
        print(json.dumps(row), file=log, flush=True)
    return rows


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="pcodec train", description="Train a pcodec model.")
    parser.add_argument("--config", default="gdn320", choices=sorted(CONFIGS))
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
    parser.add_argument("--reference", type=Path, default=None,
                        help="with --export and --kodak: a `pcodec bench` result holding layered "
                             "JPEG 2000 on the same images, for the BD-rate and its campaign plot")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this many minutes with a checkpoint (a chunk of a run)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="where to train (default: the config's, cpu)")
    parser.add_argument("--weights-out", type=Path, default=None,
                        help="then write the run's weights (no optimizer state) here, to "
                             "resume elsewhere with --init")
    parser.add_argument("--post-filter", metavar="WEIGHTS", type=Path, default=None,
                        help="train a post-filter (postfilter.py) for these weights, frozen; "
                             "then --export writes them with it")
    parser.add_argument("--measure", action="store_true",
                        help="time training steps for the config variations and exit")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:  # 0 would have meant the default count
        parser.error(f"--steps {args.steps}: expected a step count of at least 1")
    config = CONFIGS[args.config]
    run_dir = args.run_dir or Path.home() / ".cache" / "pcodec" / "runs" / config.name
    if args.measure:
        measure_throughput()
        return
    if args.export:
        entry = export_model(run_dir, args.export, args.kodak, "pcodec train --config "
                             f"{config.name} --data {args.data} --kodak {args.kodak}",
                             note=args.note, gain_data=args.data, reference=args.reference)
        print(json.dumps(entry.get("kodak", {})), file=sys.stderr)
        return
    for item in args.set:
        key, _, value = item.partition("=")
        if not hasattr(config, key) or not value:
            parser.error(f"--set {item}: expected FIELD=VALUE with a field of TrainConfig")
        try:
            config = replace(config, **{key: parse_setting(getattr(config, key), value)})
        except ValueError as error:
            parser.error(f"--set {item}: {error}")
    if args.device:
        config = replace(config, device=args.device)
    if args.post_filter:
        from .postfilter import STEPS, train_post_filter

        train_post_filter(args.post_filter, args.data, run_dir, args.steps or STEPS,
                          threads=config.threads, minutes=args.minutes,
                          coarse=config.post_coarse, crops=config.post_crops,
                          per_crop=config.post_crop_layers or None,
                          synthesis_lr=config.post_synthesis_lr, lr=config.post_lr,
                          synthesis_float32=config.post_synthesis_float32)
        return
    train(config, args.data, run_dir, args.steps or config.steps, args.init, args.kodak,
          minutes=args.minutes)
    if args.weights_out:
        export_checkpoint(run_dir / "checkpoint.pt", args.weights_out)


if __name__ == "__main__":
    main()
