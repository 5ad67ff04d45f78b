"""The tf.data input pipeline: decode, preprocess (train/eval pair), batch.

    ds = make_dataset("data/demo/tfrecords/train-*.tfrecord", batch_size=64,
                      image_size=96, num_classes=10, training=True)

The pipeline delivers RGB pixels; the model normalises them itself (its
backbone's `InputNormalization` layer), so this data layer knows nothing
about networks and imports neither `mlcrl_tf` nor Keras.

Decoding is separate from preprocessing (tf-models' Decoder/Parser split):

* `decode_example(serialized, num_classes)` parses one tf.Example of the
  schema in `pipelines.tfrecord_lib` into `image_bytes`, `filename`,
  `labels` (float32 (C,) multi-hot) and `difficult` (bool (C,)).
  A class id outside [0, num_classes) is an error, not a silent drop: a
  `tf.errors.InvalidArgumentError` naming `num_classes` and the file is
  raised (it usually means the wrong `--num_classes` or label map).
* `decode_image(image_bytes)` -> uint8 (H, W, 3) RGB. `tf.io.decode_image`
  sniffs the content, so JPEG/PNG/GIF (first frame)/BMP, grayscale and a PNG
  stored under a `.jpg` name all work. EXIF orientation and CMYK JPEGs are
  *not* handled here: the converters normalise them when they write the
  records (`pipelines.coco_to_tfrecord`).
* `preprocess_eval(image, image_size, antialias=False)`: bilinear resize to
  (S, S) without keeping the aspect ratio (the paper resizes to 448x448);
  float32 RGB in [0, 255]. No antialiasing by default (it costs about 3x
  the pipeline's throughput, docs/performance.md); `antialias=True`
  (`--antialias`) gives the PIL-like resize of the PyTorch reference code.
* `preprocess_train(image, image_size, augmentation, seed, antialias=False)`:
  the same by default (the paper uses no augmentation); optional
  ML-GCN-style multi-scale crop and horizontal flip (`Augmentation`), driven
  by a stateless seed so that eager and tf.data runs agree.

`make_dataset(..., antialias=...)` uses the one setting for training and
evaluation alike (a run stores it, so its evaluation and export match).

Sources: a glob of TFRecord shards of our schema, or a prepared TensorFlow
Datasets split spelled `tfds:NAME:SPLIT` (`pipelines.tfds_source`), which
yields the same parsed records.

Undecodable records (garbage or truncated image bytes, a corrupt tf.Example)
are skipped, never fatal, and counted: `make_dataset` wraps the decode step in
`tf.data.Dataset.ignore_errors` (which logs each error through TF's C++
logging) and, when given a `SkipCounter`, counts records read, images
delivered and records skipped in its tf.Variables: read `counter.skipped` or
call `counter.log()` during or after iteration. Label ids are checked AFTER
`ignore_errors`, so a bad class id stops the run instead of being skipped.

Distributed input: `batch_size` is always the GLOBAL batch. Given a
`tf.distribute.InputContext`, each input pipeline reads every n-th shard FILE
and batches `input_context.get_per_replica_batch_size(batch_size)`. When
there are fewer files than input pipelines, every pipeline reads all files and
keeps every n-th RECORD instead (correct but n times the I/O; a warning says
so). Either way each record goes to exactly one pipeline.
"""

import dataclasses
import random

from absl import logging
import tensorflow as tf

from pipelines import image_header
from pipelines import record_stream
from pipelines import tfds_source
from pipelines import tfrecord_lib

# ML-GCN's MultiScaleCrop(448, scales=(1.0, 0.875, 0.75, 0.66, 0.5)).
ML_GCN_CROP_SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)
# ML-GCN's max_distort: the height and width scale indices differ by <= 2.
_MAX_DISTORT = 2
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation (the paper uses none).

    Attributes:
        random_flip: flip left-right with probability 1/2.
        crop_scales: None (no crop) or scales for the multi-scale random crop
            taken before the resize, e.g. `ML_GCN_CROP_SCALES`.
    """

    random_flip: bool = False
    crop_scales: tuple | None = None

    def __bool__(self):
        return bool(self.random_flip or self.crop_scales)


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------

def _parse_example(serialized):
    """tf.Example -> image bytes, filename, label ids and difficult ids."""
    parsed = tf.io.parse_single_example(serialized, tfrecord_lib.FEATURE_SPEC)
    return {
        "image_bytes": parsed[tfrecord_lib.ENCODED_KEY],
        "filename": parsed[tfrecord_lib.FILENAME_KEY],
        "label_ids": tf.sparse.to_dense(parsed[tfrecord_lib.LABEL_KEY]),
        "difficult_ids": tf.sparse.to_dense(parsed[tfrecord_lib.DIFFICULT_KEY]),
    }


def _multi_hot(ids, num_classes, filename, what):
    """int64 class ids (n,) -> float32 multi-hot (C,); ids out of range raise."""
    message = (f"{what}: a class id is outside [0, num_classes={num_classes}); "
               "wrong num_classes or label map? (filename, ids):")
    in_range = tf.reduce_all((ids >= 0) & (ids < num_classes))
    check = tf.debugging.Assert(in_range, [record_stream.ERROR_TAG, message, filename, ids])
    with tf.control_dependencies([check]):
        one_hot = tf.one_hot(ids, num_classes, dtype=tf.float32)
    # Sum then clip: a repeated id stays 1 and no id gives all zeros.
    return tf.minimum(tf.reduce_sum(one_hot, axis=0), 1.0)


def _labels_to_multi_hot(features, num_classes):
    """Replaces `label_ids`/`difficult_ids` by `labels`/`difficult` (C,)."""
    features = dict(features)
    filename = features["filename"]
    features["labels"] = _multi_hot(features.pop("label_ids"), num_classes,
                                    filename, "image/class/label")
    features["difficult"] = _multi_hot(features.pop("difficult_ids"),
                                       num_classes, filename,
                                       "image/class/difficult") > 0
    return features


def decode_example(serialized, num_classes):
    """Parses one serialized tf.Example of the mlcrl_tf schema.

    Args:
        serialized: scalar string tensor, one record.
        num_classes: int C.

    Returns:
        A dict: `image_bytes` string (), `filename` string (), `labels`
        float32 (C,) multi-hot (difficult classes included), `difficult`
        bool (C,).

    Raises:
        tf.errors.InvalidArgumentError: a label or difficult id is outside
            [0, num_classes) (message names num_classes and the filename).
    """
    return _labels_to_multi_hot(_parse_example(serialized), num_classes)


def decode_image(image_bytes, max_pixels=None):
    """Decodes JPEG/PNG/GIF/BMP bytes (by content, not name) to RGB.

    Grayscale and RGBA become 3-channel RGB; an animated GIF gives its first
    frame. EXIF rotation and CMYK are normalised by the converters at write
    time, not here.

    Args:
        image_bytes: scalar string tensor.
        max_pixels: optional pixel budget read from the header BEFORE
            decoding (`pipelines.image_header`): a decompression bomb is
            refused without being decoded.

    Returns:
        uint8 tensor (H, W, 3).

    Raises:
        tf.errors.InvalidArgumentError: the bytes are not a decodable image,
            or the image is above `max_pixels`.
    """
    if max_pixels is not None:
        image_bytes = image_header.within_pixel_budget_fast(image_bytes, max_pixels)
    image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# --------------------------------------------------------------------------
# Preprocessing: the train/eval pair.
# --------------------------------------------------------------------------

def _resize(image, image_size, antialias):
    """Bilinear resize to (S, S), aspect ratio not kept."""
    return tf.image.resize(tf.cast(image, tf.float32),
                           (image_size, image_size), method="bilinear",
                           antialias=antialias)


def preprocess_eval(image, image_size, antialias=False):
    """Evaluation (and serving) preprocessing.

    Args:
        image: uint8 or float tensor (H, W, 3) (or a batch (B, H, W, 3)),
            RGB in [0, 255].
        image_size: side S of the square model input.
        antialias: antialiased (PIL-like) bilinear downscaling; about 3x
            slower on 640x480 photos to 448 (docs/performance.md). The
            identity when the image already has the model size.

    Returns:
        float32 (S, S, 3) (or (B, S, S, 3)), RGB in [0, 255] (the model
        normalises).
    """
    return _resize(image, image_size, antialias)


def _multi_scale_crop(image, crop_scales, seed):
    """ML-GCN's MultiScaleCrop with a random (not fixed-grid) offset.

    The crop height and width are each `min(H, W) * scale` for scales picked
    from `crop_scales` whose indices differ by at most 2 (max_distort=2), so
    the aspect ratio changes a little too.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    base = tf.cast(tf.minimum(height, width), tf.float32)
    sizes = tf.maximum(tf.cast(base * tf.constant(crop_scales, tf.float32),
                               tf.int32), 1)
    n = len(crop_scales)
    pairs = tf.constant([(i, j) for i in range(n) for j in range(n)
                         if abs(i - j) <= _MAX_DISTORT], tf.int32)
    k = tf.random.stateless_uniform([], seeds[0], 0, tf.shape(pairs)[0],
                                    dtype=tf.int32)
    crop_h, crop_w = sizes[pairs[k, 0]], sizes[pairs[k, 1]]
    top = tf.random.stateless_uniform([], seeds[1], 0, height - crop_h + 1,
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, width - crop_w + 1,
                                       dtype=tf.int32)
    return tf.slice(image, [top, left, 0], [crop_h, crop_w, 3])


def preprocess_train(image, image_size, augmentation=None, seed=None, antialias=False):
    """Training preprocessing; equal to `preprocess_eval` by default.

    Args:
        image: uint8 or float tensor (H, W, 3), RGB in [0, 255].
        image_size: side S of the square model input.
        augmentation: an `Augmentation`, or None for none (the paper's).
        seed: stateless seed, int tensor of shape (2,). The same seed gives
            the same augmentation eagerly and inside tf.data. None draws a
            fresh one per call (not reproducible).
        antialias: see `preprocess_eval`.

    Returns:
        float32 (S, S, 3), RGB in [0, 255].
    """
    augmentation = augmentation or Augmentation()
    if augmentation:
        if seed is None:
            seed = tf.random.uniform([2], maxval=_INT32_MAX, dtype=tf.int32)
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2))
    if augmentation.crop_scales:
        image = _multi_scale_crop(image, tuple(augmentation.crop_scales), crop_seed)
    image = _resize(image, image_size, antialias)
    if augmentation.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image


# --------------------------------------------------------------------------
# Counting undecodable records.
# --------------------------------------------------------------------------

class SkipCounter:
    """Where `make_dataset` reports its counts: records read, images
    delivered, records skipped as undecodable.

    int64 host tf.Variables written by the pipeline as it runs (see
    `pipelines.record_stream`): in evaluation (ordered, one pass) the counts
    are exact at the end of the pass and per file as each file completes;
    in training, skips are counted per pass, once the pass is through the
    pipeline. Each iteration over the dataset counts from 0 again; the
    counter shows the latest one.

    Use one counter per `make_dataset` call, created outside any
    `tf.distribute` strategy scope (the variables must stay plain host
    variables). A dataset that captures variables cannot be serialised, so
    this pipeline is not for the tf.data service or iterator checkpoints.

    Example:
        counter = SkipCounter()
        ds = make_dataset(..., training=False, skip_counter=counter)
        for batch in ds: ...
        counter.log("eval")   # or counter.skipped
    """

    def __init__(self):
        if tf.distribute.has_strategy():
            raise ValueError(
                "SkipCounter: create it outside the tf.distribute strategy "
                "scope (it holds plain host variables).")
        with tf.init_scope(), tf.device("/cpu:0"):
            self._values = {name: tf.Variable(0, dtype=tf.int64, trainable=False,
                                              name=f"records_{name}")
                            for name in ("read", "delivered", "skipped")}
        self._attached = False

    @property
    def read(self):
        """Records read from completed files (int); this input pipeline's
        share of them when pipelines share files."""
        return int(self._values["read"].numpy())

    @property
    def delivered(self):
        """Images decoded and passed on (int)."""
        return int(self._values["delivered"].numpy())

    @property
    def skipped(self):
        """Records that could not be decoded so far (int)."""
        return int(self._values["skipped"].numpy())

    def reset(self):
        """Sets every count to 0 (between passes, not during one)."""
        for v in self._values.values():
            v.assign(0)

    def log(self, name="input"):
        """Logs the counts: a warning if any record was skipped."""
        skipped = self.skipped
        log = logging.warning if skipped else logging.info
        log("%s pipeline: %d records read, %d images delivered, %d skipped "
            "as undecodable.", name, self.read, self.delivered, skipped)

    def attach(self):
        """Claims the counter for one dataset (ValueError if already claimed)."""
        if self._attached:
            raise ValueError("This SkipCounter already belongs to another "
                             "make_dataset call; create one per dataset.")
        self._attached = True

    def record(self, element):
        """Stores the running counts carried by one element (inside tf.data)."""
        updates = [self._values[name].assign(element[name], read_value=False)
                   for name in ("read", "delivered", "skipped")]
        with tf.control_dependencies(updates):
            return tf.nest.map_structure(tf.identity, element)


# --------------------------------------------------------------------------
# The pipeline.
# --------------------------------------------------------------------------

def make_dataset(source, batch_size, image_size, num_classes, training, *,
                 shuffle_buffer=2048, input_context=None, augmentation=None,
                 seed=None, skip_counter=None, skip_batches=0, data_dir=None,
                 antialias=False, deterministic=False,
                 max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """Builds the batched tf.data pipeline over TFRecord shards (or TFDS).

    Args:
        source: glob of the shards, e.g. `.../train-*.tfrecord` (a complete
            `-of-N` set, see `tfrecord_lib.find_shards`), or `tfds:NAME:SPLIT`.
        batch_size: GLOBAL batch size; with `input_context` each pipeline
            batches `input_context.get_per_replica_batch_size(batch_size)`.
        image_size: side S of the square model input.
        num_classes: C.
        training: True: shuffle files and records, augment (if asked),
            repeat forever, drop the last partial batch, decode in any order
            (unless `deterministic`). False: every record exactly once, in
            a fixed order, last partial batch kept.
        shuffle_buffer: records in the shuffle buffer (training). They are
            still encoded: 2048 COCO images are ~330 MB.
        input_context: optional `tf.distribute.InputContext`.
        augmentation: an `Augmentation` (training only), see `preprocess_train`.
        seed: int, makes shuffling and augmentation reproducible.
        skip_counter: optional `SkipCounter` to read the counts from.
        skip_batches: training only: global batches (steps) of this dataset
            already consumed, to resume mid-epoch. Each pipeline skips its
            share (`skip_batches * batch_size / num_input_pipelines`) of
            encoded records before decoding, so nothing is decoded twice and
            the augmentation of the later records is unchanged. Exact unless
            an undecodable record lies in the skipped part.
        data_dir: TensorFlow Datasets' data directory for a `tfds:` source.
        antialias: antialiased resize (see `preprocess_eval`).
        deterministic: training decodes in order too (bit-reproducible runs).
        max_pixels: pixel budget of one image, read from its header before
            decoding; a larger image is skipped (counted) undecoded.

    Returns:
        A `tf.data.Dataset` of dicts: `images` float32 (B, S, S, 3) RGB in
        [0, 255], `labels` float32 (B, C), `difficult` bool (B, C),
        `filename` string (B,).

    Raises:
        ValueError: no (or an incomplete set of) shards, or skip_batches
            for evaluation.
    """
    if skip_batches and not training:
        raise ValueError("skip_batches is for resuming training; evaluation "
                         "reads every record.")
    seed = random.randrange(_INT32_MAX) if seed is None else seed
    if skip_counter is not None:
        skip_counter.attach()
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    ds, parse, files = _records(source, training, seed, input_context, data_dir,
                                shuffle_buffer)
    ds = _number_images(ds, skip_batches * (batch_size // num_pipelines))
    ds = _decode(ds, parse, image_size, training, augmentation, seed,
                 (antialias, max_pixels), ordered=deterministic or not training)
    ds = record_stream.check_stream(ds, files, ordered=deterministic or not training)
    if skip_counter is not None:
        ds = ds.map(skip_counter.record)
    ds = ds.filter(lambda e: tf.logical_not(e["end"]))
    ds = ds.map(lambda e: _labels_to_multi_hot(_features(e), num_classes))
    per_pipeline_batch = (input_context.get_per_replica_batch_size(batch_size)
                          if input_context else batch_size)
    ds = ds.batch(per_pipeline_batch, drop_remainder=training)
    # Overlap input with the training step.
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches_per_pipeline(source, batch_size, num_replicas, num_pipelines=1):
    """Batches each input pipeline must give so every replica runs as many steps.

    Distributed evaluation needs every replica (every worker) to run the same
    number of steps; `padded_eval_dataset` pads a pipeline that runs out
    with empty batches. Counted from the converters' per-shard record counts
    of the files each pipeline reads (`tfrecord_lib.expected_records`).

    Args:
        source: glob of shards (not a TFDS split: its per-pipeline sizes are
            not known here).
        batch_size: GLOBAL batch size.
        num_replicas: replicas in sync (all workers).
        num_pipelines: input pipelines (workers).

    Returns:
        (batches per pipeline, steps per replica).
    """
    files = tfrecord_lib.find_shards(source)
    counts = record_stream.expected_counts(files, count_unreported=True)
    per_replica = max(1, batch_size // num_replicas)
    replicas_per_pipeline = max(1, num_replicas // num_pipelines)
    if len(files) >= num_pipelines:  # files sharded: pipeline p reads files[p::n]
        sizes = [sum(counts[p::num_pipelines]) for p in range(num_pipelines)]
    else:  # records sharded
        sizes = [_ceil_div(sum(counts), num_pipelines)] * num_pipelines
    steps = max(_ceil_div(_ceil_div(size, per_replica), replicas_per_pipeline)
                for size in sizes)
    return steps * replicas_per_pipeline, steps


def _ceil_div(a, b):
    return -(-a // b)


def padded_eval_dataset(source, batch_size, image_size, num_classes, input_context,
                        num_batches, **kwargs):
    """`make_dataset(training=False)` for one pipeline, padded with empty
    batches to exactly `num_batches` (see `eval_batches_per_pipeline`)."""
    ds = make_dataset(source, batch_size, image_size, num_classes, training=False,
                      input_context=input_context, **kwargs)
    empty = tf.nest.map_structure(
        lambda spec: tf.zeros([0] + spec.shape[1:].as_list(), spec.dtype), ds.element_spec)
    return ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)


def make_record_dataset(source, batch_size, num_classes, data_dir=None, skip_counter=None):
    """Evaluation records NOT decoded here (an export decodes them itself).

    The same reader and checks as `make_dataset` (a truncated or corrupt
    shard is an error naming it), every record once, in order. A record that
    is not a tf.Example of the schema is skipped and counted, as
    `make_dataset` does (its image bytes are not looked at here: the export
    reports undecodable images itself).

    Args:
        source: glob of shards, or `tfds:NAME:SPLIT`.
        batch_size: records per batch.
        num_classes: C.
        data_dir: TensorFlow Datasets' data directory for a `tfds:` source.
        skip_counter: optional `SkipCounter` to read the counts from.

    Returns:
        A dataset of dicts: `image_bytes` string (B,), `filename` string (B,),
        `labels` float32 (B, C), `difficult` bool (B, C).
    """
    if skip_counter is not None:
        skip_counter.attach()
    ds, parse, files = _records(source, False, 0, None, data_dir, 0)
    ds = _parse_records(ds, parse)
    ds = record_stream.check_stream(ds, files, ordered=True)
    if skip_counter is not None:
        ds = ds.map(skip_counter.record)
    ds = ds.filter(lambda e: tf.logical_not(e["end"]))
    ds = ds.map(lambda e: _labels_to_multi_hot(
        {k: e[k] for k in ("image_bytes", "filename", "label_ids", "difficult_ids")},
        num_classes))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _parse_records(ds, parse):
    """Parses every record in order; drops what does not parse (end markers
    are not parsed: they always reach `check_stream`, which counts it)."""
    blank = {"image_bytes": tf.constant(""), "filename": tf.constant(""),
             "label_ids": tf.zeros([0], tf.int64), "difficult_ids": tf.zeros([0], tf.int64)}

    def step(element):
        features = tf.cond(element["end"], lambda: blank,
                           lambda: dict(parse(element["record"])))
        return dict(features, **_bookkeeping(element))

    ds = ds.map(step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors(log_warning=False)


def _bookkeeping(element):
    """What `check_stream` reads of a stream element besides the features."""
    return {k: element[k] for k in ("end", "file", "count", "kept", "expected", "pass")}


def _records(source, training, seed, input_context, data_dir, shuffle_buffer):
    """The record stream (with end markers), how to parse a record, the files."""
    if tfds_source.is_tfds(source):
        # Already parsed records; the split shards itself by file or record.
        split = tfds_source.open_split(source, data_dir=data_dir)
        return (record_stream.tfds_stream(split, training, seed, input_context,
                                          shuffle_buffer), dict, [])
    files = tfrecord_lib.find_shards(source)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    if 1 < num_pipelines > len(files):
        logging.warning(
            "%d shard files for %d input pipelines: every pipeline reads all "
            "files and keeps every %d-th record. Write at least %d shards to "
            "shard by file.", len(files), num_pipelines, num_pipelines,
            num_pipelines)
    return (record_stream.record_stream(files, training, seed, input_context,
                                        shuffle_buffer), _parse_example, files)


def _number_images(ds, skip):
    """Numbers the images of the stream (their augmentation seed); drops the
    first `skip` images (resuming), never an end marker."""

    def number(n, element):
        image = tf.cast(tf.logical_not(element["end"]), tf.int64)
        return n + image, dict(element, index=n)

    ds = ds.scan(tf.constant(0, tf.int64), number)
    if skip:
        ds = ds.filter(lambda e: tf.logical_or(e["end"], e["index"] >= skip))
    return ds


def _decode(ds, parse, image_size, training, augmentation, seed, image_options, ordered):
    """Parses, decodes and preprocesses in parallel; drops what fails.

    End markers are not decoded: they always reach `check_stream`.
    `image_options` is (antialias, max_pixels).
    """
    antialias, max_pixels = image_options
    blank = {"images": tf.zeros([image_size, image_size, 3], tf.float32),
             "filename": tf.constant(""), "label_ids": tf.zeros([0], tf.int64),
             "difficult_ids": tf.zeros([0], tf.int64)}

    def decode_and_preprocess(element):
        features = parse(element["record"])
        image = decode_image(features.pop("image_bytes"), max_pixels)
        if training:
            image = preprocess_train(
                image, image_size, augmentation,
                seed=tf.stack([tf.constant(seed, tf.int64), element["index"]]),
                antialias=antialias)
        else:
            image = preprocess_eval(image, image_size, antialias)
        return dict(features, images=image)

    def step(element):
        features = tf.cond(element["end"], lambda: blank,
                           lambda: decode_and_preprocess(element))
        return dict(features, **_bookkeeping(element))

    # The expensive step, in parallel; in order only where needed
    # (evaluation, --deterministic training).
    ds = ds.map(step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=ordered)
    # An undecodable image or record is dropped, counted and reported once
    # per file or pass by `check_stream` (not one warning per record).
    return ds.ignore_errors(log_warning=False)


def _features(element):
    return {k: element[k] for k in ("images", "filename", "label_ids", "difficult_ids")}
