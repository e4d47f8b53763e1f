"""End-to-end CLI behaviour: the user's own examples, pipes, batch runs and clean errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE, synthetic_image
from PIL import Image

from pcodec.cli import main


def pcodec(*args, input=None, cwd=None):
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        result = runner.invoke(main, [str(a) for a in args], input=input)
    finally:
        if cwd is not None:
            os.chdir(old)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def save(array, path, mode=None, **options):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(path, **options)
    return path


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "img.png").write_bytes(SAMPLE.read_bytes())
    return tmp_path


def test_users_examples_work_as_written(workdir):
    assert pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir).exit_code == 0
    original = (workdir / "img.png").read_bytes()
    result = pcodec("decode", "img.pcb", "--layers", "3", cwd=workdir)
    assert result.exit_code == 0
    assert (workdir / "img.png").read_bytes() == original  # the original is never clobbered
    decoded = [p for p in workdir.iterdir() if p.suffix == ".png" and p.name != "img.png"]
    assert len(decoded) == 1
    again = pcodec("decode", "img.pcb", "--layers", "3", cwd=workdir)  # never replaced unasked
    assert again.exit_code == 1 and "img.l3.png: exists" in again.stderr
    assert pcodec("decode", "img.pcb", "--layers", "3", "-f", cwd=workdir).exit_code == 0
    assert len([p for p in workdir.iterdir() if p.suffix == ".png"]) == 2
    result = pcodec("truncate", "img.pcb", "--bytes", "5000", "-o", "small.pcb", cwd=workdir)
    assert result.exit_code == 0 and (workdir / "small.pcb").stat().st_size <= 5000
    info = pcodec("info", "img.pcb", cwd=workdir)
    assert info.exit_code == 0 and "layer 8" in info.stdout


def test_info_json(workdir):
    pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    import json

    document = json.loads(pcodec("info", "--json", "img.pcb", cwd=workdir).stdout)
    assert document["width"] == 384 and document["height"] == 256 and document["layers"] == 8
    assert document["total_bytes"] == (workdir / "img.pcb").stat().st_size
    assert document["status"] == "complete"


def test_truncate_is_a_filter(workdir):
    pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    data = (workdir / "img.pcb").read_bytes()
    result = pcodec("truncate", "--bytes", "3000", input=data)
    assert result.exit_code == 0 and 0 < len(result.stdout_bytes) <= 3000
    again = pcodec("truncate", "-", "--bytes", "3000", input=data)
    assert again.stdout_bytes == result.stdout_bytes


def test_pipeline_through_real_pipes_is_byte_identical(tmp_path):
    sample = str(SAMPLE)
    command = (f"{sys.executable} -m pcodec encode - < {sample} | {sys.executable} -m pcodec "
               f"truncate - --bytes 6000 | {sys.executable} -m pcodec decode - -o {tmp_path}/b.png")
    subprocess.run(command, shell=True, check=True, capture_output=True)
    # The same through files, in-process.
    pcodec("encode", sample, "-o", tmp_path / "a.pcb")
    pcodec("truncate", tmp_path / "a.pcb", "--bytes", "6000", "-o", tmp_path / "a6.pcb")
    pcodec("decode", tmp_path / "a6.pcb", "-o", tmp_path / "a.png")
    assert (np.asarray(Image.open(tmp_path / "b.png")) == np.asarray(Image.open(tmp_path / "a.png"))).all()


def test_decoded_pixels_do_not_depend_on_the_blas_thread_count(tmp_path, sample_stream):
    (tmp_path / "s.pcb").write_bytes(sample_stream)
    outputs = []
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-m", "pcodec", "decode", "s.pcb", "-o", f"{threads}.ppm",
                        "-q"], cwd=tmp_path, env=env, check=True, capture_output=True)
        outputs.append((tmp_path / f"{threads}.ppm").read_bytes())
    assert outputs[0] == outputs[1]


# The latent digest the golden tests record (golden.decoded), in a fresh process.
LATENT_DIGEST = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from golden import decoded
from pcodec import models
print(decoded(models.load(), open(sys.argv[1], "rb").read(), {{}})["latent_sha256"])
"""


def test_decode_in_fresh_process_with_other_thread_count_is_bit_exact(tmp_path):
    """The decoded latent (prior and intervals) is the same whatever the thread count. The
    float32 synthesis may differ by a level in a few pixels: OpenBLAS's threaded kernels may
    sum in another order (seen with OPENBLAS_CORETYPE=Haswell on an AMD EPYC: 3 pixels)."""
    pcodec("encode", SAMPLE, "-o", tmp_path / "s.pcb")
    digests, outputs = [], []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        digests.append(subprocess.run([sys.executable, "-c", LATENT_DIGEST, str(tmp_path / "s.pcb")],
                                      check=True, env=env, capture_output=True, text=True).stdout)
        out = tmp_path / f"t{threads}.png"
        subprocess.run([sys.executable, "-m", "pcodec", "decode", str(tmp_path / "s.pcb"), "-o",
                        str(out)], check=True, env=env, capture_output=True)
        outputs.append(np.asarray(Image.open(out)).astype(int))
    assert len(digests[0]) == 65 and digests[0] == digests[1]
    difference = np.abs(outputs[0] - outputs[1])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-4


@pytest.mark.parametrize("kind", ["truncated", "bitflip", "empty", "text", "png"])
def test_bad_streams_exit_3_with_one_line_and_no_output(workdir, kind):
    pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    data = (workdir / "img.pcb").read_bytes()
    bad = {
        "truncated": data[: len(data) // 2],
        "bitflip": data[:200] + bytes([data[200] ^ 0x10]) + data[201:],
        "empty": b"",
        "text": b"this is not a pcb file\n" * 10,
        "png": (workdir / "img.png").read_bytes(),
    }[kind]
    (workdir / "bad.pcb").write_bytes(bad)
    for command in (["decode", "bad.pcb", "-o", "out.png"], ["info", "bad.pcb"],
                    ["truncate", "bad.pcb", "--bytes", "500", "-o", "out.pcb"]):
        result = pcodec(*command, cwd=workdir)
        assert result.exit_code == 3, (command, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "out.png").exists() and not (workdir / "out.pcb").exists()


def test_truncated_stream_decodes_with_partial(workdir):
    pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    data = (workdir / "img.pcb").read_bytes()
    (workdir / "cut.pcb").write_bytes(data[: len(data) // 2])
    result = pcodec("decode", "--partial", "cut.pcb", "-o", "cut.png", cwd=workdir)
    assert result.exit_code == 0
    expected = pcodec("decode", "img.pcb", "--bytes", len(data) // 2, "-o", "ref.png", cwd=workdir)
    assert expected.exit_code == 0
    assert (np.asarray(Image.open(workdir / "cut.png")) == np.asarray(Image.open(workdir / "ref.png"))).all()


def test_unreadable_and_non_image_inputs(workdir):
    (workdir / "notes.txt").write_text("hello")
    for name in ("missing.png", "notes.txt"):
        result = pcodec("encode", name, "-o", "x.pcb", cwd=workdir)
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "x.pcb").exists()


def test_failed_run_leaves_existing_output_intact(workdir):
    (workdir / "keep.png").write_bytes(b"precious")
    (workdir / "bad.pcb").write_bytes(b"garbage")
    assert pcodec("decode", "bad.pcb", "-o", "keep.png", "-f", cwd=workdir).exit_code == 3
    assert (workdir / "keep.png").read_bytes() == b"precious"
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


def test_batch_goes_on_past_a_bad_file(workdir):
    save(synthetic_image(20, 30), workdir / "a.png")
    (workdir / "b.png").write_text("not an image")
    save(synthetic_image(30, 20, 1), workdir / "c.png")
    (workdir / "out").mkdir()
    result = pcodec("encode", "a.png", "b.png", "c.png", "-o", "out", cwd=workdir)
    assert result.exit_code == 1
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["a.pcb", "c.pcb"]


def test_parallel_jobs_give_the_same_files_and_go_on_past_a_bad_one(workdir):
    for name, seed in (("a", 0), ("c", 1), ("d", 2)):
        save(synthetic_image(40, 56, seed), workdir / f"{name}.png")
    (workdir / "b.png").write_text("not an image")
    (workdir / "one").mkdir()
    (workdir / "two").mkdir()
    names = ["a.png", "b.png", "c.png", "d.png"]
    assert pcodec("encode", *names, "-o", "one", cwd=workdir).exit_code == 1
    result = pcodec("encode", *names, "-o", "two", "-j", "2", cwd=workdir)
    assert result.exit_code == 1 and "3 of 4 inputs done, 1 failed" in result.stderr
    streams = sorted(p.name for p in (workdir / "one").iterdir())
    assert streams == ["a.pcb", "c.pcb", "d.pcb"]
    for name in streams:
        assert (workdir / "one" / name).read_bytes() == (workdir / "two" / name).read_bytes()
    result = pcodec("decode", *(f"two/{n}" for n in streams), "-o", "two", "--layers", "2",
                    "-j", "2", cwd=workdir)
    assert result.exit_code == 0
    assert sorted(p.name for p in (workdir / "two").glob("*.png")) == ["a.l2.png", "c.l2.png", "d.l2.png"]


def test_an_existing_output_is_replaced_only_with_force_by_every_command(workdir):
    (workdir / "img.pcb").write_bytes(b"old")
    result = pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    assert result.exit_code == 1 and "img.pcb: exists (-f/--force replaces it)" in result.stderr
    assert (workdir / "img.pcb").read_bytes() == b"old"
    assert pcodec("encode", "img.png", "-o", "img.pcb", "--force", cwd=workdir).exit_code == 0
    (workdir / "cut.pcb").write_bytes(b"old")
    assert pcodec("truncate", "img.pcb", "--layers", "2", "-o", "cut.pcb", cwd=workdir).exit_code == 1
    assert pcodec("truncate", "img.pcb", "--layers", "2", "-o", "cut.pcb", "-f",
                  cwd=workdir).exit_code == 0
    assert (workdir / "cut.pcb").read_bytes() != b"old"


def test_usage_errors_exit_2(workdir):
    assert pcodec("decode", "--layers", "-1", "img.pcb", cwd=workdir).exit_code == 2
    assert pcodec("truncate", "img.pcb", cwd=workdir).exit_code == 2
    assert pcodec("frobnicate", cwd=workdir).exit_code == 2


def test_encode_refine_writes_a_different_stream_that_decodes(workdir):
    assert pcodec("encode", "img.png", "-o", "plain.pcb", cwd=workdir).exit_code == 0
    assert pcodec("encode", "img.png", "--refine", "2", "-o", "refined.pcb",
                  cwd=workdir).exit_code == 0
    assert (workdir / "refined.pcb").read_bytes() != (workdir / "plain.pcb").read_bytes()
    assert pcodec("decode", "refined.pcb", "-o", "out.png", cwd=workdir).exit_code == 0
    assert Image.open(workdir / "out.png").size == Image.open(workdir / "img.png").size
    assert pcodec("encode", "img.png", "--refine", "-1", "-o", "x.pcb", cwd=workdir).exit_code == 2


def test_encode_to_a_byte_budget_equals_encode_then_truncate(workdir):
    assert pcodec("encode", "img.png", "-o", "full.pcb", cwd=workdir).exit_code == 0
    assert pcodec("truncate", "full.pcb", "--bytes", "3000", "-o", "cut.pcb",
                  cwd=workdir).exit_code == 0
    assert pcodec("encode", "img.png", "--bytes", "3000", "-o", "a.pcb", cwd=workdir).exit_code == 0
    assert (workdir / "a.pcb").read_bytes() == (workdir / "cut.pcb").read_bytes()
    width, height = Image.open(workdir / "img.png").size
    assert pcodec("encode", "img.png", "--bpp", "0.5", "-o", "b.pcb", cwd=workdir).exit_code == 0
    budget = width * height // 16
    assert budget - 2 <= (workdir / "b.pcb").stat().st_size <= budget
    assert pcodec("encode", "img.png", "--bpp", "1", "--bytes", "9", cwd=workdir).exit_code == 2
    result = pcodec("encode", "img.png", "--bytes", "10", "-o", "c.pcb", cwd=workdir)
    assert result.exit_code == 2 and not (workdir / "c.pcb").exists()


def test_layers_at_rates_given_on_the_command_line(workdir):
    """--layer-bpp: quality layers ending at those file sizes (format 3), the rest one more
    layer; `info` lists them and `decode --layers K` / `truncate --layers K` use them."""
    import json

    width, height = Image.open(workdir / "img.png").size
    assert pcodec("encode", "img.png", "--layer-bpp", "0.25,0.5", "-o", "r.pcb",
                  cwd=workdir).exit_code == 0
    document = json.loads(pcodec("info", "--json", "r.pcb", cwd=workdir).stdout)
    assert document["format_version"] == 3 and document["layers"] == 3
    ends = [layer["cumulative_bytes"] for layer in document["quality_layers"]]
    assert ends[0] <= width * height * 0.25 / 8 < ends[0] + 1 and ends[2] == document["total_bytes"]
    assert "quality layer 2" in pcodec("info", "r.pcb", cwd=workdir).stdout
    assert pcodec("truncate", "r.pcb", "--layers", "2", "-o", "r2.pcb", cwd=workdir).exit_code == 0
    assert (workdir / "r2.pcb").stat().st_size <= width * height * 0.5 / 8
    for name in ("r.pcb", "r2.pcb"):
        assert pcodec("decode", name, "--layers", "2", "-o", f"{name}.png", cwd=workdir).exit_code == 0
    assert (workdir / "r.pcb.png").read_bytes() == (workdir / "r2.pcb.png").read_bytes()
    assert pcodec("decode", "r2.pcb", "--layers", "3", cwd=workdir).exit_code == 2
    assert pcodec("encode", "img.png", "--layer-bpp", "none", "-o", "s.pcb",
                  cwd=workdir).exit_code == 0
    assert json.loads(pcodec("info", "--json", "s.pcb", cwd=workdir).stdout)["format_version"] == 2
    for bad in ("0.5,0.25", "0,1", "a,b", ""):
        assert pcodec("encode", "img.png", "--layer-bpp", bad, "-o", "x.pcb",
                      cwd=workdir).exit_code == 2
    assert not (workdir / "x.pcb").exists()


def test_device_option(workdir):
    import torch

    assert pcodec("encode", "img.png", "-o", "a.pcb", "--device", "cpu", cwd=workdir).exit_code == 0
    assert pcodec("encode", "img.png", "-o", "b.pcb", cwd=workdir).exit_code == 0
    assert (workdir / "a.pcb").read_bytes() == (workdir / "b.pcb").read_bytes()
    if not torch.cuda.is_available():
        result = pcodec("encode", "img.png", "-o", "c.pcb", "--device", "cuda", cwd=workdir)
        assert result.exit_code == 2 and "no CUDA device" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (workdir / "c.pcb").exists()


IMAGE_KINDS = {
    "gray": lambda a, p: save(a, p, "L"),
    "palette": lambda a, p: save(a, p, "P"),
    "rgba": lambda a, p: save(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)]), p),
    "gray16": lambda a, p: Image.fromarray(a[:, :, 0].astype(np.uint16) * 257).save(p),
    "cmyk_jpeg": lambda a, p: save(a, p.with_suffix(".jpg"), "CMYK", quality=95),
    "tiff": lambda a, p: save(a, p.with_suffix(".tif")),
    "bmp": lambda a, p: save(a, p.with_suffix(".bmp")),
    "ppm": lambda a, p: save(a, p.with_suffix(".ppm")),
    "webp": lambda a, p: save(a, p.with_suffix(".webp"), lossless=True),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_input_kinds(tmp_path, kind):
    array = synthetic_image(33, 47, seed=5)
    path = IMAGE_KINDS[kind](array, tmp_path / "in.png") or tmp_path / "in.png"
    result = pcodec("encode", path, "-o", tmp_path / "x.pcb")
    assert result.exit_code == 0, result.output
    if kind == "rgba":
        assert "alpha channel dropped" in result.stderr
    assert pcodec("decode", tmp_path / "x.pcb", "-o", tmp_path / "x.png").exit_code == 0
    decoded = np.asarray(Image.open(tmp_path / "x.png"))
    assert decoded.shape == (33, 47, 3)


def test_exif_orientation_is_applied(tmp_path):
    array = synthetic_image(20, 40)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    pcodec("encode", tmp_path / "r.jpg", "-o", tmp_path / "r.pcb")
    pcodec("decode", tmp_path / "r.pcb", "-o", tmp_path / "r.png")
    assert np.asarray(Image.open(tmp_path / "r.png")).shape == (40, 20, 3)


def test_animated_input_is_refused(tmp_path):
    frames = [Image.fromarray(synthetic_image(16, 16, s)) for s in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    result = pcodec("encode", tmp_path / "a.gif", "-o", tmp_path / "a.pcb")
    assert result.exit_code == 1 and "animated" in result.stderr


def test_pixel_limit_is_checked_from_the_image_header(tmp_path):
    save(synthetic_image(64, 64), tmp_path / "big.png")
    result = pcodec("encode", tmp_path / "big.png", "-o", tmp_path / "b.pcb", "--max-pixels", "1000")
    assert result.exit_code == 1 and "pixel limit" in result.stderr


def test_output_type_follows_extension(tmp_path):
    pcodec("encode", SAMPLE, "-o", tmp_path / "s.pcb")
    for suffix, fmt in ((".ppm", "PPM"), (".bmp", "BMP"), (".png", "PNG")):
        assert pcodec("decode", tmp_path / "s.pcb", "-o", tmp_path / f"s{suffix}").exit_code == 0
        assert Image.open(tmp_path / f"s{suffix}").format == fmt
    assert pcodec("decode", tmp_path / "s.pcb", "-o", tmp_path / "s.xyz").exit_code == 2


def test_stats_line(workdir):
    result = pcodec("encode", "img.png", "-o", "img.pcb", cwd=workdir)
    line = result.stderr.strip()
    assert "bytes" in line and "bpp" in line and "8 layers" in line and len(line.splitlines()) == 1
    assert pcodec("-q", "encode", "img.png", "-o", "img2.pcb", cwd=workdir).stderr == ""


def test_help_and_info_do_not_import_torch():
    code = ("import sys, pcodec.cli as c; sys.argv=['pcodec','--help'];\n"
            "try: c.run()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_flags_and_exit_codes_are_the_same_across_commands(workdir):
    assert pcodec("encode", "-q", "img.png", "-o", "img.pcb", cwd=workdir).stderr == ""
    assert "Exit codes" in pcodec("--help").output and "4 model not installed" in pcodec(
        "decode", "--help").output
    too_many = pcodec("decode", "img.pcb", "--layers", "12", "-o", "x.png", cwd=workdir)
    assert too_many.exit_code == 2 and "the stream has 8 layers" in too_many.stderr
    assert pcodec("truncate", "img.pcb", "--layers", "9", cwd=workdir).exit_code == 2
    assert pcodec("encode", "img.png", "--layers", "9", "-o", "y.pcb", cwd=workdir).exit_code == 2
    missing = pcodec("encode", "img.png", "--model", "nosuch", "-o", "z.pcb", cwd=workdir)
    assert missing.exit_code == 4 and "'nosuch' is not installed" in missing.stderr
    tiny = pcodec("encode", "img.png", "--bpp", "0.0001", "-o", "t.pcb", cwd=workdir)
    assert tiny.exit_code == 2 and "--bpp 0.0001" in tiny.stderr and "--bytes" not in tiny.stderr
    assert not [p for p in workdir.iterdir() if p.suffix == ".pcb" and p.name != "img.pcb"]
    done = subprocess.run([sys.executable, "-m", "pcodec", "train", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: pcodec train")


def test_partial_decoding_says_what_it_dropped_and_info_describes_the_same(workdir):
    pcodec("encode", "img.png", "--layer-bpp", "none", "-o", "img.pcb", cwd=workdir)  # layers = sections
    import json

    from pcodec import container

    data = (workdir / "img.pcb").read_bytes()
    header, length = container.parse_header(data)
    fifth = length + sum(s.length for s in header.sections[:5])  # layer 5 starts here
    damaged = bytearray(data)
    damaged[fifth + 3] ^= 0xFF
    (workdir / "bad.pcb").write_bytes(bytes(damaged))
    assert pcodec("info", "bad.pcb", cwd=workdir).exit_code == 3
    result = pcodec("decode", "--partial", "bad.pcb", "-o", "bad.png", cwd=workdir)
    assert result.exit_code == 0
    assert "bad.pcb: stream cut or damaged: 4 of 8 layers whole" in result.stderr
    document = json.loads(pcodec("info", "--partial", "--json", "bad.pcb", cwd=workdir).stdout)
    assert len(document["sections"]) == 5 and document["status"] == "cut"
    quiet = pcodec("decode", "-q", "--partial", "bad.pcb", "-o", "q.png", cwd=workdir)
    assert quiet.exit_code == 0 and quiet.stderr == ""
