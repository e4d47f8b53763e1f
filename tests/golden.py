"""Golden streams: written once per format version with the tiny test model, then decoded by
every later build to the same pixels. `python tests/golden.py` regenerates them (only on a
format version bump)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TEST_MODEL = DATA / "tiny-test.pt"
TEST_MODEL_ID = "tiny-test"


def load_test_model():
    from pcodec.models import load_weights_file

    return load_weights_file(TEST_MODEL, TEST_MODEL_ID)


def cases():
    """(name, height, width, seed, decode options) of each golden stream."""
    return [("a", 37, 53, 1, [{}, {"layers": 2}, {"max_bytes": 220}]),
            ("b", 1, 1, 2, [{}]),
            ("c", 70, 9, 3, [{}, {"layers": 0}])]


def pixel_digest(pixels) -> str:
    return hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def regenerate():
    from conftest import synthetic_image

    from pcodec import container, engine

    model = load_test_model()
    expected = {"format_version": container.VERSION, "streams": {}}
    for name, height, width, seed, options in cases():
        data = engine.encode(model, synthetic_image(height, width, seed))
        (DATA / f"golden-{name}.pcb").write_bytes(data)
        expected["streams"][name] = [
            {"options": o, "sha256": pixel_digest(engine.decode(model, data, **o))} for o in options]
    (DATA / "golden.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    regenerate()
