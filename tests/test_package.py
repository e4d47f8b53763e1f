"""What a plain (non-editable) install gives: the default weights inside the package, and a
codec that works without compressai or torchvision."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_a_built_wheel_carries_the_default_model_and_codes_without_compressai(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside it
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if Path(folder) == ROOT and n not in ("pyproject.toml", "README.md",
                                                               "pcodec", "models")
        or n == "__pycache__"])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    wheel, = tmp_path.glob("pcodec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    default = manifest["models"][manifest["default"]]["file"]
    assert "pcodec/weights/manifest.json" in names and f"pcodec/weights/{default}" in names
    assert not [n for n in names if n.endswith(".png")]  # learning curves stay in the tree
    assert not [n for n in names if "in-training" in n]  # so do weights still in training
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # compressai and torchvision made unimportable: coding must not need them.
    script = f"""
import sys
sys.modules["compressai"] = sys.modules["torchvision"] = None
sys.path.insert(0, {str(site)!r})
import numpy as np, pcodec
from pcodec import models
assert str(models.models_dir()).startswith({str(site)!r}), models.models_dir()
image = (np.arange(48 * 64 * 3).reshape(48, 64, 3) % 251).astype(np.uint8)
data = pcodec.encode(image)
assert pcodec.decode(data, layers=2).shape == image.shape
print("ok", len(data))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
