"""`pcodec bench`: rate–distortion and speed of pcodec and the classical codecs, side by side.

Every rate is the size of a real file (headers included) divided by the pixel count; every
distortion is measured on the decoded 8-bit RGB image. Peers are command-line tools from Debian
packages (`make bench-tools`); a missing tool is reported and skipped.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .evaluate import image_files, psnr

REFERENCE = "JPEG 2000 (OpenJPEG, layered)"
SECOND_REFERENCE = "HEVC-intra 4:4:4 (x265, BPG stand-in)"
# bpp targets for the progressive JPEG 2000 layers and for pcodec's byte cuts.
J2K_LAYER_BPP = (0.06, 0.1, 0.16, 0.25, 0.4, 0.6, 0.9, 1.3, 1.9, 2.8)


# -- metrics -------------------------------------------------------------------------------

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_GAUSSIAN = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5**2))
_GAUSSIAN /= _GAUSSIAN.sum()


def _blur_valid(planes: np.ndarray) -> np.ndarray:
    """11-tap σ=1.5 Gaussian over (C, H, W), keeping only fully covered pixels."""
    from scipy.ndimage import correlate1d

    window = _GAUSSIAN.astype(planes.dtype)
    out = correlate1d(correlate1d(planes, window, axis=1), window, axis=2)
    return out[:, 5:-5, 5:-5]


def _pool(planes: np.ndarray) -> np.ndarray:
    """2x2 average pooling, an odd side zero-padded on both ends (torch's avg_pool2d)."""
    pad = [(0, 0)] + [(s % 2, s % 2) for s in planes.shape[1:]]
    planes = np.pad(planes, pad)
    h, w = (planes.shape[1] // 2) * 2, (planes.shape[2] // 2) * 2
    planes = planes[:, :h, :w]
    return 0.25 * (planes[:, 0::2, 0::2] + planes[:, 1::2, 0::2] + planes[:, 0::2, 1::2]
                   + planes[:, 1::2, 1::2])


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM on RGB, the definition of pytorch_msssim (CompressAI's metric) in numpy:
    3x faster on CPU than its grouped convolutions, and equal to it (test). None for
    images under 161 px a side (five scales of an 11-tap window)."""
    if min(a.shape[:2]) < 161:
        return None
    x = a.transpose(2, 0, 1).astype(np.float32)  # float32 as pytorch_msssim
    y = b.transpose(2, 0, 1).astype(np.float32)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    factors = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        mu_x, mu_y, xx, yy, xy = np.split(_blur_valid(np.concatenate([x, y, x * x, y * y, x * y])), 5)
        cs = (2 * (xy - mu_x * mu_y) + c2) / (xx - mu_x**2 + yy - mu_y**2 + c2)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            factors.append(np.maximum(cs.mean(axis=(1, 2), dtype=np.float64), 0))
            x, y = _pool(x), _pool(y)
        else:
            luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            factors.append(np.maximum((luminance * cs).mean(axis=(1, 2), dtype=np.float64), 0))
    per_channel = np.prod([f ** w for f, w in zip(factors, MS_SSIM_WEIGHTS)], axis=0)
    return float(per_channel.mean())


def bd_rate(rate_a, psnr_a, rate_b, psnr_b) -> float | None:
    """Bjøntegaard delta rate of B against A, in percent (negative: B needs fewer bits), with
    pchip interpolation of log-rate over the overlapping PSNR range."""
    from scipy.integrate import trapezoid
    from scipy.interpolate import PchipInterpolator

    pa, ra = _sorted_curve(psnr_a, rate_a)
    pb, rb = _sorted_curve(psnr_b, rate_b)
    if len(pa) < 2 or len(pb) < 2:
        return None
    low, high = max(pa[0], pb[0]), min(pa[-1], pb[-1])
    if high <= low:
        return None
    grid = np.linspace(low, high, 1000)
    log_a = PchipInterpolator(pa, np.log(ra))(grid)
    log_b = PchipInterpolator(pb, np.log(rb))(grid)
    return float((np.exp(trapezoid(log_b - log_a, grid) / (high - low)) - 1) * 100)


def bd_psnr(rate_a, psnr_a, rate_b, psnr_b) -> float | None:
    """Bjøntegaard delta PSNR of B against A in dB over the overlapping log-rate range."""
    from scipy.integrate import trapezoid
    from scipy.interpolate import PchipInterpolator

    la, pa = _sorted_curve(np.log(rate_a), psnr_a)
    lb, pb = _sorted_curve(np.log(rate_b), psnr_b)
    if len(la) < 2 or len(lb) < 2:
        return None
    low, high = max(la[0], lb[0]), min(la[-1], lb[-1])
    if high <= low:
        return None
    grid = np.linspace(low, high, 1000)
    diff = PchipInterpolator(lb, pb)(grid) - PchipInterpolator(la, pa)(grid)
    return float(trapezoid(diff, grid) / (high - low))


def _sorted_curve(x, y):
    """Points sorted by x with duplicate x removed (pchip needs a strictly increasing x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    keep = np.concatenate([[True], np.diff(x) > 1e-9])
    return x[keep], y[keep]


# -- peers ---------------------------------------------------------------------------------

def _run(args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, **kwargs)


def _read_any(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _source_png(work: Path, image: np.ndarray) -> Path:
    """The image as PNG in the work folder (written once), for tools that do not read PPM."""
    png = work / "source.png"
    if not png.exists():
        from PIL import Image

        Image.fromarray(image).save(png)
    return png


class Peer:
    name = ""
    tools: tuple[str, ...] = ()
    progressive = False

    def available(self) -> bool:
        return all(shutil.which(t) for t in self.tools)

    def points(self, source: Path, image: np.ndarray, work: Path):
        """Yield (file bytes, decoded image, encode s, decode s) per rate point."""
        raise NotImplementedError


class Jpeg2000Layered(Peer):
    """One OpenJPEG file with quality layers (LRCP, PLT markers); the k-layer file is the
    codestream prefix holding the first k layers' packets plus an EOC marker."""

    name = REFERENCE
    tools = ("opj_compress", "opj_decompress")
    progressive = True

    def points(self, source, image, work):
        ratios = ",".join(f"{24 / b:.3f}" for b in J2K_LAYER_BPP)
        full = work / "layered.j2k"
        start = time.perf_counter()
        _run(["opj_compress", "-i", str(source), "-o", str(full), "-r", ratios, "-p", "LRCP", "-PLT"])
        encode_s = time.perf_counter() - start
        data = full.read_bytes()
        for layers in range(1, len(J2K_LAYER_BPP) + 1):
            prefix = j2k_layer_prefix(data, layers, len(J2K_LAYER_BPP))
            path = work / f"l{layers}.j2k"
            path.write_bytes(prefix)
            out = work / f"l{layers}.ppm"
            start = time.perf_counter()
            _run(["opj_decompress", "-i", str(path), "-o", str(out)])
            yield len(prefix), _read_any(out), encode_s, time.perf_counter() - start


def j2k_layer_prefix(data: bytes, layers: int, total_layers: int) -> bytes:
    """A decodable codestream of the first `layers` quality layers of a one-tile, LRCP
    codestream with PLT markers: main header + tile-part header (Psot rewritten) + the first
    layers' packets + EOC."""
    position = 2  # after SOC
    while True:
        marker, length = struct.unpack(">HH", data[position:position + 4])
        if marker == 0xFF90:  # SOT
            break
        position += 2 + length
    sot = position
    packet_lengths, position = [], sot + 12
    while True:
        marker = struct.unpack(">H", data[position:position + 2])[0]
        if marker == 0xFF93:  # SOD
            sod_end = position + 2
            break
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if marker == 0xFF58:  # PLT: Zplt then packet lengths in 7-bit groups
            value = 0
            for byte in data[position + 5:position + 2 + length]:
                value = (value << 7) | (byte & 0x7F)
                if not byte & 0x80:
                    packet_lengths.append(value)
                    value = 0
        position += 2 + length
    per_layer = len(packet_lengths) // total_layers
    if per_layer * total_layers != len(packet_lengths):
        raise ValueError("unexpected packet count in the JPEG 2000 codestream")
    body = sum(packet_lengths[: per_layer * layers])
    tile = bytearray(data[sot:sod_end + body])
    tile[6:10] = struct.pack(">I", len(tile))  # Psot: this tile-part's new length
    return data[:sot] + bytes(tile) + b"\xff\xd9"


class Jpeg2000(Peer):
    name = "JPEG 2000 (OpenJPEG, one file per rate)"
    tools = ("opj_compress", "opj_decompress")

    def points(self, source, image, work):
        for bpp in J2K_LAYER_BPP[::2]:
            path, out = work / f"r{bpp}.j2k", work / f"r{bpp}.ppm"
            start = time.perf_counter()
            _run(["opj_compress", "-i", str(source), "-o", str(path), "-r", f"{24 / bpp:.3f}"])
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            _run(["opj_decompress", "-i", str(path), "-o", str(out)])
            yield path.stat().st_size, _read_any(out), encode_s, time.perf_counter() - start


class ProgressiveJpeg(Peer):
    name = "JPEG progressive (Pillow/libjpeg, 4:2:0)"

    def points(self, source, image, work):
        from PIL import Image

        for quality in (10, 25, 45, 65, 80, 90, 95):
            buffer = io.BytesIO()
            start = time.perf_counter()
            Image.fromarray(image).save(buffer, "JPEG", quality=quality, progressive=True,
                                        optimize=True)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
            yield len(buffer.getvalue()), decoded, encode_s, time.perf_counter() - start


class JpegXL(Peer):
    name = "JPEG XL (cjxl 0.7, non-progressive)"
    tools = ("cjxl", "djxl")

    def points(self, source, image, work):
        for distance in (12, 7, 4.5, 3, 2, 1.2, 0.7, 0.4):
            path, out = work / f"d{distance}.jxl", work / f"d{distance}.ppm"
            start = time.perf_counter()
            _run(["cjxl", str(source), str(path), "-d", str(distance), "--quiet"])
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            _run(["djxl", str(path), str(out), "--quiet"])
            yield path.stat().st_size, _read_any(out), encode_s, time.perf_counter() - start


class WebP(Peer):
    name = "WebP (cwebp)"
    tools = ("cwebp", "dwebp")

    def points(self, source, image, work):
        png = _source_png(work, image)
        for quality in (5, 20, 40, 60, 75, 88, 96):
            path, out = work / f"q{quality}.webp", work / f"q{quality}.ppm"
            start = time.perf_counter()
            _run(["cwebp", "-quiet", "-q", str(quality), "-m", "6", str(png), "-o", str(path)])
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            _run(["dwebp", "-quiet", str(path), "-ppm", "-o", str(out)])
            yield path.stat().st_size, _read_any(out), encode_s, time.perf_counter() - start


class Avif(Peer):
    name = "AVIF 4:4:4 (avifenc/aom)"
    tools = ("avifenc", "avifdec")

    def points(self, source, image, work):
        png = _source_png(work, image)
        for quantizer in (58, 50, 42, 34, 26, 18, 10):
            path, out = work / f"q{quantizer}.avif", work / f"q{quantizer}.png"
            start = time.perf_counter()
            _run(["avifenc", "-j", "2", "-s", "6", "-y", "444", "--min", str(quantizer), "--max",
                  str(quantizer), str(png), str(path)])
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            _run(["avifdec", "-j", "2", str(path), str(out)])
            yield path.stat().st_size, _read_any(out), encode_s, time.perf_counter() - start


class HevcIntra(Peer):
    """x265 through ffmpeg, 4:4:4, one intra frame, raw Annex-B stream: BPG's core without
    its container (BPG itself is not packaged). `-tune psnr` turns off x265's psycho-visual
    tuning (psy-rd, psy-rdoq, adaptive quantization), which trades PSNR for perceived
    detail: on 4 Kodak images it moved JPEG 2000's BD-rate against HEVC from +1.9 % to
    +14.9 %, and preset slower (vs medium) to +17.6 %. This is a PSNR benchmark."""

    name = SECOND_REFERENCE
    tools = ("ffmpeg",)

    def points(self, source, image, work):
        png = _source_png(work, image)
        height, width = image.shape[:2]
        for qp in (50, 45, 40, 35, 30, 25, 20):
            path, out = work / f"qp{qp}.hevc", work / f"qp{qp}.png"
            start = time.perf_counter()
            _run(["ffmpeg", "-v", "error", "-y", "-i", str(png), "-vf",
                  "scale=out_color_matrix=bt709:out_range=full", "-pix_fmt", "yuv444p",
                  "-color_range", "pc", "-c:v", "libx265", "-preset", "slower", "-tune", "psnr",
                  "-x265-params", f"qp={qp}:keyint=1:log-level=0", "-frames:v", "1", "-f", "hevc",
                  str(path)])
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            _run(["ffmpeg", "-v", "error", "-y", "-color_range", "pc", "-colorspace", "bt709",
                  "-i", str(path), "-vf", "scale=in_color_matrix=bt709:in_range=full",
                  "-pix_fmt", "rgb24", "-frames:v", "1", str(out)])
            decoded = _read_any(out)
            if decoded.shape[:2] != (height, width):
                decoded = decoded[:height, :width]
            yield path.stat().st_size, decoded, encode_s, time.perf_counter() - start


PEERS = [Jpeg2000Layered(), Jpeg2000(), ProgressiveJpeg(), JpegXL(), WebP(), Avif(), HevcIntra()]


# -- pcodec --------------------------------------------------------------------------------

def pcodec_rows(model, image: np.ndarray, cuts: int, refine: int = 0):
    """Rows for every layer of one stream and for prefixes of it cut at log-spaced byte
    offsets (the bytes a client that stopped there received), sharing the decoding work;
    the stream encoded with `refine` steps (pcodec encode --refine)."""
    from . import container, engine

    pixels = image.shape[0] * image.shape[1]
    start = time.perf_counter()
    data = engine.encode(model, image, refine=refine)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.decode(model, data)
    decode_s = time.perf_counter() - start
    header, header_length = container.parse_header(data)
    ends = header_length + np.cumsum([s.length for s in header.sections])
    # Layers formed by rate end inside sections: a layer's row is that prefix of the stream.
    layer_ends = ([header_length + e for e in header.layer_ends] if header.layer_ends
                  else [int(e) for e in ends[1:]])
    offsets = {int(o) for o in np.geomspace(ends[0], len(data), cuts)}
    sizes = sorted(set(layer_ends) | offsets)
    rows = []
    for size, decoded in engine.decode_prefixes(model, data, sizes):
        # MS-SSIM at the layer points only: it costs more than a decode, and the cuts are
        # there for the PSNR-vs-bytes curve.
        quality = {"psnr": psnr(decoded, image),
                   "ms_ssim": ms_ssim(decoded, image) if size in layer_ends else None}
        common = {"bytes": size, "bpp": 8 * size / pixels, **quality,
                  "encode_s": encode_s, "decode_s": decode_s}
        if size in layer_ends:
            rows.append({"kind": "layer", "layers": layer_ends.index(size) + 1, **common})
        if size in offsets:  # the same log-spaced fractions of every stream: averaged by rank
            rows.append({"kind": "cut", "layers": None, **common})
    if model.layer_bpp:  # a stream shorter than the top rates has fewer layers: the whole
        # stream stands for the missing ones, so that the means over images keep every layer
        last = [row for row in rows if row["kind"] == "layer"][-1]
        for layers in range(last["layers"] + 1, engine.most_layers(model) + 1):
            rows.append({**last, "layers": layers})
    return rows


# -- the run -------------------------------------------------------------------------------

def run_bench(folder: Path, out_dir: Path, limit: int | None, cuts: int, codecs: list[str] | None,
              progress=True, reuse: Path | None = None, refine: int = 0) -> dict:
    """RD rows of every selected codec on every image; with `reuse`, the other codecs' rows
    for the same images come from an earlier bench.json (the peers are deterministic: after
    new weights, `--codec pcodec --reuse` re-runs 8 of the 23 minutes). pcodec's streams are
    encoded with `refine` steps (recorded in the result)."""
    from PIL import Image

    from . import models

    files = image_files(folder, limit)
    if not files:
        raise SystemExit(f"no images in {folder}")
    peers = [p for p in PEERS if codecs is None or any(c.lower() in p.name.lower() for c in codecs)]
    skipped = {p.name: f"missing {', '.join(t for t in p.tools if not shutil.which(t))}"
               for p in peers if not p.available()}
    for name, why in skipped.items():
        print(f"bench: skipping {name}: {why} (make bench-tools)", file=sys.stderr)
    peers = [p for p in peers if p.available()]
    run_pcodec = codecs is None or any("pcodec" in c.lower() for c in codecs)
    model = models.load() if run_pcodec else None
    rows = []
    seconds: dict[str, float] = {}  # wall time of the bench per codec, metrics included
    total = len(files) * (len(peers) + int(run_pcodec))
    done, started = 0, time.perf_counter()
    for path in files:
        image = _read_any(path)
        pixels = image.shape[0] * image.shape[1]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            source = work / "source.ppm"
            Image.fromarray(image).save(source)
            if run_pcodec:
                start = time.perf_counter()
                for row in pcodec_rows(model, image, cuts, refine):
                    codec = "pcodec" if row.pop("kind") == "layer" else "pcodec (byte cuts)"
                    rows.append({"image": path.name, "codec": codec, **row})
                seconds["pcodec"] = seconds.get("pcodec", 0.0) + time.perf_counter() - start
                done += 1
                _progress(done, total, started, f"{path.name} pcodec", progress)
            for peer in peers:
                start = time.perf_counter()
                for size, decoded, encode_s, decode_s in peer.points(source, image, work):
                    rows.append({"image": path.name, "codec": peer.name, "bytes": size,
                                 "bpp": 8 * size / pixels, "psnr": psnr(decoded, image),
                                 "ms_ssim": ms_ssim(decoded, image), "encode_s": encode_s,
                                 "decode_s": decode_s})
                seconds[peer.name] = seconds.get(peer.name, 0.0) + time.perf_counter() - start
                done += 1
                _progress(done, total, started, f"{path.name} {peer.name.split(' (')[0]}", progress)
    if progress:
        print(file=sys.stderr)
    reused = {}
    if reuse is not None:
        ran = {row["codec"] for row in rows} | {p.name for p in peers}
        names = {p.name for p in files}
        earlier = json.loads(Path(reuse).read_text())
        for row in earlier["rows"]:
            if row["codec"] not in ran and row["image"] in names:
                rows.append(row)
                reused[row["codec"]] = str(reuse)
        for name in reused:
            if name in earlier.get("bench_seconds", {}):
                seconds[name] = earlier["bench_seconds"][name]
    result = summarize(rows, len(files))
    result["reused_from"] = reused
    result["skipped"] = skipped
    result["bench_seconds"] = {name: round(value, 1) for name, value in seconds.items()}
    result["images"] = [p.name for p in files]
    result["folder"] = str(folder)
    result["pcodec_refine"] = refine if run_pcodec else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")
    plot(result, out_dir / "rd.png")
    return result


def _progress(done, total, started, label, enabled):
    if not enabled:
        return
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    bar = "#" * int(30 * done / total)
    print(f"\r[{bar:<30}] {done}/{total} {elapsed:5.0f}s eta {eta:5.0f}s  {label[:40]:<40}",
          end="", file=sys.stderr, flush=True)


def mean_curves(rows, images: int) -> dict:
    """Per codec: the mean of bpp/PSNR/MS-SSIM at each setting across images (CompressAI's
    convention). Settings are the rate points' order; pcodec byte cuts are taken at the same
    fraction of each image's stream and are averaged by rank too."""
    curves = {}
    by_codec: dict[str, dict[str, list]] = {}
    for row in rows:
        by_codec.setdefault(row["codec"], {}).setdefault(row["image"], []).append(row)
    for codec, per_image in by_codec.items():
        if len(per_image) < images:
            continue
        points = min(len(v) for v in per_image.values())
        series = [sorted(v, key=lambda r: r["bytes"])[:points] for v in per_image.values()]
        curve = {"bpp": [], "psnr": [], "ms_ssim": []}
        for index in range(points):
            curve["bpp"].append(float(np.mean([s[index]["bpp"] for s in series])))
            curve["psnr"].append(float(np.mean([s[index]["psnr"] for s in series])))
            values = [s[index]["ms_ssim"] for s in series if s[index]["ms_ssim"] is not None]
            curve["ms_ssim"].append(float(np.mean(values)) if values else None)
        curve["encode_s"] = float(np.mean([s[0]["encode_s"] for s in series]))
        curve["decode_s"] = float(np.mean([s[-1]["decode_s"] for s in series]))
        curves[codec] = curve
    return curves


def summarize(rows, images: int) -> dict:
    curves = mean_curves(rows, images)
    names = list(curves)
    matrix = {a: {b: bd_rate(curves[b]["bpp"], curves[b]["psnr"], curves[a]["bpp"], curves[a]["psnr"])
                  for b in names} for a in names}
    delta_psnr = {a: {b: bd_psnr(curves[b]["bpp"], curves[b]["psnr"], curves[a]["bpp"], curves[a]["psnr"])
                      for b in names} for a in names}
    return {"curves": curves, "bd_rate_percent": matrix, "bd_psnr_db": delta_psnr,
            "pcodec_cuts": cut_statistics(rows),
            "per_image_bd_rate_vs_reference_percent": per_image_bd_rates(rows)}


def per_image_bd_rates(rows) -> dict:
    """Per codec: the mean and median over images of each image's own BD-rate against the
    reference. Unlike the BD-rate of the mean curves, it does not depend on whether a codec's
    points sit at the same rates in every image (JPEG 2000's layers do; layers formed by
    quality do not, and a mean of points at varied rates lies below the images' curves)."""
    per_image: dict[str, dict[str, list]] = {}
    for row in rows:
        per_image.setdefault(row["codec"], {}).setdefault(row["image"], []).append(row)
    reference = per_image.get(REFERENCE, {})
    result = {}
    for codec, images in per_image.items():
        values = [bd_rate([r["bpp"] for r in reference[name]], [r["psnr"] for r in reference[name]],
                          [r["bpp"] for r in points], [r["psnr"] for r in points])
                  for name, points in images.items() if name in reference]
        values = [v for v in values if v is not None]
        if values and codec != REFERENCE:
            result[codec] = {"mean": float(np.mean(values)), "median": float(np.median(values))}
    return result


def cut_statistics(rows) -> dict:
    """Per image: BD-rate of pcodec's byte-cut curve against its layer points, and whether
    PSNR ever decreases as the cut moves later (issue: every byte must help)."""
    per_image: dict[str, dict[str, list]] = {}
    for row in rows:
        if row["codec"].startswith("pcodec"):
            per_image.setdefault(row["image"], {}).setdefault(row["codec"], []).append(row)
    bd, decreases, levels = [], 0, []
    for curves in per_image.values():
        layers = sorted(curves.get("pcodec", []), key=lambda r: r["bytes"])
        cuts = sorted(curves.get("pcodec (byte cuts)", []), key=lambda r: r["bytes"])
        if len(layers) >= 2 and len(cuts) >= 2:
            value = bd_rate([r["bpp"] for r in layers], [r["psnr"] for r in layers],
                            [r["bpp"] for r in cuts], [r["psnr"] for r in cuts])
            if value is not None:
                bd.append(value)
        decreases += any(b["psnr"] < a["psnr"] - 1e-9 for a, b in zip(cuts, cuts[1:]))
        # Distinct images among the cuts and layer points (distinct PSNR to 1e-6 dB).
        levels.append(len({round(r["psnr"], 6) for r in cuts + layers}))
    return {"images": len(per_image),
            "cuts_per_image": max((len(c.get("pcodec (byte cuts)", [])) for c in per_image.values()),
                                  default=0),
            "distinct_quality_levels_min": min(levels, default=None),
            "distinct_quality_levels_mean": float(np.mean(levels)) if levels else None,
            "bd_rate_cuts_vs_layers_percent_mean": float(np.mean(bd)) if bd else None,
            "bd_rate_cuts_vs_layers_percent_worst": float(np.max(bd)) if bd else None,
            "images_where_psnr_ever_decreases": decreases}


def table(result: dict) -> str:
    curves, matrix = result["curves"], result["bd_rate_percent"]

    def cell(value):
        return "n/a" if value is None else f"{value:+.1f} %"

    lines = [f"| codec | BD-rate vs {REFERENCE.split(' (')[0]} (layered) | vs HEVC-intra 4:4:4 | "
             "bpp range | PSNR range (dB) | encode s | decode s |", "|---|---|---|---|---|---|---|"]
    for name, curve in sorted(curves.items(), key=lambda kv: matrix[kv[0]].get(REFERENCE) or 0):
        lines.append(
            f"| {name} | {cell(matrix[name].get(REFERENCE))} | {cell(matrix[name].get(SECOND_REFERENCE))} "
            f"| {min(curve['bpp']):.3f}–{max(curve['bpp']):.3f} | {min(curve['psnr']):.2f}–"
            f"{max(curve['psnr']):.2f} | {curve['encode_s']:.3f} | {curve['decode_s']:.3f} |")
    if result.get("pcodec_refine"):
        lines.append(f"\npcodec streams encoded with --refine {result['pcodec_refine']}")
    per_image = result.get("per_image_bd_rate_vs_reference_percent") or {}
    for name in ("pcodec", "pcodec (byte cuts)"):
        if name in per_image:
            lines.append(f"\n{name}: each image's own BD-rate vs {REFERENCE.split(' (')[0]} "
                         f"(layered) {per_image[name]['mean']:+.1f} % mean, "
                         f"{per_image[name]['median']:+.1f} % median")
    cuts = result.get("pcodec_cuts") or {}
    if cuts.get("bd_rate_cuts_vs_layers_percent_mean") is not None:
        lines.append(
            f"\npcodec byte cuts ({cuts['cuts_per_image']} per image, {cuts['images']} images): "
            f"BD-rate vs its layer points {cuts['bd_rate_cuts_vs_layers_percent_mean']:+.1f} % mean, "
            f"{cuts['bd_rate_cuts_vs_layers_percent_worst']:+.1f} % worst; PSNR decreases with "
            f"more bytes on {cuts['images_where_psnr_ever_decreases']} images; distinct quality "
            f"levels per image ≥ {cuts['distinct_quality_levels_min']}")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 6))
    for name, curve in result["curves"].items():
        if name == "pcodec (byte cuts)":
            axis.plot(curve["bpp"], curve["psnr"], ".", ms=3, color="tab:red", label=name)
        elif name == "pcodec":
            axis.plot(curve["bpp"], curve["psnr"], "o-", color="tab:red", lw=2, label=name + " (layers)")
        else:
            axis.plot(curve["bpp"], curve["psnr"], "-", marker=".", lw=1, label=name)
    axis.set_xlabel("bits per pixel (whole files)")
    axis.set_ylabel("PSNR RGB (dB)")
    axis.set_xlim(0, 2.5)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{len(result['images'])} images of {Path(result['folder']).name}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- speed ---------------------------------------------------------------------------------

def _timed_command(args, repeat: int = 3, **kwargs) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, **kwargs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_rss_mb(args) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of one command, from GNU time's report or,
    without it, from the child's rusage."""
    import resource

    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if shutil.which("time") or Path("/usr/bin/time").exists():
        result = subprocess.run(["/usr/bin/time", "-f", "%M", *args], check=True,
                                capture_output=True, text=True)
        peak_kb = int(result.stderr.strip().splitlines()[-1])
    else:
        subprocess.run(args, check=True, capture_output=True)
        peak_kb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return time.perf_counter() - start, peak_kb / 1024


def run_speed(folder: Path, out_dir: Path, limit: int = 8, large: bool = True) -> dict:
    """Stage times, images/s, start-up and peak memory of pcodec beside OpenJPEG."""
    from PIL import Image

    from . import engine, models
    from .coding import thread_count

    pcodec = [sys.executable, "-m", "pcodec"]
    files = image_files(folder, limit)
    model = models.load()
    images = [_read_any(p) for p in files]
    result: dict = {"images": [p.name for p in files], "threads": thread_count()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Batch, in one process: encode then decode every image, stage by stage.
        streams = []
        engine.STAGE_SECONDS.clear()
        start = time.perf_counter()
        for image in images:
            streams.append(engine.encode(model, image))
        encode_s = (time.perf_counter() - start) / len(images)
        encode_stages = {k: v / len(images) for k, v in engine.STAGE_SECONDS.items()}
        engine.STAGE_SECONDS.clear()
        start = time.perf_counter()
        for data in streams:
            engine.decode(model, data)
        decode_s = (time.perf_counter() - start) / len(images)
        decode_stages = {k: v / len(images) for k, v in engine.STAGE_SECONDS.items()}
        engine.STAGE_SECONDS.clear()
        start = time.perf_counter()
        for data in streams:
            header, payloads, partial = engine.read_stream(model, data)
            for layers, state in engine.decode_latents(model, header, payloads, partial):
                engine.synthesize(model, state, header.height, header.width, layers=layers)
        all_layers_s = (time.perf_counter() - start) / len(images)
        result["batch"] = {"encode_s_per_image": encode_s, "decode_s_per_image": decode_s,
                           "decode_every_layer_s_per_image": all_layers_s,
                           "encode_stages_s": encode_stages, "decode_stages_s": decode_stages}
        # Many files in one CLI call on both cores (-j 2: one single-threaded worker per
        # core), start-up excluded: the time of all images less that of the first two, which
        # pays the same start-up (each worker imports torch and loads the weights once).
        if len(streams) > 2:
            paths = []
            for index, data in enumerate(streams):
                paths.append(work / f"batch{index:03d}.pcb")
                paths[-1].write_bytes(data)
            (work / "batch-out").mkdir()
            call = pcodec + ["-q", "decode", "-f", "-j", "2", "-o", str(work / "batch-out") + "/"]
            # Medians of 3: one call's start-up varies by a second (2026-12-01: one run gave
            # 2.9 s per image, a rerun on the same host 0.48 s).
            every = _timed_command(call + [str(p) for p in paths])
            first_two = _timed_command(call + [str(p) for p in paths[:2]])
            result["batch"]["decode_cli_j2_s_per_image"] = (every - first_two) / (len(paths) - 2)
        # One file through the CLI, start-up included.
        stream_path = work / "one.pcb"
        stream_path.write_bytes(streams[0])
        result["cli"] = {
            "help_s": _timed_command(pcodec + ["--help"]),
            "info_s": _timed_command(pcodec + ["info", str(stream_path)]),
            "truncate_s": _timed_command(pcodec + ["truncate", "-f", str(stream_path), "--bytes", "9000",
                                                   "-o", str(work / "cut.pcb")]),
            "decode_one_file_s": _timed_command(pcodec + ["decode", "-f", str(stream_path), "-o",
                                                          str(work / "one.png")], repeat=2),
            "import_torch_s": _timed_command([sys.executable, "-c", "import torch"]),
        }
        result["loop"] = _shell_loops(pcodec, images, streams, work)
        # OpenJPEG on the same images, about the same rate as pcodec's full streams.
        if shutil.which("opj_decompress"):
            times = []
            for image, data in zip(images, streams):
                source, j2k = work / "s.ppm", work / "s.j2k"
                Image.fromarray(image).save(source)
                bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
                _run(["opj_compress", "-i", str(source), "-o", str(j2k), "-r", f"{24 / bpp:.3f}"])
                times.append(_timed_command(["opj_decompress", "-i", str(j2k), "-o",
                                             str(work / "d.ppm")], repeat=1))
            result["openjpeg_decode_s_per_image"] = float(np.mean(times))
        if large:
            big = work / "large.png"
            base = Image.fromarray(images[0])
            base.resize((3840, 3840 * base.height // base.width), Image.LANCZOS).crop(
                (0, 0, 3840, 2160)).save(big)
            encode_wall, encode_peak = _peak_rss_mb(pcodec + ["encode", str(big), "-o",
                                                              str(work / "large.pcb")])
            decode_wall, decode_peak = _peak_rss_mb(pcodec + ["decode", str(work / "large.pcb"),
                                                              "-o", str(work / "large.out.png")])
            result["3840x2160"] = {"encode_s": encode_wall, "encode_peak_mb": encode_peak,
                                   "decode_s": decode_wall, "decode_peak_mb": decode_peak}
    (out_dir / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _shell_loops(pcodec: list[str], images: list[np.ndarray], streams: list[bytes],
                 work: Path) -> dict:
    """`for f in *.pcb; do pcodec decode "$f" -o "${f%.pcb}.ppm"; done` and the same loop
    of encode calls, one process per file as a shell script runs them, beside opj_decompress
    and opj_compress on JPEG 2000 files of about the same rate. Every loop writes PPM, so no
    PNG encoder is timed."""
    from PIL import Image

    loops = work / "loops"
    loops.mkdir()
    sources, pcbs, j2ks = [], [], []
    for index, (image, data) in enumerate(zip(images, streams)):
        sources.append(loops / f"{index:03d}.ppm")
        Image.fromarray(image).save(sources[-1])
        pcbs.append(loops / f"{index:03d}.pcb")
        pcbs[-1].write_bytes(data)
        bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
        j2ks.append(loops / f"{index:03d}.j2k")
        if shutil.which("opj_compress"):
            _run(["opj_compress", "-i", str(sources[-1]), "-o", str(j2ks[-1]),
                  "-r", f"{24 / bpp:.3f}"])

    def loop(commands) -> float:
        start = time.perf_counter()
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start

    result = {"files": len(images),
              "pcodec_decode_s": loop([pcodec + ["decode", "-f", str(p), "-o",
                                                 str(p.with_suffix(".out.ppm"))] for p in pcbs]),
              "pcodec_encode_s": loop([pcodec + ["encode", "-f", str(s), "-o",
                                                 str(s.with_suffix(".again.pcb"))]
                                       for s in sources])}
    if shutil.which("opj_decompress"):
        result["opj_decompress_s"] = loop([["opj_decompress", "-i", str(j), "-o",
                                            str(j.with_suffix(".out.ppm"))] for j in j2ks])
        result["opj_compress_s"] = loop([["opj_compress", "-i", str(s), "-o",
                                          str(s.with_suffix(".again.j2k")), "-r", "20"]
                                         for s in sources])
    return result


def run_nesting(folder: Path, out_dir: Path, limit: int | None = None) -> dict:
    """evaluate.nesting_cost over a folder: mean bpp per layer of the nested intervals and of
    a plain uniform quantizer at the same PSNR, and the BD-rate between the two curves."""
    from .evaluate import nesting_cost, unquantized_psnr
    from .imageio import read_image
    from .models import load

    model = load()
    per_image, ceilings = [], []
    for path in image_files(folder, limit):
        image = read_image(str(path), 1 << 30)
        per_image.append(nesting_cost(model, image))
        ceilings.append(unquantized_psnr(model, image))
    if not per_image:
        raise ValueError(f"no images in {folder}")
    ceiling = float(np.mean(ceilings))
    mean = {key: [float(np.mean([rows[k][key] for rows in per_image]))
                  for k in range(len(per_image[0]))]
            for key in ("psnr", "nested_bpp", "uniform_bpp")}
    result = {"model": model.model_id, "images": len(per_image), "folder": str(folder), **mean,
              "unquantized_psnr": ceiling,
              "bd_rate_nested_vs_uniform_percent": bd_rate(mean["uniform_bpp"], mean["psnr"],
                                                           mean["nested_bpp"], mean["psnr"])}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "nesting.json").write_text(json.dumps(result, indent=1))
    return result


def nesting_table(result: dict) -> str:
    lines = ["| layer | PSNR (dB) | nested bpp | uniform bpp, same PSNR | nested costs |",
             "|---|---|---|---|---|"]
    for k, (quality, nested, uniform) in enumerate(
            zip(result["psnr"], result["nested_bpp"], result["uniform_bpp"]), 1):
        lines.append(f"| {k} | {quality:.2f} | {nested:.3f} | {uniform:.3f} | "
                     f"{100 * (nested / uniform - 1):+.1f} % |")
    lines.append(f"\nBD-rate of the nested curve against the uniform one: "
                 f"{result['bd_rate_nested_vs_uniform_percent']:+.1f} % "
                 f"(images: {result['images']}, model {result['model']}; ideal code lengths "
                 f"plus the real hyper-latent section)")
    lines.append(f"Transforms alone, y not quantized: {result['unquantized_psnr']:.2f} dB")
    return "\n".join(lines)


def speed_table(result: dict) -> str:
    batch, cli = result["batch"], result["cli"]
    lines = ["| measure | seconds |", "|---|---|"]
    lines.append(f"| encode, per image, batch in one process | {batch['encode_s_per_image']:.3f} |")
    for name, seconds in batch["encode_stages_s"].items():
        lines.append(f"| &nbsp;&nbsp;{name} | {seconds:.3f} |")
    lines.append(f"| decode, per image, batch in one process | {batch['decode_s_per_image']:.3f} |")
    for name, seconds in batch["decode_stages_s"].items():
        lines.append(f"| &nbsp;&nbsp;{name} | {seconds:.3f} |")
    if "decode_cli_j2_s_per_image" in batch:
        lines.append(f"| decode, per image, one `pcodec decode -j 2` call on many files "
                     f"(PNG out, start-up excluded) | {batch['decode_cli_j2_s_per_image']:.3f} |")
    lines.append(f"| decode every layer of a stream (9 images), per stream | "
                 f"{batch['decode_every_layer_s_per_image']:.3f} |")
    if "openjpeg_decode_s_per_image" in result:
        lines.append(f"| opj_decompress, per image (process included) | "
                     f"{result['openjpeg_decode_s_per_image']:.3f} |")
    lines.append(f"| `pcodec decode` one file, start-up included | {cli['decode_one_file_s']:.3f} |")
    lines.append(f"| `import torch` (encode only: decoding runs on numpy) | "
                 f"{cli['import_torch_s']:.3f} |")
    lines.append(f"| `pcodec --help` | {cli['help_s']:.3f} |")
    lines.append(f"| `pcodec info` | {cli['info_s']:.3f} |")
    lines.append(f"| `pcodec truncate` | {cli['truncate_s']:.3f} |")
    loop = result.get("loop")
    if loop:
        for verb, peer in (("decode", "opj_decompress"), ("encode", "opj_compress")):
            line = (f"| shell loop, one `pcodec {verb}` per file, {loop['files']} files "
                    f"(PPM) | {loop[f'pcodec_{verb}_s']:.2f} |")
            lines.append(line)
            if f"{peer}_s" in loop:
                ratio = loop[f"pcodec_{verb}_s"] / loop[f"{peer}_s"]
                lines.append(f"| &nbsp;&nbsp;the same loop with `{peer}` ({ratio:.0f}x faster) | "
                             f"{loop[f'{peer}_s']:.2f} |")
    if "3840x2160" in result:
        large = result["3840x2160"]
        lines.append(f"| 3840×2160 encode (peak RSS {large['encode_peak_mb']:.0f} MB) | "
                     f"{large['encode_s']:.1f} |")
        lines.append(f"| 3840×2160 decode (peak RSS {large['decode_peak_mb']:.0f} MB) | "
                     f"{large['decode_s']:.1f} |")
    return "\n".join(lines)
