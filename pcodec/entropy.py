"""Range coding with constriction: numpy arrays in, bytes out. The only module that calls it.

Streams are constriction's 32-bit words written big-endian, so that a byte prefix of a stream
holds the most significant bits first. A prefix is decoded by running two decoders, one on the
prefix padded with zero bits and one padded with one bits: a range decoder's symbols are a
monotone function of the code value, so every symbol on which the two agree is the symbol any
continuation of the prefix would give.

Encoder and Decoder take symbols in chunks (whole numpy arrays per call), so callers can build
probability tables for one chunk at a time and keep memory bounded.
"""

from __future__ import annotations

import numpy as np

from .errors import StreamError

_PAD_WORDS = 4  # padding beyond a prefix: enough that both decoders diverge before running dry
_PREFIX_BATCH = 256  # symbols decoded per step when decoding a prefix


def _constriction():
    import constriction

    return constriction


def _family(kind: str, parameter):
    model = _constriction().stream.model
    if kind == "categorical":
        return model.Categorical(perfect=False)
    return model.Uniform(parameter)


def _params(kind: str, table, start: int, stop: int):
    """Per-symbol model parameters; constriction needs C-contiguous float64 arrays."""
    if kind == "uniform":
        return ()
    return (np.ascontiguousarray(table[start:stop], dtype=np.float64),)


class Encoder:
    """Appends symbols to one range-coded stream."""

    def __init__(self):
        self._encoder = _constriction().stream.queue.RangeEncoder()

    def categorical(self, symbols: np.ndarray, probabilities: np.ndarray):
        """Symbol i in 0..n-1 with probabilities[i] (rows need not be normalised)."""
        self._encode("categorical", None, symbols, probabilities)

    def uniform(self, symbols: np.ndarray, size: int):
        self._encode("uniform", size, symbols, None)

    def _encode(self, kind, parameter, symbols, table):
        if len(symbols):
            self._encoder.encode(np.asarray(symbols, np.int32), _family(kind, parameter),
                                 *_params(kind, table, 0, len(symbols)))

    def finish(self) -> bytes:
        return self._encoder.get_compressed().astype(">u4").tobytes()


class Decoder:
    """Reads symbols back from a stream, or from a prefix of one (complete=False).

    On a prefix, each call returns the leading symbols the prefix determines; once a call
    returns fewer than asked, `exhausted` is set and every later call returns nothing.
    A complete stream that cannot have been produced by the same calls raises StreamError.
    """

    def __init__(self, data: bytes, complete: bool = True):
        queue = _constriction().stream.queue
        self.complete = complete
        self.exhausted = False
        if complete:
            usable = len(data) - len(data) % 4
            self._decoders = [queue.RangeDecoder(_words(data[:usable]))]
        else:
            tail = (-len(data)) % 4 + 4 * _PAD_WORDS
            self._decoders = [queue.RangeDecoder(_words(data + fill * tail))
                              for fill in (b"\x00", b"\xff")]

    def categorical(self, probabilities: np.ndarray) -> np.ndarray:
        return self._decode("categorical", None, probabilities, len(probabilities))

    def uniform(self, count: int, size: int) -> np.ndarray:
        return self._decode("uniform", size, None, count)

    def _decode(self, kind, parameter, table, count) -> np.ndarray:
        if count == 0 or self.exhausted:
            return np.zeros(0, np.int64)
        if self.complete:
            try:
                return self._decode_with(self._decoders[0], kind, parameter, table, 0, count)
            except (AssertionError, ValueError, RuntimeError) as error:
                # constriction reports data that no encoder could have produced this way.
                raise StreamError(f"corrupt stream: entropy decoding failed ({error})") from None
        decoded, position = [], 0
        while position < count:
            stop = min(count, position + _PREFIX_BATCH)
            low, high = self._decode_pair(kind, parameter, table, position, stop)
            differ = np.nonzero(low != high)[0]
            agreed = low[: differ[0]] if len(differ) else low
            decoded.append(agreed)
            if len(agreed) < stop - position:
                self.exhausted = True
                break
            position = stop
        return np.concatenate(decoded) if decoded else np.zeros(0, np.int64)

    def _decode_pair(self, kind, parameter, table, start, stop):
        saved = [decoder.clone() for decoder in self._decoders]
        try:
            return tuple(self._decode_with(d, kind, parameter, table, start, stop)
                         for d in self._decoders)
        except Exception:
            # constriction raises on some impossible padded tails: redo this batch one symbol
            # at a time to keep the symbols before the failure.
            self._decoders = saved
            pairs = []
            for position in range(start, stop):
                try:
                    pairs.append([self._decode_with(d, kind, parameter, table, position,
                                                    position + 1)[0] for d in self._decoders])
                except Exception:
                    break
            pairs = np.array(pairs, np.int64).reshape(-1, 2)
            return pairs[:, 0], pairs[:, 1]

    @staticmethod
    def _decode_with(decoder, kind, parameter, table, start, stop) -> np.ndarray:
        family = _family(kind, parameter)
        if kind == "uniform":
            symbols = decoder.decode(family, stop - start)
        else:
            symbols = decoder.decode(family, *_params(kind, table, start, stop))
        return np.asarray(symbols, dtype=np.int64).reshape(-1)


def _words(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=">u4").astype(np.uint32)
