"""The .pcb container: header, section table, CRCs; packing, parsing and truncation.

Layout (docs/FORMAT.md has the full description):
    magic (8) | version (1) | header length (4, big-endian) | fields | header CRC32 (4)
    | sections: the hyper-latent, then one per quantization layer, in order.
The section table up front gives each section's length, a "partial" flag (the section was cut
inside: decode only the symbols its bytes determine) and its CRC32, so a prefix can be judged
and truncated without touching the payload. No torch, no numpy.

A stream's quality layers (what `--layers K` counts) are its sections (format 2), or, where
the encoder formed them by rate as JPEG 2000 does (format 3), the payload prefixes listed in
the header: any prefix decodes, so a layer may end inside a section.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, replace

from .errors import StreamError, UsageError

MAGIC = b"\x89PCB\r\n\x1a\n"  # PNG-style: catches text-mode and 7-bit transfer damage
# 2: probability tables and coding orders from detmath's portable arithmetic, layer 1 coded
# with those tables too (format 1 used library kernels that differ between machines).
# 3: the same coding, with the quality layers' payload ends in the header (written only for
# streams whose layers are formed by rate; others stay format 2, byte for byte).
VERSION = 3
READABLE = (2, 3)
MAX_LAYERS = 64
MAX_SECTIONS = 64
MAX_MODEL_ID = 64
DIGEST_BYTES = 8
DEFAULT_MAX_PIXELS = 1 << 25  # 33.5 megapixels (8K UHD fits); override: --max-pixels


@dataclass(frozen=True)
class Section:
    length: int
    crc: int
    partial: bool = False


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    model_id: str
    weights_digest: bytes
    sections: tuple[Section, ...] = field(default_factory=tuple)
    # Payload bytes at the end of each quality layer, increasing (format 3; the last may lie
    # past the payload: that layer was cut inside); empty: the layers are the sections.
    layer_ends: tuple[int, ...] = ()

    @property
    def version(self) -> int:
        return 3 if self.layer_ends else 2

    @property
    def coded_layers(self) -> int:
        """Quantization layers present (complete or partial); the first section is ẑ."""
        return max(0, len(self.sections) - 1)

    @property
    def layers(self) -> int:
        """Quality layers present (complete or partial)."""
        if not self.layer_ends:
            return self.coded_layers
        return self.layers_within(self.payload_length)[0]

    def layers_within(self, payload: int) -> tuple[int, bool]:
        """Format 3: the quality layers that the first `payload` bytes of the payload reach,
        and whether the last of them is cut inside (ẑ alone: none)."""
        whole = sum(end <= payload for end in self.layer_ends)
        start = self.layer_ends[whole - 1] if whole else self.hyper_length
        cut = whole < len(self.layer_ends) and payload > start
        return whole + cut, cut

    @property
    def hyper_length(self) -> int:
        return self.sections[0].length if self.sections else 0

    @property
    def payload_length(self) -> int:
        return sum(s.length for s in self.sections)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, start: int, end: int):
        self.data, self.position, self.end = data, start, end

    def take(self, count: int) -> bytes:
        if self.position + count > self.end:
            raise StreamError("corrupt header: fields run past the header length")
        chunk = self.data[self.position:self.position + count]
        self.position += count
        return chunk

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise StreamError("corrupt header: varint too long")


def pack_header(header: Header) -> bytes:
    model_id = header.model_id.encode("ascii")
    fields = bytearray()
    fields += _varint(header.width) + _varint(header.height)
    fields += bytes([len(model_id)]) + model_id + header.weights_digest
    fields += bytes([len(header.sections)])
    for section in header.sections:
        fields += _varint(section.length) + bytes([int(section.partial)])
        fields += struct.pack(">I", section.crc)
    if header.layer_ends:  # format 3: each quality layer's payload bytes
        fields += bytes([len(header.layer_ends)])
        for previous, end in zip((0,) + header.layer_ends, header.layer_ends):
            fields += _varint(end - previous)
    length = len(MAGIC) + 1 + 4 + len(fields) + 4
    body = MAGIC + bytes([header.version]) + struct.pack(">I", length) + bytes(fields)
    return body + struct.pack(">I", zlib.crc32(body))


def pack(width: int, height: int, model_id: str, weights_digest: bytes,
         sections: list[bytes], layer_sizes=()) -> bytes:
    """The stream of these sections; with `layer_sizes` (bytes, increasing), its quality
    layers formed by rate: layer k is the longest prefix of the stream that takes at most
    layer_sizes[k] bytes (at least ẑ's section; the file `truncate` makes of it is a few
    header bytes shorter), and the rest of the stream one last layer."""
    header = Header(width, height, model_id, weights_digest)
    if layer_sizes:
        header = replace(header, layer_ends=_rate_layer_ends(header, sections, layer_sizes))
    return repack(header, sections, [False] * len(sections))


def _rate_layer_ends(header: Header, sections: list[bytes], sizes) -> tuple[int, ...]:
    total = sum(len(s) for s in sections)
    table = tuple(Section(len(s), 0) for s in sections)
    ends: tuple[int, ...] = (total,)
    for _ in range(4):  # the header's length depends on the ends' varints: settles in two
        head = len(pack_header(replace(header, sections=table, layer_ends=ends)))
        fitted = tuple(sorted({min(max(size - head, len(sections[0])), total)
                               for size in sizes} | {total}))[-MAX_LAYERS:]
        if fitted == ends:
            break
        ends = fitted
    return ends


def parse_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, int]:
    """Header and its length. Checks everything that can be checked before the payload."""
    if len(data) == 0:
        raise StreamError("empty input: not a .pcb stream")
    if not data.startswith(MAGIC[: min(len(data), len(MAGIC))]) or len(data) < len(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise StreamError(f"truncated stream: only {len(data)} bytes, header incomplete")
        raise StreamError("not a .pcb stream (bad magic)")
    if len(data) < len(MAGIC) + 5:
        raise StreamError(f"truncated stream: only {len(data)} bytes, header incomplete")
    version = data[len(MAGIC)]
    if version == 1:
        raise StreamError("format version 1 stream: its tables depended on the machine that "
                          "wrote it and this pcodec reads only versions 2 and 3; re-encode the image")
    if version not in READABLE:
        raise StreamError(f"unsupported .pcb format version {version} (this pcodec reads "
                          f"versions {READABLE[0]} to {READABLE[-1]})")
    (length,) = struct.unpack(">I", data[len(MAGIC) + 1:len(MAGIC) + 5])
    if length < len(MAGIC) + 9 or length > 1 << 16:
        raise StreamError(f"corrupt header: implausible header length {length}")
    if len(data) < length:
        raise StreamError(f"truncated stream: {len(data)} bytes, header needs {length}")
    (crc,) = struct.unpack(">I", data[length - 4:length])
    if zlib.crc32(data[:length - 4]) != crc:
        raise StreamError("corrupt header: CRC mismatch")
    reader = _Reader(data, len(MAGIC) + 5, length - 4)
    width, height = reader.varint(), reader.varint()
    if width < 1 or height < 1:
        raise StreamError(f"corrupt header: image size {width}x{height}")
    if width * height > max_pixels:
        raise StreamError(f"image size {width}x{height} exceeds the pixel limit of {max_pixels} "
                          "(raise it with --max-pixels)")
    id_length = reader.take(1)[0]
    if id_length == 0 or id_length > MAX_MODEL_ID:
        raise StreamError("corrupt header: bad model id length")
    try:
        model_id = reader.take(id_length).decode("ascii")
    except UnicodeDecodeError:
        raise StreamError("corrupt header: model id is not ASCII") from None
    digest = reader.take(DIGEST_BYTES)
    count = reader.take(1)[0]
    if count > MAX_SECTIONS:
        raise StreamError(f"corrupt header: {count} sections")
    sections = []
    for _ in range(count):
        section_length = reader.varint()
        flags = reader.take(1)[0]
        if flags > 1:
            raise StreamError("corrupt header: unknown section flags")
        (section_crc,) = struct.unpack(">I", reader.take(4))
        sections.append(Section(section_length, section_crc, bool(flags)))
    header = Header(width, height, model_id, digest, tuple(sections))
    if version == 3:
        layer_count = reader.take(1)[0]
        if not 1 <= layer_count <= MAX_LAYERS:
            raise StreamError(f"corrupt header: {layer_count} quality layers")
        ends = [reader.varint() for _ in range(layer_count)]
        ends = tuple(sum(ends[:k + 1]) for k in range(layer_count))
        if (ends[0] < header.hyper_length or ends[-1] < header.payload_length
                or (len(ends) > 1 and ends[-2] >= header.payload_length)
                or any(b <= a for a, b in zip(ends, ends[1:]))):
            raise StreamError("corrupt header: quality layers do not fit the sections")
        header = replace(header, layer_ends=ends)
    if reader.position != length - 4:
        raise StreamError("corrupt header: trailing bytes in header")
    return header, length


def split_sections(data: bytes, header: Header, header_length: int, cut_ok: bool = False,
                   damage_ok: bool = False) -> tuple[list[bytes], list[bool]]:
    """Section payloads and whether each is partial, with lengths and CRCs checked.

    cut_ok: `data` may be a raw prefix of a stream; the section its end cuts is returned as
    partial (its CRC cannot be checked) and later ones are dropped. damage_ok: a section whose
    CRC fails ends the stream instead of being an error. Both off: strict.
    """
    payloads, partial = [], []
    position = header_length
    for index, section in enumerate(header.sections):
        chunk = data[position:position + section.length]
        position += section.length
        name = "hyper-latent section" if index == 0 else f"layer {index}"
        if len(chunk) < section.length:
            if not cut_ok:
                raise StreamError(
                    f"truncated stream: {len(data)} of {header_length + header.payload_length} "
                    f"bytes present, {name} incomplete (decode with --partial to use the prefix)")
            if chunk:
                payloads.append(chunk)
                partial.append(True)
            break
        if zlib.crc32(chunk) != section.crc:
            if not damage_ok:
                raise StreamError(f"corrupt stream: CRC mismatch in {name}")
            break
        payloads.append(chunk)
        partial.append(section.partial)
        if section.partial:
            break  # nothing after a cut section can be decoded
    if not (cut_ok or damage_ok) and len(data) > position:
        raise StreamError(f"corrupt stream: {len(data) - position} unexpected bytes after the end")
    return payloads, partial


def cut(header: Header, payloads: list[bytes], partial: list[bool], layers: int | None = None,
        max_bytes: int | None = None) -> tuple[list[bytes], list[bool]]:
    """The longest prefix of the sections with at most `layers` layers whose packed stream
    takes at most `max_bytes` bytes (the last section cut inside if needed)."""
    if layers is not None:
        if layers < 0:
            raise UsageError("--layers must be at least 0")
        if not header.layer_ends:
            payloads, partial = payloads[:layers + 1], partial[:layers + 1]
        elif layers < len(header.layer_ends):
            limit = header.layer_ends[layers - 1] if layers else header.hyper_length
            payloads, partial = _payload_prefix(payloads, partial, limit)
    kept: list[tuple[bytes, bool]] = []
    for payload, is_partial in zip(payloads, partial):
        candidate = kept + [(payload, is_partial)]
        if max_bytes is None or _packed_size(header, candidate) <= max_bytes:
            kept = candidate
            continue
        if not kept:
            break  # a cut hyper-latent section is never used by decoders: drop it whole
        # Cut this section: shrink until header + payload fits (the varint may shrink too).
        room = max_bytes - _packed_size(header, kept + [(b"", True)])
        while room > 0 and _packed_size(header, kept + [(payload[:room], True)]) > max_bytes:
            room -= 1
        if room > 0:
            kept.append((payload[:room], True))
        break
    if max_bytes is not None and _packed_size(header, kept) > max_bytes:
        raise UsageError(f"--bytes {max_bytes} is below the smallest valid stream "
                         f"({_packed_size(header, [])} bytes)")
    return [p for p, _ in kept], [f for _, f in kept]


def _payload_prefix(payloads: list[bytes], partial: list[bool], limit: int):
    """The sections of the first `limit` payload bytes, the last cut inside if it must be."""
    kept, kept_partial, room = [], [], limit
    for payload, is_partial in zip(payloads, partial):
        if room <= 0:
            break
        kept.append(payload[:room])
        kept_partial.append(is_partial or room < len(payload))
        room -= len(payload)
    return kept, kept_partial


def _with_sections(header: Header, table: tuple[Section, ...]) -> Header:
    """The header of a stream holding these sections: the quality layers the payload
    reaches, the last with its own end (past the payload where it was cut inside)."""
    total = sum(s.length for s in table)
    ends = header.layer_ends
    ends = tuple(e for e in ends if e < total) + tuple(e for e in ends if e >= total)[:1]
    return replace(header, sections=table, layer_ends=ends)


def repack(header: Header, payloads: list[bytes], partial: list[bool]) -> bytes:
    table = tuple(Section(len(p), zlib.crc32(p), f) for p, f in zip(payloads, partial))
    return pack_header(_with_sections(header, table)) + b"".join(payloads)


def truncate(data: bytes, layers: int | None = None, max_bytes: int | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, allow_partial: bool = False) -> bytes:
    """A valid, self-consistent stream holding a prefix of `data`: at most `layers` layers
    and at most `max_bytes` bytes in all."""
    header, header_length = parse_header(data, max_pixels)
    payloads, partial = split_sections(data, header, header_length, allow_partial, allow_partial)
    return repack(header, *cut(header, payloads, partial, layers, max_bytes))


def smallest_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Bytes of the smallest valid stream cut from `data`: its header with no section."""
    return _packed_size(parse_header(data, max_pixels)[0], [])


def _packed_size(header: Header, kept) -> int:
    table = tuple(Section(len(p), 0, f) for p, f in kept)
    return len(pack_header(_with_sections(header, table))) + sum(len(p) for p, _ in kept)
