"""The Python API does what the command line does, on bytes and arrays."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE

import pcodec
from pcodec import engine
from pcodec.errors import StreamError, UsageError


def test_encode_from_array_path_and_pillow_gives_one_stream(model, sample_image, sample_stream):
    from PIL import Image

    assert pcodec.encode(sample_image) == sample_stream
    assert pcodec.encode(SAMPLE) == sample_stream
    assert pcodec.encode(Image.open(SAMPLE)) == sample_stream
    assert len(pcodec.encode(sample_image, layers=2)) < len(sample_stream)


def test_decode_truncate_and_prefixes_agree(model, sample_stream):
    two_layers = pcodec.decode(sample_stream, layers=2)
    assert np.array_equal(two_layers, engine.decode(model, sample_stream, 2))
    small = pcodec.truncate(sample_stream, layers=2)
    assert np.array_equal(pcodec.decode(small), two_layers)
    document = pcodec.info(small)
    assert document["layers"] == 2 and document["total_bytes"] == len(small)
    whole = pcodec.info(sample_stream)  # layers formed by rate, or the sections
    ends = [layer["cumulative_bytes"] for layer in whole["quality_layers"]] or \
        [section["cumulative_bytes"] for section in whole["sections"][1:]]
    end_of_layer_2 = ends[1]
    sizes = [end_of_layer_2, 3000, len(sample_stream)]
    got = list(pcodec.decode_prefixes(sample_stream, sizes))
    assert [size for size, _ in got] == sorted(sizes)
    assert np.array_equal(dict(got)[end_of_layer_2], two_layers)
    assert np.array_equal(dict(got)[3000], pcodec.decode(sample_stream, max_bytes=3000))


def test_errors_are_pcodec_errors(sample_stream):
    with pytest.raises(StreamError):
        pcodec.decode(b"not a stream")
    with pytest.raises(StreamError):
        pcodec.decode(sample_stream[: len(sample_stream) // 2])
    with pytest.raises(UsageError):
        pcodec.encode(np.zeros((8, 8), np.uint8))
    with pytest.raises(UsageError):
        pcodec.encode(np.zeros((8, 8, 3), np.uint8), layers=99)


def test_import_stays_light():
    code = "import sys, pcodec; print('torch' in sys.modules, 'numpy' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert output.split() == ["False", "False"]
