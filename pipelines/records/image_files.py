"""Reading and checking one image file before it is stored: `prepare_image`.

Only a regular file within `ImageLimits` is read; it must decode with PIL and
TensorFlow to the same size; EXIF-rotated, animated and other than
JPEG/PNG/GIF/BMP images are re-encoded. The rules: docs/data.md, Checking one
image; the limits: docs/reliability.md, Converters.
"""

import contextlib
import dataclasses
import io
import os

import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

from pipelines.records import image_header
from pipelines.utils import files

# Formats stored as they are (when TensorFlow decodes them). MPO is how PIL
# names a JPEG carrying extra preview images (some camera photos).
KEPT_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
JPEG_QUALITY = 95
# The reading side's pixel budget too (100 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = image_header.DEFAULT_MAX_PIXELS
# 256 MiB: far above any JPEG/PNG photo within the pixel budget.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """The resource limits of one image, checked before it is decoded.

    Args:
        max_pixels: int, width x height above which an image is skipped
            before decoding (`--max_image_pixels`). Defaults to 100,000,000.
        max_bytes: int, file size above which an image is skipped before
            it is read (`--max_image_bytes`). Defaults to 256 MiB.

    Raises:
        ValueError: a limit that is not a positive int.

    Example:

    >>> ImageLimits()
    ImageLimits(max_pixels=100000000, max_bytes=268435456)
    >>> ImageLimits(max_pixels=0)
    Traceback (most recent call last):
    ...
    ValueError: ImageLimits.max_pixels must be a positive int, got 0
    """
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self):
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value < 1):
                raise ValueError(f"ImageLimits.{name} must be a positive "
                                 f"int, got {value!r}")


class ImageError(ValueError):
    """An image file that cannot be stored: a counted skip of a conversion.

    Args:
        path: the image file.
        reason: why it cannot be stored, as the report's `skipped` list
            gives it.

    Example:

    >>> error = ImageError("photos/a.jpg", "empty file")
    >>> str(error), error.reason
    ('photos/a.jpg: empty file', 'empty file')
    """

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_image_file(path, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """Reads a regular file of at most `max_bytes` bytes.

    Opened without blocking (a FIFO does not hang) and checked with fstat
    on the open file, so a file swapped for a special one is caught too.

    Args:
        path: the file.
        max_bytes: the size cap (`--max_image_bytes`).

    Returns:
        The file's bytes.

    Raises:
        ImageError: missing, not a regular file, larger than `max_bytes`,
            empty or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        kind = files.special_file_kind(info.st_mode)
        if kind:
            raise ImageError(path, f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise ImageError(path, f"file of {info.st_size} bytes exceeds the "
                             f"size cap --max_image_bytes={max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # The file grew while being read.
        raise ImageError(path, f"file exceeds the size cap "
                         f"--max_image_bytes={max_bytes}")
    if not data:
        raise ImageError(path, "empty file")
    return data


@contextlib.contextmanager
def _pil_bomb_check_off():
    """Our pixel budget (checked right after the header) replaces PIL's own
    decompression-bomb limit, so that the budget flag decides alone.
    Not thread-safe (PIL's limit is a module global); restored on exit."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_image(data, path, max_pixels):
    """Reads the header, checks the pixel budget, then decodes frame 0.

    Returns:
        `(image, animated, orientation)`: the loaded PIL image (first
        frame), whether it is an animated GIF, and its EXIF orientation.
    """
    with _pil_bomb_check_off():
        try:
            image = Image.open(io.BytesIO(data))
        except MemoryError:
            raise
        except Exception as e:  # PIL raises many types on bad data.
            raise ImageError(path, f"not a readable image (PIL: {e})") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(path, f"{width}x{height} = {width * height} "
                             "pixels exceeds the pixel budget "
                             f"--max_image_pixels={max_pixels}")
        try:
            animated = image.format == "GIF" and bool(image.is_animated)
            image.seek(0)
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except MemoryError:
            raise
        except Exception as e:  # PIL raises many types on bad data.
            raise ImageError(path, f"not a readable image (PIL: {e})") from None
    return image, animated, orientation


def _tf_decode_problem(data, size, path):
    """Returns None if TF decodes `data` to RGB of `size` (w, h), else why."""
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.ResourceExhaustedError:
        raise ImageError(path, "out of memory while TensorFlow decoded it "
                         "(ResourceExhaustedError)") from None
    except tf.errors.OpError as e:
        message = e.message.strip().splitlines()[0]
        return "TensorFlow cannot decode it: " + message.split("}} ")[-1]
    height, width = image.shape[:2]
    if (width, height) != tuple(size):
        return (f"TensorFlow decodes it as {width}x{height}, "
                f"PIL as {size[0]}x{size[1]}")
    return None


def _to_8bit(image):
    """PIL's convert('RGB') clips 16/32-bit integer images; scale instead."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint32) >> 8
    elif image.mode in ("I", "F"):
        array = np.asarray(image).astype(np.float64)
        if array.max() > 255:
            array = array * (255.0 / 65535.0)
        array = np.clip(np.round(array), 0, 255)
    else:
        return image
    return Image.fromarray(array.astype(np.uint8), mode="L")


def _reencode(image, lossless=False):
    """Encodes a PIL image as RGB JPEG q95, or PNG if lossless is asked or
    the image has alpha, a palette or transparency."""
    lossless = (lossless or image.mode in ("P", "PA", "RGBA", "LA", "La",
                                           "RGBa")
                or "transparency" in image.info)
    image = _to_8bit(image).convert("RGB")
    buffer = io.BytesIO()
    if lossless:
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), image.size


def _prepare_bytes(data, path, max_pixels):
    """`(bytes to store, None or why they were re-encoded)` of an image's data."""
    image, animated, orientation = _open_image(data, path, max_pixels)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        reason = f"EXIF orientation {orientation}, rotated upright"
    elif animated:
        reason = "animated GIF, first frame stored"
    elif image.format not in KEPT_FORMATS:
        reason = f"{image.format} is not JPEG/PNG/GIF/BMP"
    else:
        reason = _tf_decode_problem(data, image.size, path)
        if reason is None:
            return data, None
    try:
        encoded, size = _reencode(image, lossless=animated)
    except MemoryError:
        raise
    except Exception as e:  # e.g. a PIL mode without an RGB conversion.
        raise ImageError(path, f"{reason}; cannot re-encode: {e}") from None
    problem = _tf_decode_problem(encoded, size, path)
    if problem is not None:
        raise ImageError(path, f"{reason}; re-encoded: {problem}")
    return encoded, reason


def prepare_image(path, limits=None):
    """Reads and checks one image file; returns the bytes to store.

    Args:
        path: the image file.
        limits: `ImageLimits` (default: the defaults).

    Returns:
        `(encoded, reason)`: the bytes for `image/encoded`, and None if they
        are the original file's bytes, else why the image was re-encoded.

    Raises:
        ImageError: (a ValueError) the file cannot be stored; `.reason`.
    """
    limits = limits or ImageLimits()
    try:
        data = read_image_file(path, limits.max_bytes)
        return _prepare_bytes(data, path, limits.max_pixels)
    except MemoryError:
        raise ImageError(path, "out of memory while decoding it "
                         "(MemoryError); lower --max_image_pixels or give "
                         "the converter more memory") from None
