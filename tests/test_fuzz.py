"""A bounded decoder fuzz run (`make fuzz` runs 100 000 cases)."""

from fuzzing import fuzz, sample_streams


def test_fuzzed_streams_decode_or_fail_cleanly(model):
    counts, findings = fuzz(model, sample_streams(model), cases=2000, seed=7)
    assert not findings, findings[0][2]
    assert any(k.endswith("image/image") for k in counts)  # some mutants stay decodable
    assert any(k.endswith("error/error") for k in counts)


def test_every_prefix_of_a_stream_is_handled(model):
    from fuzzing import check_case

    stream, shape = sample_streams(model)[1]
    outcomes = {check_case(model, stream[:end], shape) for end in range(0, len(stream) + 1, 3)}
    assert outcomes <= {"error/error", "error/image", "image/image"}
