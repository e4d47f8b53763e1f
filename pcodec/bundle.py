"""Training photos packed for a GPU machine, which gets only a copy of the source tree (64 MiB
in all, the repository's weights included) and no network: as many photos as fit a byte
budget, in a fixed shuffled order, as 4:4:4 JPEG at quality 92 (about 41.5 dB against the
originals; 177 MiB of PNG come to ~46 MB for all 638 photos). `make gpu-bundle` runs it."""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

JPEG_QUALITY = 92


def pack_photos(source: Path, target: Path, budget_bytes: int, min_side: int = 256,
                seed: int = 0) -> tuple[int, int]:
    """JPEG copies of the photos in `source` into `target` until the next one would pass
    `budget_bytes`, skipping those smaller than the training crops (`min_side`); returns
    (photos packed, bytes)."""
    from PIL import Image

    files = sorted(p for p in Path(source).iterdir()
                   if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp"})
    random.Random(seed).shuffle(files)
    target.mkdir(parents=True, exist_ok=True)
    count = total = 0
    for path in files:
        with Image.open(path) as image:
            if min(image.size) < min_side:
                continue
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        if total + buffer.tell() > budget_bytes:
            break
        (target / f"{path.stem}.jpg").write_bytes(buffer.getvalue())
        count, total = count + 1, total + buffer.tell()
    return count, total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pcodec.bundle", description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--megabytes", type=float, default=18.0)
    args = parser.parse_args(argv)
    count, total = pack_photos(args.source, args.target, int(args.megabytes * 1e6))
    print(f"{count} photos, {total / 1e6:.1f} MB in {args.target}")


if __name__ == "__main__":
    main()
