"""What `mlcrl_tf.visualize` does: CAM panels of image files, as PNG files
named so that no two collide (docs/reliability.md, predict and visualize).
"""

import os
import re
import sys

import numpy as np
import tensorflow as tf

from mlcrl_tf.evaluation import cam_panels
from mlcrl_tf.evaluation import cams as cams_lib
from mlcrl_tf.run_dir import restore
from pipelines.records import image_files
from pipelines.records import image_header
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing
from pipelines.utils import files
from pipelines.utils import output_checks


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
    paths = files.unique_real_paths(paths)[0]
    image_parts, class_parts = output_names(paths, class_names)
    written, problems = [], []
    for path, image_part in zip(paths, image_parts):
        resized, problem = load_image(path, model.image_size, max_pixels, max_bytes,
                                      antialias)
        if problem:
            problems.append((path, problem))
            continue
        shown = cam_panels._to_uint8(resized.numpy())
        outputs = cams_lib.run_feature_model(model, resized.numpy()[None])
        maps = cams_lib.maps_from_outputs(model, outputs, choose(outputs["logits"]))
        for k, c in enumerate(maps["class_ids"][0]):
            cams = {"direct": maps["direct"][0, k],
                    "f_conv": None if maps["f_conv"] is None else maps["f_conv"][0, k]}
            panel = cam_panels.render_cam_panel(shown, cams, class_names[c],
                                     score=float(maps["probabilities"][0, c]),
                                     tile_size=tile_size)
            out = os.path.join(output_dir, f"{image_part}_{class_parts[c]}.png")
            cam_panels.save_png(panel, out)
            written.append(out)
    return written, problems


def run(model_dir, paths, output_dir, restore_options, stdout=None, stderr=None,
        **visualize_options):
    """The `mlcrl_tf.visualize` command: returns the exit code.

    Checks `output_dir` before restoring the model (`output_checks`), writes the
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
    output_checks.ensure_output_dir(output_dir, "output_dir")
    model, config, class_names, _ = restore.restore_model(model_dir, **restore_options)
    written, problems = visualize_files(model, class_names, paths, output_dir,
                                        antialias=config.antialias, **visualize_options)
    for path in written:
        stdout.write(path + "\n")
    for path, reason in problems:
        stderr.write(f"warning: {path}: {reason}\n")
    rendered = len(files.unique_real_paths(paths)[0]) - len(problems)
    stderr.write(f"Rendered {rendered} image(s) ({len(written)} panel(s)), "
                 f"{len(problems)} skipped.\n")
    return 0 if rendered else 1
