"""The torch-free decoder: weights read without torch, numpy transforms equal to torch's."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from pcodec import inference, ptfile

WEIGHTS = [ROOT / "models" / "gdn320-r13.pt", ROOT / "models" / "gdn320-r12.pt",
           ROOT / "models" / "gdn320-r7.pt",
           ROOT / "models" / "gdn320-r1.pt",
           ROOT / "models" / "hp128-dhq8-r6.pt",
           ROOT / "tests" / "data" / "tiny-test.pt"]


def _same(ours, theirs, where="weights"):
    if isinstance(theirs, torch.Tensor):
        expected = theirs.numpy()
        assert isinstance(ours, np.ndarray) and ours.dtype == expected.dtype, where
        assert np.array_equal(ours, expected), where
    elif isinstance(theirs, dict):
        assert list(ours) == list(theirs), where
        for key in theirs:
            _same(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{index}]")
    else:
        assert ours == theirs or (ours != ours and theirs != theirs), where  # NaN == NaN


@pytest.mark.parametrize("path", WEIGHTS, ids=lambda p: p.name)
def test_weights_read_without_torch_equal_torch_load(path):
    _same(ptfile.load(path), torch.load(path, weights_only=True, map_location="cpu"))


def test_strided_and_shared_storages_come_back_as_torch_saves_them(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    saved = {"t": base.t(), "row": base[2], "half": torch.ones(3, dtype=torch.float16),
             "n": torch.tensor(7), "flags": torch.tensor([True, False])}
    torch.save(saved, tmp_path / "w.pt")
    _same(ptfile.load(tmp_path / "w.pt"), saved)


def test_a_weights_file_with_other_objects_is_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # pickles a class
    with pytest.raises(Exception, match="unexpected object"):
        ptfile.load(tmp_path / "module.pt")


def _random_state(design: str, blocks=(1, 2, 1)):
    from compressai.layers import GDN

    from pcodec.transforms import build_transforms

    torch.manual_seed(3)
    state = {}
    for name, module in build_transforms(16, 24, GDN, design, blocks).items():
        for parameter in module.parameters():  # away from the initial identity-like values
            parameter.data += 0.05 * torch.randn_like(parameter)
        state.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    return state


@pytest.mark.parametrize("one_row_blocks", [False, True])
@pytest.mark.parametrize("design", ["gdn5", "pu", "pux"])
def test_numpy_transforms_equal_torch_layers(design, one_row_blocks, monkeypatch):
    """Also with the convolutions worked one output row at a time (images this small are
    otherwise one block), so block edges are covered."""
    from pcodec.transforms import Transforms

    if one_row_blocks:
        monkeypatch.setattr(inference, "TAP_BLOCK_BYTES", 1)
    state = _random_state(design)
    network = Transforms(16, 24, state, design, (1, 2, 1))
    arrays = {key: value.numpy() for key, value in state.items()}
    y = torch.randn(1, 24, 5, 7)
    z = torch.randint(-4, 5, (1, 16, 3, 2)).double()
    with torch.no_grad():
        pixels = network.g_s(y)[0].permute(1, 2, 0).numpy()
        prior = network.h_s.double()(z)[0].permute(1, 2, 0).numpy()
    ours = inference.synthesis(arrays, design)(y[0].permute(1, 2, 0).numpy())
    assert ours.dtype == np.float32 and ours.shape == pixels.shape
    assert np.abs(ours - pixels).max() < 1e-5 * max(1.0, np.abs(pixels).max())
    ours_prior = inference.hyper_synthesis(arrays)(z[0].permute(1, 2, 0).numpy())
    assert ours_prior.dtype == np.float64
    assert np.abs(ours_prior - prior).max() < 1e-12 * np.abs(prior).max()


def random_post_filter(layers: int, width: int = 8, seed: int = 5, coarse: int = 0) -> dict:
    """A post-filter's state (keys "post.") with weights and per-layer gains away from their
    initial values (the last convolution and the coarse branch's way back start at zero)."""
    from pcodec.postfilter import PostFilter

    torch.manual_seed(seed)
    module = PostFilter(layers, width, coarse)
    for parameter in module.parameters():
        parameter.data += 0.1 * torch.randn_like(parameter)
    return {f"post.{key}": value for key, value in module.state_dict().items()}


@pytest.mark.parametrize("coarse", [0, 6])
def test_numpy_post_filter_equals_torch_for_every_layer(coarse):
    from pcodec.postfilter import from_state

    state = random_post_filter(layers=3, coarse=coarse)
    module = from_state(state)
    assert hasattr(module, "coarse") == bool(coarse)
    ours = inference.post_filter({key: value.numpy() for key, value in state.items()})
    x = torch.rand(1, 3, 12, 16)
    outputs = []
    for layer in range(3):
        with torch.no_grad():
            expected = module(x, torch.tensor([layer]))[0].permute(1, 2, 0).numpy()
        got = ours(x[0].permute(1, 2, 0).numpy(), layer)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-5, layer
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1])  # each layer has its own gains
    with torch.no_grad():  # between two layers (a cut inside one), their gains interpolated
        between = module(x, torch.tensor([1.25]))[0].permute(1, 2, 0).numpy()
    assert np.abs(ours(x[0].permute(1, 2, 0).numpy(), 1.25) - between).max() < 1e-5
    assert not np.allclose(between, outputs[1]) and not np.allclose(between, outputs[2])
    assert inference.post_filter({"g_s.0.weight": np.zeros(1)}) is None


def test_gelu_equals_torch_without_scipy():
    x = torch.linspace(-12, 12, 200001)
    expected = torch.nn.functional.gelu(x.double()).numpy()
    ours = inference.gelu(x.numpy())
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-6
    assert ours[-1] == np.float32(12)


def test_decoding_imports_no_torch(sample_stream, tmp_path):
    stream = tmp_path / "s.pcb"
    stream.write_bytes(sample_stream)
    script = ("import sys, pcodec; pixels = pcodec.decode(open(sys.argv[1], 'rb').read()); "
              "assert pixels.ndim == 3; print(sorted(m for m in ('torch', 'compressai', 'scipy') "
              "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script, str(stream)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
