"""A bounded decoder fuzz run on the tiny test model (`make fuzz`: 100 000 cases, shipped model)."""

import pytest
from fuzzing import check_case, fuzz, sample_streams
from golden import load_test_model


@pytest.fixture(scope="module")
def tiny():
    return load_test_model()


def test_fuzzed_streams_decode_or_fail_cleanly(tiny):
    counts, findings = fuzz(tiny, sample_streams(tiny), cases=3000, seed=7)
    assert not findings, findings[0][2]
    assert any(k.endswith("image/image") for k in counts)  # some mutants stay decodable
    assert any(k.endswith("error/error") for k in counts)


def test_every_prefix_of_a_stream_is_handled(tiny):
    stream, shape = sample_streams(tiny)[1]
    outcomes = {check_case(tiny, stream[:end], shape) for end in range(0, len(stream) + 1)}
    assert outcomes <= {"error/error", "error/image", "image/image"}
