"""Training recipes: each config a documented set of choices (transforms, stage, λ ladder,
schedule), the two stages a pu model goes through, the learning-rate schedule and how a
step's crops are dealt to the layers. train.py runs them; export.py writes their weights.

Stage "base" trains one rate, the finest λ (DeepHQ trains its base first); stage "ladder"
trains every layer of the nested quantizer from those weights (`--init`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

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
    # ladder's λ·MSE gave the finest two layers 75 % of the gradient. "analysis": g_a and h_a
    # alone, for the decoder as it is (its integer steps and spreads), on the ladder's rows
    # (layers_per_crop) with the loss the mean of each row's log(λ·255²·MSE + bpp).
    # "transforms": the same rows and loss for every weight but the steps (g_a, h_a, g_s, h_s
    # and the hyper-latent's model).
    train_only: str = ""
    # Width of a post-filter after g_s, told the layer (postfilter.PostFilter), trained with
    # the synthesis ("synthesis", "transforms") from --init weights that carry one; 0: none.
    post_filter: int = 0
    # Channels of the filter's quarter-resolution branch (0: none). With `pcodec train
    # --post-filter WEIGHTS` whose weights carry a filter, the branch is added to it.
    post_coarse: int = 0
    # Training crops whose decoded rows `pcodec train --post-filter` learns from, collected
    # in sets of 1,024 (postfilter.rows_sets).
    post_crops: int = 1024
    # Decoded layers kept of each training crop beyond the first set (0: every layer): at
    # half the layers, the same memory holds twice the crops.
    post_crop_layers: int = 0
    # Peak rate of the synthesis g_s trained with the post-filter, on the latents the decoder
    # reconstructs (postfilter.train_post_filter; 0: the filter alone, the codec frozen).
    post_synthesis_lr: float = 0.0
    # The synthesis trained with the filter in float32 even where bf16 is native (the
    # decoder runs it in float32; bf16 alone costs its finest layer ~0.04 dB).
    post_synthesis_float32: bool = False
    # Peak rate of the post-filter (0: postfilter.LR, or WARM_LR for a filter that goes on).
    post_lr: float = 0.0
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
    # EPYC without AVX-512 (2026-12-02) a step of 4 × 256² took 23.7 s with it, 2.95 s without.
    autocast: bool = True
    channels_last: bool = True
    threads: int = 2
    # "cuda": the transforms, entropy models and optimizer on a GPU (bf16 autocast where it has
    # it); data, checkpoints, evaluation and export stay on the CPU.
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 2000
    eval_images: int = 24
    notes: dict = field(default_factory=dict)


# The gdn5 models' ladder since -r5 (ratio 2.6 per layer): its finest λ, twice CompressAI's
# top quality, is meant for the ≥ 40 dB goal, which needs an M = 320 latent.
PU_LADDER = (0.00045, 0.00117, 0.00304, 0.00791, 0.02056, 0.05346, 0.139, 0.3614)


CONFIGS = {
    "hp128": TrainConfig(),
    # Pixel-unshuffle/residual transforms, M = 320: the base stage (then pu320-ladder). At 3e-4
    # the base diverged at step ~4,750 (a gradient spike, before spikes were skipped): 2e-4.
    "pu320": TrainConfig(name="pu320", M=320, design="pu", blocks=(1, 2, 2), patch=256, batch=8,
                         stage="base", lambdas=PU_LADDER, steps=40000, lr=2e-4, lr_final=1e-5,
                         decay_start=34000, decay_steps=6000, ema_decay=0.999,
                         checkpoint_every=100, eval_every=3000, eval_images=6),
    # The ladder stage from pu320's weights (--init; a new stage counts its steps from 0):
    # each crop at the finest layer and one other, the steps learning at 10x the base rate
    # from the unit grid up (ratio 1.65).
    "pu320-ladder": TrainConfig(name="pu320-ladder", M=320, design="pu", blocks=(1, 2, 2),
                                patch=256, batch=4, stage="ladder", layers_per_crop=2,
                                keep_finest=True, lambdas=PU_LADDER, steps=16000, lr=1e-4,
                                lr_final=1e-5, decay_start=14000, decay_steps=2000,
                                ema_decay=0.999, checkpoint_every=100, eval_every=2000,
                                eval_images=6),
    # gdn5 transforms at M = 320 (CompressAI's width for high rates), the whole ladder from
    # scratch in one stage, 128² crops at 5e-4: on an AMD EPYC with avx512_bf16 (bf16
    # transforms, 38-40 crops/s) it reached +202 % against layered JPEG 2000 in one
    # CPU-hour and +122 % in 2.2, where pux320's two stages had needed 5.8 for +207 %
    # (docs/gdn320.md). This schedule is that run's first two stages: 5e-4 to 16,275 steps,
    # then one cosine; the second cosine (to +99.5 % in 4.5) is a resume with --set, as
    # docs/gdn320.md and the manifest record.
    "gdn320": TrainConfig(name="gdn320", M=320, lambdas=PU_LADDER, steps=37000,
                          decay_start=16275, decay_steps=20725, eval_every=8000),
    # Tiny config for tests and smoke runs.
    "tiny": TrainConfig(name="tiny", N=16, M=24, patch=64, batch=2, checkpoint_every=5,
                        eval_every=10**9),
}
# The same two stages with AuxT-style wavelet shortcuts beside each stage of the transforms
# (design "pux"), the pilot's choice (docs/pu320.md).
CONFIGS["pux320"] = replace(CONFIGS["pu320"], name="pux320", design="pux")
CONFIGS["pux320-ladder"] = replace(CONFIGS["pu320-ladder"], name="pux320-ladder", design="pux")


def network_config(config: TrainConfig):
    from .network import NetworkConfig

    layers = len(config.lambdas)
    if config.design == "gdn5":
        return NetworkConfig(N=config.N, M=config.M, layers=layers,
                             post_filter=config.post_filter,
                             post_coarse=config.post_coarse)
    # The base stage quantizes y − μ on the unit grid: that is the finest layer's step.
    return NetworkConfig(N=config.N, M=config.M, layers=layers, design=config.design,
                         blocks=tuple(config.blocks), post_filter=config.post_filter,
                         post_coarse=config.post_coarse,
                         finest_step=1.0,
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
    to it geometrically over REWARM_STEPS. 2026-12-02: resumed a run decayed to 8e-6 at 1e-4
    directly: non-finite batches 93 steps later and a loss of 5.5 (3.4 before)."""
    if resumed_rate is None or rate <= resumed_rate or steps_since_resume >= REWARM_STEPS:
        return rate
    return resumed_rate * (rate / resumed_rate) ** (steps_since_resume / REWARM_STEPS)


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


def parse_setting(current, value: str):
    """A --set value in the type of the field it replaces (a tuple: comma-separated)."""
    if isinstance(current, bool):
        return value.lower() in {"1", "true", "yes"}
    if isinstance(current, tuple):
        kind = type(current[0]) if current else float
        return tuple(kind(item) for item in value.split(","))
    return type(current)(value)
