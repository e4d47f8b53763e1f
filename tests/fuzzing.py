"""Decoder fuzzing: mutated .pcb streams must decode to a valid image or fail with StreamError
(exit 3), within a time bound. Used by test_fuzz.py (bounded) and `make fuzz` (long)."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np

from pcodec import container, engine
from pcodec.errors import StreamError, UsageError

CASE_SECONDS = 5.0
PIXEL_LIMIT = 1 << 16  # fuzzed headers may claim any size; keep decodes small and bounded


def mutate(stream: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(stream)
    kind = rng.choice(["prefix", "bitflip", "burst", "random", "header_field", "payload_fixed_crc",
                       "splice"])
    if kind == "prefix":
        return kind, bytes(data[: rng.randrange(len(data) + 1)])
    if kind == "bitflip":
        for _ in range(rng.choice([1, 1, 2, 3])):
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    if kind == "burst":
        start = rng.randrange(len(data))
        for position in range(start, min(len(data), start + rng.randrange(1, 33))):
            data[position] = rng.randrange(256)
        return kind, bytes(data)
    if kind == "random":
        size = rng.choice([0, 1, 8, 13, 64, 300, 5000])
        head = container.MAGIC + bytes([container.VERSION]) if rng.random() < 0.5 else b""
        return kind, head + bytes(rng.randrange(256) for _ in range(size))
    if kind == "splice":
        cut = rng.randrange(len(data))
        return kind, bytes(data[:cut] + data[rng.randrange(len(data)):])
    header, length = container.parse_header(stream)
    payloads, partial = container.split_sections(stream, header, length)
    if kind == "header_field":
        extreme = rng.choice([0, 1, 2**7 - 1, 2**14, 2**21 + 3, 2**32 - 1, 2**60])
        field = rng.choice(["width", "height", "section_length", "sections", "model", "flags",
                            "layer_ends"])
        sections = list(header.sections)
        if field in ("width", "height"):
            header = header.__class__(**{**header.__dict__, field: extreme})
        elif field == "section_length" and sections:
            index = rng.randrange(len(sections))
            sections[index] = container.Section(extreme, sections[index].crc, sections[index].partial)
        elif field == "sections":
            sections = sections * rng.randrange(0, 8)
        elif field == "layer_ends":  # quality layers ending anywhere (format 3)
            ends = sorted(rng.choice([0, 1, extreme, rng.randrange(header.payload_length + 2)])
                          for _ in range(rng.randrange(1, 4)))
            header = header.__class__(**{**header.__dict__, "layer_ends": tuple(ends)})
        elif field == "model":
            header = header.__class__(**{**header.__dict__, "model_id": rng.choice(["x", "hp" * 20])})
        elif sections:
            index = rng.randrange(len(sections))
            sections[index] = container.Section(sections[index].length, sections[index].crc, True)
        packed = container.pack_header(header.__class__(**{**header.__dict__,
                                                          "sections": tuple(sections[:64])}))
        return kind, packed + b"".join(payloads)
    # Payload damaged but CRCs recomputed: the entropy decoder sees garbage.
    index = rng.randrange(len(payloads))
    section = bytearray(payloads[index])
    if section:
        for _ in range(rng.randrange(1, 6)):
            section[rng.randrange(len(section))] = rng.randrange(256)
    payloads[index] = bytes(section)
    return kind, container.repack(header, payloads, partial)


def check_case(model, data: bytes, expected_shape) -> str:
    """'image', 'partial image' or 'error'; raises AssertionError on any other outcome."""
    outcomes = []
    for allow_partial in (False, True):
        start = time.perf_counter()
        try:
            header, _ = container.parse_header(data, PIXEL_LIMIT)
            pixels = engine.decode(model, data, allow_partial=allow_partial, max_pixels=PIXEL_LIMIT) \
                if header.model_id == model.model_id else None
            if pixels is None:
                raise StreamError("other model")
            assert pixels.dtype == np.uint8 and pixels.shape == (header.height, header.width, 3)
            outcomes.append("image")
        except (StreamError, UsageError):
            outcomes.append("error")
        elapsed = time.perf_counter() - start
        assert elapsed < CASE_SECONDS, f"case took {elapsed:.1f} s"
    return "/".join(outcomes)


def fuzz(model, streams, cases: int, seed: int = 0, report_every: int = 0, check=None):
    """Mutants of `streams` through `check(data, shape, rng)` (default: the engine, strictly
    and with --partial): outcome counts per mutation kind, and findings with their inputs."""
    rng = random.Random(seed)
    check = check or (lambda data, shape, _: check_case(model, data, shape))
    counts: dict[str, int] = {}
    findings = []
    for number in range(cases):
        stream, shape = streams[number % len(streams)]
        kind, data = mutate(stream, rng)
        try:
            outcome = check(data, shape, rng)
        except Exception as error:  # noqa: BLE001 - a finding, recorded with its input
            findings.append((kind, data, f"{type(error).__name__}: {error}"))
            outcome = "FINDING"
        counts[f"{kind}:{outcome}"] = counts.get(f"{kind}:{outcome}", 0) + 1
        if report_every and (number + 1) % report_every == 0:
            print(f"{number + 1} cases, {len(findings)} findings", file=sys.stderr, flush=True)
    return counts, findings


EXIT_CODES = {0, 1, 2, 3, 4}  # pcodec --help's table, less the signals'


def check_cli_case(folder: Path, data: bytes, rng: random.Random) -> str:
    """The mutant through `decode`, `decode --partial`, `info` and `truncate`, in process:
    exit codes from the table, no exception but SystemExit, and an error line that names the
    file. Returns the exit codes, e.g. '3/0/3/3'."""
    from click.testing import CliRunner

    from pcodec.cli import main

    source = folder / "case.pcb"
    source.write_bytes(data)
    codes = []
    for command in (["decode", "-f", source, "-o", folder / "out.png"],
                    ["decode", "-f", "--partial", source, "-o", folder / "out.png"],
                    ["info", source],
                    ["truncate", "-f", source, "--bytes", rng.randrange(1, 4000), "-o",
                     folder / "out.pcb"]):
        start = time.perf_counter()
        result = CliRunner().invoke(main, [str(a) for a in command])
        elapsed = time.perf_counter() - start
        assert elapsed < CASE_SECONDS, f"{command[0]} took {elapsed:.1f} s"
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{command[0]}: {type(result.exception).__name__}: {result.exception}"
        assert result.exit_code in EXIT_CODES, f"{command[0]} exited {result.exit_code}"
        assert "Traceback" not in result.output
        if result.exit_code:
            assert str(source) in result.stderr, f"{command[0]}: {result.stderr!r}"
        codes.append(str(result.exit_code))
    return "/".join(codes)


def sample_streams(model):
    from conftest import synthetic_image

    streams = [(engine.encode(model, synthetic_image(h, w, seed)), (h, w, 3))
               for seed, (h, w) in enumerate([(16, 24), (40, 56), (1, 1), (70, 9)])]
    # Quality layers formed by rate (format 3), ending inside sections.
    return streams + [(engine.encode(model, synthetic_image(h, w, seed), layer_bpp=(1, 3, 6)),
                       (h, w, 3)) for seed, (h, w) in enumerate([(40, 56), (70, 9)])]


def main():
    import argparse
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    import torch

    from pcodec import models

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description="Fuzz the pcodec decoder.")
    parser.add_argument("--cases", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shipped-model", action="store_true",
                        help="fuzz with the shipped model instead of the tiny test model")
    args = parser.parse_args()
    from golden import load_test_model

    model = models.load() if args.shipped_model else load_test_model()
    started = time.perf_counter()
    counts, findings = fuzz(model, sample_streams(model), args.cases, args.seed, report_every=5000)
    for key in sorted(counts):
        print(f"{key:40} {counts[key]}")
    print(f"{args.cases} cases in {time.perf_counter() - started:.0f} s, {len(findings)} findings")
    for kind, data, message in findings[:20]:
        print(f"FINDING {kind}: {message} ({len(data)} bytes)")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
