"""A bounded decoder fuzz run on the tiny test model (`make fuzz`: 100 000 cases, shipped model)."""

import pytest
from fuzzing import check_case, check_cli_case, fuzz, sample_streams
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


def test_fuzzed_streams_through_every_command_exit_by_the_table(tiny, tmp_path, monkeypatch):
    """Mutants through decode, decode --partial, info and truncate, as the CLI runs them
    (10 000 of them: about 100 s on one core)."""
    import json
    import shutil

    from golden import TEST_MODEL, TEST_MODEL_ID

    from pcodec import models

    shutil.copy(TEST_MODEL, tmp_path / "tiny.pt")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"default": TEST_MODEL_ID, "models": {TEST_MODEL_ID: {"file": "tiny.pt"}}}))
    monkeypatch.setenv("PCODEC_MODELS", str(tmp_path))
    models.load.cache_clear()
    try:
        counts, findings = fuzz(tiny, sample_streams(tiny), 10_000, seed=3,
                                check=lambda data, _, rng: check_cli_case(tmp_path, data, rng))
    finally:
        models.load.cache_clear()
    assert not findings, findings[0][2]
    outcomes = {key.split(":")[1] for key in counts}
    assert "0/0/0/0" in outcomes and "3/3/3/3" in outcomes
