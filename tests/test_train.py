import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, image_folder, synthetic_image

from pcodec import engine, export, quant, recipes, train
from pcodec.errors import RuntimeIOError, UsageError
from pcodec.evaluate import psnr
from pcodec.models import load_weights_file


@pytest.fixture()
def photos(tmp_path):
    return image_folder(tmp_path / "photos", 3, 80, 96)


def test_learning_rate_warms_up_holds_then_decays_to_its_floor():
    config = recipes.CONFIGS["hp128"]
    rates = [recipes.learning_rate(config, s) for s in range(0, config.steps + 1, 100)]
    assert rates[0] < rates[1] < rates[2] == config.lr
    assert recipes.learning_rate(config, config.decay_start) == pytest.approx(config.lr)
    decay = rates[config.decay_start // 100:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert rates[-1] == pytest.approx(config.lr_final)


def test_set_overrides_parse_into_the_field_types():
    config = recipes.CONFIGS["hp128"]
    assert recipes.parse_setting(config.lambdas, "0.0005,0.0013,0.0067") == (0.0005, 0.0013, 0.0067)
    assert recipes.parse_setting(config.lr, "3e-5") == 3e-5
    assert recipes.parse_setting(config.steps, "100") == 100
    assert recipes.parse_setting(config.autocast, "true") is True
    assert recipes.parse_setting(config.autocast, "0") is False
    assert recipes.parse_setting(config.blocks, "1,2,2") == (1, 2, 2)


@pytest.mark.parametrize("setting", ["log_every=3", "lr=abc", "lr"])
def test_a_bad_set_is_a_usage_error(setting, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--config", "tiny", "--set", setting])
    assert stopped.value.code == 2
    assert f"--set {setting}" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_a_step_count_below_one_is_a_usage_error(steps, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--config", "tiny", "--steps", steps])
    assert stopped.value.code == 2 and f"--steps {steps}" in capsys.readouterr().err


def test_training_resumes_from_its_checkpoint_and_exports_usable_weights(photos, tmp_path):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    run = tmp_path / "run"
    train.train(config, photos, run, 2, None, None)
    first = json.loads((run / "train.log").read_text().splitlines()[-1])
    assert first["step"] == 2

    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        _, state = train.train(config, photos, run, 4, None, None, log=stream)
    assert "resumed" in log.read_text() and state["step"] == 4
    assert [r["step"] for r in state["history"]] == [2, 4]

    models = tmp_path / "models"
    entry = export.export_model(run, "tiny-run", None, "test", models_folder=models,
                               gain_data=photos)
    assert entry["training"]["steps"] == 4
    # every training second was spent here, and the manifest says where
    assert entry["training"]["hours_by_machine"] == {
        export.machine_name(): entry["training"]["cpu_hours"]}
    assert json.loads((models / "manifest.json").read_text())["default"] == "tiny-run"
    weights = load_weights_file(models / "tiny-run.pt")
    assert weights.order_offsets.shape == weights.unit.shape
    assert weights.order_offsets.dtype == np.int64 and np.median(weights.order_offsets) == 0
    assert weights.scale_offsets.shape == (weights.layers, len(weights.unit))
    assert np.isin(weights.reconstruction_spreads, quant.RECONSTRUCTION_SPREADS).all()
    assert weights.reconstruction_spreads.shape == (weights.layers,)
    assert weights.defer_keys.shape == (weights.layers,) and weights.defer_keys.dtype == np.int64
    image = synthetic_image(40, 56, 5)
    decoded = engine.decode(weights, engine.encode(weights, image))
    assert decoded.shape == image.shape and np.isfinite(psnr(image, decoded))
    for key, damage, message in (
            ("scale_offsets", lambda v: v[:, :3], "scale offsets of shape"),
            ("reconstruction_spreads", lambda v: v + 100, "reconstruction spreads .* out of range"),
            ("defer_keys", lambda v: v[:3], "deferral thresholds of shape")):
        saved = torch.load(models / "tiny-run.pt", weights_only=False)
        saved[key] = damage(saved[key])  # a damaged file: a clear error
        torch.save(saved, tmp_path / "damaged.pt")
        with pytest.raises(RuntimeIOError, match=f"damaged.pt: {message}"):
            load_weights_file(tmp_path / "damaged.pt")


def test_a_resumed_run_climbs_back_to_a_higher_rate_gradually(photos, tmp_path):
    assert recipes.rewarmed(1e-4, None, 0) == 1e-4  # a fresh run: the schedule as it is
    assert recipes.rewarmed(1e-5, 1e-4, 0) == 1e-5  # lower than before: at once
    climb = [recipes.rewarmed(1e-4, 1e-6, s) for s in range(0, recipes.REWARM_STEPS + 1, 100)]
    assert climb[0] == pytest.approx(1e-6) and climb[-1] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(climb, climb[1:]))
    assert climb[5] == pytest.approx(1e-5)  # geometric: halfway in steps, halfway in log

    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, lr=1e-6,
                     decay_start=10**6)
    run = tmp_path / "run"
    train.train(config, photos, run, 202, None, None)  # past the 200-step start-up warm-up
    _, state = train.train(replace(config, lr=1e-3), photos, run, 206, None, None)
    rates = [record["lr"] for record in state["history"][-2:]]
    assert 1e-6 < rates[0] < rates[1] < 1e-5  # steps 204 and 206, not 1e-3 at once


def test_non_finite_batches_are_skipped_and_a_diverged_run_stops(photos, tmp_path, monkeypatch):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    real_loss = train.rd_loss
    calls = {"n": 0}

    def bad_first_batches(*args, **kwargs):
        loss, bpp, mse = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # a finite loss whose gradient is NaN (d√x/dx at 0 is infinite)
            loss = loss + 0.0 * torch.sqrt(0.0 * loss)
            assert torch.isfinite(loss)
        if calls["n"] == 2:
            loss = loss * float("nan")
        return loss, bpp, mse

    monkeypatch.setattr(train, "rd_loss", bad_first_batches)
    model, state = train.train(config, photos, tmp_path / "run", 2, None, None)
    assert state["step"] == 2 and state["skipped"] == 2
    assert all(bool(p.isfinite().all()) for p in model.parameters())

    def always_nan(*args, **kwargs):
        loss, bpp, mse = real_loss(*args, **kwargs)
        return loss * float("nan"), bpp, mse

    monkeypatch.setattr(train, "rd_loss", always_nan)
    log = io.StringIO()
    with pytest.raises(SystemExit, match="diverged"):
        train.train(config, photos, tmp_path / "run", 4, None, None, log)
    assert log.getvalue().count("back to the checkpoint at step 2") == train.MAX_ROLLBACKS


@pytest.mark.parametrize("native", [True, False])
def test_training_autocasts_to_bf16_only_where_the_cpu_has_it(photos, tmp_path, monkeypatch,
                                                               native):
    from pcodec import network, transforms

    seen = []
    real_forward = network.HyperpriorNetwork.forward

    def recording_forward(self, x, layer_of, autocast=True, steps=None):
        seen.append(autocast)
        return real_forward(self, x, layer_of, autocast, steps)

    monkeypatch.setattr(transforms, "native_bf16", lambda: native)
    monkeypatch.setattr(network.HyperpriorNetwork, "forward", recording_forward)
    log = io.StringIO()
    train.train(replace(recipes.CONFIGS["tiny"], threads=1), photos, tmp_path / "run", 2, None,
                None, log)
    assert seen == [native, native]
    assert ("no native bf16" in log.getvalue()) == (not native)


def test_a_run_that_diverges_goes_back_to_its_checkpoint_and_on(photos, tmp_path, monkeypatch):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    run = tmp_path / "run"
    train.train(config, photos, run, 2, None, None)
    real_loss = train.rd_loss
    calls = {"n": 0}

    def nan_after_one_step(*args, **kwargs):  # step 3 goes, then 20 NaN batches, then all is well
        loss, bpp, mse = real_loss(*args, **kwargs)
        calls["n"] += 1
        if 2 <= calls["n"] < 2 + train.MAX_SKIPS_IN_A_ROW:
            loss = loss * float("nan")
        return loss, bpp, mse

    monkeypatch.setattr(train, "rd_loss", nan_after_one_step)
    log = io.StringIO()
    model, state = train.train(config, photos, run, 4, None, None, log)
    assert "at step 3: back to the checkpoint at step 2" in log.getvalue()
    assert state["step"] == 4 and state["rollbacks"] == 1
    assert state["skipped"] == train.MAX_SKIPS_IN_A_ROW
    assert calls["n"] == 1 + train.MAX_SKIPS_IN_A_ROW + 2  # steps 3 and 4 done again
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    # the rate that diverged is not tried again: steps 3 and 4 ran at half of it
    assert state["rate_factor"] == train.ROLLBACK_RATE_FACTOR
    rates = {record["step"]: record["lr"] for record in state["history"]}
    expected = recipes.rewarmed(recipes.learning_rate(config, 3), rates[2], 1)
    assert rates[4] == pytest.approx(train.ROLLBACK_RATE_FACTOR * expected)
    # a later resume climbs from the rate the run last used, not from that rate halved again
    _, state = train.train(config, photos, run, 5, None, None)
    rates = {record["step"]: record["lr"] for record in state["history"]}
    assert rates[5] == pytest.approx(rates[4])


def test_a_climbing_loss_rolls_back_before_it_is_saved(photos, tmp_path, monkeypatch):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    run = tmp_path / "run"
    records = train.LOSS_CLIMB_RECORDS
    # the tiny model's two-crop windows swing by 5x: only a climb of 10⁶ bpp counts here
    monkeypatch.setattr(train, "LOSS_CLIMB_MIN_CROPS", 0)
    monkeypatch.setattr(train, "LOSS_CLIMB_FACTOR", 100.0)
    train.train(config, photos, run, 2 * records, None, None)
    real_loss = train.rd_loss
    calls = {"n": 0}

    def climbing_rate(*args, **kwargs):  # the next window's two steps report 10⁶ bpp more
        loss, bpp, mse = real_loss(*args, **kwargs)
        calls["n"] += 1
        return loss, bpp + (1e6 if calls["n"] <= 2 else 0.0), mse

    monkeypatch.setattr(train, "rd_loss", climbing_rate)
    log = io.StringIO()
    _, state = train.train(config, photos, run, 2 * records + 2, None, None, log)
    assert f"back to the checkpoint at step {2 * records}" in log.getvalue()
    assert state["rollbacks"] == 1 and state["rate_factor"] == train.ROLLBACK_RATE_FACTOR
    assert max(record["loss"] for record in state["history"]) < 1e5  # never recorded
    assert calls["n"] == 4


def test_a_moving_average_of_the_weights_resumes_and_is_what_gets_exported(photos, tmp_path):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, ema_decay=0.5)
    run = tmp_path / "run"
    train.train(config, photos, run, 2, None, None)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["ema"]["n_averaged"] == 2
    model, _ = train.train(config, photos, run, 4, None, None)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["ema"]["n_averaged"] == 4  # carried over the resume, not restarted

    export.export_checkpoint(run / "checkpoint.pt", tmp_path / "w.pt")
    exported = torch.load(tmp_path / "w.pt", weights_only=False)["model"]
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items()}
    name = "g_s.0.weight"
    assert torch.equal(exported[name], averaged[name].float())
    assert not torch.equal(exported[name], checkpoint["model"][name].float())
    weights = load_weights_file(tmp_path / "w.pt")
    image = synthetic_image(40, 56, 5)
    assert engine.decode(weights, engine.encode(weights, image)).shape == image.shape


def test_training_sees_the_coders_scale_range():
    from pcodec import quant
    from pcodec.network import SCALE_MAX, SCALE_MIN, HyperpriorNetwork, NetworkConfig

    # The coder snaps σ into its table; training must never use a σ the coder cannot.
    assert np.isclose(quant.SCALES[0], SCALE_MIN) and np.isclose(quant.SCALES[-1], SCALE_MAX)
    model = HyperpriorNetwork(NetworkConfig(N=16, M=24, layers=3))
    with torch.no_grad():
        model.h_s[-1].bias.fill_(1e4)  # every σ (and μ) far above the table
        _, scales = model.prior(torch.zeros(1, 16, 2, 2))
    assert float(scales.max()) == SCALE_MAX


def test_the_scale_table_follows_the_latent_and_travels_with_the_weights(tmp_path):
    from pcodec import quant
    from pcodec.network import SCALE_MAX, HyperpriorNetwork, NetworkConfig

    config = recipes.CONFIGS["tiny"]
    model = HyperpriorNetwork(NetworkConfig(N=16, M=24, layers=3))
    with torch.no_grad():
        model.log_steps[-1].fill_(np.log(56.0))  # a latent grown 7x past the base table's
        model.h_s[-1].bias.fill_(1e4)
    train.follow_latent_scale(model, config)
    assert int(model.scale_shift) == 3
    with torch.no_grad():
        _, scales = model.prior(torch.zeros(1, 16, 2, 2))
    assert float(scales.max()) == SCALE_MAX * 8  # training clamps where the coder's table ends
    train.follow_latent_scale(model, replace(config, train_only="synthesis"))
    assert int(model.scale_shift) == 3  # a synthesis-only run never moves it: bytes stay
    export.export_weights(model, config, {"step": 0}, tmp_path / "w.pt")
    weights = load_weights_file(tmp_path / "w.pt")
    assert weights.scale_shift == 3 and np.array_equal(weights.scales, quant.SCALES * 8)
    old = {k: v for k, v in model.state_dict().items() if k != "scale_shift"}
    HyperpriorNetwork(NetworkConfig(N=16, M=24, layers=3)).load_state_dict(old)  # weights before it


def test_an_anchored_finest_step_holds_the_scale_of_y(photos, tmp_path):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=3, threads=1, finest_step=2.5)
    model, _ = train.train(config, photos, tmp_path / "run", 3, None, None)
    log_steps = model.log_steps.detach()
    assert torch.isclose(log_steps[-1].mean(), torch.tensor(np.log(2.5), dtype=log_steps.dtype))
    free, _ = train.train(replace(config, finest_step=0.0), photos, tmp_path / "free", 3, None,
                          None)
    assert not torch.isclose(free.log_steps.detach()[-1].mean(), log_steps[-1].mean())


def test_rescaling_the_latent_leaves_the_codec_unchanged():
    from pcodec.network import HyperpriorNetwork, NetworkConfig

    torch.manual_seed(1)
    model = HyperpriorNetwork(NetworkConfig(N=16, M=24, layers=3)).eval()
    with torch.no_grad():
        model.h_s[-1].bias[:24] = 5.0  # σ ≈ 5 before and 2.5 after: clear of the clamps
    x, layer_of = torch.rand(2, 3, 64, 64), torch.tensor([1, 3])
    before = model(x, layer_of, autocast=False)
    model.rescale_latent(2.0)
    after = model(x, layer_of, autocast=False)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_large_kernels_are_stored_in_half_precision_and_code_as_before(photos, tmp_path,
                                                                      monkeypatch):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    train.train(config, photos, tmp_path / "run", 2, None, None)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    export.export_checkpoint(checkpoint, tmp_path / "full.pt")
    monkeypatch.setattr(export, "HALF_PRECISION_MIN_ELEMENTS", 2000)  # tiny kernels count too
    export.export_checkpoint(checkpoint, tmp_path / "half.pt")
    saved = torch.load(tmp_path / "half.pt", weights_only=True)["model"]
    assert saved["g_s.2.weight"].dtype == torch.float16  # 16 x 16 x 5 x 5
    assert saved["log_steps"].dtype == torch.float32 and saved["g_a.0.weight"].dtype == torch.float32
    image = synthetic_image(48, 64, 7)
    full, half = load_weights_file(tmp_path / "full.pt"), load_weights_file(tmp_path / "half.pt")
    stream = engine.encode(half, image)
    assert engine.encode(half, image) == stream  # deterministic from the stored values
    assert abs(psnr(image, engine.decode(half, stream))
               - psnr(image, engine.decode(full, engine.encode(full, image)))) < 0.1


def test_training_reconstructs_far_tail_intervals_as_the_decoder_does():
    from pcodec import quant
    from pcodec.network import conditional_mean

    # A confidently wrong prior: intervals hundreds of σ from the mean (seen in training).
    lower = torch.tensor([81.05, -290.9, 30.9, -3.0])
    upper = torch.tensor([100.35, -259.7, 52.6, 1.0])
    sigma = torch.tensor([0.0767, 0.1128, 0.04, 1.5], requires_grad=True)
    mean = conditional_mean(lower, upper, sigma)
    decoder = quant.reconstruct(lower.numpy(), upper.numpy(), sigma.detach().numpy(),
                                np.ones(4, bool))
    assert np.allclose(mean.detach().numpy(), decoder, rtol=0, atol=1e-3)
    mean.sum().backward()
    # the true value is ~0.002; float32 gave 2.8e6 for the third and the midpoint for two
    assert float(sigma.grad[:3].abs().max()) < 5


def fine_tune(photos, tmp_path, **settings):
    """Tiny weights trained 2 steps, then fine-tuned 2 more with `settings`: (the config
    and state of the fine-tune, the weights before and after, the names of changed tensors)."""
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, ema_decay=0)
    train.train(config, photos, tmp_path / "base", 2, None, None)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    export.export_checkpoint(tmp_path / "base" / "checkpoint.pt", base)
    tuning = replace(config, lr=1e-2, **settings)
    _, state = train.train(tuning, photos, tmp_path / "tuned", 4, base, None)
    assert state["step"] == 4
    export.export_checkpoint(tmp_path / "tuned" / "checkpoint.pt", tuned)
    before = torch.load(base, weights_only=True)["model"]
    after = torch.load(tuned, weights_only=True)["model"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    return tuning, state, base, tuned, changed


def test_synthesis_fine_tuning_changes_only_the_synthesis_and_keeps_every_byte(photos, tmp_path):
    tuning, state, base, tuned, changed = fine_tune(photos, tmp_path, train_only="synthesis",
                                                    synthesis_layers=3)
    assert state["history"][-1]["loss"] < 0  # log10 MSE of [0, 1] pixels
    assert [r.get("objective") for r in state["history"]] == [None, "synthesis"]
    assert changed and all(name.startswith("g_s.") for name in changed)
    image = synthetic_image(48, 64, 3)
    old, new = load_weights_file(base), load_weights_file(tuned)
    stream = engine.encode(old, image)
    # Same encoder and prior: the same sections, byte for byte (the header names the weights).
    tuned_stream = engine.encode(new, image)
    assert engine.read_stream(new, tuned_stream)[1] == engine.read_stream(old, stream)[1]
    assert psnr(image, engine.decode(new, tuned_stream)) != psnr(image, engine.decode(old, stream))

    with pytest.raises(SystemExit, match="give --init"):
        train.train(tuning, photos, tmp_path / "scratch", 2, None, None)
    with pytest.raises(SystemExit, match="finest_step"):
        train.train(replace(tuning, finest_step=7.0), photos, tmp_path / "held", 2, base, None)
    with pytest.raises(SystemExit, match="'synthesis' or 'analysis' or 'transforms'"):
        train.train(replace(tuning, train_only="prior"), photos, tmp_path / "other", 2, base, None)


def test_fine_tuning_weights_with_a_post_filter_trains_it_with_the_synthesis(photos, tmp_path):
    """Weights that carry a post-filter keep it through a fine-tune (its width read off
    them): train_only=synthesis trains g_s and the filter on the filtered images, every
    byte of every stream stays, and the export carries the tuned filter."""
    from test_inference import random_post_filter

    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, ema_decay=0)
    train.train(config, photos, tmp_path / "base", 2, None, None)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    export.export_checkpoint(tmp_path / "base" / "checkpoint.pt", base)
    weights = torch.load(base, weights_only=False)
    weights["model"].update(random_post_filter(len(config.lambdas)))
    torch.save(weights, base)
    tuning = replace(config, lr=1e-2, train_only="synthesis", synthesis_layers=2)
    train.train(tuning, photos, tmp_path / "tuned", 4, base, None)
    export.export_checkpoint(tmp_path / "tuned" / "checkpoint.pt", tuned)
    before = torch.load(base, weights_only=True)["model"]
    after = torch.load(tuned, weights_only=True)["model"]
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert all(name.startswith(("g_s.", "post.")) for name in changed)
    assert any(name.startswith("post.") for name in changed)
    assert any(name.startswith("g_s.") for name in changed)
    old, new = load_weights_file(base), load_weights_file(tuned)
    assert new.post_filter is not None
    image = synthetic_image(48, 64, 3)
    stream, tuned_stream = engine.encode(old, image), engine.encode(new, image)
    assert engine.read_stream(new, tuned_stream)[1] == engine.read_stream(old, stream)[1]
    assert not np.array_equal(engine.decode(new, tuned_stream), engine.decode(old, stream))


def test_analysis_fine_tuning_changes_only_the_encoder(photos, tmp_path):
    """train_only=analysis trains g_a and h_a alone: the tuned weights write other bytes, and
    the weights it started from decode those bytes to the same image (the decoder is theirs)."""
    tuning, _, base, tuned, changed = fine_tune(photos, tmp_path, train_only="analysis",
                                                layers_per_crop=2)
    assert any(name.startswith("g_a.") for name in changed)
    assert all(name.startswith(("g_a.", "h_a.")) for name in changed)
    image = synthetic_image(48, 64, 3)
    old, new = load_weights_file(base), load_weights_file(tuned)
    stream = engine.encode(new, image)
    header, payloads, partial = engine.read_stream(new, stream)
    assert payloads != engine.read_stream(old, engine.encode(old, image))[1]
    *_, (_, state) = engine.decode_latents(old, header, payloads, partial)
    by_old = engine._render(old, engine._reconstruct_latent(old, state, True), 48, 64)
    assert np.array_equal(by_old, engine.decode(new, stream))

    with pytest.raises(SystemExit, match="give --init"):
        train.train(tuning, photos, tmp_path / "scratch", 2, None, None)


def test_transforms_fine_tuning_keeps_the_step_ladder(photos, tmp_path):
    """train_only=transforms trains both sides and the prior, never the steps: the tuned
    weights code every layer with the integer steps of the weights it started from."""
    _, _, base, tuned, changed = fine_tune(photos, tmp_path, train_only="transforms",
                                           layers_per_crop=2)
    for part in ("g_a.", "h_a.", "g_s.", "h_s.", "entropy_bottleneck.quantiles"):
        assert any(name.startswith(part) for name in changed), part
    assert "log_steps" not in changed
    old, new = load_weights_file(base), load_weights_file(tuned)
    assert np.array_equal(old.unit, new.unit) and np.array_equal(old.int_steps, new.int_steps)
    image = synthetic_image(48, 64, 3)
    stream = engine.encode(new, image)
    assert stream != engine.encode(old, image)
    assert engine.decode(new, stream).shape == image.shape


def test_synthesis_fine_tuning_trains_on_the_decoders_own_latent(photos, tmp_path):
    """The latent the synthesis is fine-tuned on is the one the decoder reconstructs at each
    layer: the codec's integer steps and the spread each layer of the weights reconstructs
    with (here the midpoint, which the default 2σ conditional mean is far from)."""
    from pcodec.network import HyperpriorNetwork

    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, ema_decay=0)
    train.train(config, photos, tmp_path / "base", 2, None, None)
    weights = tmp_path / "base.pt"
    export.export_checkpoint(tmp_path / "base" / "checkpoint.pt", weights)
    saved = torch.load(weights, weights_only=False)
    for key in ("g_a.6.weight", "g_a.6.bias"):  # y over many cells: not all central, where
        saved["model"][key] = saved["model"][key] * 100  # every spread gives the midpoint
    layers = len(config.lambdas)
    saved["reconstruction_spreads"] = torch.full((layers,), len(quant.RECONSTRUCTION_SPREADS) - 1)
    torch.save(saved, weights)
    assert np.all(np.isinf(load_weights_file(weights).reconstruction_spreads))

    # What a fine-tune from these weights starts with (train.train(..., init_weights=weights)).
    net = HyperpriorNetwork(recipes.network_config(config))
    net.load_state_dict(saved["model"])
    net.restore_spreads(saved)
    image = synthetic_image(64, 64, 5)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    # float32, as the encoder's analysis, so that elements fall in the same intervals
    trained_on, _ = net.decoded_latents(x, torch.arange(1, layers + 1), autocast=False)

    model = load_weights_file(weights)
    header, payloads, partial = engine.read_stream(model, engine.encode(model, image))
    for layer, state in engine.decode_latents(model, header, payloads, partial):
        if layer == 0:
            continue
        decoded = engine._reconstruct_latent(model, state, conditional_mean=True)
        # Training's float intervals round to the coder's integer grid differently by up to
        # half a unit a layer, and a few elements near a boundary take another sub-interval:
        # ≥ 94 % within 2 units at every layer (with the default spread: 2-36 %).
        close = np.abs(trained_on[layer - 1].numpy() - decoded) <= 2 * model.unit[:, None, None]
        assert close.mean() > 0.9, (layer, close.mean())


def test_layers_per_crop_are_dealt_so_a_step_sees_the_whole_ladder():
    import random

    rng = random.Random(3)
    for _ in range(20):
        rows = recipes.draw_layers(rng, 8, 2, 4).tolist()  # row k·2 + b holds crop b
        assert sorted(rows) == list(range(1, 9))
        assert len(set(rows[0::2])) == 4 and len(set(rows[1::2])) == 4
    one_each = recipes.draw_layers(rng, 8, 4, 1)
    assert one_each.shape == (4,) and all(1 <= v <= 8 for v in one_each.tolist())
    with pytest.raises(SystemExit, match="divisor"):
        recipes.draw_layers(rng, 8, 2, 3)
    for _ in range(20):  # the finest beside one other, dealt from layers 1..7
        rows = recipes.draw_layers(rng, 8, 3, 2, keep_finest=True).tolist()
        assert rows[:3] == [8, 8, 8] and all(1 <= v <= 7 for v in rows[3:])


def test_a_pass_at_several_layers_per_crop_is_those_passes_one_by_one():
    from pcodec.network import HyperpriorNetwork, NetworkConfig

    torch.manual_seed(2)
    model = HyperpriorNetwork(NetworkConfig(N=16, M=24, layers=4)).eval()
    x = torch.rand(2, 3, 64, 64)
    layer_of = torch.tensor([1, 4, 3, 2])  # crop 0 at layers 1 and 3, crop 1 at 4 and 2
    together = model(x, layer_of, autocast=False)
    for row, layer in enumerate(layer_of.tolist()):
        crop = row % 2
        alone = model(x[crop:crop + 1], torch.tensor([layer]), autocast=False)
        for a, b in zip(together, alone):
            assert torch.allclose(a[row:row + 1], b, rtol=1e-4, atol=1e-6)


def test_training_at_every_layer_of_each_crop_logs_every_layer(photos, tmp_path):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1, layers_per_crop=8,
                     batch=1)
    _, state = train.train(config, photos, tmp_path / "run", 2, None, None)
    record = state["history"][-1]
    assert state["images"] == 2  # crops, not crop-layers
    assert all(np.isfinite(record["psnr"])) and all(b > 0 for b in record["bpp"])


@pytest.mark.parametrize("design", ["pu", "pux"])
def test_the_two_stages_of_the_pu_designs_train_and_code_real_streams(photos, tmp_path, design):
    """Base stage (single rate, the unit grid) then the ladder from its exported weights; each
    stage's loss falls and its weights code a stream whose quality rises with every layer."""
    base = replace(recipes.CONFIGS["tiny"], design=design, blocks=(1, 1, 2), stage="base",
                   checkpoint_every=10, threads=1, lr=1e-3)
    _, state = train.train(base, photos, tmp_path / "base", 30, None, None)
    losses = [r["loss"] for r in state["history"]]
    assert losses[-1] < losses[0]
    assert all(r["stage"] == "base" and r["bpp"][-1] > 0 and r["bpp"][0] == 0
               for r in state["history"])  # one reconstruction per crop, at the finest λ
    models = tmp_path / "models"
    export.export_model(tmp_path / "base", "tiny-base", None, "test", models_folder=models)
    weights = load_weights_file(models / "tiny-base.pt")
    assert weights.config["design"] == design and weights.margin >= 8

    ladder = replace(base, stage="ladder")
    log = io.StringIO()
    _, state = train.train(ladder, photos, tmp_path / "ladder", 60, models / "tiny-base.pt",
                           None, log=log)
    assert "started from weights" in log.getvalue()
    assert "stage" not in state["history"][-1]
    # A new stage runs its own schedule from step 0; the base's records stay in the history.
    assert state["step"] == 60 and any(r.get("stage") == "base" for r in state["history"])
    export.export_model(tmp_path / "ladder", "tiny-ladder", None, "test", models_folder=models)
    weights = load_weights_file(models / "tiny-ladder.pt")
    image = synthetic_image(48, 64, 4)
    header, payloads, partial = engine.read_stream(weights, engine.encode(weights, image))
    quality = [psnr(engine.synthesize(weights, latents, 48, 64), image)
               for _, latents in engine.decode_latents(weights, header, payloads, partial)]
    assert len(quality) == 9 and all(np.isfinite(quality))
    if design == "pu":  # 60 tiny steps: enough for pu's layers to differ, a coin toss for pux's
        assert quality[-1] > quality[1]


def inverse_haar(x):
    """The Haar analysis's transpose, as a transposed grouped convolution (a reference)."""
    from pcodec.transforms import _haar_filters

    channels = x.shape[1] // 4
    return torch.nn.functional.conv_transpose2d(x, _haar_filters(channels, x), stride=2,
                                                groups=channels)


def test_wavelet_shortcuts_are_orthonormal_where_they_start():
    from pcodec.network import HyperpriorNetwork, NetworkConfig
    from pcodec.transforms import WaveletShortcut, haar

    x = torch.randn(2, 5, 8, 12, dtype=torch.float64)
    assert torch.allclose(inverse_haar(haar(x)), x) and torch.allclose(
        (haar(x) ** 2).sum(), (x ** 2).sum())  # orthonormal: energy kept
    net = HyperpriorNetwork(NetworkConfig(N=16, M=24, design="pux", blocks=(1, 1, 1)))
    with torch.no_grad():
        for shortcut in (WaveletShortcut(3, 16, 2), WaveletShortcut(16, 3, 2, up=True),
                         WaveletShortcut(16, 16, 1)):
            assert float(shortcut.orthogonality_penalty()) < 1e-9
        assert float(net.shortcut_penalty()) < 1e-9
        net.g_a[1].aux.proj.weight.mul_(2)
        assert float(net.shortcut_penalty()) > 0.1
        plain = HyperpriorNetwork(NetworkConfig(N=16, M=24, design="pu"))
        assert float(plain.shortcut_penalty()) == 0


@pytest.mark.parametrize("cin, cout, levels, up", [(3, 16, 2, False), (16, 16, 1, False),
                                                  (16, 16, 1, True), (16, 3, 2, True)])
def test_a_wavelet_shortcut_is_its_haar_scale_and_projection_in_one(cin, cout, levels, up):
    from pcodec.transforms import WaveletShortcut, haar

    torch.manual_seed(levels)
    shortcut = WaveletShortcut(cin, cout, levels, up).double()
    with torch.no_grad():
        shortcut.scale.uniform_(0.5, 2.0)
    x = torch.randn(2, cin, 8 * 2 ** levels, 4 * 2 ** levels, dtype=torch.float64)
    if up:
        expected = shortcut.proj(x) * shortcut.scale.view(1, -1, 1, 1)
        for _ in range(levels):
            expected = inverse_haar(expected)
    else:
        expected = x
        for _ in range(levels):
            expected = haar(expected)
        expected = shortcut.proj(expected * shortcut.scale.view(1, -1, 1, 1))
    assert torch.allclose(shortcut(x), expected, rtol=0, atol=1e-12)


def test_pu_transforms_tile_like_one_pass():
    """The pu synthesis's receptive field is wider than gdn5's: its tiles take more context."""
    from pcodec import inference
    from pcodec.models import tile_margin
    from pcodec.network import HyperpriorNetwork, NetworkConfig

    torch.manual_seed(0)
    net = HyperpriorNetwork(NetworkConfig(N=16, M=24, design="pu", blocks=(1, 2, 2)))
    synthesis = inference.synthesis({k: v.numpy() for k, v in net.state_dict().items()}, "pu")

    def run(piece):  # (1, M, h, w) → (1, 3, 16h, 16w), as engine._render runs it
        return synthesis(piece[0].transpose(1, 2, 0)).transpose(2, 0, 1)[None]

    y = np.random.default_rng(0).standard_normal((1, 24, 20, 28)).astype(np.float32)
    pieces = engine.tiled(run, y, 16, tile=8, margin=tile_margin("pu"), parallel=False)
    assert np.abs(run(y) - pieces).max() < 2e-3


def test_a_chunk_of_minutes_ends_with_a_checkpoint_that_the_next_chunk_resumes(photos, tmp_path):
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=1000, threads=1)
    log = io.StringIO()
    _, state = train.train(config, photos, tmp_path / "run", 10**6, None, None, log=log,
                           minutes=0.02)
    first = state["step"]
    assert 0 < first < 10**6 and "checkpoint saved" in log.getvalue()
    _, state = train.train(config, photos, tmp_path / "run", first + 3, None, None)
    assert state["step"] == first + 3
    if not torch.cuda.is_available():  # CI has no GPU: asking for one is a clear error
        with pytest.raises(SystemExit, match="no CUDA device"):
            train.train(replace(config, device="cuda"), photos, tmp_path / "gpu", 1, None, None)


def test_a_gpu_chunk_packs_its_photos_and_hands_its_weights_on(photos, tmp_path):
    """What `make gpu-bundle` and a GPU chunk do, on the CPU: photos packed into a byte
    budget, a chunk that writes its weights (no optimizer state), and a run elsewhere that
    starts from them at their step with a fresh optimizer."""
    from pcodec.bundle import pack_photos

    count, size = pack_photos(photos, tmp_path / "packed", 10**6, min_side=64)
    assert count == 3 and size == sum(p.stat().st_size for p in (tmp_path / "packed").iterdir())
    assert pack_photos(photos, tmp_path / "small", size - 1, min_side=64)[0] == 2
    assert pack_photos(photos, tmp_path / "none", 10**6, min_side=81)[0] == 0  # 80x96 photos
    common = ["--config", "tiny", "--data", str(tmp_path / "packed"), "--set", "threads=1"]
    train.main(common + ["--run-dir", str(tmp_path / "gpu"), "--steps", "4",
                         "--weights-out", str(tmp_path / "w.pt")])
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "optimizer" not in saved and saved["state"]["step"] == 4
    log = io.StringIO()
    _, state = train.train(recipes.CONFIGS["tiny"], tmp_path / "packed", tmp_path / "cpu", 6,
                           tmp_path / "w.pt", None, log=log)
    assert state["step"] == 6 and "fresh optimizer" in log.getvalue()
    # the weights carry the hours per machine on, and the run adds its own
    assert saved["state"]["host_seconds"] == {export.machine_name(): saved["state"]["seconds"]}
    assert state["host_seconds"] == {export.machine_name(): pytest.approx(state["seconds"])}
    assert state["seconds"] > saved["state"]["seconds"]


def test_the_throughput_table_times_each_candidate():
    rows = train.measure_throughput([{"N": 16, "M": 24, "patch": 64, "batch": 2},
                                     {"N": 16, "M": 24, "patch": 64, "batch": 2,
                                      "design": "gdn5", "autocast": False}],
                                    steps=1, log=io.StringIO())
    assert [r["numerics"] for r in rows][1] == "float32"
    assert all(r["crops_per_s"] > 0 and r["s_per_step"] > 0 for r in rows)


def test_a_gradient_spike_is_skipped_not_taken(photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    plain = train.rd_loss

    def spike_once(*args, **kwargs):
        calls["n"] += 1
        loss, bpp, mse = plain(*args, **kwargs)
        return (loss * 1e6 if calls["n"] == 12 else loss), bpp, mse

    monkeypatch.setattr(train, "rd_loss", spike_once)
    monkeypatch.setattr(train, "SPIKE_WINDOW", 5)
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=20, threads=1)
    _, state = train.train(config, photos, tmp_path / "run", 20, None, None)
    assert state["step"] == 20 and calls["n"] == 21  # one batch more than steps: the spike
    assert state["spikes"] == 1 and state["history"][-1]["bad_batches_skipped"] == 1


def test_an_export_against_a_reference_adds_its_point_to_the_campaign(photos, tmp_path):
    """--export with --kodak and --reference: the BD-rate against layered JPEG 2000, one
    campaign point per exported step (kept across exports under the same id) and its plot."""
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=2, threads=1)
    reference = tmp_path / "bench.json"
    reference.write_text(json.dumps({"curves": {export.REFERENCE_CODEC: {
        "bpp": [0.01, 0.05, 0.2, 1.0, 3.0, 8.0], "psnr": [1.0, 5.0, 10.0, 20.0, 30.0, 40.0]}}}))
    models = tmp_path / "models"
    for steps in (2, 4):
        train.train(config, photos, tmp_path / "run", steps, None, None)
        entry = export.export_model(tmp_path / "run", "tiny-c", photos, "test",
                                    models_folder=models, reference=reference)
    assert [p["step"] for p in entry["campaign"]] == [2, 4]
    bd = entry["kodak"]["bd_rate_vs_j2k_layered_percent"]
    assert isinstance(bd, float) and entry["campaign"][-1]["bd_rate_vs_j2k_layered_percent"] == bd
    assert (models / "tiny-c-campaign.png").stat().st_size > 0


def test_a_campaign_is_drawn_beside_the_shipped_models(tmp_path, monkeypatch):
    """The shipped default's campaign comes from the source tree when PCODEC_MODELS names a
    candidates' folder, whatever that folder's default; never the model itself."""
    candidates = tmp_path / "candidates"
    candidates.mkdir()
    (candidates / "manifest.json").write_text(json.dumps({"default": "other", "models": {
        "other": {"campaign": [{"cpu_hours": 1.0, "bd_rate_vs_j2k_layered_percent": 90.0}]}}}))
    monkeypatch.setenv("PCODEC_MODELS", str(candidates))
    shipped = json.loads((ROOT / "models" / "manifest.json").read_text())
    name, points = export.shipped_campaign("new")
    assert name == shipped["default"] and points == shipped["models"][name]["campaign"]
    monkeypatch.delenv("PCODEC_MODELS")
    assert export.shipped_campaign(shipped["default"]) is None


class Stopped(Exception):
    pass


def test_a_signal_during_a_step_stops_the_run_after_it_with_a_checkpoint(photos, tmp_path,
                                                                          monkeypatch):
    import os
    import signal

    def stop(signum, frame):  # what the CLI's handler does: raise, to a clean exit
        raise Stopped(signum)

    monkeypatch.setattr(signal, "getsignal", lambda signum: stop)  # as if the CLI installed it
    draw = train.PatchSampler.batch
    calls = []

    def batch_then_signal(self, size):  # SIGTERM while the third step runs
        calls.append(size)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw(self, size)

    monkeypatch.setattr(train.PatchSampler, "batch", batch_then_signal)
    config = replace(recipes.CONFIGS["tiny"], checkpoint_every=1000, threads=1)
    run, log = tmp_path / "run", io.StringIO()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Stopped):
            train.train(config, photos, run, 10**6, None, None, log=log)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # the step that was running finished and was saved (no regular checkpoint before 1,000)
    assert "stopped by SIGTERM after step 3: checkpoint saved" in log.getvalue()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    monkeypatch.undo()
    _, state = train.train(config, photos, run, 5, None, None)
    assert state["step"] == 5


def test_post_filter_rows_come_in_seeded_sets_with_the_first_sets_tail_held_out(
        photos, tmp_path, monkeypatch):
    """More crops than a set: each further set is collected from its own seed, once, keeping
    the layers asked for of each crop; the first set keeps every layer and its last crops
    are held out, the same crops whatever the count of sets."""
    from pcodec import postfilter

    monkeypatch.setattr(postfilter, "CROPS", 4)
    base, state = ROOT / "tests" / "data" / "tiny-test.pt", {"collect_seconds": 0.0}
    model = load_weights_file(base)
    layers, log = model.layers, io.StringIO()
    (rows, row_layers, originals), (watch, watch_originals) = postfilter.rows_sets(
        base, photos, tmp_path, 6, 64, state, log, layers, per_crop=2, held_out=1)
    first, second = (np.load(tmp_path / name) for name in ("post-rows.npz", "post-rows-1.npz"))
    assert first["rows"].shape[1] == layers and second["rows"].shape[1] == 2
    assert np.array_equal(first["originals"], train.PatchSampler(photos, 64, 0).batch(4))
    assert np.array_equal(second["originals"], train.PatchSampler(photos, 64, 1).batch(2))
    # Two layers of each crop, every layer about as often; only those were synthesised.
    assert row_layers.shape == (5, 2) and len(set(row_layers[:2].ravel())) == 4
    assert np.array_equal(second["rows"], postfilter.decoded_rows(
        model, second["originals"])[np.arange(2)[:, None], row_layers[:2]])
    assert np.array_equal(originals, np.concatenate([second["originals"],
                                                     first["originals"][:3]]))
    assert np.array_equal(rows[:2], second["rows"])
    assert np.array_equal(rows[2:], first["rows"][np.arange(3)[:, None], row_layers[2:]])
    assert np.array_equal(watch, first["rows"][3:]) and np.array_equal(
        watch_originals, first["originals"][3:])
    collected = state["collect_seconds"]
    assert collected > 0
    again = postfilter.rows_sets(base, photos, tmp_path, 6, 64, state, log, layers, 2, 1)
    assert np.array_equal(again[0][0], rows) and state["collect_seconds"] == collected
    # Fewer crops than the sets hold: the first of each set, the same crops held out.
    fewer = postfilter.rows_sets(base, photos, tmp_path, 5, 64, state, log, layers, 2, 1)
    assert np.array_equal(fewer[0][0], np.concatenate([rows[:1], rows[2:]]))
    assert np.array_equal(fewer[1][0], watch) and state["collect_seconds"] == collected
    # Every layer asked of a set that kept two: refused, not filled with other rows.
    with pytest.raises(UsageError, match="post-rows-1.npz keeps 2 layers"):
        postfilter.rows_sets(base, photos, tmp_path, 6, 64, state, log, layers, None, 1)


def test_the_synthesis_trains_with_the_filter_on_the_latents_the_decoder_reconstructs(
        photos, tmp_path):
    """`--set post_synthesis_lr=R`: rows are the decoded latents (each synthesises to its own
    layer's decoded image); g_s and the filter train together, resume, and export to weights
    that write every section byte for byte as the codec did and decode them to other pixels;
    every weight but g_s's and the filter's is the codec's."""
    from pcodec import postfilter

    base = ROOT / "tests" / "data" / "tiny-test.pt"
    model = load_weights_file(base)
    crops = train.PatchSampler(photos, 64, 0).batch(2)
    latents, images = (postfilter.decoded_rows(model, crops, latents=True),
                       postfilter.decoded_rows(model, crops))
    assert latents.shape == (2, model.layers, model.config["M"], 4, 4)
    for crop in range(2):
        errors = np.array([[np.abs(engine.synthesis_float(model, latents[crop, k].astype(
            np.float32)) - images[crop, j]).max() for j in range(model.layers)]
            for k in range(model.layers)])
        assert errors.diagonal().max() < 2e-3  # float16 storage of ŷ
        assert (errors.diagonal() == errors.min(axis=1)).all()  # each its own layer's
    run, log = tmp_path / "joint", io.StringIO()
    small = {"width": 8, "threads": 1, "log": log, "crops": 6, "crop_size": 64, "row_size": 32,
             "held_out": 2, "synthesis_lr": 1e-3, "lr": 3e-3}
    postfilter.train_post_filter(base, photos, run, steps=2, **small)
    groups = torch.load(run / "post-checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [group["peak"] for group in groups] == [3e-3, 1e-3]  # the filter's, then g_s's
    state = postfilter.train_post_filter(base, photos, run, steps=4, synthesis_float32=True,
                                         **small)
    assert state["step"] == 4 and "resumed" in log.getvalue()
    assert state["numerics"].endswith("synthesis float32")  # bf16 or not for the filter
    assert (run / "post-latents.npz").exists() and not (run / "post-rows.npz").exists()
    assert len(state["history"][-1]["held_out_gain_db"]) == model.layers
    with pytest.raises(UsageError, match="trained with the synthesis"):
        postfilter.train_post_filter(base, photos, run, steps=5, **{**small, "synthesis_lr": 0})
    models = tmp_path / "models"
    entry = export.export_model(run, "tiny-joint", None, "test", models_folder=models)
    assert entry["training"]["post_filter"]["synthesis_lr"] == 1e-3
    new = load_weights_file(models / "tiny-joint.pt")
    changed = {key for key in model.state if not np.array_equal(model.state[key], new.state[key])}
    assert changed and all(key.startswith("g_s.") for key in changed)
    assert any(key.startswith("post.") for key in new.state)
    image = synthetic_image(48, 64, 3)
    stream, new_stream = engine.encode(model, image), engine.encode(new, image)
    assert engine.read_stream(new, new_stream)[1] == engine.read_stream(model, stream)[1]
    assert not np.array_equal(engine.decode(new, new_stream), engine.decode(model, stream))


def test_a_post_filter_trains_resumes_and_exports_with_the_codecs_own_bytes(photos, tmp_path):
    """`pcodec train --post-filter`: decoded rows of the frozen codec, a resumable run, and
    weights that write the same sections byte for byte and decode them to other pixels."""
    from pcodec import postfilter

    base = ROOT / "tests" / "data" / "tiny-test.pt"
    run, log = tmp_path / "post", io.StringIO()
    small = {"width": 8, "threads": 1, "log": log, "crops": 6, "crop_size": 64, "row_size": 32,
             "held_out": 2}
    assert postfilter.train_post_filter(base, photos, run, steps=3, **small)["step"] == 3
    state = postfilter.train_post_filter(base, photos, run, steps=6, **small)
    assert state["step"] == 6 and "resumed" in log.getvalue()
    assert len(state["history"][-1]["held_out_gain_db"]) == load_weights_file(base).layers
    models = tmp_path / "models"
    entry = export.export_model(run, "tiny-post", None, "test", models_folder=models)
    assert entry["training"]["post_filter"]["steps"] == 6
    assert sum(entry["training"]["hours_by_machine"].values()) == pytest.approx(
        entry["training"]["cpu_hours"], abs=0.002)  # the filter's hours on its host too
    assert "post-filter" in entry["architecture"]
    old, new = load_weights_file(base), load_weights_file(models / "tiny-post.pt")
    assert old.post_filter is None and new.post_filter is not None
    image = synthetic_image(48, 64, 3)
    stream, new_stream = engine.encode(old, image), engine.encode(new, image)
    assert engine.read_stream(new, new_stream)[1] == engine.read_stream(old, stream)[1]
    assert not np.array_equal(engine.decode(new, new_stream), engine.decode(old, stream))
    # The encoder fine-tuned for them keeps their filter, how it was trained and its hours.
    start = torch.load(models / "tiny-post.pt", weights_only=True)["state"]["step"]
    tuning = replace(recipes.CONFIGS["tiny"], threads=1, ema_decay=0, train_only="analysis")
    train.train(tuning, photos, tmp_path / "encoder", start + 2, models / "tiny-post.pt", None)
    entry = export.export_model(tmp_path / "encoder", "tiny-encoder", None, "test",
                                models_folder=models)
    assert entry["training"]["post_filter"]["steps"] == 6
    assert sum(entry["training"]["hours_by_machine"].values()) == pytest.approx(
        entry["training"]["cpu_hours"], abs=0.002)
    encoder = load_weights_file(models / "tiny-encoder.pt")
    assert all(np.array_equal(encoder.state[key], new.state[key])
               for key in new.state if key.startswith("post."))
    # Weights with a filter: a coarse branch is added to it and starts as the filter was.
    branch_run = tmp_path / "coarse"
    postfilter.train_post_filter(models / "tiny-post.pt", photos, branch_run, steps=0,
                                 **small, coarse=4)
    export.export_model(branch_run, "tiny-coarse", None, "test", models_folder=models)
    coarse = load_weights_file(models / "tiny-coarse.pt")
    assert "post.coarse_gains" in coarse.state
    assert np.array_equal(engine.decode(coarse, engine.encode(coarse, image)),
                          engine.decode(new, new_stream))
    postfilter.train_post_filter(models / "tiny-post.pt", photos, branch_run, steps=2, **small,
                                 coarse=4)
    entry = export.export_model(branch_run, "tiny-coarse", None, "test", models_folder=models)
    coarse = load_weights_file(models / "tiny-coarse.pt")
    assert entry["training"]["post_filter"]["continues"]["steps"] == 6
    assert sum(entry["training"]["hours_by_machine"].values()) == pytest.approx(
        entry["training"]["cpu_hours"], abs=0.002)
    assert "quarter-resolution branch 4" in entry["architecture"]
    coarse_stream = engine.encode(coarse, image)
    assert engine.read_stream(coarse, coarse_stream)[1] == engine.read_stream(old, stream)[1]
    assert not np.array_equal(engine.decode(coarse, coarse_stream),
                              engine.decode(new, new_stream))
    # Weights whose filter has a branch: training goes on with it (no coarse asked for).
    again_run = tmp_path / "again"
    postfilter.train_post_filter(models / "tiny-coarse.pt", photos, again_run, steps=0, **small)
    export.export_model(again_run, "tiny-again", None, "test", models_folder=models)
    again = load_weights_file(models / "tiny-again.pt")
    assert np.array_equal(engine.decode(again, engine.encode(again, image)),
                          engine.decode(coarse, coarse_stream))
