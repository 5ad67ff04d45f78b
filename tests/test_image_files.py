"""Checking one image before it is stored (pipelines.records.image_files), on
real photos: what is kept, what is re-encoded, what is refused, within bounds."""

import builtins
import io
import os
import struct
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
import tensorflow as tf

from pipelines.records import image_files
from pipelines.records import shard_writer

from helpers import CLASSES
from helpers import H
from helpers import W
from helpers import decode
from helpers import jpeg_bytes
from helpers import mean_abs_diff
from helpers import save
from helpers import write_bytes

# ----------------------------------------------------------------------------
# prepare_image: what is kept, what is re-encoded (measured on TF 2.21).
# ----------------------------------------------------------------------------

def _make_kept(directory, photo, kind):
    if kind == "rgb.jpg":
        return save(directory, kind, photo, "JPEG", quality=90)
    if kind == "gray.jpg":
        return save(directory, kind, photo.convert("L"), "JPEG")
    if kind == "png_named.jpg":
        return save(directory, kind, photo, "PNG")
    if kind == "cmyk.jpg":
        return save(directory, kind, photo.convert("CMYK"), "JPEG", quality=95)
    if kind == "gray16.png":
        gray = np.asarray(photo.convert("L")).astype(np.uint16) * 257
        return save(directory, kind, Image.fromarray(gray), "PNG")
    if kind == "palette.png":
        return save(directory, kind, photo.convert(
            "P", palette=Image.ADAPTIVE), "PNG")
    if kind == "still.gif":
        return save(directory, kind, photo.convert("P"), "GIF")
    if kind == "rgb.bmp":
        return save(directory, kind, photo, "BMP")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "rgb.jpg", "gray.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png",
    "palette.png", "still.gif", "rgb.bmp"])
def test_decodable_images_are_stored_unchanged(tmp_path, photos, kind):
    path = _make_kept(str(tmp_path), photos[0], kind)
    encoded, reason = image_files.prepare_image(path)
    assert reason is None
    with open(path, "rb") as f:
        assert encoded == f.read()
    image = decode(encoded)
    assert image.shape == (H, W, 3)
    # TF's pixels match what the image shows (CMYK included; the 16-bit
    # PNG is scaled to 8 bit, not clipped).
    if kind in ("palette.png", "still.gif"):  # Exact: compare with PIL.
        with Image.open(path) as pil:
            assert np.array_equal(image, np.asarray(pil.convert("RGB")))
        return
    reference = np.asarray(photos[0].convert(
        "L" if kind.startswith("gray") else "RGB"))
    if reference.ndim == 2:
        reference = reference[..., None]
    assert mean_abs_diff(image, reference) < 4


@pytest.mark.parametrize("kind,fmt,magic", [
    ("rgb.tiff", "TIFF", b"\xff\xd8"),
    ("rgb.webp", "WEBP", b"\xff\xd8"),
    ("rgba.tiff", "TIFF", b"\x89PNG"),
])
def test_other_formats_are_reencoded(tmp_path, photos, kind, fmt, magic):
    photo = photos[1].convert("RGBA") if kind.startswith("rgba") else photos[1]
    options = {"lossless": True} if fmt == "WEBP" else {}
    path = save(str(tmp_path), kind, photo, fmt, **options)
    encoded, reason = image_files.prepare_image(path)
    assert fmt in reason
    assert encoded.startswith(magic)
    image = decode(encoded)
    assert image.shape == (H, W, 3)
    assert mean_abs_diff(image, photos[1]) < 4


def test_exif_orientation_is_applied(tmp_path, photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display".
    path = save(str(tmp_path), "exif6.jpg", photos[0], "JPEG", quality=95,
                exif=exif.tobytes())
    with open(path, "rb") as f:
        # TensorFlow ignores EXIF: the original bytes decode sideways.
        assert decode(f.read()).shape == (H, W, 3)
    encoded, reason = image_files.prepare_image(path)
    assert "orientation 6" in reason
    image = decode(encoded)
    assert image.shape == (W, H, 3)
    upright = np.rot90(np.asarray(photos[0]), k=-1)  # 90 degrees clockwise.
    assert mean_abs_diff(image, upright) < 4
    assert mean_abs_diff(image, np.rot90(np.asarray(photos[0]), k=1)) > 20


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "not a readable image"),
    ("garbage", "not a readable image"),
    ("empty", "empty file"),
    ("missing", "file not found"),
])
def test_unreadable_images_raise(tmp_path, photos, kind, reason):
    data = jpeg_bytes(photos[0])
    contents = {"truncated": data[:len(data) // 2],
                "garbage": data[:20] + os.urandom(200) + b"\x00" * 100,
                "empty": b""}
    path = str(tmp_path / f"{kind}.jpg")
    if kind != "missing":
        write_bytes(str(tmp_path), f"{kind}.jpg", contents[kind])
    with pytest.raises(image_files.ImageError, match=reason) as info:
        image_files.prepare_image(path)
    assert path in str(info.value)


# ----------------------------------------------------------------------------
# Bounded resources.
# ----------------------------------------------------------------------------

def png_of_zeros(path, width, height):
    """A valid grayscale PNG of width x height zeros, built row by row (a
    decompression bomb: tiny file, huge image)."""
    def chunk(kind, data):
        body = kind + data
        return (struct.pack(">I", len(data)) + body
                + struct.pack(">I", zlib.crc32(body) & 0xffffffff))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # Filter byte 0 + one byte per pixel.
    idat = b"".join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                             0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _forbid_decoding(monkeypatch):
    def fail(*unused_args, **unused_kwargs):
        raise AssertionError("decoded an image over the pixel budget")
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    monkeypatch.setattr(tf.io, "decode_image", fail)


def test_pixel_budget_refuses_before_decoding(tmp_path, monkeypatch):
    path = png_of_zeros(str(tmp_path / "bomb.png"), 10_001, 10_000)
    assert os.path.getsize(path) < 200_000
    _forbid_decoding(monkeypatch)
    with pytest.raises(image_files.ImageError, match=(
            r"10001x10000 = 100010000 pixels exceeds the pixel budget "
            r"--max_image_pixels=100000000")):
        image_files.prepare_image(path)


def test_pixel_budget_flag_is_honoured(tmp_path, photos):
    path = save(str(tmp_path), "a.jpg", photos[0], "JPEG")
    limits = image_files.ImageLimits(max_pixels=W * H - 1)
    with pytest.raises(image_files.ImageError, match="pixel budget"):
        image_files.prepare_image(path, limits)
    assert image_files.prepare_image(path, image_files.ImageLimits(max_pixels=W * H))[1] is None
    records = [shard_writer.ImageRecord(path, "a.jpg", (0,)),
               shard_writer.ImageRecord(path + ".png", "b.png", (1,))]
    photos[1].resize((10, 10)).save(records[1].path)
    report = shard_writer.write_split(records, str(tmp_path / "out"), "train",
                             CLASSES, num_shards=1, num_workers=1,
                             limits=image_files.ImageLimits(max_pixels=100))
    assert report["num_skipped"] == 1 and report["max_image_pixels"] == 100
    assert "pixel budget" in report["skipped"][0]["reason"]


def test_animated_gif_stores_first_frame_only(tmp_path, photos):
    frames = [photos[0].convert("P"),
              photos[1].convert("P"), photos[0].rotate(180).convert("P")]
    path = save(str(tmp_path), "anim.gif", frames[0], "GIF", save_all=True,
                append_images=frames[1:])
    encoded, reason = image_files.prepare_image(path)
    assert reason == "animated GIF, first frame stored"
    assert encoded.startswith(b"\x89PNG")  # Lossless.
    with Image.open(io.BytesIO(encoded)) as stored:
        assert not getattr(stored, "is_animated", False)
    with Image.open(path) as original:
        first = np.asarray(original.convert("RGB"))
    assert np.array_equal(decode(encoded), first)


def test_memory_error_is_reported_as_out_of_memory(tmp_path, photos,
                                                   monkeypatch):
    path = save(str(tmp_path), "a.png", photos[0], "PNG")

    def out_of_memory(*unused_args, **unused_kwargs):
        raise MemoryError()

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(image_files.ImageError, match="out of memory") as info:
        image_files.prepare_image(path)
    assert "corrupt" not in str(info.value)
    assert "not a readable image" not in str(info.value)


def _forbid_reading(monkeypatch):
    def fail(*unused_args, **unused_kwargs):
        raise AssertionError("read a file that is refused by its fstat")
    monkeypatch.setattr(os, "fdopen", fail)
    monkeypatch.setattr(os, "read", fail)
    monkeypatch.setattr(builtins, "open", fail)


@pytest.mark.parametrize("kind,reason", [
    ("fifo", r"not a regular file \(a FIFO\)"),
    ("directory", r"not a regular file \(a directory\)"),
    ("dev_zero", r"not a regular file \(a character device\)"),
    ("link_to_fifo", r"not a regular file \(a FIFO\)"),
    ("too_big", r"file of 4097 bytes exceeds the size cap "
                r"--max_image_bytes=4096"),
])
def test_special_and_large_files_are_skipped(tmp_path, monkeypatch, fifo_unblocker,
                                             kind, reason):
    path = str(tmp_path / f"{kind}.jpg")
    if kind in ("fifo", "link_to_fifo"):
        os.mkfifo(str(tmp_path / "pipe"))
        fifo_unblocker(str(tmp_path / "pipe"))
        os.symlink(str(tmp_path / "pipe"), path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        write_bytes(str(tmp_path), f"{kind}.jpg", b"\xff" * 4097)
    with monkeypatch.context() as patch:
        _forbid_reading(patch)
        with pytest.raises(image_files.ImageError, match=reason):
            image_files.prepare_image(path, image_files.ImageLimits(max_bytes=4096))
    # Refused from fstat alone: nothing was read, and opening the FIFO did
    # not block (a blocked open would have waited for the unblocker).
    assert fifo_unblocker.rescued == []
