"""The Python API: what the command line does, on bytes and arrays.

    import pcodec
    data = pcodec.encode("img.png")                 # or an (H, W, 3) uint8 array
    preview = pcodec.decode(data, max_bytes=20000)  # (H, W, 3) uint8 from a prefix
    small = pcodec.truncate(data, layers=3)         # a valid, shorter stream
    for size, image in pcodec.decode_prefixes(data, [5000, 20000, len(data)]): ...

Errors are pcodec.errors classes (StreamError for bad streams, UsageError, RuntimeIOError).
torch loads on the first encode, not on import; decoding runs on numpy alone.
"""

from __future__ import annotations

from . import container


def _model(model_id: str | None, device: str):
    from . import models

    return models.load(model_id, device)


def _pixels(image):
    """(H, W, 3) uint8 from an array, a Pillow image or a path."""
    import numpy as np

    from .errors import UsageError
    from .imageio import DEFAULT_MAX_PIXELS, read_image, to_rgb

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise UsageError(f"expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        return np.ascontiguousarray(image)
    if hasattr(image, "convert"):  # a Pillow image
        return to_rgb(image, "image")
    return read_image(str(image), DEFAULT_MAX_PIXELS)


def encode(image, layers: int | None = None, model: str | None = None,
           device: str = "cpu", refine: int = 0, layer_bpp=None) -> bytes:
    """A .pcb stream of an image (array, Pillow image or path); `layers` codes only the first
    K layers; `model` is an id from models/manifest.json (default: the shipped default);
    `refine` gradient steps on the image's latent (smaller files, slower encoding);
    `layer_bpp` the file sizes where its quality layers end (default: the model's rates;
    (): one layer per quantization layer)."""
    from . import engine
    from .errors import UsageError

    loaded = _model(model, device)
    most = engine.most_layers(loaded, layer_bpp)
    if layers is not None and not 1 <= layers <= most:
        raise UsageError(f"layers={layers}: the streams have at most {most} layers")
    return engine.encode(loaded, _pixels(image), layers, refine, layer_bpp)


def _stream_model(data: bytes, device: str):
    header, _ = container.parse_header(data)
    return _model(header.model_id, device)


def decode(data: bytes, layers: int | None = None, max_bytes: int | None = None,
           partial: bool = False, device: str = "cpu"):
    """(H, W, 3) uint8 image from a stream, its first `layers` layers or its first
    `max_bytes` bytes (a raw prefix, as a partial download gives it); `partial` accepts a
    stream cut short or damaged, as far as it is intact."""
    from . import engine

    return engine.decode(_stream_model(data, device), data, layers, max_bytes, partial)


def decode_prefixes(data: bytes, sizes, device: str = "cpu"):
    """(size, image) for the first `size` bytes of a stream, for every size, in increasing
    order, sharing the work the prefixes have in common (much faster than one decode each)."""
    from . import engine

    yield from engine.decode_prefixes(_stream_model(data, device), data, sizes)


def truncate(data: bytes, layers: int | None = None, max_bytes: int | None = None,
             partial: bool = False) -> bytes:
    """A valid, self-consistent stream of at most `layers` layers and `max_bytes` bytes."""
    return container.truncate(data, layers, max_bytes, container.DEFAULT_MAX_PIXELS, partial)


def info(data: bytes, max_pixels: int = container.DEFAULT_MAX_PIXELS,
         partial: bool = False) -> dict:
    """Header, layers and sizes of a stream (every CRC checked): what `pcodec info --json`
    prints. `partial`: of a cut or damaged stream, the sections that are intact (the last
    one possibly in part), as `decode --partial` would use them."""
    header, header_length = container.parse_header(data, max_pixels)
    payloads, cut = container.split_sections(data, header, header_length, partial, partial)
    pixels = header.width * header.height
    sections, offset = [], header_length
    for index, (section, payload, is_partial) in enumerate(zip(header.sections, payloads, cut)):
        offset += len(payload)
        sections.append({
            "name": "hyper" if index == 0 else f"layer {index}", "bytes": len(payload),
            "partial": is_partial, "crc32": f"{section.crc:08x}",
            "cumulative_bytes": offset, "cumulative_bpp": round(8 * offset / pixels, 5)})
    total = offset
    quality_layers = [{"layer": k + 1, "cumulative_bytes": header_length + end,
                       "cumulative_bpp": round(8 * (header_length + end) / pixels, 5)}
                      for k, end in enumerate(header.layer_ends)]
    return {
        "format_version": header.version, "width": header.width, "height": header.height,
        "model": header.model_id, "weights_digest": header.weights_digest.hex(),
        "layers": header.layers, "header_bytes": header_length, "total_bytes": total,
        "bpp": round(8 * total / pixels, 5), "sections": sections,
        # Format 3: the quality layers' ends (inside sections); format 2: the sections'.
        "quality_layers": quality_layers,
        "status": ("cut" if any(cut) or len(payloads) < len(header.sections)
                   or any(s.partial for s in header.sections) else "complete")}
