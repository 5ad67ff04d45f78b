"""The record stream of `make_dataset`, and what it checks about the data.

`record_stream` (shards) and `tfds_stream` read pass after pass and close each
file with an end marker carrying its record count; `check_stream`, after
decoding, compares that count with the converter's report and counts the
skipped records; `readable_errors` turns its errors into one-line ValueErrors.
The element dicts and the checks: docs/data.md, Record stream and end markers.
"""

import contextlib
import sys

import tensorflow as tf

from pipelines.records import shard_sets

ERROR_TAG = "mlcrl_tf input:"
UNKNOWN = -1
# With fewer records than this, the no-image check waits for more passes
# (images still in flight must not be mistaken for missing ones).
_WATCHDOG_RECORDS = 256


def expected_counts(files, count_unreported=False):
    """Per-file record counts from the converters' reports.

    Args:
        files: shard paths.
        count_unreported: count a file no report lists by reading it (which
            raises ValueError naming a corrupt file); else -1 (unknown).
    """
    counts = shard_sets.expected_records(files)
    return [int(counts[path]) if counts[path] is not None
            else (shard_sets.count_records([path]) if count_unreported else UNKNOWN)
            for path in files]


def _marked(records, file_index, expected):
    """One file's records, then its end marker; with running counts."""
    # A placeholder record of the stream's structure: variable dimensions
    # (a TFDS source's label-id vectors) are empty.
    dummy = tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype),
        records.element_spec)
    stream = records.map(lambda r: (r, False)).concatenate(
        tf.data.Dataset.from_tensors((dummy, True)))

    def count(n, item):
        record, end = item
        n = n + tf.cast(tf.logical_not(end), tf.int64)
        return n, {"record": record, "end": end, "file": file_index, "count": n,
                   "kept": n, "expected": expected}

    return stream.scan(tf.constant(0, tf.int64), count)


def _one_pass(files, expected, training, seed, input_context, shuffle_buffer):
    """The records of one pass over shard files, with end markers.

    Iterating the returned dataset again gives the next pass: with
    `training`, file order and record order are reshuffled each time, a
    deterministic sequence given `seed`.
    """
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    share_files = num_pipelines > len(files) and num_pipelines > 1
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.range(len(files), dtype=tf.int32), tf.constant(expected, tf.int64)))
    if num_pipelines > 1 and not share_files:
        # Each pipeline reads its own files: no record is read twice.
        ds = ds.shard(num_pipelines, input_context.input_pipeline_id)
    if training and not share_files:
        # A new file order every pass. (Record sharding below needs the same
        # order in every pipeline, so then the files stay in order.)
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read(path, index, count):
        # A corrupt record ends this file here; its end marker tells.
        records = tf.data.TFRecordDataset(path, buffer_size=8 << 20).ignore_errors(
            log_warning=False)
        return _marked(records, index, count)

    # Several files at once: more I/O in flight, and consecutive files mixed.
    ds = ds.interleave(read, cycle_length=min(len(files), 16), block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if share_files:
        ds = _keep_share(ds, num_pipelines, input_context.input_pipeline_id, len(files))
    if training:
        # Shuffle encoded records (cheap) before the expensive decode; each
        # pass is shuffled on its own, so an epoch sees every record once.
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def _keep_share(ds, num_pipelines, pipeline_id, num_files):
    """Record sharding of a stream every pipeline reads in the same order.

    Keeps every `num_pipelines`-th record (numbered without the end markers,
    so the pipelines' shares differ by at most one record) and every end
    marker, whose `kept` becomes the file's records this pipeline kept.
    """

    def step(state, element):
        position, kept = state
        record = tf.logical_not(element["end"])
        mine = tf.logical_and(record, position % num_pipelines == pipeline_id)
        kept += tf.cast(mine, tf.int64) * tf.one_hot(element["file"], num_files,
                                                     dtype=tf.int64)
        out = (dict(element, kept=kept[element["file"]]), tf.logical_or(mine, element["end"]))
        return (position + tf.cast(record, tf.int64), kept), out

    state = (tf.constant(0, tf.int64), tf.zeros([num_files], tf.int64))
    return ds.scan(state, step).filter(lambda element, keep: keep).map(
        lambda element, keep: element)


def _passes(one_pass, training):
    """`one_pass` again and again (training) or once, each element tagged
    with its pass number."""
    stop = tf.int64.max if training else 1
    return tf.data.Dataset.range(stop).flat_map(
        lambda p: one_pass.map(lambda e: dict(e, **{"pass": p})))


def record_stream(files, training, seed, input_context=None, shuffle_buffer=0):
    """Pass after pass over shard files (training: forever, shuffled).

    Args:
        files: the sorted shard paths.
        training: shuffle files and records each pass, and repeat.
        seed: int, makes the file and record order of every pass
            reproducible.
        input_context: optional `tf.distribute.InputContext` (shards files,
            or records when there are fewer files than input pipelines:
            docs/data.md, Distributed input).
        shuffle_buffer: records in the shuffle buffer (training).

    Returns:
        A dataset of the element dicts of docs/data.md, Record stream and
        end markers.
    """
    # Evaluation reads each file once anyway: count unreported files first so
    # that a truncated one is caught too. (Training counts them at start-up.)
    expected = expected_counts(files, count_unreported=not training)
    one_pass = _one_pass(files, expected, training, seed, input_context, shuffle_buffer)
    return _passes(one_pass, training)


def tfds_stream(split, training, seed, input_context=None, shuffle_buffer=0):
    """The same element dicts over a `tfds_source.TfdsSplit` (one "file")."""
    records = split.records(shuffle_files=training, seed=seed, input_context=input_context)
    one_pass = _marked(records, tf.constant(0, tf.int32), tf.constant(UNKNOWN, tf.int64))
    if training:
        one_pass = one_pass.shuffle(shuffle_buffer, seed=seed,
                                    reshuffle_each_iteration=True)
    return _passes(one_pass, training)


def _fail(condition, *message):
    """An assertion that raises InvalidArgumentError tagged ERROR_TAG."""
    return tf.debugging.Assert(condition, [ERROR_TAG, *message], summarize=8)


def check_stream(ds, files, ordered):
    """Checks end markers after decoding; counts and reports skips.

    Args:
        ds: decoded elements (images and end markers), after ignore_errors.
        files: the shard paths (for messages).
        ordered: the stream keeps the record order (evaluation), so per-file
            skip counts are exact at each file's end marker.

    Returns:
        The same elements, each with the running int64 counts `read`
        (records of completed files kept by this pipeline), `delivered`
        (images) and `skipped` (records found undecodable) added.
    """
    names = tf.constant([str(f) for f in files] or ["<tfds>"])
    num_files = max(len(files), 1)
    state = {"delivered": tf.zeros([], tf.int64), "read": tf.zeros([], tf.int64),
             "skipped": tf.zeros([], tf.int64),
             "file_delivered": tf.zeros([num_files], tf.int64),
             "pass_read": tf.zeros([3], tf.int64), "pass_delivered": tf.zeros([3], tf.int64),
             "reported_pass": tf.constant(-1, tf.int64)}

    def step(s, element):
        checks = [_truncation_check(element, names)]
        if ordered:
            s, report = _file_skips(s, element, names)
        else:
            s, report = _pass_skips(s, element)
        s = _count(s, element, num_files)
        checks.append(_fail(tf.logical_not(_nothing_decodes(s, element)),
                            "no image could be decoded in two whole passes over",
                            s["read"], "records of", names,
                            "(not image data, or another tool's TFRecords?)"))
        with tf.control_dependencies(checks + [report]):
            out = dict(element, skipped=tf.identity(s["skipped"]),
                       read=tf.identity(s["read"]), delivered=tf.identity(s["delivered"]))
        return s, out

    return ds.scan(state, step)


def _truncation_check(element, names):
    """At a file's end marker: as many records as its converter report says."""
    complete = tf.logical_or(element["expected"] < 0,
                             tf.equal(element["count"], element["expected"]))
    return _fail(tf.logical_or(tf.logical_not(element["end"]), complete),
                 names[element["file"]], "holds", element["count"],
                 "readable records but its converter report says", element["expected"],
                 "(truncated or corrupt: reconvert it or restore the file)")


def _count(s, element, num_files):
    """Counts one element: a delivered image or a file's end marker."""
    image = tf.cast(tf.logical_not(element["end"]), tf.int64)
    slot = tf.one_hot(element["pass"] % 3, 3, dtype=tf.int64)
    read = tf.cast(element["end"], tf.int64) * element["kept"]
    s = dict(s)
    s["delivered"] += image
    s["file_delivered"] += image * tf.one_hot(element["file"], num_files, dtype=tf.int64)
    s["pass_delivered"] += image * slot
    s["read"] += read
    s["pass_read"] += read * slot
    return s


def _file_skips(s, element, names):
    """Ordered stream: at a file's end marker all its images went by, so its
    skips are exact; one warning line per file with skips."""
    index = element["file"]
    skipped = tf.where(element["end"], element["kept"] - s["file_delivered"][index], 0)
    s = dict(s, skipped=s["skipped"] + skipped)
    report = tf.cond(skipped > 0, lambda: tf.print(
        "warning:", skipped, "of", element["kept"], "records of", names[index],
        "could not be decoded (skipped)", output_stream=sys.stderr), tf.no_op)
    return s, report


def _pass_skips(s, element):
    """Training: when pass p + 2 starts, pass p is surely through the
    pipeline; its skips are counted and reported in one line."""
    done = element["pass"] - 2
    new = tf.logical_and(done >= 0, done > s["reported_pass"])
    slot = tf.maximum(done, 0) % 3
    skipped = tf.where(new, s["pass_read"][slot] - s["pass_delivered"][slot], 0)
    clear = tf.cast(new, tf.int64) * tf.one_hot(slot, 3, dtype=tf.int64)
    s = dict(s, skipped=s["skipped"] + skipped,
             reported_pass=tf.where(new, done, s["reported_pass"]))
    s["pass_read"] -= clear * s["pass_read"]
    s["pass_delivered"] -= clear * s["pass_delivered"]
    report = tf.cond(skipped > 0, lambda: tf.print(
        "warning: training input:", skipped, "records of pass", done,
        "could not be decoded (skipped)", output_stream=sys.stderr), tf.no_op)
    return s, report


def _nothing_decodes(s, element):
    """True once two whole passes have delivered no image, and at least
    `_WATCHDOG_RECORDS` records were read (the watchdog)."""
    return tf.logical_and(
        tf.logical_and(element["pass"] >= 2, s["delivered"] == 0),
        s["read"] >= _WATCHDOG_RECORDS)


def input_error_message(error):
    """The readable message of an error raised by `check_stream`, else None."""
    text = getattr(error, "message", str(error))
    if ERROR_TAG not in text:
        return None
    body = text.split(ERROR_TAG, 1)[1]
    for stop in ("\n\t [[", " [[", "\n\n"):
        body = body.split(stop, 1)[0]
    return " ".join(part.strip(" ][") for part in body.split("] [")).strip()


@contextlib.contextmanager
def readable_errors(what):
    """Turns an input check's error into `ValueError(f"{what}: ...")`.

    Other errors pass unchanged.
    """
    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        message = input_error_message(e)
        if message is None:
            raise
        raise ValueError(f"{what}: {message}") from None
