import numpy as np

from pcodec import entropy


def sample_parts(seed=0, count=3000):
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(6) * 0.4, size=count)
    symbols = np.array([rng.choice(6, p=p) for p in probabilities])
    stds = rng.uniform(0.05, 20, count)
    gaussian = np.clip(np.round(rng.normal(0, stds)), -100, 100).astype(np.int64)
    return [(entropy.Model(probabilities=probabilities), symbols),
            (entropy.Model(gaussian_range=100, stds=stds), gaussian)]


def test_round_trip():
    parts = sample_parts()
    data = entropy.encode(parts)
    decoded = entropy.decode(data, [m for m, _ in parts])
    for (_, symbols), got in zip(parts, decoded):
        assert (got == symbols).all()


def test_every_prefix_decodes_a_correct_and_growing_prefix_of_symbols():
    parts = sample_parts(1, 800)
    truth = np.concatenate([s for _, s in parts])
    data = entropy.encode(parts)
    previous = 0
    for end in range(0, len(data) + 1):
        decoded = np.concatenate(entropy.decode(data[:end], [m for m, _ in parts], complete=False))
        assert (decoded == truth[: len(decoded)]).all()
        assert len(decoded) >= previous
        previous = len(decoded)
    assert previous == len(truth)


def test_prefix_decoding_is_close_to_ideal():
    """Symbols whose information is complete within the prefix are nearly all recovered."""
    parts = sample_parts(2, 4000)
    model = parts[0][0]
    symbols = parts[0][1]
    data = entropy.encode(parts[:1])
    bits = -np.log2(model.probabilities[np.arange(len(symbols)), symbols])
    ideal_end = np.cumsum(bits) / 8
    for end in (len(data) // 4, len(data) // 2, 3 * len(data) // 4):
        (decoded,) = entropy.decode(data[:end], [model], complete=False)
        ideal = int((ideal_end <= end).sum())
        assert len(decoded) >= 0.97 * ideal - 20
