"""Range coding with constriction: numpy arrays in, bytes out. The only module that calls it.

Streams are constriction's 32-bit words written big-endian, so that a byte prefix of a stream
holds the most significant bits first. A prefix is decoded by running two decoders, one on the
prefix padded with zero bits and one padded with one bits: a range decoder's symbols are a
monotone function of the code value, so every symbol on which the two agree is the symbol any
continuation of the prefix would give (see decode_prefix).
"""

from __future__ import annotations

import numpy as np

from .errors import StreamError

_PAD_WORDS = 4  # padding beyond a prefix: enough that both decoders diverge before running dry
_PREFIX_BATCH = 256  # symbols decoded per step when decoding a prefix


def _constriction():
    import constriction

    return constriction


def _to_bytes(words: np.ndarray) -> bytes:
    return words.astype(">u4").tobytes()


def _to_words(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=">u4").astype(np.uint32)


class Model:
    """A family of per-symbol distributions: categorical tables or quantized Gaussians."""

    def __init__(self, probabilities: np.ndarray | None = None, gaussian_range: int | None = None,
                 stds: np.ndarray | None = None):
        self.probabilities = probabilities
        self.gaussian_range = gaussian_range
        self.stds = stds

    def __len__(self) -> int:
        return len(self.probabilities) if self.probabilities is not None else len(self.stds)

    def _family_and_params(self, start: int, stop: int):
        model = _constriction().stream.model
        if self.probabilities is not None:
            return model.Categorical(perfect=False), (self.probabilities[start:stop],)
        r = self.gaussian_range
        stds = self.stds[start:stop]
        return model.QuantizedGaussian(-r, r), (np.zeros_like(stds), stds)

    def encode(self, encoder, symbols: np.ndarray):
        family, params = self._family_and_params(0, len(self))
        encoder.encode(symbols.astype(np.int32), family, *params)

    def decode(self, decoder, start: int, stop: int) -> np.ndarray:
        family, params = self._family_and_params(start, stop)
        return np.asarray(decoder.decode(family, *params), dtype=np.int64)


def encode(parts) -> bytes:
    """One range-coded stream of several (model, symbols) parts, in order."""
    encoder = _constriction().stream.queue.RangeEncoder()
    for model, symbols in parts:
        if len(symbols):
            model.encode(encoder, symbols)
    return _to_bytes(encoder.get_compressed())


def encode_uniform(values: np.ndarray, bits: int = 16) -> list:
    """Parts coding non-negative integers < 2**(2*bits) as two uniform halves."""
    values = values.astype(np.int64)
    high, low = values >> bits, values & ((1 << bits) - 1)
    return [(_UniformModel(1 << bits, len(values)), high), (_UniformModel(1 << bits, len(values)), low)]


class _UniformModel(Model):
    def __init__(self, size: int, count: int):
        super().__init__()
        self.size, self.count = size, count

    def __len__(self) -> int:
        return self.count

    def _family_and_params(self, start, stop):
        return _constriction().stream.model.Uniform(self.size), ()

    def decode(self, decoder, start: int, stop: int) -> np.ndarray:
        model = _constriction().stream.model.Uniform(self.size)
        return np.asarray(decoder.decode(model, stop - start), dtype=np.int64).reshape(-1)


def decode(data: bytes, models, complete: bool = True) -> list[np.ndarray]:
    """Decode the symbols of each model in turn.

    complete: the stream is whole; every symbol is decoded (a corrupt stream may give wrong
    symbols, which the container's CRC guards against). Otherwise `data` is a prefix and
    each returned array holds only the leading symbols the prefix determines; once one
    model's symbols stop short, the later models get empty arrays.
    """
    constriction = _constriction()
    if not complete:
        return decode_prefix(data, models)
    usable = len(data) - len(data) % 4
    decoder = constriction.stream.queue.RangeDecoder(_to_words(data[:usable]))
    try:
        return [model.decode(decoder, 0, len(model)) if len(model) else np.zeros(0, np.int64)
                for model in models]
    except (AssertionError, ValueError, RuntimeError) as error:
        # constriction reports data that no encoder could have produced this way.
        raise StreamError(f"corrupt stream: entropy decoding failed ({error})") from None


def decode_prefix(data: bytes, models) -> list[np.ndarray]:
    constriction = _constriction()
    tail = (-len(data)) % 4
    low = data + b"\x00" * (tail + 4 * _PAD_WORDS)
    high = data + b"\xff" * (tail + 4 * _PAD_WORDS)
    decoders = [constriction.stream.queue.RangeDecoder(_to_words(buf)) for buf in (low, high)]
    results, stopped = [], False
    for model in models:
        decoded = []
        position = 0
        while not stopped and position < len(model):
            stop = min(len(model), position + _PREFIX_BATCH)
            saved = [decoder.clone() for decoder in decoders]
            try:
                a = model.decode(decoders[0], position, stop)
                b = model.decode(decoders[1], position, stop)
            except Exception:
                # constriction raises on some impossible padded tails: redo this batch one
                # symbol at a time to keep the symbols before the failure.
                decoders = saved
                a, b = _decode_until_failure(model, decoders, position, stop)
            differ = np.nonzero(a != b)[0]
            if len(differ) or len(a) < stop - position:
                decoded.append(a[: differ[0]] if len(differ) else a)
                stopped = True
                break
            decoded.append(a)
            position = stop
        results.append(np.concatenate(decoded) if decoded else np.zeros(0, np.int64))
        if len(results[-1]) < len(model):
            stopped = True
    return results


def _decode_until_failure(model, decoders, start, stop):
    symbols = ([], [])
    for position in range(start, stop):
        try:
            pair = [model.decode(decoder, position, position + 1)[0] for decoder in decoders]
        except Exception:
            break
        symbols[0].append(pair[0])
        symbols[1].append(pair[1])
    return np.array(symbols[0], np.int64), np.array(symbols[1], np.int64)
