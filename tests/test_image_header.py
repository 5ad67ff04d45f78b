"""Tests for pipelines.image_header: sizes and GIF frame counts read from the
encoded header agree with PIL and libjpeg on real files, the in-graph and
Python twins agree on every input (real, crafted, truncated, mutated), and
bombs are refused before decoding, eagerly, in tf.function and in tf.data."""

import io
import struct
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from pipelines.records import image_header as ih

from helpers import gif_of_frames
from helpers import png_bomb

BUDGET = 1_000_000


# --------------------------------------------------------------------------
# Builders (also used by tests/test_faults_serving.py).
# --------------------------------------------------------------------------


def encode(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_images():
    """{name: bytes} of real encoded images of every supported format."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 255, (37, 53, 1), dtype=np.uint8)], -1)
    gray16 = (rng.integers(0, 65535, (37, 53))).astype(np.uint16)
    return {
        "jpeg": encode(rgb, "JPEG"),
        "jpeg_progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg_exif": encode(rgb, "JPEG", exif=Image.Exif().tobytes() + b"\0" * 300),
        "jpeg_gray": encode(rgb[..., 0], "JPEG"),
        "png": encode(rgb, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_16bit": encode(gray16, "PNG"),
        "gif": encode(rgb, "GIF"),
        "gif_animated": gif_of_frames(30, 40, 5),
        "bmp": encode(rgb, "BMP"),
        "webp_lossy": encode(rgb, "WEBP"),
        "webp_lossless": encode(rgb, "WEBP", lossless=True),
        "webp_alpha": encode(rgba, "WEBP"),
    }


_graph_info = tf.function(ih.header_info, input_signature=[tf.TensorSpec([], tf.string)])


def _graph(data):
    out = {k: v.numpy() for k, v in _graph_info(tf.constant(data)).items()}
    return (out["format"].decode(), int(out["width"]), int(out["height"]),
            int(out["frames"]), int(out["pixels"]), not bool(out["checked"]))


def _python(data):
    h = ih.read_header(data)
    return h.format, h.width, h.height, h.frames, h.pixels, bool(h.problem)


# --------------------------------------------------------------------------
# Sizes of real files.
# --------------------------------------------------------------------------

def test_sizes_of_real_images_equal_pil_and_tensorflow(real_images):
    for name, data in real_images.items():
        header = ih.read_header(data)
        with Image.open(io.BytesIO(data)) as image:
            assert (header.width, header.height) == image.size, name
            frames = getattr(image, "n_frames", 1) if image.format == "GIF" else 1
        assert header.frames == frames and not header.problem, name
        assert header.pixels == frames * image.size[0] * image.size[1], name
        assert _graph(data) == _python(data), name
        decoded = tf.io.decode_image(data, expand_animations=False)
        assert decoded.shape[:2] == (header.height, header.width), name
        if header.format == ih.JPEG:
            assert list(tf.io.extract_jpeg_shape(data).numpy()[:2]) == [
                header.height, header.width]


def test_animated_gif_counts_every_frame():
    data = gif_of_frames(200, 100, 1000)
    assert _python(data) == (ih.GIF, 200, 100, 1000, 1000 * 200 * 100, False)
    assert _graph(data) == _python(data)
    assert Image.open(io.BytesIO(data)).n_frames == 1000


# --------------------------------------------------------------------------
# Bombs and hostile headers.
# --------------------------------------------------------------------------

def _jpeg_header(width, height, before_sof=b""):
    """SOI, optional segments, a SOF0 of width x height, then junk."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + before_sof + sof + b"\xff\xda\x00\x02" + b"\x00" * 50


def _webp_vp8x(width, height):
    chunk = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (
        (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize("name, data, expected", [
    ("png bomb", png_bomb(20000, 20000), "20000x20000 = 400000000 pixels, above the "
                                         "pixel budget of 1000000"),
    ("jpeg after segments and stray bytes",
     _jpeg_header(60000, 50000, b"\xff\xe0\x00\x10" + b"J" * 14 + b"junk\xff\xff"
                  + b"\xff\xfe\x00\x04ab"),
     "60000x50000 = 3000000000 pixels"),
    ("bmp, negative height", b"BM" + b"\0" * 16 + struct.pack("<ii", 5000, -4000)
     + b"\0" * 30, "5000x4000 = 20000000 pixels"),
    ("webp canvas", _webp_vp8x(16384, 16384), "16384x16384 = 268435456 pixels"),
    ("gif frames", gif_of_frames(200, 100, 60), "GIF of 60 frame(s) of 200x100: "
                                                "1200000 pixels to decode"),
    ("jpeg xl", b"\xff\x0a\xfa\x7f" + b"\0" * 40,
     "JPEG XL whose size cannot be checked"),
])
def test_bombs_are_refused_by_both_twins(name, data, expected):
    problem = ih.pixel_budget_problem(data, BUDGET)
    assert problem and expected in problem, name
    assert ih.budget_problem(tf.constant(data), BUDGET).numpy().decode() == problem
    assert _graph(data) == _python(data), name


def test_gif_with_a_frame_larger_than_its_screen_counts_the_frame():
    data = bytearray(gif_of_frames(10, 10, 1))
    start = data.index(b",")
    data[start + 5:start + 9] = struct.pack("<HH", 30000, 30000)
    assert ih.read_header(bytes(data)).pixels == 900_000_000
    assert _graph(bytes(data)) == _python(bytes(data))


def test_walks_are_bounded_and_refuse_what_they_cannot_finish():
    # 100,000 one-byte comment sub-blocks: more steps than MAX_HEADER_STEPS.
    gif = gif_of_frames(4, 4, 1)[:-1]
    hostile_gif = gif + b"\x21\xfe" + b"\x01," * 100_000 + b"\x00;"
    hostile_jpeg = _jpeg_header(10, 10, b"\xff\xfe\x00\x02" * 70_000)
    for data, what in ((hostile_gif, "blocks"), (hostile_jpeg, "segments")):
        assert f"more than {ih.MAX_HEADER_STEPS} {what}" in ih.pixel_budget_problem(
            data, BUDGET)
        start = time.perf_counter()
        assert _graph(data) == _python(data)
        assert time.perf_counter() - start < 60.0  # ~1 s each on an idle machine.
    # A 3 MB GIF of full 255-byte sub-blocks is walked 64 blocks per step.
    big = gif_of_frames(2000, 1500, 1)
    assert len(big) > 2_000_000 and ih.read_header(big).frames == 1
    assert _graph(big) == _python(big)


def test_unknown_short_and_empty_data_are_left_to_the_decoder():
    for data in (b"", b"hello", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a",
                 b"BM", b"RIFF\0\0\0\0WEBP", b"\x00" * 100):
        assert ih.pixel_budget_problem(data, BUDGET) is None
        assert _graph(data) == _python(data), data


def test_twins_agree_on_truncated_and_mutated_files(real_images):
    rng = np.random.default_rng(1)
    cases = []
    for data in real_images.values():
        cases += [data[:n] for n in (3, 10, 16, 24, 30, 40, len(data) // 2)]
        for _ in range(6):
            mutated = bytearray(data)
            for i in rng.integers(0, min(len(data), 64), size=3):
                mutated[i] = int(rng.integers(0, 256))
            cases.append(bytes(mutated))
    for data in cases:
        assert _graph(data) == _python(data), data[:40]


# --------------------------------------------------------------------------
# In a tf.data pipeline (how training and evaluation would use it).
# --------------------------------------------------------------------------

def test_within_pixel_budget_in_tf_data_refuses_before_decoding(real_images):
    good = real_images["png"]
    bomb = png_bomb(20000, 20000)

    def decode(data):
        checked = ih.within_pixel_budget(data, BUDGET)
        return tf.shape(tf.io.decode_image(checked, channels=3, expand_animations=False))

    dataset = tf.data.Dataset.from_tensor_slices([good, bomb, good]).map(decode)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="20000x20000 = 400000000 pixels, above the pixel budget"):
        list(dataset)
    start = time.perf_counter()
    shapes = [s.numpy().tolist() for s in dataset.ignore_errors()]
    assert shapes == [[37, 53, 3], [37, 53, 3]]
    assert time.perf_counter() - start < 5.0  # Decoding the bomb takes ~12 s.
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel budget"):
        tf.function(lambda d: ih.within_pixel_budget(d, BUDGET))(tf.constant(bomb))


def _real_jpeg_claiming(width, height):
    """A valid small JPEG whose SOF0 header claims width x height."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("jpeg header of 60000x50000", _real_jpeg_claiming(60000, 50000)),
    ("png bomb", png_bomb(20000, 20000)),
    ("gif frames", gif_of_frames(200, 100, 60)),
])
def test_the_fast_check_of_the_input_pipeline_refuses_the_same_bombs(name, data,
                                                                     real_images):
    """within_pixel_budget_fast (libjpeg's header reader for JPEG) refuses what
    the graph twin refuses, and passes real images of every format."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel budget"):
        ih.within_pixel_budget_fast(tf.constant(data), BUDGET)
    for fmt, good in real_images.items():
        assert ih.within_pixel_budget_fast(tf.constant(good), BUDGET).numpy() == good, fmt
