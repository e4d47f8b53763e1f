import numpy as np
import torch

from pcodec import quant
from pcodec.network import split_interval


def random_intervals(rng, count):
    step = rng.integers(16, 400, count)
    lower = rng.integers(-5000, 5000, count)
    width = (step * rng.uniform(0.5, 9.0, count)).astype(np.int64) + 1
    return lower, lower + width, step


def test_split_tiles_parent_interval_exactly():
    rng = np.random.default_rng(0)
    lower, upper, step = random_intervals(rng, 20000)
    count, stretched = quant.split_counts(lower, upper, step)
    bounds = quant.split_bounds(lower, upper, step, count, stretched, int(count.max()))
    assert (bounds[:, 0] == lower).all() and (bounds[:, -1] == upper).all()
    widths = np.diff(bounds, axis=1)
    assert (widths >= 0).all()
    for k in range(widths.shape[1]):  # every real sub-interval is non-empty
        real = k < count
        assert (widths[real, k] > 0).all()
    # Sub-intervals are at most one step wide, except a stretched (merged-sliver) split.
    normal = ~stretched & (count > 1)
    assert (widths[normal][:, 1:-1] <= step[normal, None]).all()
    # The boundary-aware rule: no sliver narrower than 0.3 step survives at the edges.
    edge = widths[normal, 0]
    assert (10 * edge >= 3 * step[normal] - 10).all()


def test_splits_tells_exactly_which_intervals_split():
    rng = np.random.default_rng(4)
    lower, upper, step = random_intervals(rng, 50000)
    upper = np.concatenate([upper, lower[:2000] + step[:2000] + rng.integers(-2, 3, 2000)])
    lower, step = np.concatenate([lower, lower[:2000]]), np.concatenate([step, step[:2000]])
    count, _ = quant.split_counts(lower, upper, step)
    assert np.array_equal(quant.splits(lower, upper, step), count > 1)


def test_index_finds_the_holding_sub_interval():
    rng = np.random.default_rng(1)
    lower, upper, step = random_intervals(rng, 5000)
    count, stretched = quant.split_counts(lower, upper, step)
    bounds = quant.split_bounds(lower, upper, step, count, stretched, int(count.max()))
    values = rng.uniform(lower, upper)
    index = quant.sub_interval_index(bounds, count, values)
    rows = np.arange(len(values))
    assert (bounds[rows, index] <= values).all() and (values < bounds[rows, index + 1]).all()


def test_float_training_split_matches_integer_coder_split():
    rng = np.random.default_rng(2)
    lower, upper, step = random_intervals(rng, 5000)
    values = rng.uniform(lower, upper)
    count, stretched = quant.split_counts(lower, upper, step)
    bounds = quant.split_bounds(lower, upper, step, count, stretched, int(count.max()))
    # Integer boundaries are the float ones rounded down: skip values within a unit of one.
    clear = np.abs(bounds - values[:, None]).min(axis=1) > 1
    lower, upper, step, values, bounds, count = (
        a[clear] for a in (lower, upper, step, values, bounds, count))
    index = quant.sub_interval_index(bounds, count, values)
    rows = np.arange(len(values))
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    new_lower, new_upper = split_interval(as_t(values), as_t(lower), as_t(upper), as_t(step))
    # Integer bounds round half-units down; the float split must agree to within one unit.
    assert np.abs(new_lower.numpy() - bounds[rows, index]).max() <= 1
    assert np.abs(new_upper.numpy() - bounds[rows, index + 1]).max() <= 1


def test_probabilities_are_normalised_even_far_in_the_tail():
    lower = np.array([-10, 10**6, -(10**7), 0])
    upper = np.array([10, 10**6 + 64, -(10**7) + 50, 3])
    step = np.array([8, 16, 16, 1])
    count, stretched = quant.split_counts(lower, upper, step)
    bounds = quant.split_bounds(lower, upper, step, count, stretched, int(count.max()))
    p = quant.interval_probabilities(bounds, np.array([5.0, 1.0, 2.0, 0.5]))
    assert np.allclose(p.sum(axis=1), 1) and (p >= 0).all() and np.isfinite(p).all()
    # In the far upper tail the mass decays away from the mean: the lowest cell is likeliest.
    assert p[1, 0] == p[1, : count[1]].max()


def test_conditional_mean_lies_inside_its_interval():
    rng = np.random.default_rng(3)
    lower = rng.integers(-3000, 3000, 10000)
    upper = lower + rng.integers(1, 200, 10000)
    sigma = rng.uniform(0.5, 500, 10000)
    coded = rng.random(10000) < 0.9
    value = quant.reconstruct(lower, upper, sigma, coded)
    assert (value[coded] >= lower[coded]).all() and (value[coded] <= upper[coded]).all()
    assert (value[~coded] == 0).all()
    # Pulled toward the prior mean 0 relative to the midpoint.
    mid = (lower + upper) / 2
    assert (np.abs(value[coded]) <= np.abs(mid[coded]) + 1e-9).all()


def test_the_scale_shift_is_the_octave_of_the_finest_step_with_hysteresis():
    reference = quant.SCALE_REFERENCE_STEP
    assert quant.scale_shift_for(reference, 0) == 0
    assert quant.scale_shift_for(56.2, 0) == 3  # gdn320 at step 74,026
    assert quant.scale_shift_for(reference * 2 ** 0.7, 0) == 0  # not yet 0.75 octave away
    assert quant.scale_shift_for(reference * 2 ** 0.8, 0) == 1
    assert quant.scale_shift_for(reference * 2 ** 2.3, 3) == 3  # back 0.7: stays
    assert quant.scale_shift_for(reference / 16, 0) == 0  # never below the base table
    assert quant.scale_shift_for(reference / 16, 2) == 0


def test_scale_snapping_is_monotone():
    sigma = np.exp(np.linspace(-5, 6, 1000))
    index = quant.scale_indexes(sigma)
    assert (np.diff(index) >= 0).all() and index.min() == 0 and index.max() == len(quant.SCALES) - 1


def test_training_reconstruction_matches_decoder_reconstruction():
    from pcodec.network import conditional_mean

    rng = np.random.default_rng(4)
    lower = rng.integers(-3000, 3000, 5000)
    upper = lower + rng.integers(1, 300, 5000)
    sigma = rng.uniform(0.5, 800, 5000)
    decoder = quant.reconstruct(lower, upper, sigma, np.ones(5000, bool))
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    training = conditional_mean(as_t(lower), as_t(upper), as_t(sigma)).numpy()
    # torch's log_ndtr is exact, the decoder's good to ~1e-7: 4e-4 of an interval at most
    # (a finest step is 16 grid units), nothing a pixel shows
    assert (np.abs(training - decoder) <= 1e-3 * (upper - lower)).all()


def test_log_ndtr_follows_scipy_far_into_both_tails():
    from scipy.special import log_ndtr

    x = np.linspace(-60, 12, 200001)
    assert np.abs(quant.log_ndtr(x) - log_ndtr(x)).max() < 2e-7
    assert np.isfinite(quant.log_ndtr(np.array([-1e3, 40.0]))).all()


def reference_split_bounds(lower, upper, step, count, stretched, width_out):
    """The rule as first written, one np.where per case (quant.split_bounds is the fast form)."""
    k = np.arange(width_out + 1, dtype=np.int64)[None, :]
    lower, upper, step = lower[:, None], upper[:, None], step[:, None]
    count, stretched = count[:, None], stretched[:, None]
    even = lower + (k * (upper - lower)) // count
    centred = (lower + upper + (2 * k - count) * step) // 2
    bounds = np.where(stretched, even, centred)
    bounds = np.where(k == 0, lower, bounds)
    return np.where(k >= count, upper, bounds)


def test_fast_split_bounds_equal_the_reference_rule():
    rng = np.random.default_rng(7)
    lower, upper, step = random_intervals(rng, 50000)
    # also splits capped at MAX_SPLIT cells and far-from-zero intervals
    lower = np.concatenate([lower, [-(10**9), 5, 0]])
    upper = np.concatenate([upper, [-(10**9) + 16 * 300, 5 + 7 * 200, 1]])
    step = np.concatenate([step, [16, 7, 1]])
    count, stretched = quant.split_counts(lower, upper, step)
    assert count.max() == quant.MAX_SPLIT and stretched.any() and (~stretched).any()
    for width in (int(count.max()), int(count.max()) + 3):
        assert np.array_equal(quant.split_bounds(lower, upper, step, count, stretched, width),
                              reference_split_bounds(lower, upper, step, count, stretched, width))


def test_layers_in_use_finds_layers_that_split_nothing():
    # channel 0: ratios 1.65, every layer splits; channel 1: ratio 1.55 at layer 2, which
    # leaves the uniform cell whole (its slivers would be < 0.3 step), then layer 3 splits;
    # channel 2: equal steps, nothing ever splits
    steps = np.array([[272, 248, 160], [165, 160, 160], [100, 100, 160]], dtype=np.int64)
    use = quant.layers_in_use(steps)
    assert use["channels_split_any"] == [round(1 / 3, 3), round(2 / 3, 3)]
    assert use["channels_split_at_mean"] == [round(1 / 3, 3), round(2 / 3, 3)]


def test_layers_in_use_agrees_with_quantizing_many_values():
    rng = np.random.default_rng(3)
    layers, channels = 5, 12
    steps = np.empty((layers, channels), np.int64)
    steps[-1] = 16
    for layer in range(layers - 2, -1, -1):  # ratios around the 1.6 a split needs
        steps[layer] = np.round(steps[layer + 1] * rng.uniform(1.4, 2.2, channels))
    channel = np.repeat(np.arange(channels), 4000)
    y = np.round(rng.normal(0, 3, len(channel)) * steps[0, channel]).astype(np.int64)
    index = quant.first_layer_index(y, steps[0, channel])
    lower, upper = quant.first_layer_interval(index, steps[0, channel])
    split_seen = np.zeros((layers - 1, channels), bool)
    for layer in range(1, layers):
        step = steps[layer, channel]
        count, stretched = quant.split_counts(lower, upper, step)
        split_seen[layer - 1, np.unique(channel[count > 1])] = True
        bounds = quant.split_bounds(lower, upper, step, count, stretched, int(count.max()))
        cell = quant.sub_interval_index(bounds, count, y)
        rows = np.arange(len(y))
        lower, upper = bounds[rows, cell], bounds[rows, cell + 1]
    expected = [round(v, 3) for v in split_seen.mean(axis=1)]
    assert 0 < min(expected) and max(expected) < 1  # the case has live and idle layers
    assert quant.layers_in_use(steps)["channels_split_any"] == expected
