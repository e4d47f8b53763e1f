import zlib

import pytest

from pcodec import container
from pcodec.errors import StreamError, UsageError

SECTIONS = [b"z" * 50, b"a" * 300, b"b" * 1000, b"c" * 7]


def make_stream():
    return container.pack(769, 513, "model-x", b"\x01" * 8, SECTIONS)


def test_pack_parse_round_trip():
    data = make_stream()
    header, length = container.parse_header(data)
    assert (header.width, header.height, header.model_id) == (769, 513, "model-x")
    assert header.layers == 3
    payloads, partial = container.split_sections(data, header, length)
    assert payloads == SECTIONS and partial == [False] * 4


def test_truncate_by_bytes_is_valid_and_within_budget():
    data = make_stream()
    smallest = len(container.truncate(data, max_bytes=len(data)).split(b"z")[0])
    previous = None
    for budget in range(smallest, len(data) + 1, 17):
        cut = container.truncate(data, max_bytes=budget)
        assert len(cut) <= budget
        header, length = container.parse_header(cut)
        payloads, partial = container.split_sections(cut, header, length)
        joined = b"".join(payloads)
        assert b"".join(SECTIONS).startswith(joined)
        if previous is not None:
            assert joined.startswith(previous)  # a longer budget keeps everything a shorter one had
        previous = joined


def test_truncate_by_layers():
    data = make_stream()
    cut = container.truncate(data, layers=2)
    header, _ = container.parse_header(cut)
    assert header.layers == 2 and not any(s.partial for s in header.sections)
    assert container.truncate(data, layers=10) == data


def test_budget_below_header_is_a_usage_error():
    with pytest.raises(UsageError):
        container.truncate(make_stream(), max_bytes=10)


def test_every_prefix_is_rejected_cleanly_unless_partial():
    data = make_stream()
    _, header_length = container.parse_header(data)
    for end in range(0, len(data)):
        prefix = data[:end]
        with pytest.raises(StreamError):
            header, length = container.parse_header(prefix)
            container.split_sections(prefix, header, length)
        if end >= header_length:
            header, length = container.parse_header(prefix)
            payloads, partial = container.split_sections(prefix, header, length, cut_ok=True)
            assert b"".join(SECTIONS).startswith(b"".join(payloads))


def test_every_single_bit_flip_is_detected():
    data = make_stream()
    for position in range(len(data)):
        for bit in (0, 3, 7):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises(StreamError):
                header, length = container.parse_header(bytes(damaged))
                container.split_sections(bytes(damaged), header, length)


def test_absurd_header_fields_are_rejected_before_allocation():
    header = container.Header(60000, 60000, "m", b"\0" * 8, ())
    with pytest.raises(StreamError, match="pixel limit"):
        container.parse_header(container.pack_header(header))
    for width, height in ((0, 5), (5, 0)):
        with pytest.raises(StreamError):
            container.parse_header(container.pack_header(container.Header(width, height, "m", b"\0" * 8)))


def test_non_pcb_inputs():
    for data in (b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"hello world, this is text" * 3):
        with pytest.raises(StreamError):
            container.parse_header(data)


def test_unknown_version_is_unsupported():
    data = bytearray(make_stream())
    data[len(container.MAGIC)] = 99
    with pytest.raises(StreamError, match="version"):
        container.parse_header(bytes(data))


def test_trailing_garbage_is_corrupt():
    with pytest.raises(StreamError):
        data = make_stream() + b"extra"
        header, length = container.parse_header(data)
        container.split_sections(data, header, length)


def test_section_crc_is_crc32():
    header, _ = container.parse_header(make_stream())
    assert [s.crc for s in header.sections] == [zlib.crc32(s) for s in SECTIONS]


def rate_stream(sizes=(400, 900, 1200)):
    return container.pack(769, 513, "model-x", b"\x01" * 8, SECTIONS, sizes)


def test_layers_formed_by_rate_end_at_their_file_sizes_inside_sections():
    """Format 3: quality layer k is the longest prefix of the stream that takes at most
    sizes[k] bytes, the rest of the stream one more layer; truncating to k layers keeps
    exactly that prefix's payload (the section it ends in flagged partial)."""
    data = rate_stream()
    header, length = container.parse_header(data)
    assert header.version == 3 and header.layers == 4 and header.coded_layers == 3
    assert header.layer_ends[-1] == header.payload_length == sum(map(len, SECTIONS))
    whole = b"".join(SECTIONS)
    for layers, size in enumerate((400, 900, 1200), start=1):
        cut = container.truncate(data, layers=layers)
        # The stream's first `size` bytes hold it exactly; the truncated file, with the shorter
        # header of fewer sections, a few bytes less.
        assert length + header.layer_ends[layers - 1] == size and len(cut) <= size
        cut_header, cut_length = container.parse_header(cut)
        assert cut_header.layers == layers
        payloads, partial = container.split_sections(cut, cut_header, cut_length)
        assert b"".join(payloads) == whole[: header.layer_ends[layers - 1]]
        assert partial[-1] and not any(partial[:-1])
        assert container.truncate(cut, layers=layers) == cut  # idempotent
    assert container.truncate(data, layers=4) == data
    assert container.parse_header(container.truncate(data, layers=0))[0].layers == 0


def test_a_byte_cut_of_a_rate_formed_stream_keeps_the_layers_it_reaches():
    data = rate_stream()
    header, length = container.parse_header(data)
    middle = length + (header.layer_ends[1] + header.layer_ends[2]) // 2  # inside layer 3
    cut = container.truncate(data, max_bytes=middle)
    cut_header, _ = container.parse_header(cut)
    assert cut_header.layers == 3 and cut_header.layer_ends == header.layer_ends[:3]
    assert cut_header.layers_within(cut_header.payload_length) == (3, True)  # its end kept
    assert container.truncate(cut, layers=2) == container.truncate(data, layers=2)


def test_rate_layers_past_the_stream_collapse_and_tiny_ones_keep_the_hyper_latent():
    header = container.parse_header(rate_stream((10, 20, 10**6)))[0]
    assert header.layer_ends == (len(SECTIONS[0]), sum(map(len, SECTIONS)))


@pytest.mark.parametrize("ends", [(10,), (60, 60, 1357), (60, 1000), (60, 1357, 2000)])
def test_quality_layers_that_do_not_fit_the_sections_are_corrupt(ends):
    from dataclasses import replace

    header = container.parse_header(rate_stream())[0]
    data = container.pack_header(replace(header, layer_ends=ends)) + b"".join(SECTIONS)
    with pytest.raises(StreamError, match="quality layers"):
        container.parse_header(data)
