"""Weights out of a training run: without optimizer state, large kernels in float16, with
the integer entropy tables and coding-order offsets the codec needs, a manifest entry that
records how they were made and what they reach on Kodak, and the learning-curve plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .recipes import TrainConfig, config_from_dict, network_config


def save_atomic(obj, path: Path):
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# What a weights file keeps of a run's state: enough to resume its schedule (--init) and to
# say what it cost. gpu_seconds is the part of seconds spent on a GPU; host_seconds splits
# seconds by machine (a campaign moves between hosts whose throughput differs 2x).
STATE_KEYS = ("step", "seconds", "gpu_seconds", "images", "history", "host_seconds")
# Where the quality layers of new weights' streams end (format 3), bits per pixel: 1.5x
# apart from 0.15, the rest of the stream one more layer. Fixed rates, as JPEG 2000's layers
# have: layers formed by the quantization steps end at rates that vary fourfold between
# Kodak images (0.09-0.37 bpp at layer 1), and a layer averaged over images at varied rates
# lies below the images' own curves (docs/gdn320.md, 2026-12-07).
LAYER_BPP = (0.15, 0.225, 0.34, 0.5, 0.76, 1.14, 1.7)


def export_weights(model, config: TrainConfig, state: dict, path: Path,
                   gain_data: Path | None = None, filter_record: dict | None = None):
    """Weights without optimizer state, plus what is needed to know how they were made
    (`filter_record`: how the post-filter they carry was trained). With `gain_data` (a
    folder of photos), also the coding order's per-channel offsets and the σ offsets each
    layer codes with and the spreads it reconstructs with (calibration.py)."""
    import torch

    from .models import hyper_latent_table, load_weights_file

    state_dict = {k: compact(v.detach().float().cpu().contiguous())
                  for k, v in model.state_dict().items()}
    z_table = torch.from_numpy(hyper_latent_table(model.entropy_bottleneck))
    saved = {"model": state_dict, "z_table": z_table, "config": asdict(config),
             "state": json.loads(json.dumps(
                 {k: state[k] for k in STATE_KEYS if k in state},
                 default=float)),
             "reconstruction_spreads": model.reconstruction_spreads.clone(),
             "layer_bpp": list(LAYER_BPP),
             **({"post_filter": filter_record} if filter_record else {})}
    save_atomic(saved, path)
    if gain_data is not None:  # measured through the inference transforms the codec runs
        from dataclasses import replace

        from .calibration import (
            CALIBRATION_CROPS,
            fit_defer_keys,
            fit_reconstruction_spreads,
            fit_scale_offsets,
        )
        from .channel_gain import channel_gains, order_offsets, training_crops

        loaded = load_weights_file(path)
        gains = channel_gains(loaded, training_crops(gain_data))
        # Each fit on the codec as the fits before it left it: the keys depend on the
        # channels' offsets and the coding σ, which elements a layer refines on the keys.
        loaded = replace(loaded, order_offsets=order_offsets(gains))
        crops = training_crops(gain_data, *CALIBRATION_CROPS)
        loaded = replace(loaded, scale_offsets=fit_scale_offsets(loaded, crops))
        loaded = replace(loaded, defer_keys=fit_defer_keys(loaded, crops))
        for name in ("order_offsets", "scale_offsets", "defer_keys"):
            saved[name] = torch.from_numpy(getattr(loaded, name))
        saved["reconstruction_spreads"] = torch.from_numpy(fit_reconstruction_spreads(loaded, crops))
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
    model.restore_spreads(checkpoint)
    export_weights(model, config, checkpoint["state"], path, gain_data,
                   checkpoint.get("post_filter"))


REFERENCE_CODEC = "JPEG 2000 (OpenJPEG, layered)"


def export_model(run_dir: Path, model_id: str, kodak: Path | None, command: str,
                 models_folder: Path | None = None, note: str | None = None,
                 gain_data: Path | None = None, reference: Path | None = None):
    """Weights without optimizer state → models/ID.pt (with the coding order's channel
    offsets measured on photos in `gain_data`), Kodak figures from real streams, the
    manifest entry and the learning-curve plot. With `reference` (a `pcodec bench` result
    on the same images holding layered JPEG 2000), also the BD-rate against it, added to the
    entry's campaign (the points of earlier exports under this id) and plotted against
    CPU-hours."""
    import datetime
    import hashlib

    from .evaluate import evaluate_weights
    from .models import models_dir

    folder = models_folder or models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / f"{model_id}.pt"
    filter_run = (run_dir / "post-checkpoint.pt").exists()  # a post-filter for frozen weights
    if filter_run:
        from .postfilter import export_post_filter

        export_post_filter(run_dir, weights_path)
    else:
        export_checkpoint(run_dir / "checkpoint.pt", weights_path, gain_data)
    import torch

    saved = torch.load(weights_path, weights_only=True)
    state, config = saved["state"], saved["config"]
    # This run's filter, or the one a fine-tune of filtered weights kept.
    post_filter = saved.get("post_filter")
    post_hours = 0.0
    if post_filter is not None:
        from .postfilter import training_hours

        post_hours = training_hours(post_filter)
    history = state["history"]
    recent = [r["images_per_s"] for r in history[-20:]]
    entry = {
        "file": weights_path.name,
        "sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "bytes": weights_path.stat().st_size,
        "architecture": f"mean-scale hyperprior, {config.get('design', 'gdn5')} transforms "
                        f"N={config['N']} M={config['M']}, "
                        f"{len(config['lambdas'])}-layer learned nested quantizer"
                        + ("" if post_filter is None else
                           f", post-filter told the layer (width {post_filter['width']}"
                           + (f", quarter-resolution branch {post_filter['coarse']}"
                              if post_filter.get("coarse") else "") + ")"),
        "config": config,
        "training": {
            "data": "../shared/data/train (638 natural photos, see its SOURCES.md)",
            "steps": state["step"], "images_seen": state["images"],
            "cpu_hours": round((state["seconds"] - state.get("gpu_seconds", 0)) / 3600
                               + post_hours, 3),
            "gpu_minutes": round(state.get("gpu_seconds", 0) / 60, 1),
            "lambda_ladder": list(config["lambdas"]),
            "throughput_images_per_s": round(float(np.median(recent)), 2) if recent else None,
            "machine": machine_name(),
            "hours_by_machine": hours_by_machine(state),
            "stage": config.get("stage", "ladder"),
            "numerics": history[-1].get("numerics") if history else None,
            "command": command,
        },
    }
    if note:
        entry["training"]["note"] = note
    if post_filter is not None:
        entry["training"]["post_filter"] = post_filter
        hours, link = entry["training"]["hours_by_machine"], post_filter
        while link is not None:  # this filter and those it went on from, each on its host
            spent = link["hours"] + link["decoding_hours"]
            hours[link["host"]] = round(hours.get(link["host"], 0) + spent, 3)
            link = link.get("continues")
    if gain_data is not None:
        entry["coding_order"] = ("keys weighted by each channel's synthesis gain "
                                 f"(channel_gain.py), measured on photos of {gain_data}")
    if kodak is not None:
        entry["kodak"] = {**evaluate_weights(weights_path, kodak, with_midpoint=True),
                          "measured": datetime.date.today().isoformat(),
                          "how": "real .pcb files, every layer, RGB PSNR, bpp of whole files"}
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    if kodak is not None and reference is not None:
        from .bench import bd_rate

        curve = json.loads(Path(reference).read_text())["curves"][REFERENCE_CODEC]
        bd = bd_rate(curve["bpp"], curve["psnr"], entry["kodak"]["bpp"], entry["kodak"]["psnr"])
        entry["kodak"]["bd_rate_vs_j2k_layered_percent"] = None if bd is None else round(bd, 2)
        campaign = manifest["models"].get(model_id, {}).get("campaign", [])
        stage = "post-filter" if filter_run else entry["training"]["stage"]
        campaign = [p for p in campaign if (p["stage"], p["step"]) != (stage, state["step"])] + [{
            "step": state["step"], "cpu_hours": entry["training"]["cpu_hours"],
            "gpu_minutes": entry["training"]["gpu_minutes"],
            "stage": stage,
            "bd_rate_vs_j2k_layered_percent": entry["kodak"]["bd_rate_vs_j2k_layered_percent"],
            "finest_bpp_psnr": [entry["kodak"]["bpp"][-1], entry["kodak"]["psnr"][-1]],
            "measured": entry["kodak"]["measured"]}]
        entry["campaign"] = campaign
        plot_campaign(campaign, model_id, folder / f"{model_id}-campaign.png",
                      shipped_campaign(model_id))
    evals_path = run_dir / "eval.log"
    evals = [json.loads(line) for line in evals_path.read_text().splitlines()] \
        if evals_path.exists() else []
    entry["training"]["kodak_evaluations"] = evals
    manifest["models"][model_id] = entry
    manifest["default"] = model_id
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    plot_learning_curve(history, evals, folder / f"{model_id}-learning-curve.png")
    return entry


def machine_name() -> str:
    """The processor's model name (Linux), which says whether bf16 was native, and its cores."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def hours_by_machine(state: dict) -> dict:
    """Training hours per machine; hours from before machines were recorded, apart."""
    hosts = state.get("host_seconds", {})
    hours = {name: round(seconds / 3600, 3) for name, seconds in hosts.items()}
    earlier = state["seconds"] - sum(hosts.values())
    if earlier > 1:
        hours["not recorded"] = round(earlier / 3600, 3)
    return hours


def shipped_campaign(model_id: str) -> tuple[str, list[dict]] | None:
    """The shipped default model's campaign (the shipped models' manifest, whatever folder
    PCODEC_MODELS names: a candidates' folder's default is not shipped), to draw beside
    another model's: whether a new design buys more per CPU-hour is what a campaign asks."""
    from .models import shipped_models_dir

    try:
        manifest = json.loads((shipped_models_dir() / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    default = manifest.get("default")
    points = manifest.get("models", {}).get(default, {}).get("campaign")
    if default and default != model_id and points:
        return default, points
    return None


def plot_campaign(campaign: list[dict], model_id: str, path: Path,
                  shipped: tuple[str, list[dict]] | None = None):
    """BD-rate against layered JPEG 2000 (all Kodak images, real files) per CPU-hour, beside
    the shipped model's campaign when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((p for p in campaign if p["bd_rate_vs_j2k_layered_percent"] is not None),
                    key=lambda p: p["cpu_hours"])
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p["cpu_hours"] for p in points],
              [p["bd_rate_vs_j2k_layered_percent"] for p in points], marker="o", label=model_id)
    for p in points:
        gpu = f", +{p['gpu_minutes']:.0f} GPU min" if p["gpu_minutes"] else ""
        axes.annotate(f"{p['step']:,} ({p['stage']}{gpu})",
                      (p["cpu_hours"], p["bd_rate_vs_j2k_layered_percent"]),
                      fontsize=7, textcoords="offset points", xytext=(4, 4))
    if shipped:
        name, others = shipped
        others = sorted(others, key=lambda p: p["cpu_hours"])
        axes.plot([p["cpu_hours"] for p in others],
                  [p["bd_rate_vs_j2k_layered_percent"] for p in others], marker=".",
                  color="gray", lw=0.8, label=f"{name}'s campaign (shipped)")
    axes.axhline(-10, color="C2", ls="--", lw=0.8, label="goal: −10 %")
    axes.axhline(0, color="gray", lw=0.8)
    axes.set_xlabel("CPU hours (2 cores)")
    axes.set_ylabel("BD-rate vs layered JPEG 2000 (%)")
    axes.set_title(model_id, fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
