"""Golden streams: written once per format version with the tiny test model (and one with
each shipped model), then
decoded by every later build to the same latent, bit for bit (what the format defines), and
to an image of the same quality (the synthesis arithmetic may change: bf16 or not, CPU or GPU).
`python tests/golden.py` regenerates them (only on a format version bump that older streams
do not survive); `python tests/golden.py --records` writes only missing streams and rewrites
what is recorded (a new model, or a version that still reads the older streams).
"""

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


def load_model(model_id: str):
    from pcodec import models

    return load_test_model() if model_id == TEST_MODEL_ID else models.load(model_id)


def cases():
    """(name, model id, height, width, seed, decode options) of each golden stream."""
    return [("a", TEST_MODEL_ID, 37, 53, 1, [{}, {"layers": 2}, {"max_bytes": 220}]),
            ("b", TEST_MODEL_ID, 1, 1, 2, [{}]),
            ("c", TEST_MODEL_ID, 70, 9, 3, [{}, {"layers": 0}]),
            # the shipped gdn5 models': -r6, and those at M = 320
            ("hp128-dhq8-r6", "hp128-dhq8-r6", 48, 80, 9, [{}, {"layers": 3}, {"max_bytes": 700}]),
            ("gdn320-r1", "gdn320-r1", 48, 80, 9, [{}, {"layers": 3}, {"max_bytes": 700}]),
            # layers formed by deferral thresholds (coding.deferred)
            ("gdn320-r7", "gdn320-r7", 48, 80, 9, [{}, {"layers": 3}, {"max_bytes": 700}]),
            # quality layers formed by rate (format 3), a post-filter told the layer
            # (postfilter.py) with a coarse branch; -r13 the same codec with another filter
            ("gdn320-r12", "gdn320-r12", 64, 96, 9, [{}, {"layers": 3}, {"layers": 6},
                                                     {"max_bytes": 700}]),
            ("gdn320-r13", "gdn320-r13", 64, 96, 9, [{}, {"layers": 3}, {"layers": 6},
                                                     {"max_bytes": 700}])]


def decoded(model, data: bytes, options: dict) -> dict:
    """What a build decodes from a stream: a digest of the latent intervals and the image."""
    from pcodec import engine

    header, payloads, partial = engine.read_stream(model, data, options.get("layers"),
                                                   options.get("max_bytes"))
    *_, (_, state) = engine.decode_latents(model, header, payloads, partial)
    latent = hashlib.sha256(state.coded.tobytes())
    latent.update(state.lower[state.coded].astype("<i8").tobytes())
    latent.update(state.upper[state.coded].astype("<i8").tobytes())
    return {"latent_sha256": latent.hexdigest(),
            "pixels": engine.synthesize(model, state, header.height, header.width,
                                        layers=engine.whole_layers(partial))}


def records(model, name: str, height: int, width: int, seed: int, options: list[dict]):
    from conftest import synthetic_image

    from pcodec.evaluate import psnr

    data = (DATA / f"golden-{name}.pcb").read_bytes()
    source = synthetic_image(height, width, seed)
    rows = []
    for case in options:
        result = decoded(model, data, case)
        rows.append({"options": case, "latent_sha256": result["latent_sha256"],
                     "psnr": round(psnr(result["pixels"], source), 4)})
    return rows


def regenerate(streams: bool):
    from conftest import synthetic_image

    from pcodec import container, engine

    expected = {"format_version": container.VERSION, "streams": {}}
    for name, model_id, height, width, seed, options in cases():
        model = load_model(model_id)
        path = DATA / f"golden-{name}.pcb"
        if streams or not path.exists():
            path.write_bytes(engine.encode(model, synthetic_image(height, width, seed)))
        expected["streams"][name] = records(model, name, height, width, seed, options)
    (DATA / "golden.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    regenerate(streams="--records" not in sys.argv)
