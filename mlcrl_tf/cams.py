"""Class activation maps as in the paper's Fig. 3, rendered as panels.

One renderer for the `mlcrl_tf.visualize` command line (`visualize_files`,
PNG files) and for TensorBoard's eval images (`eval_image_panels`, written
by `mlcrl_tf.summaries`).

For one image and one class c, a panel shows side by side:

1. the image as the model saw it (resized to S x S by `preprocess_eval`);
2. the class activation map of the direct head (Zhou et al.'s CAM):
   CAM_c = sum_d W[d, c] * Fx[..., d], with W the kernel of
   `model.classifier` (its first D rows for variant `tbc`, whose other C
   rows read GMP(Fconv)); the bias is left out, as in CAM;
3. the `f_conv` map Fconv[..., c] (variants with `f_conv`), whose global
   max is the context logit of class c.

Each map is computed at the feature-map resolution (S / stride), upsampled
bilinearly to the image size, min-max normalised to [0, 1] per map, coloured
with a NumPy jet colormap and blended over the image. A caption names the
class and its probability.

Files (`visualize_files`, `output_names`) are `<output_dir>/<image>_<class>.png`
and one run never writes two panels to one name:

- <image> is the input's file name without its extension; inputs whose
  stems clash (compared case-insensitively, for case-insensitive file
  systems: `a/x.jpg` and `b/x.jpg`, `x.jpg` and `X.png`) are all named
  `<stem>~<n>`, n their 1-based position on the command line; two paths of
  one real file are rendered once;
- <class> is the class name made file-safe (runs of characters other than
  `A-Z a-z 0-9 . _ -` become `_`); classes whose safe names clash
  (`T-shirt/top` and `T-shirt_top`, `Bag` and `bag`) are all named
  `<safe name>~<class id>`.

An image that cannot be read or decoded (missing, not a regular file, above
`max_image_bytes` or the pixel budget `max_pixels`, corrupt) is named with
its reason in `problems` and skipped; the others are rendered.
"""

import os
import re
import sys
import weakref

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow as tf

from mlcrl_tf import checkpoints
from pipelines.utils import files
from pipelines.utils import outputs
from pipelines.records import image_header
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing
from pipelines.records import image_files

_FEATURE_MODELS = weakref.WeakKeyDictionary()
_CAPTION_HEIGHT = 14
_LINE_HEIGHT = 12
_TOP_PREDICTIONS = 3


# --------------------------------------------------------------------------
# Maps.
# --------------------------------------------------------------------------

def _feature_model(model):
    """`model.feature_model()`, built once per model."""
    feature_model = _FEATURE_MODELS.get(model)
    if feature_model is None:
        feature_model = model.feature_model()
        _FEATURE_MODELS[model] = feature_model
    return feature_model


def direct_head_kernel(model):
    """W (D, C): the classifier rows that read the pooled features Fx."""
    kernel = np.asarray(model.classifier.kernel.numpy(), np.float32)
    return kernel[:int(model.backbone.output_shape[-1])]


def compute_cams(model, images, class_ids):
    """Class maps at feature-map resolution for some classes of each image.

    Args:
        model: an `MLCRLModel`.
        images: float (N, S, S, 3), RGB in [0, 255] at the model size
            (`preprocess_eval`'s output; the model normalises).
        class_ids: the classes to map: an int (the same for every image), a
            sequence of N ints (one per image) or an (N, K) array.

    Returns:
        dict with `direct` float32 (N, K, h, w) (the direct head's CAM),
        `f_conv` float32 (N, K, h, w) or None (variants without f_conv),
        `class_ids` int (N, K) and `probabilities` float32 (N, C).

    Raises:
        ValueError: images of the wrong shape or a class id out of range.
    """
    images = _checked_images(model, images)
    _class_id_array(class_ids, len(images), model.num_classes)  # before the run
    return maps_from_outputs(model, run_feature_model(model, images), class_ids)


def run_feature_model(model, images):
    """One run of the network: `model.feature_model()`'s outputs.

    Args:
        model: an `MLCRLModel`.
        images: float (N, S, S, 3), RGB in [0, 255] at the model size.

    Returns:
        dict of tensors: `features` (N, h, w, D), `logits` (N, C) and, for
        variants with f_conv, `class_maps` (N, h, w, C).

    Raises:
        ValueError: images of the wrong shape.
    """
    return _feature_model(model)(_checked_images(model, images), training=False)


def _checked_images(model, images):
    """float32 (N, S, S, 3) at the model size, else ValueError."""
    images = np.asarray(images, np.float32)
    size = model.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images must have shape (N, {size}, {size}, 3), "
                         f"got {images.shape}.")
    return images


def _class_id_array(class_ids, n, num_classes):
    """`compute_cams`'s class_ids as an int (n, K) array (ValueError if bad)."""
    ids = np.asarray(class_ids)
    if ids.ndim == 0:
        ids = np.full((n, 1), int(ids))
    elif ids.ndim == 1:
        ids = ids.reshape(n, 1) if len(ids) == n else None
    if ids is None or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class_ids must be an int, {n} ints or an ({n}, K) int array, "
                         f"got {class_ids!r}.")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"class_ids must be in [0, {num_classes}), got {class_ids!r}.")
    return ids


def maps_from_outputs(model, outputs, class_ids):
    """`compute_cams` from `run_feature_model`'s outputs (no second run).

    Args:
        model: the `MLCRLModel` that gave `outputs`.
        outputs: `run_feature_model(model, images)`.
        class_ids: as `compute_cams`.

    Returns:
        As `compute_cams`.
    """
    features = np.asarray(tf.cast(outputs["features"], tf.float32))  # (N, h, w, D)
    ids = _class_id_array(class_ids, features.shape[0], model.num_classes)
    kernel = direct_head_kernel(model)  # (D, C)
    # CAM for the chosen classes only: (N, h, w, D) x (N, D, K) -> (N, K, h, w).
    direct = np.einsum("nhwd,ndk->nkhw", features, kernel[:, ids].transpose(1, 0, 2))
    fconv = None
    if "class_maps" in outputs:
        maps = np.asarray(tf.cast(outputs["class_maps"], tf.float32))  # (N, h, w, C)
        fconv = np.take_along_axis(maps.transpose(0, 3, 1, 2),
                                   ids[:, :, None, None], axis=1)
    probabilities = np.asarray(tf.sigmoid(tf.cast(outputs["logits"], tf.float32)))
    return {"direct": direct.astype(np.float32),
            "f_conv": None if fconv is None else fconv.astype(np.float32),
            "class_ids": ids, "probabilities": probabilities}


def upsample_and_normalise(cam, height, width):
    """Bilinear resize of one (h, w) map to (height, width), then to [0, 1].

    A constant map becomes all zeros.
    """
    cam = np.asarray(cam, np.float32)
    resized = tf.image.resize(cam[:, :, None], (height, width), method="bilinear")
    resized = resized.numpy()[:, :, 0]
    low, high = float(resized.min()), float(resized.max())
    if high - low < 1e-12:
        return np.zeros_like(resized)
    return (resized - low) / (high - low)


def jet(values):
    """The jet colormap in NumPy: [0, 1] (H, W) -> uint8 (H, W, 3).

    0 is dark blue, 0.5 green-yellow, 1 dark red (matplotlib's "jet").
    """
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)],
                   axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def overlay(image_uint8, heat, alpha=0.5):
    """Blends jet(heat) (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
    colours = jet(heat).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(image_uint8, np.float32) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Panels.
# --------------------------------------------------------------------------

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
            tiles.append(overlay(image, upsample_and_normalise(cam, tile, tile), alpha))
            titles.append(title)
    body = np.concatenate(tiles, axis=1)
    text = class_name if score is None else f"{class_name} {score:.2f}"
    text += "  [" + " | ".join(titles) + "]"
    return np.concatenate([_caption(body.shape[1], text), body], axis=0)


def save_png(array, path):
    """Writes an RGB uint8 array as PNG (creating the directory).

    Raises:
        ValueError: the file cannot be written (naming it; e.g. a full disk).
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(np.asarray(array, np.uint8)).save(path, format="PNG")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {files.error_text(e)}") from None


def _safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def _disambiguate(names, suffixes):
    """names[i] + "~" + suffixes[i] where names clash (case-insensitively)."""
    counts = {}
    for name in names:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    return [f"{name}~{suffix}" if counts[name.lower()] > 1 else name
            for name, suffix in zip(names, suffixes)]


def output_names(paths, class_names):
    """The file-name parts of `visualize_files`'s panels (module docstring).

    Args:
        paths: the input image paths (duplicates by real path already gone).
        class_names: the C class names.

    Returns:
        (image parts, one per path; class parts, one per class), such that
        every `<image>_<class>` is distinct, case-insensitively.
    """
    stems = [os.path.splitext(os.path.basename(p))[0] or "image" for p in paths]
    images = _disambiguate(stems, [str(i + 1) for i in range(len(paths))])
    classes = _disambiguate([_safe_name(c) for c in class_names],
                            [str(c) for c in range(len(class_names))])
    panels = [f"{i}_{c}".lower() for i in images for c in classes]
    if len(set(panels)) != len(panels):
        # e.g. stems "a_b" + class "c" and stem "a" + class "b_c": fall back
        # to positions, which cannot clash.
        images = [f"{stem}~{i + 1}" for i, stem in enumerate(stems)]
        classes = [f"{name}~{c}" for c, name in enumerate(classes)]
    return images, classes


def _unique_paths(paths):
    seen, unique = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def load_image(path, image_size, max_pixels=image_header.DEFAULT_MAX_PIXELS,
               max_bytes=image_files.DEFAULT_MAX_IMAGE_BYTES, antialias=False):
    """Reads, checks and decodes one image file to the model's input.

    Decoded and resized as the run's evaluation pipeline does
    (`input_pipeline.decode_image` + `preprocess_eval`); `antialias` must be
    the run's (`Config.antialias`) for the maps to show what the model saw
    in training and evaluation.

    Returns:
        (float32 (S, S, 3) tensor, RGB in [0, 255]; None) or (None, reason).
    """
    try:
        data = image_files.read_image_file(path, max_bytes)
    except image_files.ImageError as e:
        return None, e.reason
    problem = image_header.pixel_budget_problem(data, max_pixels)
    if problem:
        return None, f"{problem} (--max_image_pixels)"
    try:
        image = decoder.decode_image(data)
        return preprocessing.preprocess_eval(image, image_size, antialias), None
    except tf.errors.ResourceExhaustedError:
        return None, "out of memory while decoding it"
    except tf.errors.InvalidArgumentError:
        kind = image_header.image_format(data)
        return None, ("corrupt or truncated image data" if kind
                      else "not an image (unknown format)")


def _class_ids(class_names, classes, top_k):
    """A function logits (1, C) -> the class ids to map (validated once)."""
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise ValueError(f"classes: unknown class name(s) {unknown}; the model knows "
                             f"{class_names}.")
        fixed = np.asarray([[class_names.index(c) for c in classes]])
        return lambda logits: fixed
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not (
            1 <= top_k <= len(class_names)):
        raise ValueError(f"top_k must be in [1, {len(class_names)}], got {top_k}.")

    def top(logits):
        logits = np.asarray(tf.cast(logits, tf.float32))
        return np.argsort(-logits[0], kind="stable")[None, :top_k]
    return top


def visualize_files(model, class_names, paths, output_dir, classes=None,
                    top_k=3, tile_size=224, max_pixels=image_header.DEFAULT_MAX_PIXELS,
                    max_bytes=image_files.DEFAULT_MAX_IMAGE_BYTES, antialias=False):
    """Writes one CAM panel per (image, class); bad images are skipped.

    The network runs once per image: the `top_k` classes are chosen from
    the logits of the run that gives the maps.

    Args:
        model: an `MLCRLModel`.
        class_names: the C class names.
        paths: image files (read with `load_image`).
        output_dir: where the PNGs go (names: module docstring).
        classes: class names to map for every image; default the `top_k`
            most probable classes of each image.
        top_k: used when `classes` is None.
        tile_size: side of each panel tile.
        max_pixels: pixel budget of one image, read from its header.
        max_bytes: larger files are skipped unread.
        antialias: the run's resize (`Config.antialias`), see `load_image`.

    Returns:
        (written PNG paths, problems: a list of (path, reason) of the
        images skipped).

    Raises:
        ValueError: an unknown class name, a bad top_k, or a panel that
            cannot be written.
    """
    class_names = list(class_names)
    choose = _class_ids(class_names, classes, top_k)
    paths = _unique_paths(paths)
    image_parts, class_parts = output_names(paths, class_names)
    written, problems = [], []
    for path, image_part in zip(paths, image_parts):
        resized, problem = load_image(path, model.image_size, max_pixels, max_bytes,
                                      antialias)
        if problem:
            problems.append((path, problem))
            continue
        shown = _to_uint8(resized.numpy())
        outputs = run_feature_model(model, resized.numpy()[None])
        maps = maps_from_outputs(model, outputs, choose(outputs["logits"]))
        for k, c in enumerate(maps["class_ids"][0]):
            cams = {"direct": maps["direct"][0, k],
                    "f_conv": None if maps["f_conv"] is None else maps["f_conv"][0, k]}
            panel = render_cam_panel(shown, cams, class_names[c],
                                     score=float(maps["probabilities"][0, c]),
                                     tile_size=tile_size)
            out = os.path.join(output_dir, f"{image_part}_{class_parts[c]}.png")
            save_png(panel, out)
            written.append(out)
    return written, problems


def run(model_dir, paths, output_dir, restore_options, stdout=None, stderr=None,
        **visualize_options):
    """The `mlcrl_tf.visualize` command: returns the exit code.

    Checks `output_dir` before restoring the model (`io_checks`), writes the
    panels (images resized with the run's `antialias`, as in its evaluation),
    prints their paths on stdout and each skipped image as one
    `warning: <path>: <reason>` line on stderr.

    Args:
        model_dir: a training run's directory.
        paths: image files.
        output_dir: where the PNGs go.
        restore_options: dict of `checkpoint`, `best`, `use_ema`.
        stdout, stderr: streams (default sys's).
        **visualize_options: passed to `visualize_files`.

    Returns:
        0 when at least one image was rendered, 1 otherwise.

    Raises:
        ValueError: an unusable output directory, an unreadable checkpoint
            or run, bad options (each named).
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    outputs.ensure_output_dir(output_dir, "output_dir")
    model, config, class_names, _ = checkpoints.restore_model(model_dir, **restore_options)
    written, problems = visualize_files(model, class_names, paths, output_dir,
                                        antialias=config.antialias, **visualize_options)
    for path in written:
        stdout.write(path + "\n")
    for path, reason in problems:
        stderr.write(f"warning: {path}: {reason}\n")
    rendered = len(_unique_paths(paths)) - len(problems)
    stderr.write(f"Rendered {rendered} image(s) ({len(written)} panel(s)), "
                 f"{len(problems)} skipped.\n")
    return 0 if rendered else 1


# --------------------------------------------------------------------------
# TensorBoard panels (written by mlcrl_tf.summaries).
# --------------------------------------------------------------------------

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
    maps = compute_cams(model, images, top[:, :1])
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
