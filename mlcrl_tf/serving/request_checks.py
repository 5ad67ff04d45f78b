"""Request checks in the graph: a bad request fails whole with one
INVALID_ARGUMENT naming the input, the limit or the bad indices, before the
costly step (docs/serving.md, Bad input; docs/reliability.md).
"""

import tensorflow as tf

from mlcrl_tf.serving import contract
from pipelines.records import image_header
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing

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
        [f"{contract.IMAGE_BYTES_KEY}: refused before decoding the element(s) at index", bad,
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


def check_image_shape(images, image_size):
    """An assertion that `images` is (B, S, S, 3), naming the shape it got and
    the one expected (the signature takes any shape, so that a wrong one is
    this INVALID_ARGUMENT rather than an error deep in the network)."""
    shape = tf.shape(images)
    # Four numbers whatever the rank, so the comparison itself cannot fail.
    four = tf.concat([shape, [-1, -1, -1, -1]], axis=0)[:4]
    ok = tf.equal(tf.rank(images), 4) & tf.reduce_all(
        tf.equal(four[1:], [image_size, image_size, 3]))
    return tf.debugging.Assert(
        ok,
        [f"{contract.IMAGES_KEY}: the batch has shape", shape,
         (f"; expected (B, {image_size}, {image_size}, 3): float32 RGB pixels in "
          "[0, 255] at the model size (nothing was scored)")],
        name="check_images_shape")


def check_pixels(images):
    """An assertion naming every image with a NaN, an infinity or a value
    outside [0, 255] (serve_tensor takes RGB pixels in [0, 255])."""
    finite = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
    in_range = tf.reduce_all((images >= 0.0) & (images <= 255.0), axis=[1, 2, 3])
    bad = tf.reshape(tf.where(~(finite & in_range)), [-1])
    return tf.debugging.Assert(
        tf.size(bad) == 0,
        [f"{contract.IMAGES_KEY}: NaN, infinite or outside [0, 255] at index", bad,
         "(non-finite:", tf.reshape(tf.where(~finite), [-1]),
         (") (expected RGB pixels in [0, 255]; clip after resizing; nothing was "
          "scored)")], summarize=64, name="check_images_values")


def decode_image_batch(image_bytes, image_size, max_pixels=contract.DEFAULT_MAX_IMAGE_PIXELS,
                       antialias=False):
    """Decodes and resizes encoded images exactly like evaluation does.

    The pixel budget is checked on every element's header first: nothing is
    decoded when one element is above it.

    Args:
        image_bytes: string tensor (B,) of encoded images (any sizes).
        image_size: side S of the model input.
        max_pixels: the pixel budget of one image (width x height, x frames
            for a GIF; `pipelines.records.image_header`).
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
        [f"{contract.IMAGE_BYTES_KEY}: cannot decode the element(s) at index", bad,
         "problem:", tf.gather(_image_bytes_problems(image_bytes), bad),
         "(expected encoded JPEG, PNG, GIF, BMP or WebP bytes; nothing was scored)"],
        summarize=64, name="check_image_bytes")
    with tf.control_dependencies([check]):
        images = tf.identity(images)
    images.set_shape([None, image_size, image_size, 3])
    return images
