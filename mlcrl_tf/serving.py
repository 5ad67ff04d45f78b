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
  string, each (B, k) (rectangular outputs, as TF Serving's REST API needs),
  ranked by logit (float32 sigmoid ties at 1.0 above a logit of ~16.6);
- `metadata` (no inputs): `class_names`, `threshold`, `top_k`, `image_size`,
  `backbone`, `variant`, `max_batch_size`, `max_image_pixels`, `antialias`
  (the resize the model was trained with) and `precision` (float32, or
  mixed_bfloat16 for a bfloat16 serving model; outputs stay float32) and
  `jit_compile` (whether the model's forward pass is XLA-compiled; TF
  Serving then needs `--xla_cpu_compilation_enabled=true` on CPU);
  `assets/labels.txt` holds the class names too.

Bad requests fail whole, with one `tf.errors.InvalidArgumentError` (HTTP 400
from TF Serving) naming the input, the limit or the bad indices, before the
costly step (docs/reliability.md):
- an empty batch, or more than `max_batch_size` images (both signatures);
- `image_bytes` elements above the pixel budget `max_image_pixels`, read from
  the header by `pipelines.image_header` before anything is decoded (a JPEG
  whose header libjpeg reads within its first `HEADER_PREFIX_BYTES` is
  walked on that prefix only, so the check does not copy large files);
- `image_bytes` elements that do not decode ("empty", "unknown format ...",
  "corrupt or truncated ..."): decoding runs through a small in-graph
  `tf.data` pipeline with `ignore_errors`, which is how the graph learns
  which elements failed (and why it cannot tell a corrupt image from an
  out-of-memory decoder);
- `images` with a NaN, an infinity or a value outside [0, 255].

Client side (`ExportClient`, used by `mlcrl_tf.evaluate` and
`mlcrl_tf.predict`): loads an export, reads its metadata, and
`ExportClient.score` scores a list of encoded images in requests of at most
the export's `max_batch_size`; images above its pixel budget are refused from
their header without a request; since one bad image fails a whole request, a
failing request is retried image by image and each bad image gets a
structured `ImageProblem` (its index and the reason, from
`image_bytes_problem`, the same rule the graph uses, or `OUT_OF_MEMORY` for a
`ResourceExhaustedError`) instead of a parsed error message.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from pipelines.records import image_header
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing

SERVING_DEFAULT = "serving_default"
SERVE_TENSOR = "serve_tensor"
METADATA = "metadata"
IMAGE_BYTES_KEY = "image_bytes"
IMAGES_KEY = "images"
LABELS_FILE = "labels.txt"
OUTPUT_KEYS = ("logits", "probabilities", "predicted", "top_k_scores",
               "top_k_class_ids", "top_k_classes")

# Export options (stored in the `metadata` signature).
# ResNet-101 at 448 px: ~37 MB per image in a request (docs/reliability.md).
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_IMAGE_PIXELS = image_header.DEFAULT_MAX_PIXELS
# The bytes of a JPEG read to find its size when libjpeg finds the whole
# header there (SOF and SOS); at most 65,536 bytes, so the in-graph walk on
# that prefix stays below image_header.MAX_HEADER_STEPS (one step >= 1 byte).
HEADER_PREFIX_BYTES = 65_536

EMPTY = "empty"
UNKNOWN_FORMAT = "unknown format (not JPEG, PNG, GIF, BMP or WebP)"
# What the graph can say of an element of a known format that failed to
# decode: its in-graph tf.data step drops every error alike (ignore_errors),
# so it cannot tell a corrupt file from a decoder that ran out of memory.
CORRUPT = ("corrupt or truncated image data (or the server ran out of memory "
           "decoding it)")
OUT_OF_MEMORY = "out of memory while scoring it (ResourceExhaustedError)"


# --------------------------------------------------------------------------
# Why an encoded image cannot be decoded (one rule, in Python and in-graph).
# --------------------------------------------------------------------------

def image_bytes_problem(data, max_pixels=None):
    """Why encoded image bytes cannot be scored, as a string.

    `EMPTY`, `UNKNOWN_FORMAT` (no known signature), the pixel-budget problem
    (`image_header.pixel_budget_problem`, when `max_pixels` is given) or
    `CORRUPT` (a known signature whose data does not decode).
    """
    if not data:
        return EMPTY
    if not image_header.image_format(data):
        return UNKNOWN_FORMAT
    if max_pixels is not None:
        problem = image_header.pixel_budget_problem(data, max_pixels)
        if problem:
            return problem
    return CORRUPT


def _image_bytes_problems(image_bytes):
    """`image_bytes_problem` (without the budget) in the graph: string (B,)."""
    known = tf.not_equal(image_header.format_name(image_bytes), "")
    empty = tf.equal(tf.strings.length(image_bytes), 0)
    return tf.where(empty, EMPTY, tf.where(known, CORRUPT, UNKNOWN_FORMAT))


def check_batch(batch, name, max_batch_size):
    """Assertions: 0 < B <= max_batch_size, naming the input and the limit."""
    size = tf.shape(batch)[0]
    return [
        tf.debugging.Assert(size > 0, [f"{name}: the batch is empty; send at least one "
                                       "image."], name=f"check_{name}_not_empty"),
        tf.debugging.Assert(
            size <= max_batch_size,
            [f"{name}: the batch has", size,
             (f"images, above the limit of this export, max_batch_size={max_batch_size}; "
              "split the request (nothing was scored).")], name=f"check_{name}_batch_size"),
    ]


def _jpeg_headers_in_prefix(heads, candidates):
    """bool (B,): the `candidates` whose JPEG header libjpeg reads in `heads`.

    `tf.io.extract_jpeg_shape` (libjpeg's header reader, up to the SOS
    marker) fails on a header cut by the prefix or corrupt; a tf.data map
    with `ignore_errors` turns those failures into False.
    """
    count = tf.size(heads)

    def readable(index, head, unused_candidate):
        shape = tf.io.extract_jpeg_shape(head, output_type=tf.int64)
        return index, shape[0] * shape[1] > 0

    sentinel = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int32), tf.constant(False)))
    indices, ok = (
        tf.data.Dataset.from_tensor_slices((tf.range(count), heads, candidates))
        .filter(lambda unused_index, unused_head, candidate: candidate)
        .map(readable)
        .ignore_errors()
        .concatenate(sentinel)
        .batch(tf.cast(count + 1, tf.int64))
        .get_single_element())
    return tf.scatter_nd(indices[:-1, None], ok[:-1], [count])


def pixel_budget_problems(image_bytes, max_pixels):
    """`image_header.budget_problem` of each element (B,) -> string (B,).

    The same answers as `image_header.budget_problem` on each whole element,
    at a cost that does not grow with the file size for a JPEG: when libjpeg
    reads the whole header of a JPEG longer than `HEADER_PREFIX_BYTES` within
    that prefix, the header walk runs on the prefix (the SOF segment lies
    inside it, so the walk finds the same size). Other JPEGs, GIFs (all frames are
    counted) and the formats read from their first 32 bytes go through the
    whole element, as before.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    heads = tf.strings.substr(image_bytes, 0, HEADER_PREFIX_BYTES)
    large_jpegs = (tf.equal(image_header.format_name(heads), image_header.JPEG)
                   & (tf.strings.length(image_bytes) > HEADER_PREFIX_BYTES))
    in_prefix = tf.cond(tf.reduce_any(large_jpegs),
                        lambda: _jpeg_headers_in_prefix(heads, large_jpegs),
                        lambda: tf.zeros_like(large_jpegs))

    def problem(args):
        index, head, use_head = args
        return tf.cond(
            use_head, lambda: image_header.budget_problem(head, max_pixels),
            lambda: image_header.budget_problem(tf.gather(image_bytes, index), max_pixels))

    return tf.map_fn(problem, (tf.range(tf.size(image_bytes)), heads, in_prefix),
                     fn_output_signature=tf.TensorSpec([], tf.string))


def check_pixel_budgets(image_bytes, max_pixels):
    """An assertion naming every element above the pixel budget (or whose
    size cannot be read from its header), before anything is decoded."""
    problems = pixel_budget_problems(image_bytes, max_pixels)
    bad = tf.reshape(tf.where(tf.not_equal(problems, "")), [-1])
    return tf.debugging.Assert(
        tf.size(bad) == 0,
        [f"{IMAGE_BYTES_KEY}: refused before decoding the element(s) at index", bad,
         "problem:", tf.gather(problems, bad),
         (f"(the export's pixel budget max_image_pixels={max_pixels} counts width x "
          "height, times the frames of a GIF; nothing was scored)")],
        summarize=64, name="check_pixel_budget")


def top_k_by_logits(logits, probabilities, k):
    """The k best classes of each row, ranked by logit: (scores, ids).

    Ranking `probabilities` would tie every class whose float32 sigmoid
    rounds to 1.0 (logits above ~16.6) and order those by class id; the
    logits keep their order. `scores` are the probabilities of those ids.
    """
    _, ids = tf.math.top_k(logits, k=k)
    return tf.gather(probabilities, ids, batch_dims=1), ids


def check_pixels(images):
    """An assertion naming every image with a NaN, an infinity or a value
    outside [0, 255] (serve_tensor takes RGB pixels in [0, 255])."""
    finite = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
    in_range = tf.reduce_all((images >= 0.0) & (images <= 255.0), axis=[1, 2, 3])
    bad = tf.reshape(tf.where(~(finite & in_range)), [-1])
    return tf.debugging.Assert(
        tf.size(bad) == 0,
        [f"{IMAGES_KEY}: NaN, infinite or outside [0, 255] at index", bad,
         "(non-finite:", tf.reshape(tf.where(~finite), [-1]),
         (") (expected RGB pixels in [0, 255]; clip after resizing; nothing was "
          "scored)")], summarize=64, name="check_images_values")


def decode_image_batch(image_bytes, image_size, max_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                       antialias=False):
    """Decodes and resizes encoded images exactly like evaluation does.

    The pixel budget is checked on every element's header first: nothing is
    decoded when one element is above it.

    Args:
        image_bytes: string tensor (B,) of encoded images (any sizes).
        image_size: side S of the model input.
        max_pixels: the pixel budget of one image (width x height, x frames
            for a GIF; `pipelines.image_header`).
        antialias: the run's resize (`input_pipeline.preprocess_eval`).

    Returns:
        float32 (B, S, S, 3), RGB in [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: an element is above the pixel budget
            or cannot be decoded; the message names `image_bytes`, every bad
            index and its problem.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    with tf.control_dependencies([check_pixel_budgets(image_bytes, max_pixels)]):
        image_bytes = tf.identity(image_bytes)
    count = tf.size(image_bytes)

    def decode(index, data):
        image = decoder.decode_image(data)
        return index, preprocessing.preprocess_eval(image, image_size, antialias)

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
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    antialias: bool = False
    precision: str = "float32"
    jit_compile: bool = False


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
        info: a `ServingInfo` (`info.jit_compile`: the model's forward pass
            runs in a `tf.function(jit_compile=True)`).
        labels_path: a local file with the class names, one per line,
            copied into the SavedModel's assets/.
    """

    def __init__(self, inference_model, info, labels_path):
        super().__init__(name="mlcrl_serving")
        self._keras = _Untracked(inference_model)
        self._info = info
        # Only the model's forward pass on float images: XLA cannot compile
        # the string decoding (nor the tf.data step) of serving_default.
        self._forward = (tf.function(self._model_forward, jit_compile=True)
                         if info.jit_compile else self._model_forward)
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

    def _model_forward(self, images):
        return tf.cast(self._keras.model(images, training=False), tf.float32)

    def _outputs(self, images):
        logits = self._forward(images)
        probabilities = tf.sigmoid(logits)
        scores, ids = top_k_by_logits(logits, probabilities, self._info.top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "predicted": probabilities >= self._info.threshold,
            "top_k_scores": scores,
            "top_k_class_ids": ids,
            "top_k_classes": tf.gather(tf.constant(list(self._info.class_names)), ids),
        }

    def _serve_image_bytes(self, image_bytes):
        info = self._info
        with tf.control_dependencies(
                check_batch(image_bytes, IMAGE_BYTES_KEY, info.max_batch_size)):
            images = decode_image_batch(tf.identity(image_bytes), info.image_size,
                                        info.max_image_pixels, info.antialias)
        return self._outputs(images)

    def _serve_tensor(self, images):
        checks = check_batch(images, IMAGES_KEY, self._info.max_batch_size)
        with tf.control_dependencies(checks):
            with tf.control_dependencies([check_pixels(images)]):
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
            "max_batch_size": tf.constant(info.max_batch_size, tf.int32),
            "max_image_pixels": tf.constant(info.max_image_pixels, tf.int64),
            "antialias": tf.constant(info.antialias),
            "precision": tf.constant(info.precision),
            "jit_compile": tf.constant(info.jit_compile),
        }


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
        # Exports older than these options have no limit to respect.
        self.max_batch_size = (int(metadata["max_batch_size"].numpy())
                               if "max_batch_size" in metadata else None)
        self.max_image_pixels = (int(metadata["max_image_pixels"].numpy())
                                 if "max_image_pixels" in metadata else None)

    def outputs(self, image_bytes):
        """The signature's outputs for a request; raises InvalidArgumentError."""
        out = self._serve(**{IMAGE_BYTES_KEY: tf.constant(list(image_bytes), tf.string)})
        return {key: value.numpy() for key, value in out.items()}

    def score(self, image_bytes, key="logits"):
        """Scores encoded images; bad ones are reported, not fatal.

        Images above the export's pixel budget are refused here, from their
        header, without a request. The others are sent in requests of at
        most the export's `max_batch_size`; a refused request (one bad image
        fails a whole request) or one that runs out of memory is retried
        image by image.

        Args:
            image_bytes: a sequence of encoded images.
            key: the output to return per image ("logits", "probabilities").

        Returns:
            (indices of the scored images, their `key` rows (n, C),
            a list of `ImageProblem` for the others, in index order).
        """
        image_bytes = list(image_bytes)
        problems, todo = [], []
        for i, data in enumerate(image_bytes):
            reason = self._header_problem(data)
            if reason:
                problems.append(ImageProblem(i, reason))
            else:
                todo.append(i)
        kept, rows = [], []
        step = self.max_batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            k, r, p = self._score_chunk([image_bytes[i] for i in chunk], key)
            kept += [chunk[j] for j in k]
            rows += list(r)
            problems += [ImageProblem(chunk[q.index], q.reason) for q in p]
        rows = np.stack(rows) if rows else np.zeros((0, len(self.class_names)), np.float32)
        return kept, rows, sorted(problems, key=lambda q: q.index)

    def _header_problem(self, data):
        if not data:
            return EMPTY
        if self.max_image_pixels is None:
            return None
        return image_header.pixel_budget_problem(data, self.max_image_pixels)

    def _score_chunk(self, image_bytes, key):
        """`score` for one request's worth of images."""
        try:
            return list(range(len(image_bytes))), list(self.outputs(image_bytes)[key]), []
        except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError):
            pass
        kept, rows, problems = [], [], []
        for i, data in enumerate(image_bytes):
            try:
                rows.append(self.outputs([data])[key][0])
                kept.append(i)
            except tf.errors.InvalidArgumentError:
                problems.append(ImageProblem(i, image_bytes_problem(data,
                                                                    self.max_image_pixels)))
            except tf.errors.ResourceExhaustedError:
                problems.append(ImageProblem(i, OUT_OF_MEMORY))
        return kept, rows, problems
