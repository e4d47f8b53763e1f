import shutil

import numpy as np
import pytest

from pcodec import bench


def test_bd_rate_worked_example():
    """B spends exactly 20 % fewer bits than A at every PSNR: BD-rate -20 %, and A against B
    +25 %; B is 0.5 dB better at every rate: BD-PSNR +0.5 dB."""
    psnr = np.array([28.0, 31.0, 34.0, 37.0, 40.0])
    rate_a = np.array([0.15, 0.3, 0.6, 1.1, 1.9])
    assert bench.bd_rate(rate_a, psnr, 0.8 * rate_a, psnr) == pytest.approx(-20.0, abs=1e-6)
    assert bench.bd_rate(0.8 * rate_a, psnr, rate_a, psnr) == pytest.approx(25.0, abs=1e-6)
    assert bench.bd_psnr(rate_a, psnr, rate_a, psnr + 0.5) == pytest.approx(0.5, abs=1e-9)
    assert bench.bd_rate(rate_a, psnr, rate_a, psnr) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_uses_only_the_overlap():
    psnr = np.array([28.0, 31.0, 34.0, 37.0])
    rate = np.array([0.2, 0.4, 0.8, 1.6])
    # B only covers the upper half, where it is 10 % cheaper.
    assert bench.bd_rate(rate, psnr, 0.9 * rate[2:], psnr[2:]) == pytest.approx(-10.0, abs=1e-6)
    assert bench.bd_rate(rate[:2], psnr[:2], rate[2:], psnr[2:]) is None


@pytest.mark.skipif(not shutil.which("opj_compress"), reason="OpenJPEG tools not installed")
def test_j2k_layer_prefixes_decode_and_grow(tmp_path):
    from conftest import synthetic_image
    from PIL import Image

    image = synthetic_image(96, 128)
    source = tmp_path / "s.ppm"
    Image.fromarray(image).save(source)
    points = list(bench.Jpeg2000Layered().points(source, image, tmp_path))
    sizes = [p[0] for p in points]
    quality = [bench.psnr(p[1], image) for p in points]
    assert sizes == sorted(sizes) and quality[-1] > quality[0]


def test_ms_ssim_equals_pytorch_msssim():
    """The numpy MS-SSIM is CompressAI's metric (pytorch_msssim), odd sizes included."""
    import torch
    from pytorch_msssim import ms_ssim as reference

    rng = np.random.default_rng(3)
    for shape in [(170, 161, 3), (203, 333, 3)]:
        a = rng.integers(0, 256, shape).astype(np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-30, 30, shape), 0, 255).astype(np.uint8)
        expected = float(reference(*(torch.from_numpy(v).permute(2, 0, 1)[None].float()
                                     for v in (a, b)), data_range=255))
        assert abs(bench.ms_ssim(a, b) - expected) < 1e-5
    assert bench.ms_ssim(a, a) == pytest.approx(1.0)
    assert bench.ms_ssim(a[:100], b[:100]) is None


def test_reuse_takes_the_codecs_not_run_from_an_earlier_run(tmp_path):
    import json

    from PIL import Image

    from pcodec.bench import REFERENCE, run_bench

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / name)
    rows = [{"image": image, "codec": codec, "bytes": 100 * k, "bpp": k * gain, "psnr": 20 + 3 * k,
             "ms_ssim": None, "encode_s": 0.1, "decode_s": 0.1}
            for image in ("a.png", "b.png", "elsewhere.png")
            for codec, gain in ((REFERENCE, 1.0), ("Other", 1.5)) for k in (1, 2, 3, 4)]
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"rows": rows, "bench_seconds": {"Other": 7.0}}))
    result = run_bench(folder, tmp_path / "out", None, 2, ["no codec has this name"],
                       progress=False, reuse=earlier)
    assert set(result["reused_from"]) == {REFERENCE, "Other"}
    assert result["bench_seconds"] == {"Other": 7.0}
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(saved["rows"]) == 16  # the two images of this folder only
    assert abs(result["bd_rate_percent"]["Other"][REFERENCE] - 50.0) < 1e-6


def test_nesting_cost_layer_one_is_the_uniform_quantizer(model, sample_image):
    """Layer 1 of the hierarchy is itself a uniform grid on y - mu, so the bisection must find
    the same rate there; later layers are compared at their own PSNR, which rises."""
    from pcodec.evaluate import nesting_cost

    rows = nesting_cost(model, sample_image)
    assert [row["layer"] for row in rows] == list(range(1, model.layers + 1))
    assert rows[0]["uniform_bpp"] == pytest.approx(rows[0]["nested_bpp"], rel=0.02)
    quality = [row["psnr"] for row in rows]
    assert quality == sorted(quality) and quality[-1] > quality[0]
    assert all(row["uniform_bpp"] > 0 for row in rows)


def test_each_images_own_bd_rate_does_not_depend_on_where_the_points_sit():
    """Points on the reference's own curves, at other rates in each image: each image's
    BD-rate is 0, while the BD-rate of the mean curves is not (a mean of points at varied
    rates lies below the images' curves)."""
    from pcodec.bench import REFERENCE, summarize

    rates = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    rows = []
    for image, offset, shift in (("a", 30.0, 1.3), ("b", 20.0, 0.7)):
        for codec, bpp in ((REFERENCE, rates), ("Other", rates * shift)):
            rows += [{"image": image, "codec": codec, "bytes": int(1000 * b), "bpp": float(b),
                      "psnr": offset + 6 * np.log2(b), "ms_ssim": None, "encode_s": 0.1,
                      "decode_s": 0.1} for b in bpp]
    result = summarize(rows, 2)
    assert abs(result["per_image_bd_rate_vs_reference_percent"]["Other"]["mean"]) < 1e-6
    assert result["bd_rate_percent"]["Other"][REFERENCE] > 1.0
