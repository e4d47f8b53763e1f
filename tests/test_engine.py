import os

import numpy as np
import pytest
from conftest import synthetic_image

from pcodec import coding, container, engine, quant
from pcodec.errors import StreamError
from pcodec.evaluate import layer_points, prior_scale_saturation, psnr


def test_full_stream_round_trip_is_exact_in_size_and_close_in_pixels(model, sample_image, sample_stream):
    decoded = engine.decode(model, sample_stream)
    assert decoded.shape == sample_image.shape and decoded.dtype == np.uint8
    assert psnr(decoded, sample_image) > 20


def test_quality_rises_strictly_with_every_layer(model, sample_image, sample_stream):
    points = layer_points(model, sample_image, sample_stream)
    sizes = [s for s, _ in points]
    quality = [q for _, q in points]
    assert len(points) == model.layers + 1
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert all(b > a for a, b in zip(quality, quality[1:])), quality


def test_prior_scale_saturation_is_the_share_of_scales_at_the_tables_top(model, sample_stream,
                                                                          monkeypatch):
    assert prior_scale_saturation(model, sample_stream) < 0.02  # the shipped prior follows the image
    monkeypatch.setattr(quant, "_SCALE_EDGES", quant._SCALE_EDGES / 1e4)  # every σ past the table
    assert prior_scale_saturation(model, sample_stream) == 1.0


def test_a_table_shifted_by_2_to_the_k_snaps_sigma_scaled_by_2_to_the_k(model, sample_image):
    import dataclasses

    from pcodec import inference

    M = model.config["M"]
    weight, bias = model.state["h_s.4.weight"].copy(), model.state["h_s.4.bias"].copy()
    weight[:M] *= 8  # the scales' half: every σ exactly 8x
    bias[:M] *= 8
    state = {**model.state, "h_s.4.weight": weight, "h_s.4.bias": bias,
             "scale_shift": np.array(model.scale_shift + 3.0, np.float32)}
    shifted = dataclasses.replace(model, state=state,
                                  hyper_synthesis=inference.hyper_synthesis(state))
    _, z_hat = engine.analyse(model, sample_image[:128, :192])
    for ours, theirs in zip(coding._prior(model, z_hat), coding._prior(shifted, z_hat)):
        assert np.array_equal(ours, theirs)  # μ, the scale indexes, the fragile elements
    assert shifted.scale_shift == model.scale_shift + 3
    assert np.array_equal(shifted.scales, 8 * model.scales)
    image = synthetic_image(48, 64)
    assert engine.decode(shifted, engine.encode(shifted, image)).shape == image.shape


def test_byte_cuts_never_lower_quality(model, sample_image, sample_stream):
    smallest = len(container.truncate(sample_stream, layers=0)) // 2
    budgets = np.unique(np.geomspace(smallest, len(sample_stream), 12).astype(int))
    previous = -1.0
    for budget in budgets:
        cut = container.truncate(sample_stream, max_bytes=int(budget))
        assert len(cut) <= budget
        quality = psnr(engine.decode(model, cut), sample_image)
        assert quality >= previous - 1e-9, (budget, quality, previous)
        previous = quality


def test_cut_inside_a_layer_beats_the_layer_before(model, sample_image, sample_stream):
    header, length = container.parse_header(sample_stream)
    ends = length + np.cumsum([s.length for s in header.sections])  # ẑ's, then each layer's
    if header.layer_ends:  # layers formed by rate
        ends = length + np.array((header.hyper_length,) + header.layer_ends)
    for layer in (2, 4, 6):
        before = psnr(engine.decode(model, sample_stream, layers=layer - 1), sample_image)
        middle = (ends[layer - 1] + ends[layer]) // 2
        inside = psnr(engine.decode(model, sample_stream, max_bytes=int(middle)), sample_image)
        assert inside > before


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (13, 7), (64, 64), (65, 129)])
def test_any_size_decodes_to_the_original_size(model, size):
    image = synthetic_image(*size)
    data = engine.encode(model, image)
    for layers in (0, 1, model.layers):
        decoded = engine.decode(model, data, layers=layers)
        assert decoded.shape == image.shape


def test_encoding_is_deterministic(model):
    image = synthetic_image(40, 56, seed=3)
    assert engine.encode(model, image) == engine.encode(model, image)


def test_stream_for_other_weights_is_refused(model, sample_stream):
    data = bytearray(sample_stream)
    header, length = container.parse_header(bytes(data))
    other = container.repack(header.__class__(header.width, header.height, header.model_id,
                                              b"\xff" * 8, header.sections),
                             *container.split_sections(bytes(data), header, length))
    with pytest.raises(StreamError, match="different weights"):
        engine.decode(model, other)


def test_tiled_transforms_match_untiled(model):
    import torch

    from pcodec.engine import tiled

    image = synthetic_image(200, 264, seed=9)
    x = torch.from_numpy(engine.pad_image(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        whole = model.network.analysis(x)
        pieces = tiled(model.network.analysis, x, 1 / 16, tile=5, margin=4)
        size = whole.abs().max()  # float32 rounding grows with y (up to ~2000 at M = 320)
        assert torch.allclose(whole / size, pieces / size, atol=1e-6)
        y = whole[:, :, :, :]
        assert torch.allclose(model.network.synthesis(y),
                              tiled(model.network.synthesis, y, 16, tile=6, margin=4), atol=1e-4)

    def synthesis(piece):  # the decoder's numpy g_s, as engine._render runs it
        return model.synthesis(piece[0].transpose(1, 2, 0)).transpose(2, 0, 1)[None]

    y = y.numpy()
    assert np.allclose(synthesis(y), tiled(synthesis, y, 16, tile=6, margin=4, parallel=False),
                       atol=1e-4)


def test_transforms_record_no_autograd_graph_in_any_thread(model):
    """Grad mode is per thread, so torch.no_grad() in the caller does not reach the tiles'
    worker threads: the transforms themselves must not build graphs that hold every
    activation (a 4K decode peaked at 9 GB that way)."""
    import threading

    import torch

    y = torch.zeros(1, model.network.g_s[0].in_channels, 4, 4)
    x = torch.zeros(1, 3, 64, 64)
    outputs = []
    worker = threading.Thread(target=lambda: outputs.extend(
        [model.network.synthesis(y), model.network.analysis(x)]))
    worker.start()
    worker.join()
    assert len(outputs) == 2 and not any(out.requires_grad for out in outputs)


def test_banded_prior_snaps_to_the_same_scales_as_one_pass(model):
    """Bands give the one-pass σ to float64 rounding (BLAS picks its kernels by shape and
    CPU, ~1e-13 apart), and the snapped scale indexes — all the coder uses — are equal."""
    z_hat = np.random.default_rng(3).integers(-6, 7, (model.config["N"], 11, 7))
    whole = model.hyper_synthesis(z_hat.transpose(1, 2, 0)).transpose(2, 0, 1)
    scales = np.maximum(np.abs(np.split(whole, 2)[0]), quant.SCALES[0])
    whole_index = quant.scale_indexes(scales.reshape(-1))
    for band in (1, 3, 8):
        banded = coding.hyper_synthesis_banded(model, z_hat, band)
        assert np.allclose(banded, whole, rtol=1e-10, atol=1e-10)
        scales = np.maximum(np.abs(np.split(banded, 2)[0]), quant.SCALES[0])
        assert np.array_equal(quant.scale_indexes(scales.reshape(-1)), whole_index)


def test_prior_is_the_same_on_one_and_two_threads(tmp_path):
    """h_s runs on numpy's BLAS threads (OMP_NUM_THREADS, read when numpy loads): both sides
    must get the same σ whatever their count."""
    import subprocess
    import sys

    script = ("import sys, numpy as np; from pcodec import coding, models; m = models.load(); "
              "z = np.random.default_rng(5).integers(-6, 7, (m.config['N'], 9, 13)); "
              "mu, index, _ = coding._prior(m, z); np.savez(sys.argv[1], mu=mu, index=index)")
    results = []
    for threads in ("1", "2"):
        path = tmp_path / f"prior{threads}.npz"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        results.append(np.load(path))
    assert np.array_equal(results[0]["index"], results[1]["index"])  # the scales the coder uses
    assert np.allclose(results[0]["mu"], results[1]["mu"], rtol=1e-6, atol=1e-6)  # μ: pixels only


def test_fast_transforms_match_float32_layers(model):
    """Channels-last, the bf16 body and the sub-pixel last layer stay within a few pixel
    levels (a small fraction on average) of the plain float32 layers the weights were loaded
    into. Measured with -r5 on 6 Kodak images: at most 3 levels, 0.18 on average, 0.015 dB."""
    import torch

    from pcodec.transforms import SubPixelDeconv

    image = synthetic_image(96, 128, seed=4)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert torch.allclose(model.network.analysis(x), model.network.g_a(x), atol=1e-4)
        y = model.network.g_a(x)
        error = (model.network.synthesis(y) - model.network.g_s(y)).abs()
        assert error.max() < 3 / 255 and error.mean() < 0.3 / 255, (error.max(), error.mean())
        hidden = model.network.g_s[:-1](y)
        last = model.network.g_s[-1]
        assert torch.allclose(SubPixelDeconv(last)(hidden), last(hidden), atol=1e-5)


def test_shared_prefix_decoding_equals_one_decode_per_prefix(model, sample_stream):
    sizes = [150, 400, 1000, 2500, 6000, len(sample_stream), len(sample_stream) + 10]
    header_length = container.parse_header(sample_stream)[1]
    sizes = [max(s, header_length) for s in sizes]
    for size, pixels in engine.decode_prefixes(model, sample_stream, sizes):
        assert (pixels == engine.decode(model, sample_stream, max_bytes=size)).all(), size


def test_stream_does_not_depend_on_table_caching(model, monkeypatch):
    image = synthetic_image(64, 96, seed=11)
    cached = engine.encode(model, image)
    monkeypatch.setattr(coding, "TABLE_CACHE_ELEMENTS", 0)
    monkeypatch.setattr(coding, "CHUNK", 1 << 15)
    assert engine.encode(model, image) == cached
    assert (engine.decode(model, cached) == engine.decode(model, cached)).all()


def test_placed_transforms_give_the_same_stream():
    """place() is what --device uses; on the CPU device it must change nothing."""
    from conftest import ROOT

    from pcodec.models import load_weights_file

    plain = load_weights_file(ROOT / "tests" / "data" / "tiny-test.pt")
    placed = load_weights_file(ROOT / "tests" / "data" / "tiny-test.pt")
    placed.network.place("cpu")
    image = synthetic_image(70, 90, seed=4)
    stream = engine.encode(plain, image)
    assert engine.encode(placed, image) == stream
    assert np.array_equal(engine.decode(placed, stream), engine.decode(plain, stream))


def test_order_offsets_reorder_the_stream_without_changing_its_layers(model):
    """Channel offsets (weights files since r4) change only the order inside each layer: the
    decoder must apply them too, every complete layer decodes to the same image, and a
    channel with a large offset is coded first."""
    from dataclasses import replace

    # Thresholds on the keys would move layer ends; layers formed by rate end at byte counts.
    model = replace(model, defer_keys=None, layer_bpp=None)
    image = synthetic_image(96, 128, seed=6)
    offsets = np.zeros(len(model.unit), np.int64)
    offsets[5] = 10_000
    boosted = replace(model, order_offsets=offsets)
    plain_stream, boosted_stream = engine.encode(model, image), engine.encode(boosted, image)
    assert boosted_stream != plain_stream
    assert len(boosted_stream) == pytest.approx(len(plain_stream), rel=0.02)
    for layers in (1, 3, model.layers):
        assert np.array_equal(engine.decode(boosted, boosted_stream, layers=layers),
                              engine.decode(model, plain_stream, layers=layers)), layers
    try:  # without the offsets the decoder reads the symbols in the wrong order
        misread = engine.decode(model, boosted_stream, layers=2)
    except StreamError:
        misread = None
    assert misread is None or not np.array_equal(misread, engine.decode(model, plain_stream, layers=2))
    header, _ = container.parse_header(boosted_stream)
    _, state = next(engine.decode_latents(boosted, header, [], []))
    order = coding.plan_layer(boosted, state, 0)
    first = state.channel[order[: int((state.channel == 5).sum())]]
    assert (first == 5).all()


def test_each_layer_codes_with_its_own_fitted_sigma_and_decodes_the_same_image(model):
    """σ offsets per layer and channel (weights since the calibration) change the tables, not
    the partition: every layer decodes to the same image, the decoder must apply them too, and
    offsets fitted to an image code it in no more bytes than the prior's own σ and in fewer
    than a miscalibrated one."""
    from dataclasses import replace

    from pcodec import calibration

    # σ sets the keys, which thresholds would read; the layers here are the sections.
    model = replace(model, defer_keys=None, layer_bpp=None)
    image = synthetic_image(128, 128, seed=3)
    shape = (model.layers, len(model.unit))
    fitted = calibration.fit_scale_offsets(model, [image])
    assert fitted.shape == shape and fitted.dtype == np.int64
    variants = {"plain": model, "fitted": replace(model, scale_offsets=fitted),
                "wide": replace(model, scale_offsets=np.full(shape, 5))}
    streams = {name: engine.encode(variant, image) for name, variant in variants.items()}
    assert len(streams["fitted"]) <= len(streams["plain"]) * 1.005
    assert len(streams["fitted"]) < len(streams["wide"]) * 0.97
    for layers in (1, 4, model.layers):
        expected = engine.decode(model, streams["plain"], layers=layers)
        for name in ("fitted", "wide"):
            assert np.array_equal(engine.decode(variants[name], streams[name], layers=layers),
                                  expected), (name, layers)
    try:  # without the offsets the decoder reads other tables
        misread = engine.decode(model, streams["wide"], layers=2)
    except StreamError:
        misread = None
    assert misread is None or not np.array_equal(
        misread, engine.decode(model, streams["plain"], layers=2))


def test_deferred_refinements_wait_for_the_next_layer(model):
    """Key thresholds per layer (weights with defer_keys): a middle layer refines only the
    elements whose order key reaches its threshold, and the others wait for the next layer;
    the last layer refines every one. The first middle layer then ends in fewer bytes than
    without thresholds (the later ones start from other intervals: what waited is coded there),
    quality still rises with every layer, the whole stream costs about the same, the stream is
    deterministic, and the decoder must apply the thresholds too."""
    from dataclasses import replace

    from pcodec import calibration

    model = replace(model, defer_keys=None)
    image = synthetic_image(128, 160, seed=4)
    thresholds = calibration.fit_defer_keys(model, [image], percentile=50)
    last = model.layers - 1
    assert thresholds[0] == thresholds[last] == np.iinfo(np.int64).min
    assert (thresholds[1:last] > np.iinfo(np.int64).min).all()
    deferring = replace(model, defer_keys=thresholds)
    stream = engine.encode(deferring, image)
    assert engine.encode(replace(model, defer_keys=thresholds), image) == stream
    plain, deferred = layer_points(model, image), layer_points(deferring, image, stream)
    assert plain[1] == deferred[1]  # the first layer codes every element either way
    assert deferred[2][0] < plain[2][0], (plain, deferred)  # layer 2: the same start, less coded
    assert deferred[-1][0] == pytest.approx(plain[-1][0], rel=0.03)
    assert deferred[-1][1] == pytest.approx(plain[-1][1], abs=0.2)
    quality = [q for _, q in deferred]
    assert all(b > a for a, b in zip(quality, quality[1:])), quality

    header, payloads, partial = engine.read_stream(deferring, stream)
    states = [state.copy() for _, state in engine.decode_latents(deferring, header, payloads, partial)]
    for layer in range(1, last):  # what a layer leaves, the next refines (or leaves again)
        _, keys, _ = coding.refinement_candidates(deferring, states[layer], layer)
        waiting = np.count_nonzero(coding.deferred(deferring, layer, keys))
        assert waiting > 0, layer
        assert np.count_nonzero(states[layer + 1].depth == layer + 1) == len(keys) - waiting
    _, keys, _ = coding.refinement_candidates(deferring, states[last], last)
    assert np.count_nonzero(states[last + 1].depth == last + 1) == len(keys)  # all, at the last
    try:  # without the thresholds the decoder reads the symbols of other elements
        misread = engine.decode(model, stream, layers=3)
    except StreamError:
        misread = None
    assert misread is None or not np.array_equal(misread, engine.decode(deferring, stream, layers=3))


def test_reconstruction_spreads_change_the_image_never_the_stream(model, sample_image):
    """Per-layer reconstruction spreads (weights since their calibration) are pixels only: the
    stream is the same, the midpoint entry decodes as conditional_mean=False does, and each
    layer's fitted spread leaves the fit image's error after that layer no higher than the
    default spread would."""
    from dataclasses import replace

    from pcodec import calibration

    model = replace(model, layer_bpp=None)  # each layer's spread is fitted to its section
    image = synthetic_image(128, 128, seed=3)
    fitted = calibration.fit_reconstruction_spreads(model, [image])
    assert fitted.shape == (model.layers,)
    with_spreads = replace(model, reconstruction_spreads=quant.RECONSTRUCTION_SPREADS[fitted])
    assert engine.encode(with_spreads, sample_image) == engine.encode(model, sample_image)
    data = engine.encode(model, image)
    midpoint = replace(model, reconstruction_spreads=np.full(model.layers, np.inf))
    for layers in range(1, model.layers + 1):
        assert np.array_equal(engine.decode(midpoint, data, layers=layers),
                              engine.decode(model, data, layers=layers, conditional_mean=False))
        other = fitted.copy()
        other[layers - 1] = quant.DEFAULT_SPREAD_INDEX
        errors = [np.sum((engine.decode(replace(model, reconstruction_spreads=(
            quant.RECONSTRUCTION_SPREADS[spreads])), data, layers=layers) - image.astype(float)) ** 2)
            for spreads in (fitted, other)]
        assert errors[0] <= errors[1], layers


@pytest.mark.parametrize("far", [0, 1 << 40])  # 1 << 40: bounds too large to pack in one key
def test_tables_built_once_per_distinct_interval_equal_tables_per_element(model, far):
    """Tables are built once per distinct (channel, scale, interval) and shared; they must be
    bit for bit the tables each element would get on its own, wide splits included."""
    rng = np.random.default_rng(8)
    count, channels = 6000, len(model.unit)
    channel = rng.integers(0, channels, count).astype(np.int32)
    scale_index = rng.integers(0, len(quant.SCALES), count).astype(np.int16)
    step = model.int_steps[1][channel]
    lower = rng.integers(-4, 4, count) * step - rng.integers(0, 3, count) + far
    upper = lower + step * rng.choice([1, 2, 3, 7, 40, 200], count) + rng.integers(0, 9, count)
    duplicate = rng.random(count) < 0.7  # most elements repeat an earlier one, as in a layer
    source = rng.integers(0, count, count)
    source = np.minimum(source, np.arange(count))
    for array in (channel, scale_index, lower, upper):
        array[duplicate] = array[source[duplicate]]
    state = coding.LatentState(np.zeros((channels, 1, 1), np.float32), scale_index, channel,
                               lower, upper, np.ones(count, np.uint8))
    elements = np.arange(count)
    shared = coding._refinement_tables(model, state, 2, elements)
    step = model.int_steps[2][channel]
    counts, stretched = quant.split_counts(lower, upper, step)
    bounds = quant.split_bounds(lower, upper, step, counts, stretched, int(counts.max()))
    coded_with = coding.coding_scale_index(model, 2, scale_index, channel)  # the layer's own σ
    probabilities = quant.interval_probabilities(bounds, model.scales[coded_with] / model.unit[channel])
    assert counts.max() == quant.MAX_SPLIT and stretched.any()
    for mine, theirs in zip(shared, (bounds, counts, probabilities)):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)


@pytest.mark.parametrize("channels", [192, 320, 1000])
def test_distinct_rows_partition_elements_by_channel_scale_and_interval(channels):
    """The packed-key sort must group exactly the elements np.unique groups, for latents of
    any width (M = 320 once fell back to np.unique, 15x slower)."""
    rng = np.random.default_rng(channels)
    count = 5000
    channel = rng.integers(0, channels, count).astype(np.int32)
    scale_index = rng.integers(0, len(quant.SCALES), count).astype(np.int16)
    lower = rng.integers(-300, 300, count)
    upper = lower + rng.integers(1, 40, count)
    source = np.minimum(rng.integers(0, count, count), np.arange(count))
    for array in (channel, scale_index, lower, upper):  # many repeats, as in a layer
        array[::2] = array[source[::2]]
    first, inverse = coding._distinct_rows(channel, scale_index, lower, upper)
    rows = np.stack([channel, scale_index, lower, upper], axis=1).astype(np.int64)
    assert np.array_equal(rows[first][inverse], rows)  # each element's row is its own
    assert len(first) == len(np.unique(rows, axis=0))  # and no two rows are equal


def test_first_layer_tables_built_pair_by_pair_equal_one_build_of_every_pair(model):
    """The layer-1 tables and keys are built for the (scale, channel) pairs an image uses, as
    it uses them: each row must not depend on which others were built with it."""
    import copy

    levels, channels = len(quant.SCALES), len(model.unit)
    every_scale = np.repeat(np.arange(levels), channels)
    every_channel = np.tile(np.arange(channels), levels)
    state = coding.LatentState(None, every_scale, every_channel, None, None, None)
    elements = np.arange(levels * channels)
    at_once, piecewise = copy.copy(model), copy.copy(model)
    for fresh in (at_once, piecewise):
        for name in ("_first_layer_tables", "_first_layer_keys"):
            fresh.__dict__.pop(name, None)
    rng = np.random.default_rng(2)
    for part in np.array_split(rng.permutation(elements), 3):
        coding._first_layer_rows(piecewise, state, part)
        coding._first_layer_keys(piecewise, every_scale[part], every_channel[part])
    assert np.array_equal(coding._first_layer_rows(piecewise, state, elements),
                          coding._first_layer_rows(at_once, state, elements))
    assert np.array_equal(coding._first_layer_keys(piecewise, every_scale, every_channel),
                          coding._first_layer_keys(at_once, every_scale, every_channel))


@pytest.mark.parametrize("coarse", [0, 6])
def test_post_filter_changes_pixels_not_bytes_and_runs_across_tiles(coarse):
    """A post-filter (postfilter.py) leaves every byte of the stream as it was; the decoder
    runs it inside each synthesis tile with the gains of the layers decoded whole, equal to
    the filter over the whole image, and in torch (GPU decoding) as in numpy; with a coarse
    branch (about twice the reach) too."""
    from dataclasses import replace

    import torch
    from conftest import ROOT
    from test_inference import random_post_filter

    from pcodec import inference
    from pcodec.models import load_weights_file

    plain = load_weights_file(ROOT / "tests" / "data" / "tiny-test.pt")
    post = {key: value.numpy() for key, value in random_post_filter(plain.layers, coarse=coarse).items()}
    filtered = replace(plain, state={**plain.state, **post}, post_filter=inference.post_filter(post))
    image = synthetic_image(80, 600, seed=6)  # 40 latents wide: two synthesis tiles
    stream = engine.encode(plain, image)
    assert engine.encode(filtered, image) == stream
    header, payloads, partial = engine.read_stream(filtered, stream)
    for layers, state in engine.decode_latents(filtered, header, payloads, partial):
        y_hat = engine._reconstruct_latent(filtered, state, True)
        unfiltered = filtered.synthesis(y_hat.transpose(1, 2, 0))
        whole = filtered.post_filter(unfiltered, max(layers, 1) - 1)
        tiled = engine.synthesis_float(filtered, y_hat, layers).transpose(1, 2, 0)
        assert np.abs(tiled - whole).max() < 1e-5, layers
        assert np.abs(whole - unfiltered).max() > 1e-3, layers
        with torch.no_grad():  # torch's g_s runs in bf16 where native: its filter alone
            in_torch = [filtered.network.synthesis(torch.from_numpy(y_hat)[None], post)[0]
                        .permute(1, 2, 0).numpy() for post in (None, max(layers, 1) - 1)]
        expected = filtered.post_filter(in_torch[0], max(layers, 1) - 1)
        assert np.abs(in_torch[1] - expected).max() < 1e-5, layers
    for layers in range(1, plain.layers + 1):
        decoded = engine.decode(filtered, stream, layers=layers)
        assert not np.array_equal(decoded, engine.decode(plain, stream, layers=layers))


def test_a_cut_inside_a_layer_takes_gains_between_its_neighbours(model, sample_image, sample_stream):
    """The post-filter's gains follow the share of the cut layer's elements decoded."""
    header, payloads, partial = engine.read_stream(model, sample_stream)
    ends = np.cumsum([len(p) for p in payloads]) + len(sample_stream) - sum(map(len, payloads))
    middle = int((ends[2] + ends[3]) // 2)  # inside layer 3
    cut = engine.read_stream(model, sample_stream, max_bytes=middle)
    *_, (_, state) = engine.decode_latents(model, *cut)
    assert 0 < state.share < 1
    y_hat = engine._reconstruct_latent(model, state, True)
    height, width = header.height, header.width
    decoded = engine.decode(model, sample_stream, max_bytes=middle)
    assert np.array_equal(decoded, engine._render(model, y_hat, height, width, 2 + state.share))
    assert not np.array_equal(decoded, engine._render(model, y_hat, height, width, 2))


def test_layers_formed_by_rate_decode_as_the_prefixes_they_are(model, sample_image):
    """Quality layers at file sizes (format 3) hold the same sections as the stream whose
    layers are the quantization layers; each decodes as the stream's prefix where it ends,
    and as the file `truncate` makes of it; quality rises with every layer."""
    pixels = sample_image.shape[0] * sample_image.shape[1]
    plain = engine.encode(model, sample_image, layer_bpp=())
    assert container.parse_header(plain)[0].version == 2  # layers that are the sections
    data = engine.encode(model, sample_image, layer_bpp=(0.3, 0.6, 1.2))
    header, length = container.parse_header(data)
    assert header.version == 3 and header.layers == 4
    assert engine.read_stream(model, data)[1] == engine.read_stream(model, plain)[1]
    previous = 0.0
    for layers, rate in zip(range(1, 5), (0.3, 0.6, 1.2, None)):
        end = length + header.layer_ends[layers - 1]
        assert rate is None or end <= rate * pixels / 8 < end + 1
        decoded = engine.decode(model, data, layers=layers)
        assert np.array_equal(decoded, engine.decode(model, data, max_bytes=end))
        assert np.array_equal(decoded, engine.decode(model, container.truncate(data, layers)))
        assert psnr(decoded, sample_image) > previous
        previous = psnr(decoded, sample_image)
    assert engine.encode(model, sample_image, layers=2, layer_bpp=(0.3, 0.6, 1.2)) == \
        container.truncate(data, 2)
