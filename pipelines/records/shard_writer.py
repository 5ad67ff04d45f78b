"""The sharded writer every converter uses: `write_split`.

Records are shuffled (seed 0) and dealt round-robin into shards; worker
processes read and check the images; every file is written under a hidden
temporary name, and the generation switch commits them. Decisions:
docs/data.md, Shard writer; guarantees: docs/reliability.md, Converters.
"""

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import tempfile
import threading

from absl import logging
import tensorflow as tf

from pipelines.records import generations
from pipelines.records import image_files
from pipelines.records import label_maps
from pipelines.records import output_lock
from pipelines.records import schema
from pipelines.records import split_report
from pipelines.utils import files

# Images per task sent to a worker process (progress granularity).
CHUNK_SIZE = 16
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image to convert: where to read it, its name and its labels.

    Args:
        path: where to read the image file.
        filename: the name stored in `image/filename` (relative to the
            dataset's image folder); unique within a split.
        labels: tuple of positive class ids, difficult ones included.
        difficult: tuple of the class ids difficult for this image (a subset
            of `labels`).

    Example:

    >>> record = ImageRecord("/data/VOC2007/JPEGImages/000005.jpg", "000005.jpg",
    ...                      labels=(8, 14), difficult=(8,))
    >>> record.filename, record.labels, record.difficult
    ('000005.jpg', (8, 14), (8,))
    """
    path: str
    filename: str
    labels: tuple = ()
    difficult: tuple = ()


def _check_arguments(records, split, class_names, num_shards, num_workers,
                     extra_report):
    """Checks write_split's arguments.

    Returns:
        `(records, class_names, num_workers)` as lists and a worker count.
    """
    records = list(records)
    class_names = label_maps.check_class_names(class_names)
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split {split!r}: use letters, digits, '_', '.', "
                         "'-' (not starting with '.' or '-')")
    if not isinstance(num_shards, int) or not 1 <= num_shards <= 99999:
        raise ValueError(f"num_shards must be an int in [1, 99999], got "
                         f"{num_shards!r}")
    if num_workers is None:
        num_workers = _default_num_workers(len(records))
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got "
                         f"{num_workers!r}")
    for key in extra_report or {}:
        if key in split_report.RESERVED_REPORT_KEYS:
            raise ValueError(f"extra_report key {key!r} is reserved")
    _check_records(records, len(class_names))
    return records, class_names, num_workers


def _check_records(records, num_classes):
    """Raises ValueError unless `records` are distinct, valid `ImageRecord`s."""
    if not records:
        raise ValueError("records is empty: nothing to convert")
    seen = set()
    for record in records:
        if not isinstance(record, ImageRecord):
            raise ValueError(f"records must be ImageRecords, got {record!r}")
        if record.filename in seen:
            raise ValueError(f"records: filename {record.filename!r} appears "
                             "twice")
        seen.add(record.filename)
        bad = [c for c in record.labels if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"records: {record.filename} has class ids {bad} "
                             f"outside [0, {num_classes})")
        if not set(record.difficult) <= set(record.labels):
            raise ValueError(f"records: {record.filename} has difficult ids "
                             "that are not among its labels")


def _default_num_workers(num_records):
    # A worker process costs a few seconds (it imports TensorFlow) and an
    # image ~6 ms (PIL + TF decode of a COCO-sized JPEG): one per 1000 images.
    return max(1, min(os.cpu_count() or 1, num_records // 1000))


def _make_output_dir(output_dir):
    """Creates `output_dir` and checks that a file can be created in it."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise schema.ConversionError(f"cannot create output_dir {output_dir}: "
                              f"{e.strerror or e}") from None
    try:  # O_TMPFILE where available: nothing is left behind.
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise schema.ConversionError(f"output_dir {output_dir} is not writable: "
                              f"{e.strerror or e}") from None


def _final_shards(output_dir, split):
    """Existing final shard files of `split` (any shard count)."""
    names = []
    for name in os.listdir(output_dir):
        match = schema.SHARD_RE.match(name)
        if match and match.group("prefix") == split:
            names.append(os.path.join(output_dir, name))
    return sorted(names)


def _remove_stale_temporaries(output_dir, split):
    """Removes the hidden temporaries an interrupted run of `split` left (run
    under the directory's conversion lock: another converter has none then)."""
    shared = (schema.LABELS_FILENAME, split + schema.REPORT_SUFFIX,
              f".{split}{schema.SWITCH_SUFFIX}")
    for name in os.listdir(output_dir):
        owner = files.temporary_owner(name)
        shard = owner and schema.SHARD_RE.match(owner)
        if owner in shared or (shard and shard.group("prefix") == split):
            logging.info("Removing %s left by an interrupted run.", name)
            os.remove(os.path.join(output_dir, name))


def _check_labels_file(output_dir, class_names, split, overwrite):
    """Returns True if labels.txt must be (re)written."""
    path = os.path.join(output_dir, schema.LABELS_FILENAME)
    if not os.path.exists(path):
        return True
    if label_maps.read_class_names(path) == class_names:
        return False
    others = sorted(name[:-len(schema.REPORT_SUFFIX)]
                    for name in os.listdir(output_dir)
                    if name.endswith(schema.REPORT_SUFFIX)
                    and name != split + schema.REPORT_SUFFIX)
    if overwrite and not others:
        return True
    raise ValueError(
        f"{path} exists with different class names than split {split!r} "
        f"has; use another output directory"
        + (f" (splits {others} use the existing labels)" if others else
           " or pass overwrite=True (--overwrite)"))


def _prepare_output_dir(output_dir, split, class_names, overwrite):
    """Makes the directory ready for a new generation of `split` (under its
    conversion lock); refuses an existing split without `overwrite` and a
    labels.txt of other class names before any image is read.

    Returns:
        The split's existing shard files (the commit replaces them).
    """
    _make_output_dir(output_dir)
    with output_lock.locked(output_dir):
        generations.finish_interrupted_switch(output_dir, split)
        old_shards = _final_shards(output_dir, split)
        existing = old_shards + [p for p in [schema.report_path(output_dir, split)]
                                 if os.path.exists(p)]
        if existing and not overwrite:
            raise ValueError(f"split {split!r} already exists in {output_dir} "
                             f"({existing[0]}); pass --overwrite (overwrite=True) "
                             "to replace it")
        _check_labels_file(output_dir, class_names, split, overwrite)  # refuses early
        _remove_stale_temporaries(output_dir, split)
    return old_shards


def _commit(output_dir, split, renames, report, class_names, old_shards, overwrite):
    """Writes the report (and labels.txt) and the journal under the directory's
    lock: the commit of the new generation (a rerun rolls forward from it).

    What another converter committed meanwhile decides again, by the rules of
    the start (`_check_labels_file`): a labels.txt another split now uses with
    other class names, or another generation of this split, refuses the
    commit (nothing of this run is left).
    """
    with output_lock.locked(output_dir):
        write_labels = _check_labels_file(output_dir, class_names, split, overwrite)
        if _final_shards(output_dir, split) != old_shards:
            raise schema.ConversionError(
                f"split {split!r} in {output_dir} was converted by another process "
                "meanwhile; nothing of this run was written (rerun it with --overwrite "
                "to replace that one).")
        _stage_texts(renames, output_dir, report, class_names if write_labels else None)
        finals = [final for _, final in renames]
        generations.write_journal(output_dir, split, renames,
                                  [p for p in old_shards if p not in finals])
        generations.apply_switch(output_dir, schema.switch_journal_path(output_dir, split))


def _prepare_record(record, limits):
    """Returns `(status, reason, serialized example or None)`."""
    try:
        record.filename.encode("utf-8")
    except UnicodeEncodeError:  # a name on disk that is not UTF-8 (JSON "\udcff")
        return ("skipped", "its file name is not valid UTF-8 (image/filename holds "
                "UTF-8): rename the file", None)
    try:
        encoded, reason = image_files.prepare_image(record.path, limits)
    except image_files.ImageError as e:
        return "skipped", e.reason, None
    example = schema.make_example(encoded, record.filename, record.labels,
                                  record.difficult)
    # deterministic=True: sorted feature keys, so the bytes do not depend on
    # the process (protobuf map order otherwise may).
    return ("reencoded" if reason else "written", reason,
            example.SerializeToString(deterministic=True))


def _prepare_chunk(task):
    """Runs in a worker process (or here): `(records, limits)` -> results."""
    records, limits = task
    return [_prepare_record(record, limits) for record in records]


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Worker processes started in the block have SIGINT blocked from their
    first instruction (a process inherits its parent's signal mask across
    fork and exec): a Ctrl-C, sent to the whole process group, is the
    converter's to handle, and a worker just finishes its chunk and is shut
    down, without a traceback of its own. The converter's own Ctrl-C is
    deferred to the end of the block, never lost: SIGINT is blocked in this
    thread, and a Python handler records one that another thread received
    (Python runs handlers in the main thread whatever its mask: raised while
    `submit` wrote a new worker's start-up data, it left that worker with
    half of it, and a traceback of its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous_handler = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        signal.signal(signal.SIGINT, previous_handler)
    if received:
        if callable(previous_handler):
            previous_handler(*received[0])
        elif previous_handler == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _prepared_chunks(tasks, num_workers):
    """Yields `_prepare_chunk(task)` for every task, in order.

    With more than one worker, at most 2 tasks per worker are in flight (so
    memory stays bounded) and a worker that dies raises ConversionError
    (ProcessPoolExecutor notices a dead process; multiprocessing.Pool would
    wait forever for its task).
    """
    if num_workers == 1:
        yield from map(_prepare_chunk, tasks)
        return
    # 'spawn': TensorFlow is not fork-safe once initialised.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
    pending = collections.deque()
    try:
        for task in tasks:
            with _workers_ignore_ctrl_c():  # submit starts the workers
                pending.append(pool.submit(_prepare_chunk, task))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool:
        raise schema.ConversionError(
            "a worker process died (killed by a signal or the out-of-memory "
            "killer) while reading images; nothing was written, rerun the "
            "conversion (with fewer --num_workers if memory is short)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardFile:
    """A TFRecord file being written; write errors name the file."""

    def __init__(self, path):
        self.path = path
        self._writer = self._call(tf.io.TFRecordWriter, path)

    def write(self, data):
        self._call(self._writer.write, data)

    def close(self):
        self._call(self._writer.close)
        self._call(files.fsync_path, self.path)

    def abandon(self):
        """Closes the file after a failure (which is the error to report)."""
        with contextlib.suppress(OSError, tf.errors.OpError):
            self._writer.close()

    def _call(self, function, *args):
        try:
            return function(*args)
        except (OSError, tf.errors.OpError) as e:
            text = e.message if isinstance(e, tf.errors.OpError) else (
                e.strerror or str(e))
            raise schema.ConversionError(f"cannot write {self.path}: {text}") from None


def _write_shard(path, chunk_results, progress=None):
    """Writes one shard from its chunks' `_prepare_chunk` results.

    Returns:
        One `(status, reason)` per record, in order.
    """
    outcomes = []
    shard = _ShardFile(path)
    try:
        for results in chunk_results:
            for status, reason, serialized in results:
                outcomes.append((status, reason))
                if serialized is not None:
                    shard.write(serialized)
            if progress is not None:
                progress.update(len(results))
    except BaseException:
        shard.abandon()  # The caller removes the temporary file.
        raise
    shard.close()
    return outcomes


def _write_shards(records, members, paths, num_workers, limits, progress):
    """Writes shard i = records[members[i]] to paths[i].

    Returns:
        One `(status, reason)` per record of `records`.
    """
    chunks = [[indices[i:i + CHUNK_SIZE]
               for i in range(0, len(indices), CHUNK_SIZE)]
              for indices in members]
    tasks = (([records[j] for j in chunk], limits)
             for shard_chunks in chunks for chunk in shard_chunks)
    results = _prepared_chunks(tasks, num_workers)
    outcome = [None] * len(records)
    try:
        for path, indices, shard_chunks in zip(paths, members, chunks):
            shard_outcomes = _write_shard(
                path, itertools.islice(results, len(shard_chunks)), progress)
            for index, result in zip(indices, shard_outcomes):
                outcome[index] = result
    finally:
        results.close()  # Stops the worker processes on an error.
    return outcome


def _deal(num_records, num_shards, shuffle_seed):
    """Record indices of each shard: shuffled, then dealt round-robin."""
    order = list(range(num_records))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [order[i::num_shards] for i in range(num_shards)]


def _check_some_stored(records, outcome, split):
    """Raises ValueError if no image of the split could be stored."""
    if all(status == "skipped" for status, _ in outcome):
        reasons = "; ".join(f"{r.filename}: {why}" for r, (_, why)
                            in list(zip(records, outcome))[:3])
        raise ValueError(f"none of the {len(records)} images of split "
                         f"{split!r} could be read ({reasons} ...)")


def write_split(records, output_dir, split, class_names, num_shards,
                num_workers=None, overwrite=False, extra_report=None,
                shuffle_seed=0, limits=None, progress=None):
    """Writes one split as sharded TFRecords, labels.txt and a report.

    Args:
        records: sequence of `ImageRecord`.
        output_dir: directory for the shards (created if needed).
        split: split name, e.g. "train2014"; letters, digits, `_ . -`.
        class_names: list of class names; class id i = class_names[i].
        num_shards: number of shard files (extra shards are empty files).
        num_workers: processes reading images; 1 = in this process. Default:
            min(CPUs, one per 1000 images), at least 1.
        overwrite: replace an existing split (docs/data.md, Shard writer).
        extra_report: dict merged into the report (converter-specific keys).
        shuffle_seed: seed of the record order before the round-robin
            dealing; None keeps the given order.
        limits: `ImageLimits` (default: the defaults).
        progress: a `pipelines.utils.progress.Progress` (started with the
            number of records and the split name), or None (silent).

    Returns:
        The report dict, also written to `<output_dir>/<split>_report.json`.

    Raises:
        ValueError: bad arguments, the split exists and overwrite is False,
            labels.txt differs, or no image at all could be read.
        ConversionError: (a ValueError) the output cannot be written or a
            worker process died.
    """
    output_dir = files.require_local(output_dir, "--output_dir",
                                     "the shard writer (atomic renames, fsync, a lock)")
    records, class_names, num_workers = _check_arguments(
        records, split, class_names, num_shards, num_workers, extra_report)
    limits = limits or image_files.ImageLimits()
    old_shards = _prepare_output_dir(output_dir, split, class_names, overwrite)
    members = _deal(len(records), num_shards, shuffle_seed)
    final = [os.path.join(output_dir, schema.shard_filename(split, i, num_shards))
             for i in range(num_shards)]
    renames = [(files.temporary_path(path), path) for path in final]
    logging.info("Writing %d images of split %r into %d shards with %d "
                 "worker(s).", len(records), split, num_shards, num_workers)
    if progress is not None:
        progress.start(total=len(records), description=split)
    committed = False
    try:
        outcome = _write_shards(records, members, [a for a, _ in renames],
                                num_workers, limits, progress)
        _check_some_stored(records, outcome, split)
        report = split_report.make_report(records, outcome, split, class_names, members,
                              final, limits)
        report.update(extra_report or {})
        _commit(output_dir, split, renames, report, class_names, old_shards, overwrite)
        committed = True
    finally:
        if not committed and not os.path.exists(
                schema.switch_journal_path(output_dir, split)):
            # Before the journal: remove every temporary (an error, Ctrl-C).
            # From it on, a rerun rolls forward.
            _remove_existing(tmp for tmp, _ in renames)
    return report


def _stage_texts(renames, output_dir, report, class_names):
    """Writes the report (and labels.txt unless `class_names` is None)
    under temporary names, appending each to `renames` first."""
    texts = [(schema.report_path(output_dir, report["split"]),
              json.dumps(report, indent=2) + "\n")]
    if class_names is not None:
        texts.append((os.path.join(output_dir, schema.LABELS_FILENAME),
                      label_maps.labels_file_text(class_names)))
    for path, text in texts:
        renames.append((files.temporary_path(path), path))
        try:
            _write_text(renames[-1][0], text)
        except OSError as e:
            raise schema.ConversionError(f"cannot write {renames[-1][0]}: "
                                  f"{e.strerror or e}") from None


def _remove_existing(paths):
    """Removes those of `paths` that exist."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _write_text(path, text):
    """Writes `text` to `path` and fsyncs it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
