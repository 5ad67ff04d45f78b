"""The inference branch as ONNX, checked against the SavedModel it sits in.

`add_onnx` writes `<version>/onnx/model.onnx` (float32 RGB images in
[0, 255], (B, S, S, 3) -> logits (B, C), the backbone normalisation inside)
and `<version>/onnx/labels.txt` into the export's hidden temporary version
directory, after the SavedModel, and refuses the export when onnxruntime's
logits differ from the SavedModel's `serve_tensor` by more than 1e-4 (plus
1e-6 of a large logit's size). tf2onnx and onnxruntime are optional (`mlcrl_tf[onnx]`).
Decisions: docs/serving.md, ONNX.
"""

import dataclasses
import importlib
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from mlcrl_tf.serving import contract
from pipelines.tfdata import input_pipeline
from pipelines.utils import files

FORMATS = ("saved_model", "onnx")
ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
LOGITS_KEY = "logits"
# The ONNX model's metadata_props key holding the export's ServingInfo (JSON).
METADATA_KEY = "mlcrl_tf.serving_info"
OPSET = 17
# The export-time check: |onnxruntime - SavedModel| <= 1e-4 + 1e-6 |logit| for
# every logit. The relative part (8 float32 ulps) matters only for large logits:
# a random-init ResNet-101 at 448 px has logits up to 167, where float32
# reordering alone differs by 1.1e-4 (docs/serving.md, ONNX).
MAX_ABS_DIFF = 1e-4
MAX_REL_DIFF = 1e-6
NUM_CHECK_IMAGES = 8
INSTALL_HINT = "pip install 'mlcrl_tf[onnx]' (tf2onnx and onnxruntime)"
RUNTIMES = ("tf2onnx", "onnxruntime")


def import_runtime(name):
    """Imports an optional ONNX package; ValueError naming the install when missing."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"the ONNX format needs {name}, which does not import "
                         f"({e}); {INSTALL_HINT}.") from None


def check_available():
    """Raises the one-line ValueError of `import_runtime` before any work."""
    for name in RUNTIMES:
        import_runtime(name)


def convert(inference_model, info):
    """The inference model as serialized ONNX bytes, `info` in its metadata.

    Args:
        inference_model: `MLCRLModel.inference_model` (float32 policy).
        info: the export's `contract.ServingInfo`.
    """
    tf2onnx = import_runtime("tf2onnx")
    size = info.image_size
    spec = [tf.TensorSpec([None, size, size, 3], tf.float32, name=contract.IMAGES_KEY)]
    forward = tf.function(
        lambda images: {LOGITS_KEY: tf.cast(inference_model(images, training=False),
                                            tf.float32)},
        input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=OPSET)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(dataclasses.asdict(info))
    proto.doc_string = (f"mlcrl_tf {info.variant}/{info.backbone}: {contract.IMAGES_KEY} "
                        f"float32 (B, {size}, {size}, 3) RGB in [0, 255] -> {LOGITS_KEY} "
                        f"float32 (B, {len(info.class_names)}); sigmoid for probabilities")
    return proto.SerializeToString()


def session(model):
    """An onnxruntime CPU session of a model file path or serialized bytes."""
    onnxruntime = import_runtime("onnxruntime")
    return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def run_logits(onnx_session, images, max_batch_size):
    """onnxruntime's logits of float32 images, in batches of at most `max_batch_size`."""
    images = np.asarray(images, np.float32)
    return np.concatenate([onnx_session.run([LOGITS_KEY], {contract.IMAGES_KEY: chunk})[0]
                           for chunk in _chunks(images, max_batch_size)])


def _chunks(images, size):
    return [images[i:i + size] for i in range(0, len(images), size)]


def max_abs_difference(a, b):
    """max |a - b|, infinite when the two disagree on where values are non-finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    finite = np.isfinite(a)
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))


def within_tolerance(got, expected):
    """Every |got - expected| <= MAX_ABS_DIFF + MAX_REL_DIFF |expected| (finite alike)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if max_abs_difference(got, expected) == float("inf"):
        return False
    finite = np.isfinite(expected)
    bound = MAX_ABS_DIFF + MAX_REL_DIFF * np.abs(expected[finite])
    return bool(np.all(np.abs(got[finite] - expected[finite]) <= bound))


def check_against_saved_model(onnx_bytes, saved_model_dir, images, max_batch_size):
    """Compares onnxruntime's logits with the SavedModel's `serve_tensor`.

    Returns:
        The largest absolute logit difference.

    Raises:
        ValueError: a logit differs by more than `MAX_ABS_DIFF` +
            `MAX_REL_DIFF` times its size (one line; nothing is exported).
    """
    serve = tf.saved_model.load(saved_model_dir).signatures[contract.SERVE_TENSOR]
    expected = np.concatenate([
        serve(**{contract.IMAGES_KEY: tf.constant(chunk)})[LOGITS_KEY].numpy()
        for chunk in _chunks(np.asarray(images, np.float32), max_batch_size)])
    got = run_logits(session(onnx_bytes), images, max_batch_size)
    difference = max_abs_difference(got, expected)
    if not within_tolerance(got, expected):
        raise ValueError(
            f"the ONNX model's logits differ from the SavedModel's by {difference:.3g} "
            f"(more than {MAX_ABS_DIFF:g} + {MAX_REL_DIFF:g} x |logit|) on {len(images)} "
            "check image(s); nothing was exported (report it with the tf2onnx and "
            "onnxruntime versions).")
    return difference


def add_onnx(version_dir, inference_model, info, labels_text, check_images):
    """Writes `<version_dir>/onnx/{model.onnx,labels.txt}` once the check passes.

    Args:
        version_dir: the (temporary) version directory holding the SavedModel.
        inference_model: the model that was exported.
        info: its `contract.ServingInfo`.
        labels_text: the labels file's text.
        check_images: float32 (N, S, S, 3) RGB in [0, 255], the images of the check.

    Returns:
        The largest absolute logit difference of the check.
    """
    onnx_bytes = convert(inference_model, info)
    difference = check_against_saved_model(onnx_bytes, version_dir, check_images,
                                           info.max_batch_size)
    directory = os.path.join(version_dir, ONNX_DIR)
    tf.io.gfile.makedirs(directory)
    files.write_atomically(os.path.join(directory, ONNX_FILE), onnx_bytes)
    files.write_atomically(os.path.join(directory, contract.LABELS_FILE), labels_text)
    logging.info("ONNX model checked on %d image(s): max |logit difference| %.3g",
                 len(check_images), difference)
    return difference


def random_check_images(image_size, count=NUM_CHECK_IMAGES):
    """Fixed pseudo-random pixels, plus an all-black and an all-white image."""
    images = np.random.default_rng(0).uniform(0, 255, (count, image_size, image_size, 3))
    images[0], images[-1] = 0.0, 255.0
    return images.astype(np.float32)


def run_check_images(config, num_classes, count=NUM_CHECK_IMAGES):
    """Up to `count` images of a run's data, as its evaluation preprocesses them.

    Tries --eval_files, --selection_files, then --train_files; falls back to
    `random_check_images` with one warning when none can be read here.
    """
    problems = []
    for name in ("eval_files", "selection_files", "train_files"):
        source = getattr(config, name)
        if not source:
            continue
        try:
            batch = next(iter(input_pipeline.make_dataset(
                source, count, config.image_size, num_classes, training=False,
                data_dir=config.data_dir, antialias=config.antialias,
                max_pixels=config.max_image_pixels).take(1)))
            return batch["images"].numpy().astype(np.float32)
        except (ValueError, StopIteration, *files.IO_ERRORS) as e:
            problems.append(f"--{name}: {files.error_text(e)}")
    logging.warning("The ONNX model is checked on random pixels: no image of the run "
                    "could be read here (%s).", "; ".join(problems) or "no data flags")
    return random_check_images(config.image_size, count)
