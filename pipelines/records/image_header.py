"""Image size read from the encoded header, before any decoding: pixel budgets.

Two twins with one rule, tested to agree on every input: pure Python
(`read_header`, `pixel_budget_problem`) and TensorFlow ops usable in `tf.data`
and in a SavedModel served by TF Serving (`header_info`, `budget_problem`,
`check_pixel_budget`, `within_pixel_budget`). Decisions: docs/data.md,
Checking one image; what each format counts: docs/reliability.md, Serving and export.
"""

import dataclasses
import struct

import tensorflow as tf

# 100 megapixels: a 108 MP phone photo is refused, anything a camera below
# that makes passes; decoding one costs ~300 MB in PIL plus ~300 MB in TF.
# The converters' default too (`image_files.DEFAULT_MAX_IMAGE_PIXELS`).
DEFAULT_MAX_PIXELS = 100_000_000
# JPEG segments or GIF blocks walked before giving up (refusing the image):
# the check costs at most ~1 s of CPU on a hostile file.
MAX_HEADER_STEPS = 65_536
# Full GIF sub-blocks (255 bytes + length byte) skipped in one step.
_GIF_SKIP = 64
_PAD = 32

JPEG, PNG, GIF, BMP, WEBP, JXL = "JPEG", "PNG", "GIF", "BMP", "WebP", "JPEG XL"
# (format, [(offset, magic), ...]) in the order `tf.io.decode_image` tries.
SIGNATURES = (
    (JPEG, ((0, b"\xff\xd8\xff"),)),
    (PNG, ((0, b"\x89PNG\r\n\x1a\n"),)),
    (GIF, ((0, b"GIF87a"),)),
    (GIF, ((0, b"GIF89a"),)),
    (BMP, ((0, b"BM"),)),
    (WEBP, ((0, b"RIFF"), (8, b"WEBP"))),
    (JXL, ((0, b"\xff\x0a"),)),
    (JXL, ((0, b"\x00\x00\x00\x0cJXL \r\n\x87\n"),)),
)
_FORMATS = (JPEG, PNG, GIF, BMP, WEBP, JXL)


# --------------------------------------------------------------------------
# Pure Python.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Header:
    r"""What an image's header says: its format, size, frames and pixels.

    Args:
        format: "JPEG", "PNG", "GIF", "BMP", "WebP", "JPEG XL", or "" if
            unknown.
        width: pixels (0 when unknown).
        height: pixels (0 when unknown).
        frames: the frames the decoder decodes (GIF; 1 otherwise).
        pixels: what the decoder allocates for: width x height, for a GIF
            frames x max(screen area, largest frame area).
        problem: non-empty when the size cannot be checked (the image must
            then be refused).

    Example:

    >>> png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (20000).to_bytes(4, "big") * 2
    >>> read_header(png)
    Header(format='PNG', width=20000, height=20000, frames=1, pixels=400000000, problem='')
    >>> pixel_budget_problem(png, DEFAULT_MAX_PIXELS)
    '20000x20000 = 400000000 pixels, above the pixel budget of 100000000'
    """
    format: str
    width: int = 0
    height: int = 0
    frames: int = 1
    pixels: int = 0
    problem: str = ""


def image_format(data):
    """The format whose signature `data` starts with, or ""."""
    for name, parts in SIGNATURES:
        if all(data[offset:offset + len(magic)] == magic for offset, magic in parts):
            return name
    return ""


def _u16be(data, i):
    """The big-endian uint16 at `data[i]`."""
    return (data[i] << 8) | data[i + 1]


def _jpeg_size(data):
    """(width, height, steps) from the first SOF; steps > MAX if unfinished."""
    data = bytes(data) + b"\0" * _PAD
    n, p, steps = len(data) - _PAD, 2, 0
    while p < n and steps < MAX_HEADER_STEPS:
        steps += 1
        c, m = data[p], data[p + 1]
        if c != 0xFF or m == 0xFF:
            p += 1  # Stray byte, or a fill byte before a marker.
        elif m in (0x00, 0x01) or 0xD0 <= m <= 0xD8:
            p += 2  # Stuffed zero, TEM, RSTn, SOI: no length.
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return _u16be(data, p + 7), _u16be(data, p + 5), 0
        elif m in (0xD9, 0xDA):
            return 0, 0, 0  # EOI or SOS before any frame header.
        else:
            p += 2 + _u16be(data, p + 2)
    return 0, 0, (steps if p < n else 0)


def _gif_frames(data):
    """(frames, largest frame area, steps) walking the GIF blocks."""
    data = bytes(data) + b"\0" * _PAD
    n = len(data) - _PAD
    at = lambda q: data[min(q, n)]  # noqa: E731 - the twin of `_reader`'s `at`
    packed = at(10)
    p = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    in_blocks, frames, largest, steps = False, 0, 0, 0
    while p < n and steps < MAX_HEADER_STEPS:
        steps += 1
        c = at(p)
        if not in_blocks:
            if c == 0x2C:  # Image descriptor: w, h at +5, +7; local table.
                frames += 1
                largest = max(largest, (at(p + 5) | at(p + 6) << 8)
                              * (at(p + 7) | at(p + 8) << 8))
                local = at(p + 9)
                p += 11 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
                in_blocks = True
            elif c == 0x21:  # Extension: label, then sub-blocks.
                p += 2
                in_blocks = True
            else:  # Trailer (or junk: the decoder stops there too).
                p = n
        elif c == 0:
            p += 1
            in_blocks = False
        else:
            full = 0
            while full < _GIF_SKIP and at(p + 256 * full) == 255:
                full += 1
            p += 256 * full if full else c + 1
    return frames, largest, (steps if p < n else 0)


def _webp_size(data):
    """(width, height) of a WebP's VP8 or VP8L frame or VP8X canvas; (0, 0) else."""
    data = bytes(data) + b"\0" * _PAD
    kind = data[12:16]
    if kind == b"VP8 ":
        return (struct.unpack("<H", data[26:28])[0] & 0x3FFF,
                struct.unpack("<H", data[28:30])[0] & 0x3FFF)
    if kind == b"VP8L":
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return 0, 0


def _cannot_check(name, why):
    """The `Header` of an image whose size cannot be checked (to be refused)."""
    return Header(name, problem=f"{name} whose size cannot be checked against the "
                                f"pixel budget ({why})")


def read_header(data):
    """Reads format, size and frame count of encoded image bytes.

    Args:
        data: the encoded image (bytes).

    Returns:
        A `Header` (format "" and 0 pixels when the format is unknown).
    """
    data = bytes(data)
    name = image_format(data)
    padded = data + b"\0" * _PAD
    frames, width, height = 1, 0, 0
    if name == JPEG:
        width, height, steps = _jpeg_size(data)
        if steps:
            return _cannot_check(name, f"more than {MAX_HEADER_STEPS} segments")
    elif name == PNG:
        if padded[12:16] == b"IHDR":
            width, height = struct.unpack(">II", padded[16:24])
    elif name == GIF:
        width, height = struct.unpack("<HH", padded[6:10])
        frames, largest, steps = _gif_frames(data)
        if steps:
            return _cannot_check(name, f"more than {MAX_HEADER_STEPS} blocks")
        return Header(name, width, height, frames,
                      frames * max(width * height, largest))
    elif name == BMP:
        width, height = (abs(v) for v in struct.unpack("<ii", padded[18:26]))
    elif name == WEBP:
        width, height = _webp_size(data)
    elif name == JXL:
        return _cannot_check(name, "its size header is not read")
    return Header(name, width, height, frames, width * height)


def describe(header):
    """'20000x20000 = 400000000 pixels' (GIF: 'N frames of WxH: P pixels')."""
    if header.format == GIF:
        return (f"GIF of {header.frames} frame(s) of {header.width}x{header.height}: "
                f"{header.pixels} pixels to decode")
    return f"{header.width}x{header.height} = {header.pixels} pixels"


def pixel_budget_problem(data, max_pixels):
    """None if `data` may be decoded within `max_pixels`, else why not.

    Args:
        data: encoded image bytes.
        max_pixels: the pixel budget (width x height x frames).

    Returns:
        None, or e.g. "20000x20000 = 400000000 pixels, above the pixel budget
        of 100000000".
    """
    header = read_header(data)
    if header.problem:
        return header.problem
    if header.pixels > max_pixels:
        return f"{describe(header)}, above the pixel budget of {max_pixels}"
    return None


# --------------------------------------------------------------------------
# In the graph: the same rule with TensorFlow ops (scalar string input).
# --------------------------------------------------------------------------

def format_name(image_bytes):
    """`image_format` in the graph, elementwise: string tensor, "" if unknown."""
    return tf.gather(tf.constant([""] + list(_FORMATS)), _format_index(image_bytes))


def _format_index(image_bytes):
    """int32: 1 + the index in _FORMATS, or 0 for an unknown format
    (elementwise: any shape)."""
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, _PAD), b"\0" * _PAD])
    index = tf.constant(0, tf.int32)
    for name, parts in reversed(SIGNATURES):  # The first match wins.
        match = tf.constant(True)
        for offset, magic in parts:
            match &= tf.equal(tf.strings.substr(head, offset, len(magic)), magic)
        index = tf.where(match, _FORMATS.index(name) + 1, index)
    return index


def _byte_array(image_bytes, length=None):
    """int64 bytes (zero-padded by _PAD) and the unpadded length n."""
    if length is not None:
        image_bytes = tf.strings.substr(image_bytes, 0, length)
    padded = tf.strings.join([image_bytes, b"\0" * _PAD])
    array = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    return array, tf.size(array, out_type=tf.int64) - _PAD


def _reader(array, n):
    """at(q) = array[min(q, n)] (0 past the end), and a little-endian int."""
    def at(q):
        return tf.gather(array, tf.minimum(tf.cast(q, tf.int64), n))

    def little(q, count):
        return sum(at(q + i) * (256 ** i) for i in range(count))
    return at, little


def _jpeg_graph(array, n):
    """(width, height, unfinished): `_jpeg_size` in the graph."""
    at, _ = _reader(array, n)

    def u16(q):
        return at(q) * 256 + at(q + 1)

    def body(p, steps, width, height, unused_done):
        c, m = at(p), at(p + 1)
        skip = (c != 0xFF) | (m == 0xFF)
        no_length = ~skip & ((m <= 0x01) | ((m >= 0xD0) & (m <= 0xD8)))
        marker = ~skip & ~no_length
        sof = marker & (m >= 0xC0) & (m <= 0xCF) & (m != 0xC4) & (m != 0xC8) & (m != 0xCC)
        end = marker & ((m == 0xD9) | (m == 0xDA))
        width = tf.where(sof, u16(p + 7), width)
        height = tf.where(sof, u16(p + 5), height)
        p = tf.where(skip, p + 1, tf.where(no_length, p + 2, p + 2 + u16(p + 2)))
        return p, steps + 1, width, height, sof | end

    def cond(p, steps, unused_width, unused_height, done):
        return ~done & (p < n) & (steps < MAX_HEADER_STEPS)

    zero = tf.constant(0, tf.int64)
    p, _, width, height, done = tf.while_loop(
        cond, body, (tf.constant(2, tf.int64), zero, zero, zero, tf.constant(False)))
    return width, height, ~done & (p < n)


def _gif_graph(array, n):
    """(frames, largest frame area, unfinished): `_gif_frames` in the graph."""
    at, little = _reader(array, n)
    offsets = tf.range(_GIF_SKIP, dtype=tf.int64) * 256

    def table(packed):  # Size of a colour table announced by a packed byte.
        return tf.where(packed >= 0x80, 3 * tf.bitwise.left_shift(
            tf.constant(2, tf.int64), packed % 8), 0)

    def body(p, in_blocks, frames, largest, steps):
        c = at(p)
        image = ~in_blocks & (c == 0x2C)
        extension = ~in_blocks & (c == 0x21)
        p_top = tf.where(image, p + 11 + table(at(p + 9)),
                         tf.where(extension, p + 2, n))
        full = tf.gather(array, tf.minimum(p + offsets, n)) == 255
        full = tf.reduce_sum(tf.math.cumprod(tf.cast(full, tf.int64)))
        p_sub = tf.where(c == 0, p + 1, tf.where(full > 0, p + 256 * full, p + c + 1))
        area = tf.where(image, little(p + 5, 2) * little(p + 7, 2), 0)
        return (tf.where(in_blocks, p_sub, p_top),
                tf.where(in_blocks, c != 0, image | extension),
                frames + tf.cast(image, tf.int64), tf.maximum(largest, area), steps + 1)

    def cond(p, unused_in_blocks, unused_frames, unused_largest, steps):
        return (p < n) & (steps < MAX_HEADER_STEPS)

    zero = tf.constant(0, tf.int64)
    p, _, frames, largest, _ = tf.while_loop(
        cond, body, (13 + table(at(10)), tf.constant(False), zero, zero, zero))
    return frames, largest, p < n


def _fixed_size(index, head):
    """(width, height) of PNG, BMP and WebP from the first _PAD bytes."""
    def big(q, count):
        return sum(head[q + i] * (256 ** (count - 1 - i)) for i in range(count))

    def little(q, count):
        return sum(head[q + i] * (256 ** i) for i in range(count))

    def signed(value):
        return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))

    def fourcc(q, text):
        return tf.reduce_all(tf.equal(head[q:q + 4], list(text)))

    ihdr = fourcc(12, b"IHDR")
    png = (tf.where(ihdr, big(16, 4), 0), tf.where(ihdr, big(20, 4), 0))
    bmp = (signed(little(18, 4)), signed(little(22, 4)))
    bits = little(21, 4)
    webp = [(fourcc(12, b"VP8 "), little(26, 2) % 16384, little(28, 2) % 16384),
            (fourcc(12, b"VP8L"), bits % 16384 + 1, (bits // 16384) % 16384 + 1),
            (fourcc(12, b"VP8X"), little(24, 3) + 1, little(27, 3) + 1)]
    webp_size = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    for match, width, height in reversed(webp):
        webp_size = (tf.where(match, width, webp_size[0]),
                     tf.where(match, height, webp_size[1]))
    pick = {_FORMATS.index(PNG) + 1: png, _FORMATS.index(BMP) + 1: bmp,
            _FORMATS.index(WEBP) + 1: webp_size}
    width, height = tf.constant(0, tf.int64), tf.constant(0, tf.int64)
    for key, (w, h) in pick.items():
        width = tf.where(tf.equal(index, key), w, width)
        height = tf.where(tf.equal(index, key), h, height)
    return width, height


def header_info(image_bytes):
    """`read_header` in the graph, for one scalar string tensor.

    Returns:
        dict of scalar tensors: `format` (string, "" if unknown), `width`,
        `height`, `frames`, `pixels` (int64) and `checked` (bool: False when
        the size cannot be known; the image must then be refused).
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    index = _format_index(image_bytes)
    head, _ = _byte_array(image_bytes, _PAD)
    width, height = _fixed_size(index, head)
    frames, checked = tf.constant(1, tf.int64), tf.not_equal(index, _FORMATS.index(JXL) + 1)
    zero = tf.constant(0, tf.int64)

    def jpeg():
        return _jpeg_graph(*_byte_array(image_bytes))

    def gif():
        return _gif_graph(*_byte_array(image_bytes))

    is_jpeg = tf.equal(index, _FORMATS.index(JPEG) + 1)
    is_gif = tf.equal(index, _FORMATS.index(GIF) + 1)
    jpeg_w, jpeg_h, jpeg_unfinished = tf.cond(
        is_jpeg, jpeg, lambda: (zero, zero, tf.constant(False)))
    gif_frames, largest, gif_unfinished = tf.cond(
        is_gif, gif, lambda: (frames, zero, tf.constant(False)))
    width = tf.where(is_jpeg, jpeg_w, tf.where(is_gif, _u16le(head, 6), width))
    height = tf.where(is_jpeg, jpeg_h, tf.where(is_gif, _u16le(head, 8), height))
    pixels = tf.where(is_gif, gif_frames * tf.maximum(width * height, largest),
                      width * height)
    checked &= ~jpeg_unfinished & ~gif_unfinished

    def known(value, otherwise=0):  # An unchecked header tells nothing.
        return tf.where(checked, value, tf.constant(otherwise, tf.int64))

    return {"format": tf.gather(tf.constant([""] + list(_FORMATS)), index),
            "width": known(width), "height": known(height),
            "frames": known(gif_frames, 1), "pixels": known(pixels), "checked": checked}


def _u16le(head, q):
    """A little-endian uint16 of the header (GIF screen width/height)."""
    return head[q] + 256 * head[q + 1]


def budget_problem(image_bytes, max_pixels):
    """`pixel_budget_problem` in the graph: a string scalar, "" when fine.

    Args:
        image_bytes: scalar string tensor, an encoded image.
        max_pixels: the pixel budget (a Python int).
    """
    info = header_info(image_bytes)
    as_text = tf.strings.as_string
    size = tf.strings.join([as_text(info["width"]), "x", as_text(info["height"])])
    described = tf.where(
        tf.equal(info["format"], GIF),
        tf.strings.join(["GIF of ", as_text(info["frames"]), " frame(s) of ", size, ": ",
                         as_text(info["pixels"]), " pixels to decode"]),
        tf.strings.join([size, " = ", as_text(info["pixels"]), " pixels"]))
    why = tf.where(tf.equal(info["format"], JXL), "its size header is not read",
                   tf.where(tf.equal(info["format"], GIF),
                            f"more than {MAX_HEADER_STEPS} blocks",
                            f"more than {MAX_HEADER_STEPS} segments"))
    unchecked = tf.strings.join(
        [info["format"], " whose size cannot be checked against the pixel budget (", why, ")"])
    over = tf.strings.join([described, f", above the pixel budget of {max_pixels}"])
    return tf.where(~info["checked"], unchecked,
                    tf.where(info["pixels"] > max_pixels, over, ""))


def check_pixel_budget(image_bytes, max_pixels):
    """An assertion op: fails with InvalidArgumentError naming the problem.

    E.g. "assertion failed: [20000x20000 = 400000000 pixels, above the pixel
    budget of 100000000]". Run the decoder under a control dependency on it,
    or use `within_pixel_budget`.
    """
    problem = budget_problem(image_bytes, max_pixels)
    return tf.debugging.Assert(tf.equal(problem, ""), [problem],
                               name="check_pixel_budget")


def within_pixel_budget(image_bytes, max_pixels):
    """`image_bytes`, available only once `check_pixel_budget` has passed.

    Use: `tf.io.decode_image(within_pixel_budget(image_bytes, max_pixels))`:
    nothing is decoded for an image above the budget (the InvalidArgumentError
    is raised first; `ignore_errors` in a tf.data pipeline then drops it).
    """
    with tf.control_dependencies([check_pixel_budget(image_bytes, max_pixels)]):
        return tf.identity(image_bytes)


def within_pixel_budget_fast(image_bytes, max_pixels):
    """`within_pixel_budget` for pipelines that skip failing images anyway.

    A JPEG's size comes from libjpeg's own header reader
    (`tf.io.extract_jpeg_shape`) instead of the segment walk in the graph,
    which copies the whole file into a tensor; a JPEG whose header libjpeg
    cannot read raises its error (docs/data.md, Checking one image). Other
    formats are checked by `check_pixel_budget`.
    """
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")

    def jpeg_check():
        shape = tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)
        return tf.debugging.Assert(
            shape[0] * shape[1] <= max_pixels,
            ["JPEG of", shape[1], "x", shape[0], "pixels, above the pixel budget of",
             max_pixels], name="check_jpeg_pixel_budget")

    check = tf.cond(is_jpeg, jpeg_check,
                    lambda: check_pixel_budget(image_bytes, max_pixels))
    with tf.control_dependencies([check]):
        return tf.identity(image_bytes)
