"""Encode-time refinement of the latent (`pcodec encode --refine`): ordinary streams that cost
less at every layer's λ than the analysis transform's own."""

import numpy as np
from conftest import synthetic_image

from pcodec import engine, refine
from pcodec.evaluate import layer_points

STEPS = 8


def layer_costs(model, image, data) -> list[float]:
    """λ·MSE + bpp at each layer of a real stream (MSE on 0-255 values: λ·255²·MSE on 0-1
    values): the training loss, per layer."""
    pixels = image.shape[0] * image.shape[1]
    points = layer_points(model, image, data)[1:]
    return [lam * 255**2 * 10 ** (-quality / 10) + 8 * size / pixels
            for lam, (size, quality) in zip(model.config["lambdas"], points)]


def relative_cost(model, image, refined, plain) -> float:
    """The mean over layers of the refined stream's cost over the plain one's: what
    refinement lowers (each layer by its relative gain)."""
    return float(np.mean(np.divide(layer_costs(model, image, refined),
                                   layer_costs(model, image, plain))))


def test_a_refined_stream_costs_less_at_the_models_own_lambdas(model, sample_image,
                                                               sample_stream):
    refined = engine.encode(model, sample_image, refine=STEPS)
    assert refined != sample_stream
    assert relative_cost(model, sample_image, refined, sample_stream) < 1
    points = layer_points(model, sample_image, refined)
    assert all(b[0] > a[0] and b[1] > a[1] for a, b in zip(points, points[1:]))  # every layer adds


def test_refining_in_tiles_gives_a_valid_stream_of_the_same_size_and_lower_cost(model,
                                                                                monkeypatch):
    image = synthetic_image(160, 224)  # a latent of 10x14: tiles of 4 latents and 4 of margin
    monkeypatch.setattr(refine, "TILE_LATENTS", 4)
    plain = engine.encode(model, image)
    tiled = engine.encode(model, image, refine=STEPS)
    assert engine.decode(model, tiled).shape == image.shape
    assert relative_cost(model, image, tiled, plain) < 1


def test_refinement_is_repeatable(model):
    image = synthetic_image(64, 96, seed=3)
    assert engine.encode(model, image, refine=3) == engine.encode(model, image, refine=3)


def test_refinement_aims_at_the_post_filtered_image(model):
    """With a post-filter in the weights, refinement follows the images the decoder shows
    (the filter at each sampled layer's gains, one per image of a batch), so its stream
    differs from the one refined for the same weights without the filter; the plain
    encodes are the same."""
    from dataclasses import replace

    import torch

    assert model.post_filter is not None  # the default model has one
    unfiltered = replace(model, state={k: v for k, v in model.state.items()
                                       if not k.startswith("post.")}, post_filter=None,
                         _network=None)  # built afresh from that state, without the filter
    image = synthetic_image(64, 96, seed=4)
    assert engine.encode(model, image) == engine.encode(unfiltered, image)
    assert engine.encode(model, image, refine=3) != engine.encode(unfiltered, image, refine=3)
    y = torch.randn(2, model.config["M"], 2, 3)
    with torch.no_grad():
        both = model.network.synthesis(y, torch.tensor([0, 5]))
        one_by_one = [model.network.synthesis(y[k:k + 1], position)[0]
                      for k, position in enumerate((0, 5))]
    assert all(torch.allclose(both[k], one_by_one[k], atol=1e-5) for k in range(2))
    assert not torch.allclose(both[0], both[1])
