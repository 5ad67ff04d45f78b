"""TensorBoard image summaries of a few evaluation images.

The training loop calls, inside `with eval_writer.as_default(step=step):`,

    summaries.write_eval_images(result.samples, model, backbone, class_names)

Each image becomes one panel: the image (as the model saw it, at S x S), the
direct head's CAM and, for variants with `f_conv`, the Fconv map of its top
predicted class (see `mlcrl_tf.visualize`), above two text lines: the ground
truth and the three most probable classes. It costs one forward pass of at
most `max_images` images and writes one `tf.summary.image` ("eval/cams").
"""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow as tf

from mlcrl_tf import backbones
from mlcrl_tf import visualize

TAG = "eval/cams"
TILE_SIZE = 128
_LINE_HEIGHT = 12
_TOP_PREDICTIONS = 3


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


def _filename(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return os.path.basename(str(value))


def eval_image_panels(samples, model, backbone, class_names, max_images=4,
                      tile_size=TILE_SIZE):
    """The panels `write_eval_images` writes: uint8 (N, H, W, 3)."""
    images = np.asarray(samples["images"][:max_images], np.float32)
    if len(images) == 0:
        return np.zeros((0, 1, 1, 3), np.uint8)
    logits = np.asarray(samples["logits"][:len(images)], np.float64)
    # Ranked on the logits; probabilities (float64) only for display.
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    labels = np.asarray(samples["labels"][:len(images)])
    names = samples.get("filename")
    top = np.argsort(-logits, axis=1, kind="stable")
    maps = visualize.compute_cams(model, images, top[:, :1])
    shown = np.clip(np.round(backbones.denormalize_images(images, backbone).numpy()),
                    0, 255).astype(np.uint8)
    panels = []
    for i, image in enumerate(shown):
        c = int(top[i, 0])
        cams = {"direct": maps["direct"][i, 0],
                "f_conv": None if maps["f_conv"] is None else maps["f_conv"][i, 0]}
        panel = visualize.render_cam_panel(image, cams, class_names[c],
                                           score=float(probabilities[i, c]),
                                           tile_size=tile_size)
        truth = [class_names[j] for j in np.flatnonzero(labels[i] > 0.5)]
        predicted = [f"{class_names[j]} {probabilities[i, j]:.2f}"
                     for j in top[i, :_TOP_PREDICTIONS]]
        head = _filename(names[i]) + ": " if names is not None else ""
        text = _text_block(panel.shape[1], [head + "GT: " + (", ".join(truth) or "-"),
                                            "Pred: " + ", ".join(predicted)])
        panels.append(np.concatenate([panel, text], axis=0))
    return np.stack(panels)


def write_eval_images(samples, model, backbone, class_names, max_images=4):
    """Writes the eval panels to the default summary writer at its step.

    Args:
        samples: dict of NumPy arrays for a few eval images: `images`
            normalised float32 (N, S, S, 3), `labels` (N, C) multi-hot,
            `logits` (N, C), optionally `filename` (N,) bytes.
        model: the `MLCRLModel` (for the class maps).
        backbone: its backbone name (to undo the normalisation).
        class_names: the C class names.
        max_images: at most this many panels.

    Returns:
        True if a summary was written (False without samples).
    """
    if not samples or len(samples["images"]) == 0 or max_images < 1:
        return False
    panels = eval_image_panels(samples, model, backbone, class_names, max_images)
    return bool(tf.summary.image(TAG, panels, max_outputs=len(panels)))
