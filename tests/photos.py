"""Extract the benchmark's held-out photos from a scikit-image wheel and check their hashes:
python tests/photos.py WHEEL OUT_DIR (used by `make bench-photos`)."""

import hashlib
import sys
import zipfile
from pathlib import Path

PHOTOS = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
}


def main(wheel: str, out: str):
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name, digest in PHOTOS.items():
            data = archive.read(f"skimage/data/{name}")
            if hashlib.sha256(data).hexdigest() != digest:
                sys.exit(f"{name} in {wheel} is not the photo the benchmark expects")
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main(*sys.argv[1:])
