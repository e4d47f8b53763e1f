"""Streams written by an earlier build decode to the same pixels with this one."""

import json

from golden import DATA, load_test_model, pixel_digest

from pcodec import container, engine


def test_golden_streams_decode_to_recorded_pixels():
    expected = json.loads((DATA / "golden.json").read_text())
    assert expected["format_version"] == container.VERSION, "format bumped: regenerate goldens"
    model = load_test_model()
    for name, decodes in expected["streams"].items():
        data = (DATA / f"golden-{name}.pcb").read_bytes()
        for case in decodes:
            assert pixel_digest(engine.decode(model, data, **case["options"])) == case["sha256"], \
                (name, case["options"])
