"""Streams written by an earlier build decode with this one: the same latent, bit for bit,
and an image of the same quality."""

import json

from conftest import synthetic_image
from golden import DATA, cases, decoded, load_model

from pcodec import container
from pcodec.evaluate import psnr


def test_golden_streams_decode_to_recorded_latents():
    expected = json.loads((DATA / "golden.json").read_text())
    assert expected["format_version"] == container.VERSION, "format bumped: regenerate goldens"
    for name, model_id, height, width, seed, _ in cases():
        model = load_model(model_id)
        data = (DATA / f"golden-{name}.pcb").read_bytes()
        source = synthetic_image(height, width, seed)
        for case in expected["streams"][name]:
            result = decoded(model, data, case["options"])
            assert result["latent_sha256"] == case["latent_sha256"], (name, case["options"])
            # bf16 vs float32 synthesis moved these tiny images' PSNR by up to 0.08 dB.
            assert abs(psnr(result["pixels"], source) - case["psnr"]) < 0.25, (name, case["options"])


def test_a_stream_of_a_retired_model_names_it_and_where_its_weights_are(tmp_path):
    from test_cli import pcodec

    result = pcodec("decode", DATA / "golden-hp128-dhq8.pcb", "-o", tmp_path / "x.png")
    assert result.exit_code == 4
    line = result.output.strip()
    assert "golden-hp128-dhq8.pcb" in line or "'hp128-dhq8'" in line
    assert "not installed" in line and "models/hp128-dhq8.pt at commit" in line
    assert not (tmp_path / "x.png").exists()
