"""The tf.data input pipeline: decode, preprocess (train/eval pair), batch.

    ds = make_dataset("data/demo/tfrecords/train-*.tfrecord", batch_size=64,
                      image_size=96, num_classes=10, training=True)

`make_dataset` gives batches of RGB pixels (the model normalises them) for
training or evaluation; `eval_batches_per_pipeline` and `padded_eval_dataset`
serve distributed evaluation, `make_record_dataset` an export's. The stages,
order, resume and distributed input: docs/data.md, Input pipeline.
"""

import random

from absl import logging
import tensorflow as tf

from pipelines.records import image_header
from pipelines.records import shard_sets
from pipelines.tfdata import decoder
from pipelines.tfdata import preprocessing
from pipelines.tfdata import record_stream
from pipelines.tfdata import tfds_source


def make_dataset(source, batch_size, image_size, num_classes, training, *,
                 shuffle_buffer=2048, input_context=None, augmentation=None,
                 seed=None, skip_counter=None, skip_batches=0, data_dir=None,
                 antialias=False, deterministic=False,
                 max_pixels=image_header.DEFAULT_MAX_PIXELS):
    """Builds the batched tf.data pipeline over TFRecord shards (or TFDS).

    Args:
        source: glob of the shards, e.g. `.../train-*.tfrecord` (a complete
            `-of-N` set, see `shard_sets.find_shards`), or `tfds:NAME:SPLIT`.
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
            already consumed, to resume mid-epoch; their records are skipped
            before decoding, and the later ones keep their augmentation
            (docs/data.md, Resume).
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
    seed = random.randrange(preprocessing.INT32_MAX) if seed is None else seed
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
    ds = ds.map(lambda e: decoder.labels_to_multi_hot(_features(e), num_classes))
    per_pipeline_batch = (input_context.get_per_replica_batch_size(batch_size)
                          if input_context else batch_size)
    ds = ds.batch(per_pipeline_batch, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches_per_pipeline(source, batch_size, num_replicas, num_pipelines=1):
    """Batches each input pipeline must give so every replica runs as many steps.

    Distributed evaluation needs every replica (every worker) to run the same
    number of steps; `padded_eval_dataset` pads a pipeline that runs out
    with empty batches. Counted from the converters' per-shard record counts
    of the files each pipeline reads (`shard_sets.expected_records`).

    Args:
        source: glob of shards (not a TFDS split: its per-pipeline sizes are
            not known here).
        batch_size: GLOBAL batch size.
        num_replicas: replicas in sync (all workers).
        num_pipelines: input pipelines (workers).

    Returns:
        (batches per pipeline, steps per replica).
    """
    files = shard_sets.find_shards(source)
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
    """The integer ceiling of a / b."""
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
    """Evaluation records with their images not decoded (an export decodes them).

    The same reader and checks as `make_dataset`, every record once, in order
    (docs/data.md, Records for an export).

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
    ds = ds.map(lambda e: decoder.labels_to_multi_hot(
        {k: e[k] for k in ("image_bytes", "filename", "label_ids", "difficult_ids")},
        num_classes))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _parse_records(ds, parse):
    """Parses every record in order; drops what does not parse (end markers
    are not parsed: they always reach `check_stream`, which counts the
    dropped records)."""
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
    files = shard_sets.find_shards(source)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    if 1 < num_pipelines > len(files):
        logging.warning(
            "%d shard files for %d input pipelines: every pipeline reads all "
            "files and keeps every %d-th record. Write at least %d shards to "
            "shard by file.", len(files), num_pipelines, num_pipelines,
            num_pipelines)
    return (record_stream.record_stream(files, training, seed, input_context,
                                        shuffle_buffer), decoder.parse_example, files)


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
        image = decoder.decode_image(features.pop("image_bytes"), max_pixels)
        if training:
            image = preprocessing.preprocess_train(
                image, image_size, augmentation,
                seed=tf.stack([tf.constant(seed, tf.int64), element["index"]]),
                antialias=antialias)
        else:
            image = preprocessing.preprocess_eval(image, image_size, antialias)
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
    """A decoded element's features, without the stream's bookkeeping."""
    return {k: element[k] for k in ("images", "filename", "label_ids", "difficult_ids")}
