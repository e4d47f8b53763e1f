import numpy as np

from pcodec import entropy


def sample(seed=0, count=3000):
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(6) * 0.4, size=count)
    symbols = np.array([rng.choice(6, p=p) for p in probabilities])
    wide = rng.dirichlet(np.ones(33) * 0.2, size=count)  # layer 1's width
    wide_symbols = np.array([rng.choice(33, p=p) for p in wide])
    encoder = entropy.Encoder()
    encoder.categorical(symbols, probabilities)
    encoder.categorical(wide_symbols, wide)
    encoder.uniform(np.arange(10), 1 << 16)
    return encoder.finish(), (probabilities, symbols, wide, wide_symbols)


def decode_all(data, tables, complete=True):
    probabilities, _, wide, _ = tables
    decoder = entropy.Decoder(data, complete)
    return [decoder.categorical(probabilities), decoder.categorical(wide),
            decoder.uniform(10, 1 << 16)]


def test_round_trip():
    data, tables = sample()
    first, second, third = decode_all(data, tables)
    assert (first == tables[1]).all() and (second == tables[3]).all()
    assert (third == np.arange(10)).all()


def test_every_prefix_decodes_a_correct_and_growing_prefix_of_symbols():
    data, tables = sample(1, 800)
    truth = np.concatenate([tables[1], tables[3], np.arange(10)])
    previous = 0
    for end in range(0, len(data) + 1):
        decoded = np.concatenate(decode_all(data[:end], tables, complete=False))
        assert (decoded == truth[: len(decoded)]).all()
        assert len(decoded) >= previous
        previous = len(decoded)
    assert previous == len(truth)


def test_prefix_decoding_is_close_to_ideal():
    """Symbols whose information is complete within the prefix are nearly all recovered."""
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.ones(6) * 0.4, size=4000)
    symbols = np.array([rng.choice(6, p=p) for p in probabilities])
    encoder = entropy.Encoder()
    encoder.categorical(symbols, probabilities)
    data = encoder.finish()
    ideal_end = np.cumsum(-np.log2(probabilities[np.arange(len(symbols)), symbols])) / 8
    for end in (len(data) // 4, len(data) // 2, 3 * len(data) // 4):
        decoded = entropy.Decoder(data[:end], complete=False).categorical(probabilities)
        assert len(decoded) >= 0.97 * int((ideal_end <= end).sum()) - 20


def test_tables_may_be_views():
    """Tables cut out of wider arrays (non-contiguous views) code like copies."""
    rng = np.random.default_rng(5)
    wide = rng.dirichlet(np.ones(8), size=500)
    view = wide[:, :5]
    symbols = rng.integers(0, 5, 500)
    encoder = entropy.Encoder()
    encoder.categorical(symbols, view)
    data = encoder.finish()
    assert (entropy.Decoder(data).categorical(view) == symbols).all()
