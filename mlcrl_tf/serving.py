"""The SavedModel contract, both sides: what an export serves and how to call it.

Server side (`ServingModule`, written by `mlcrl_tf.export_lib`):

- `serving_default`: `image_bytes` string (B,) of encoded JPEG/PNG/GIF/BMP/
  WebP, decoded, resized and handed to the model in the graph with the
  evaluation functions `input_pipeline.decode_image` +
  `input_pipeline.preprocess_eval` (RGB in [0, 255]; the model normalises);
- `serve_tensor`: `images` float32 (B, S, S, 3), RGB in [0, 255] already at
  the model size;
- both return `logits` and `probabilities` (B, C) float32, `predicted` bool
  (B, C) = probability >= the export's threshold, and the fixed-size top k:
  `top_k_scores` float32, `top_k_class_ids` int32 and `top_k_classes`
  string, each (B, k) (rectangular outputs, as TF Serving's REST API needs);
- `metadata` (no inputs): `class_names`, `threshold`, `top_k`, `image_size`,
  `backbone`, `variant`; `assets/labels.txt` holds the class names too.

Bad `image_bytes`: the whole request fails with one
`tf.errors.InvalidArgumentError` (HTTP 400 from TF Serving) whose message
names `image_bytes`, the index of every bad element and why ("empty",
"unknown format ...", "corrupt or truncated ..."). Decoding runs through a
small in-graph `tf.data` pipeline with `ignore_errors`, which is how the graph
learns which elements failed. An empty batch (B = 0) is an
InvalidArgumentError too, on both image signatures.

Client side (`ExportClient`, used by `mlcrl_tf.evaluate` and
`mlcrl_tf.predict`): loads an export, reads its metadata, and
`ExportClient.score` scores a list of encoded images; since one bad image
fails a whole request, a failing request is retried image by image and each
bad image gets a structured `ImageProblem` (its index and the reason, from
`image_bytes_problem`, the same rule the graph uses) instead of a parsed
error message.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from pipelines import input_pipeline

SERVING_DEFAULT = "serving_default"
SERVE_TENSOR = "serve_tensor"
METADATA = "metadata"
IMAGE_BYTES_KEY = "image_bytes"
IMAGES_KEY = "images"
LABELS_FILE = "labels.txt"
OUTPUT_KEYS = ("logits", "probabilities", "predicted", "top_k_scores",
               "top_k_class_ids", "top_k_classes")

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
EMPTY = "empty"
UNKNOWN_FORMAT = "unknown format (not JPEG, PNG, GIF, BMP or WebP)"
CORRUPT = "corrupt or truncated image data"


# --------------------------------------------------------------------------
# Why an encoded image cannot be decoded (one rule, in Python and in-graph).
# --------------------------------------------------------------------------

def image_bytes_problem(data):
    """The problem of encoded image bytes that failed to decode, as a string.

    `EMPTY`, `UNKNOWN_FORMAT` (no known signature) or `CORRUPT` (a known
    signature whose data does not decode).
    """
    if not data:
        return EMPTY
    for parts in _FORMAT_SIGNATURES.values():
        if all(data[offset:offset + len(magic)] == magic for offset, magic in parts):
            return CORRUPT
    return UNKNOWN_FORMAT


def _image_bytes_problems(image_bytes):
    """`image_bytes_problem` in the graph: string (B,)."""
    head = tf.strings.join(
        [tf.strings.substr(image_bytes, 0, _HEAD_BYTES), b"\x00" * _HEAD_BYTES])
    known = tf.zeros_like(image_bytes, dtype=tf.bool)
    for parts in _FORMAT_SIGNATURES.values():
        match = tf.ones_like(known)
        for offset, magic in parts:
            match &= tf.equal(tf.strings.substr(head, offset, len(magic)), magic)
        known |= match
    empty = tf.equal(tf.strings.length(image_bytes), 0)
    return tf.where(empty, EMPTY, tf.where(known, CORRUPT, UNKNOWN_FORMAT))


def decode_image_batch(image_bytes, image_size):
    """Decodes and resizes encoded images exactly like evaluation does.

    Args:
        image_bytes: string tensor (B,) of encoded images (any sizes).
        image_size: side S of the model input.

    Returns:
        float32 (B, S, S, 3), RGB in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: an element cannot be decoded; the
            message names `image_bytes`, every bad index and its problem.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    count = tf.size(image_bytes)

    def decode(index, data):
        image = input_pipeline.decode_image(data)
        return index, input_pipeline.preprocess_eval(image, image_size)

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
# Server side: the exported module.
# --------------------------------------------------------------------------

class _Untracked:
    """Holds the Keras model out of the SavedModel's object graph."""

    def __init__(self, model):
        self.model = model


@dataclasses.dataclass(frozen=True)
class ServingInfo:
    """What an export says about itself (the `metadata` signature)."""

    class_names: tuple
    backbone: str
    image_size: int
    threshold: float
    top_k: int
    variant: str


class ServingModule(tf.Module):
    """The exported object: the inference model and its serving functions.

    Only the variables captured by the serving functions are tracked
    (`model_variables`), never the Keras training model, so no projector
    weight can reach the SavedModel. Tracking the captured tf.Variables
    themselves (not Keras's wrappers) is also what makes the export load
    in TF1-style sessions, the way TF Serving loads it.

    Args:
        inference_model: `MLCRLModel.inference_model` (RGB images -> logits;
            it normalises its input itself).
        info: a `ServingInfo`.
        labels_path: a local file with the class names, one per line,
            copied into the SavedModel's assets/.
    """

    def __init__(self, inference_model, info, labels_path):
        super().__init__(name="mlcrl_serving")
        self._keras = _Untracked(inference_model)
        self._info = info
        self.labels_file = tf.saved_model.Asset(labels_path)
        size = info.image_size
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
        scores, ids = tf.math.top_k(probabilities, k=self._info.top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "predicted": probabilities >= self._info.threshold,
            "top_k_scores": scores,
            "top_k_class_ids": ids,
            "top_k_classes": tf.gather(tf.constant(list(self._info.class_names)), ids),
        }

    def _serve_image_bytes(self, image_bytes):
        with tf.control_dependencies([_check_not_empty(image_bytes, IMAGE_BYTES_KEY)]):
            images = decode_image_batch(image_bytes, self._info.image_size)
        return self._outputs(images)

    def _serve_tensor(self, images):
        with tf.control_dependencies([_check_not_empty(images, IMAGES_KEY)]):
            images = tf.identity(images)
        return self._outputs(images)

    def _metadata(self):
        info = self._info
        return {
            "class_names": tf.constant(list(info.class_names)),
            "threshold": tf.constant(info.threshold, tf.float32),
            "top_k": tf.constant(info.top_k, tf.int32),
            "image_size": tf.constant(info.image_size, tf.int32),
            "backbone": tf.constant(info.backbone),
            "variant": tf.constant(info.variant),
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
# Client side.
# --------------------------------------------------------------------------

def resolve_saved_model(saved_model_dir):
    """A version directory, or the highest integer version under a base dir.

    Raises:
        ValueError: neither a SavedModel nor a directory of versions.
    """
    if tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
        return saved_model_dir
    if tf.io.gfile.isdir(saved_model_dir):
        versions = [n.rstrip("/") for n in tf.io.gfile.listdir(saved_model_dir)]
        versions = sorted(int(n) for n in versions if n.isdigit())
        if versions:
            return os.path.join(saved_model_dir, str(versions[-1]))
    raise ValueError(f"saved_model={saved_model_dir!r} is neither a SavedModel "
                     "directory nor an export base directory with integer versions.")


@dataclasses.dataclass(frozen=True)
class ImageProblem:
    """One image an export could not score: its index in the request, and why."""

    index: int
    reason: str


class ExportClient:
    """An export's `serving_default` plus its metadata, as a Python object.

    Args:
        saved_model_dir: a version directory (or its base directory).

    Raises:
        ValueError: not a SavedModel of `mlcrl_tf.export`.
    """

    def __init__(self, saved_model_dir):
        self.path = resolve_saved_model(saved_model_dir)
        loaded = tf.saved_model.load(self.path)
        signatures = loaded.signatures
        if SERVING_DEFAULT not in signatures or METADATA not in signatures:
            raise ValueError(f"saved_model={self.path!r} lacks the {SERVING_DEFAULT}/"
                             f"{METADATA} signatures of mlcrl_tf.export.")
        self._loaded = loaded  # keeps the variables alive
        self._serve = signatures[SERVING_DEFAULT]
        metadata = signatures[METADATA]()
        self.class_names = [n.decode("utf-8") for n in metadata["class_names"].numpy()]
        self.threshold = float(metadata["threshold"].numpy())
        self.image_size = int(metadata["image_size"].numpy())

    def outputs(self, image_bytes):
        """The signature's outputs for a request; raises InvalidArgumentError."""
        out = self._serve(**{IMAGE_BYTES_KEY: tf.constant(list(image_bytes), tf.string)})
        return {key: value.numpy() for key, value in out.items()}

    def score(self, image_bytes, key="logits"):
        """Scores encoded images; bad ones are reported, not fatal.

        One request first; if the export refuses it (one bad image fails a
        whole request), each image is retried alone.

        Args:
            image_bytes: a sequence of encoded images.
            key: the output to return per image ("logits", "probabilities").

        Returns:
            (indices of the scored images, their `key` rows (n, C),
            a list of `ImageProblem` for the others).
        """
        image_bytes = list(image_bytes)
        if not image_bytes:
            return [], np.zeros((0, len(self.class_names)), np.float32), []
        try:
            return list(range(len(image_bytes))), self.outputs(image_bytes)[key], []
        except tf.errors.InvalidArgumentError:
            pass
        kept, rows, problems = [], [], []
        for i, data in enumerate(image_bytes):
            try:
                rows.append(self.outputs([data])[key][0])
                kept.append(i)
            except tf.errors.InvalidArgumentError:
                problems.append(ImageProblem(i, image_bytes_problem(data)))
        rows = np.stack(rows) if rows else np.zeros((0, len(self.class_names)), np.float32)
        return kept, rows, problems
