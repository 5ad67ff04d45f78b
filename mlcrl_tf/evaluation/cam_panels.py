"""CAM panels as pictures: image | direct-head CAM | f_conv map, for
`visualize` and for TensorBoard's eval images.
"""

import io
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
import tensorflow as tf

from mlcrl_tf.evaluation import cams as cams_lib
from pipelines.utils import files

_CAPTION_HEIGHT = 14
_LINE_HEIGHT = 12
_TOP_PREDICTIONS = 3


def _resize_uint8(image, size):
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _caption(width, text):
    """A black strip (_CAPTION_HEIGHT, width, 3) with white text."""
    strip = Image.new("RGB", (width, _CAPTION_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255),
                               font=ImageFont.load_default())
    return np.asarray(strip)


def render_cam_panel(image_uint8, cams, class_name, score=None, tile_size=None,
                     alpha=0.5):
    """image | direct-head CAM | f_conv map, with a caption, as one picture.

    Args:
        image_uint8: RGB uint8 (H, W, 3), the image the maps belong to
            (normally the model-size square image).
        cams: dict with `direct` (h, w) and optionally `f_conv` (h, w) (None
            or missing for variants without f_conv): one image's maps for one
            class at feature resolution (from `compute_cams`).
        class_name: shown in the caption.
        score: the class probability, shown when given.
        tile_size: side of each square tile; default the image's height.
        alpha: heat-map opacity.

    Returns:
        uint8 (tile + caption height, 2 or 3 tiles wide, 3).
    """
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_uint8 must be uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}.")
    tile = int(tile_size or image.shape[0])
    image = _resize_uint8(image, tile)
    tiles, titles = [image], ["image"]
    for key, title in (("direct", "CAM"), ("f_conv", "f_conv")):
        cam = cams.get(key)
        if cam is not None:
            heat = cams_lib.upsample_and_normalise(cam, tile, tile)
            tiles.append(cams_lib.overlay(image, heat, alpha))
            titles.append(title)
    body = np.concatenate(tiles, axis=1)
    text = class_name if score is None else f"{class_name} {score:.2f}"
    text += "  [" + " | ".join(titles) + "]"
    return np.concatenate([_caption(body.shape[1], text), body], axis=0)


def save_png(array, path):
    """Writes an RGB uint8 array as PNG, whole or not at all (creating the
    directory).

    Raises:
        ValueError: the file cannot be written (naming it; e.g. a full disk).
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    try:
        tf.io.gfile.makedirs(os.path.dirname(path) or ".")
        files.write_atomically(path, buffer.getvalue())
    except files.IO_ERRORS as e:
        raise ValueError(f"cannot write {path}: {files.error_text(e)}") from None


def _to_uint8(images):
    """RGB float in [0, 255] -> uint8 for display."""
    return np.clip(np.round(np.asarray(images, np.float32)), 0, 255).astype(np.uint8)


def _text_block(width, lines):
    """White text lines on black, uint8 (len(lines) * _LINE_HEIGHT, width, 3)."""
    block = Image.new("RGB", (width, _LINE_HEIGHT * len(lines)), (0, 0, 0))
    draw = ImageDraw.Draw(block)
    font = ImageFont.load_default()
    max_chars = max(8, width // 6)
    for i, line in enumerate(lines):
        if len(line) > max_chars:
            line = line[:max_chars - 1] + "…"
        draw.text((2, i * _LINE_HEIGHT), line, fill=(255, 255, 255), font=font)
    return np.asarray(block)


def _basename(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return os.path.basename(str(value))


def eval_image_panels(samples, model, class_names, max_images=4, tile_size=128):
    """One panel per eval image: its top class's maps over two text lines.

    The text lines are the ground truth and the three most probable classes.

    Args:
        samples: dict of NumPy arrays for a few eval images: `images` RGB
            float32 (N, S, S, 3), `labels` (N, C) multi-hot, `logits` (N, C),
            optionally `filename` (N,) bytes.
        model: the `MLCRLModel`.
        class_names: the C class names.
        max_images: at most this many panels.
        tile_size: side of each tile.

    Returns:
        uint8 (N, H, W, 3).
    """
    images = np.asarray(samples["images"][:max_images], np.float32)
    if len(images) == 0:
        return np.zeros((0, 1, 1, 3), np.uint8)
    logits = np.asarray(samples["logits"][:len(images)], np.float64)
    # Ranked on the logits; probabilities (float64) only for display.
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = np.asarray(samples["labels"][:len(images)])
    names = samples.get("filename")
    top = np.argsort(-logits, axis=1, kind="stable")
    maps = cams_lib.compute_cams(model, images, top[:, :1])
    panels = []
    for i, image in enumerate(_to_uint8(images)):
        c = int(top[i, 0])
        cams = {"direct": maps["direct"][i, 0],
                "f_conv": None if maps["f_conv"] is None else maps["f_conv"][i, 0]}
        panel = render_cam_panel(image, cams, class_names[c],
                                 score=float(probabilities[i, c]), tile_size=tile_size)
        truth = [class_names[j] for j in np.flatnonzero(labels[i] > 0.5)]
        predicted = [f"{class_names[j]} {probabilities[i, j]:.2f}"
                     for j in top[i, :_TOP_PREDICTIONS]]
        head = _basename(names[i]) + ": " if names is not None else ""
        text = _text_block(panel.shape[1], [head + "GT: " + (", ".join(truth) or "-"),
                                            "Pred: " + ", ".join(predicted)])
        panels.append(np.concatenate([panel, text], axis=0))
    return np.stack(panels)
