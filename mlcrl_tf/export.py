"""Exports the inference branch as a SavedModel in TF Serving's layout.

    python -m mlcrl_tf.export --model_dir=runs/demo --export_dir=saved_models/demo \
        [--version=N] [--best | --checkpoint=PREFIX] [--use_ema=true] \
        [--threshold=0.5] [--top_k=5]

`export_model(model, export_dir, class_names, backbone)` writes
`<export_dir>/<version>/` (saved_model.pb, variables/, assets/labels.txt),
the layout `tensorflow_model_server --model_base_path=<export_dir>` watches.
See docs/serving.md for clients.

Decisions (also in docs/serving.md):

- Only the inference branch is exported: backbone + direct head + `f_conv`,
  i.e. `model.inference_model`, wrapped in a `tf.Module`. The variables
  tracked are exactly those the serving functions capture, so the image and
  label projectors (training only) are not in the SavedModel: a crl export
  holds D x C + C more parameters than a baseline export, no more.
- Versions: the next free integer by default (1 for a new directory); an
  existing version is never overwritten (ValueError). The SavedModel is
  written to a hidden, non-integer sibling `.tmp-<version>-<random>` and
  renamed into place when complete (atomic on local/POSIX file systems), so
  TF Serving never sees a half-written version; a failed export removes its
  temporary directory.
- Signatures (all outputs rectangular, as TF Serving's REST API needs):
  `serving_default`: `image_bytes` string (B,) of encoded JPEG/PNG/GIF/BMP/
  WebP, decoded, resized and normalised in the graph with the evaluation
  functions `input_pipeline.decode_image` + `input_pipeline.preprocess_eval`;
  `serve_tensor`: `images` float32 (B, S, S, 3), RGB in [0, 255] already at
  the model size (normalised in the graph). Both return `logits` and
  `probabilities` (B, C) float32, `predicted` bool (B, C) = probability >=
  the export's threshold, and the fixed-size top k: `top_k_scores` float32,
  `top_k_class_ids` int32 and `top_k_classes` string, each (B, k).
  `metadata` (no inputs) returns `class_names`, `threshold`, `top_k`,
  `image_size`, `backbone` and `variant`; `assets/labels.txt` holds the
  class names too (line i = class id i).
- Bad `image_bytes`: the whole request fails with one
  `tf.errors.InvalidArgumentError` (HTTP 400 from TF Serving) whose message
  names `image_bytes`, the index of every bad element and why ("empty",
  "unknown format ...", "corrupt or truncated ..."). Decoding runs through a
  small in-graph `tf.data` pipeline with `ignore_errors`, which is how the
  graph learns which elements failed (a plain decode op would stop at the
  first one without saying which). TensorFlow's JPEG/PNG decoders reject
  truncated files (checked: even a JPEG missing only its end marker), so
  no partially grey image is ever scored. An empty batch (B = 0) is an
  InvalidArgumentError too, on both image signatures.
"""

import os
import sys
import tempfile
import uuid

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from mlcrl_tf import backbones
from pipelines import input_pipeline

SERVING_DEFAULT = "serving_default"
SERVE_TENSOR = "serve_tensor"
METADATA = "metadata"
IMAGE_BYTES_KEY = "image_bytes"
IMAGES_KEY = "images"
LABELS_FILE = "labels.txt"
DEFAULT_TOP_K = 5
OUTPUT_KEYS = ("logits", "probabilities", "predicted", "top_k_scores",
               "top_k_class_ids", "top_k_classes")
TEMP_PREFIX = ".tmp-"

# Leading bytes of the formats `tf.io.decode_image` reads: (offset, bytes).
_FORMAT_SIGNATURES = {
    "JPEG": [(0, b"\xff\xd8\xff")],
    "PNG": [(0, b"\x89PNG\r\n\x1a\n")],
    "GIF87a": [(0, b"GIF87a")],
    "GIF89a": [(0, b"GIF89a")],
    "BMP": [(0, b"BM")],
    "WebP": [(0, b"RIFF"), (8, b"WEBP")],
    "JPEG XL codestream": [(0, b"\xff\x0a")],
    "JPEG XL container": [(0, b"\x00\x00\x00\x0cJXL \r\n\x87\n")],
}
_HEAD_BYTES = 12
_EMPTY = "empty"
_UNKNOWN = "unknown format (not JPEG, PNG, GIF, BMP or WebP)"
_CORRUPT = "corrupt or truncated image data"


# --------------------------------------------------------------------------
# In-graph decoding of a batch of encoded images.
# --------------------------------------------------------------------------

def _image_bytes_problems(image_bytes):
    """Why each element might not decode: string (B,), from its first bytes.

    Only used to word the error message; the decoder is the judge.
    """
    head = tf.strings.join(
        [tf.strings.substr(image_bytes, 0, _HEAD_BYTES), b"\x00" * _HEAD_BYTES])
    known = tf.zeros_like(image_bytes, dtype=tf.bool)
    for parts in _FORMAT_SIGNATURES.values():
        match = tf.ones_like(known)
        for offset, magic in parts:
            match &= tf.equal(tf.strings.substr(head, offset, len(magic)), magic)
        known |= match
    empty = tf.equal(tf.strings.length(image_bytes), 0)
    return tf.where(empty, _EMPTY, tf.where(known, _CORRUPT, _UNKNOWN))


def decode_image_batch(image_bytes, image_size, backbone):
    """Decodes and preprocesses encoded images exactly like evaluation does.

    Args:
        image_bytes: string tensor (B,) of encoded images (any sizes).
        image_size: side S of the model input.
        backbone: a name from `mlcrl_tf.backbones.BACKBONES`.

    Returns:
        float32 (B, S, S, 3), normalised for the backbone.

    Raises:
        tf.errors.InvalidArgumentError: an element cannot be decoded; the
            message names `image_bytes`, every bad index and its problem.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    count = tf.size(image_bytes)

    def decode(index, data):
        image = input_pipeline.decode_image(data)
        return index, input_pipeline.preprocess_eval(image, image_size, backbone)

    # A tf.data map with ignore_errors drops the elements whose decoding
    # fails instead of stopping the graph, so the survivors' indices tell
    # which ones failed. The sentinel (-1) makes the single batch exist even
    # when nothing decodes.
    sentinel = tf.data.Dataset.from_tensors(
        (tf.constant(-1, tf.int32), tf.zeros([image_size, image_size, 3], tf.float32)))
    indices, images = (
        tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .concatenate(sentinel)
        .batch(tf.cast(count + 1, tf.int64))
        .get_single_element())
    indices, images = indices[:-1], images[:-1]
    decoded = tf.scatter_nd(indices[:, None], tf.ones_like(indices, tf.bool), [count])
    bad = tf.reshape(tf.where(~decoded), [-1])
    check = tf.debugging.Assert(
        tf.reduce_all(decoded),
        [f"{IMAGE_BYTES_KEY}: cannot decode the element(s) at index", bad,
         "problem:", tf.gather(_image_bytes_problems(image_bytes), bad),
         "(expected encoded JPEG, PNG, GIF, BMP or WebP bytes; nothing was scored)"],
        summarize=64, name="check_image_bytes")
    with tf.control_dependencies([check]):
        images = tf.identity(images)
    images.set_shape([None, image_size, image_size, 3])
    return images


# --------------------------------------------------------------------------
# The serving module.
# --------------------------------------------------------------------------

class _Untracked:
    """Holds the Keras model out of the SavedModel's object graph."""

    def __init__(self, model):
        self.model = model


class ServingModule(tf.Module):
    """The exported object: the inference model and its serving functions.

    Only the variables captured by the serving functions are tracked
    (`model_variables`), never the Keras training model, so no projector
    weight can reach the SavedModel. Tracking the captured tf.Variables
    themselves (not Keras's wrappers) is also what makes the export load
    in TF1-style sessions, the way TF Serving loads it.

    Args:
        inference_model: `MLCRLModel.inference_model` (normalised images ->
            logits).
        class_names: C class names.
        backbone: the backbone's name (selects the normalisation).
        image_size: side S of the model input.
        threshold: default probability threshold of `predicted`.
        top_k: k of the `top_k_*` outputs.
        variant: the model variant (reported by `metadata`).
        labels_path: a local file with the class names, one per line,
            copied into the SavedModel's assets/.
    """

    def __init__(self, inference_model, class_names, backbone, image_size,
                 threshold, top_k, variant, labels_path):
        super().__init__(name="mlcrl_serving")
        self._keras = _Untracked(inference_model)
        self._class_names = list(class_names)
        self._backbone = backbone
        self._image_size = int(image_size)
        self._threshold = float(threshold)
        self._top_k = int(top_k)
        self._variant = variant
        self.labels_file = tf.saved_model.Asset(labels_path)
        size = self._image_size
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)])
        self.serve_tensor = tf.function(
            self._serve_tensor,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                           name=IMAGES_KEY)])
        self.metadata = tf.function(self._metadata, input_signature=[])
        self.model_variables = _captured_variables(
            [self.serve_image_bytes, self.serve_tensor])

    def signatures(self):
        """The SignatureDefs to save, by name."""
        return {
            SERVING_DEFAULT: self.serve_image_bytes.get_concrete_function(),
            SERVE_TENSOR: self.serve_tensor.get_concrete_function(),
            METADATA: self.metadata.get_concrete_function(),
        }

    def _outputs(self, images):
        logits = tf.cast(self._keras.model(images, training=False), tf.float32)
        probabilities = tf.sigmoid(logits)
        scores, ids = tf.math.top_k(probabilities, k=self._top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "predicted": probabilities >= self._threshold,
            "top_k_scores": scores,
            "top_k_class_ids": ids,
            "top_k_classes": tf.gather(tf.constant(self._class_names), ids),
        }

    def _serve_image_bytes(self, image_bytes):
        with tf.control_dependencies([_check_not_empty(image_bytes, IMAGE_BYTES_KEY)]):
            images = decode_image_batch(image_bytes, self._image_size, self._backbone)
        return self._outputs(images)

    def _serve_tensor(self, images):
        with tf.control_dependencies([_check_not_empty(images, IMAGES_KEY)]):
            images = backbones.normalize_images(images, self._backbone)
        return self._outputs(images)

    def _metadata(self):
        return {
            "class_names": tf.constant(self._class_names),
            "threshold": tf.constant(self._threshold, tf.float32),
            "top_k": tf.constant(self._top_k, tf.int32),
            "image_size": tf.constant(self._image_size, tf.int32),
            "backbone": tf.constant(self._backbone),
            "variant": tf.constant(self._variant),
        }


def _check_not_empty(batch, name):
    """An empty batch is an error (the backbone cannot run on B = 0)."""
    return tf.debugging.Assert(
        tf.shape(batch)[0] > 0,
        [f"{name}: the batch is empty; send at least one image."], name=f"check_{name}")


def _captured_variables(functions):
    """The variables the traced functions read, each once, in trace order."""
    seen, variables = set(), []
    for function in functions:
        for variable in function.get_concrete_function().variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables


# --------------------------------------------------------------------------
# Versions and the atomic write.
# --------------------------------------------------------------------------

def existing_versions(export_dir):
    """Sorted integer version numbers present in `export_dir` (TF Serving's)."""
    if not tf.io.gfile.isdir(export_dir):
        return []
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(export_dir))
    return sorted(int(n) for n in names if n.isdigit())


def _resolve_version(export_dir, version):
    versions = existing_versions(export_dir)
    if version is None:
        return versions[-1] + 1 if versions else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}.")
    if version in versions:
        raise ValueError(
            f"version={version} already exists in export_dir={export_dir!r}; exports "
            "are never overwritten. Omit the version to take the next free one "
            f"({versions[-1] + 1}).")
    return version


def _check_arguments(model, class_names, backbone, threshold, top_k):
    """Validates export_model's arguments; returns (class_names, backbone, top_k)."""
    needed = ("inference_model", "backbone_name", "image_size", "num_classes", "variant")
    if not all(hasattr(model, a) for a in needed):
        raise ValueError(
            f"model must be an mlcrl_tf MLCRLModel (from model.build_model or "
            f"checkpoints.restore_model), got {type(model).__name__}.")
    if isinstance(class_names, (str, bytes)):
        raise ValueError("class_names must be a list of strings, got one string.")
    class_names = list(class_names)
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the model has "
                         f"{model.num_classes} classes.")
    for name in class_names:
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"class_names must be non-empty one-line strings, got {name!r}.")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names contains duplicates.")
    if backbone is None:
        backbone = model.backbone_name
    if backbone != model.backbone_name:
        raise ValueError(f"backbone={backbone!r} but the model was built with "
                         f"{model.backbone_name!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0.0 < threshold < 1.0):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}.")
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, model.num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not (
            1 <= top_k <= model.num_classes):
        raise ValueError(f"top_k must be an integer in [1, {model.num_classes}], "
                         f"got {top_k!r}.")
    return class_names, backbone, top_k


def export_model(model, export_dir, class_names, backbone=None, threshold=0.5,
                 version=None, top_k=None):
    """Writes the inference branch as `<export_dir>/<version>/` for TF Serving.

    Args:
        model: an `MLCRLModel` (its `inference_model` is exported).
        export_dir: the model's base directory (TF Serving's
            `--model_base_path`); created if needed.
        class_names: the C class names, in class-id order.
        backbone: the backbone's name (selects the input normalisation);
            None takes the model's. Must match the model.
        threshold: probability threshold of the `predicted` output, and the
            default of `mlcrl_tf.predict`.
        version: integer version; default the next free one. An existing
            version is never overwritten.
        top_k: k of the `top_k_*` outputs; default min(5, C).

    Returns:
        The path of the written version directory.

    Raises:
        ValueError: a bad argument (named in the message) or an existing
            version.
    """
    class_names, backbone, top_k = _check_arguments(model, class_names, backbone,
                                                    threshold, top_k)
    tf.io.gfile.makedirs(export_dir)
    version = _resolve_version(export_dir, version)
    final_dir = os.path.join(export_dir, str(version))
    # Hidden and not an integer: TF Serving and existing_versions ignore it.
    temp_dir = os.path.join(export_dir, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as local:
        labels_path = os.path.join(local, LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        module = ServingModule(model.inference_model, class_names, backbone,
                               model.image_size, threshold, top_k, model.variant,
                               labels_path)
        try:
            tf.saved_model.save(module, temp_dir, signatures=module.signatures())
            try:
                tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)
            except tf.errors.OpError as e:
                raise ValueError(
                    f"could not move the export into {final_dir!r} (another export "
                    f"took version {version}?): {e.message}") from e
        finally:
            if tf.io.gfile.exists(temp_dir):
                tf.io.gfile.rmtree(temp_dir)
    logging.info("Exported %s/%s (%d classes) to %s", model.variant, backbone,
                 len(class_names), final_dir)
    return final_dir


def export_from_model_dir(model_dir, export_dir, version=None, checkpoint=None,
                          best=False, use_ema=True, threshold=None, top_k=None):
    """Restores a training run and exports it; returns the version directory.

    Args:
        model_dir: a training run's directory (run.json + checkpoints).
        export_dir: the export base directory.
        version: explicit version, default the next free one.
        checkpoint: an explicit checkpoint prefix; default the latest.
        best: export the best-by-mAP checkpoint.
        use_ema: export the EMA weights when the run kept them.
        threshold: default the run's --threshold.
        top_k: default min(5, C).
    """
    from mlcrl_tf import checkpoints  # pylint: disable=import-outside-toplevel
    model, config, class_names, path = checkpoints.restore_model(
        model_dir, checkpoint=checkpoint, best=best, use_ema=use_ema)
    logging.info("Restored %s", path)
    return export_model(model, export_dir, class_names, backbone=config.backbone,
                        threshold=config.threshold if threshold is None else threshold,
                        version=version, top_k=top_k)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------

def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.", required=True)
    flags.DEFINE_string("export_dir", None, "Export base directory; the version goes "
                        "in <export_dir>/<version>/.", required=True)
    flags.DEFINE_integer("version", None, "Version number; default the next free one.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Export best/: the checkpoint with the highest mAP on "
                      "the run's --selection_files if it had them, else on its "
                      "--eval_files (for COCO/VOC the test split: selected on the "
                      "test set).")
    flags.DEFINE_bool("use_ema", True, "Export the EMA weights when the run kept them.")
    flags.DEFINE_float("threshold", None, "Threshold of the `predicted` output; "
                       "default the run's --threshold.")
    flags.DEFINE_integer("top_k", None, "k of the top_k_* outputs; default min(5, C).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    try:
        path = export_from_model_dir(f.model_dir, f.export_dir, version=f.version,
                                     checkpoint=f.checkpoint, best=f.best,
                                     use_ema=f.use_ema, threshold=f.threshold,
                                     top_k=f.top_k)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"Exported {f.model_dir} to {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
