"""The reading side: complete shard sets, and how many records they hold.

`find_shards` returns the files of a pattern, refusing an incomplete `-of-N`
set or a split half-way through a generation switch; `expected_records` and
`count_records` take the counts from the converters' reports. Decisions:
docs/data.md, Reading shards.
"""

import json
import os

import numpy as np
import tensorflow as tf

from pipelines.records import generations
from pipelines.records import schema


def _check_shard_set(directory, prefix, listing, file_pattern):
    """Raises ValueError unless `<prefix>-*-of-M` in `directory` is one
    complete shard set with no switch in progress."""
    generations.check_no_switch(directory, prefix, listing)
    sets = {}
    for name in listing:
        other = schema.SHARD_RE.match(name)
        if other and other.group("prefix") == prefix:
            sets.setdefault(int(other.group("total")), set()).add(
                int(other.group("index")))
    where = os.path.join(directory, prefix)
    if len(sets) > 1:
        raise ValueError(
            f"{where}-*.tfrecord holds shard sets of different sizes "
            f"{sorted(sets)} (pattern {file_pattern!r}); remove the stale "
            "one or rerun the converter with --overwrite")
    total, indices = next(iter(sets.items()))
    missing = sorted(set(range(total)) - indices)
    if missing or max(indices) >= total:
        raise ValueError(
            f"incomplete shard set {where}-*-of-{total:05d}.tfrecord: "
            f"missing shard(s) {missing[:10]} (pattern {file_pattern!r}); "
            "a conversion was probably interrupted, rerun it with "
            "--overwrite")


def find_shards(file_pattern):
    """Returns the sorted files matching a pattern, checking shard sets.

    Hidden files (temporaries of a running or crashed conversion) are
    ignored; every matched `<prefix>-NNNNN-of-MMMMM.tfrecord` must belong to
    one complete set of M shards (the pattern may select only some of them),
    with no pending switch (docs/data.md, Reading shards). Other file names
    are returned as they are.

    Args:
        file_pattern: a glob pattern (`tf.io.gfile.glob` syntax).

    Returns:
        Sorted list of matching file paths.

    Raises:
        ValueError: nothing matches, a shard set is incomplete or mixed, or
            a conversion was interrupted while switching files.
    """
    files = sorted(path for path in tf.io.gfile.glob(file_pattern)
                   if not os.path.basename(path).startswith("."))
    if not files:
        where = os.path.dirname(file_pattern) or "."
        local = "://" not in file_pattern
        raise ValueError(
            f"file pattern {file_pattern!r} matches no file (looked in "
            f"{os.path.abspath(where) if local else where}"
            + ("; a relative path is relative to the working directory" if local and
               not os.path.isabs(file_pattern) else "") + ")")
    listings = {}
    checked = set()
    for path in files:
        match = schema.SHARD_RE.match(os.path.basename(path))
        directory = os.path.dirname(path)
        if not match or (directory, match.group("prefix")) in checked:
            continue
        checked.add((directory, match.group("prefix")))
        if directory not in listings:
            listings[directory] = tf.io.gfile.listdir(directory or ".")
        _check_shard_set(directory, match.group("prefix"),
                         listings[directory], file_pattern)
    return files


def _report_shard_counts(directory, split):
    """Shard file name -> record count from `<split>_report.json`, or None
    if there is no report."""
    generations.check_no_switch(directory, split)
    path = schema.report_path(directory, split)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            report = json.loads(f.read().decode("utf-8"))
        return {str(shard["file"]): int(shard["num_records"])
                for shard in report["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"report {path} is unreadable or has no valid "
                         f"'shards' list ({e}); rerun the converter with "
                         "--overwrite") from None


def expected_records(files):
    """How many records each shard file should hold, from the reports.

    Args:
        files: shard paths (e.g. from `find_shards`).

    Returns:
        dict path -> the record count the converter wrote into that file
        (the `shards` list of `<split>_report.json` beside it), or None where
        no report lists the file (not a converter's shard name, no report,
        or a report of another shard set).

    Raises:
        ValueError: a report is unreadable, or a switch is half done.
    """
    reports = {}
    expected = {}
    for path in files:
        name = os.path.basename(path)
        match = schema.SHARD_RE.match(name)
        if not match:
            expected[path] = None
            continue
        key = (os.path.dirname(path), match.group("prefix"))
        if key not in reports:
            reports[key] = _report_shard_counts(*key)
        expected[path] = (reports[key] or {}).get(name)
    return expected


def _count_file_records(path):
    """The records in one file, read and counted; ValueError if it is corrupt."""
    try:
        return int(tf.data.TFRecordDataset(path).reduce(
            np.int64(0), lambda n, _: n + 1).numpy())
    except tf.errors.OpError as e:
        raise ValueError(f"cannot count the records of {path}: "
                         f"{e.message.strip().splitlines()[0]}") from None


def count_records(files):
    """Records in exactly these shard files.

    Per-shard counts come from the converters' reports
    (`expected_records`); a file no report lists is read and counted.

    Args:
        files: shard paths (e.g. from `find_shards`; a subset of a split
            counts only that subset).

    Returns:
        The total number of records.

    Raises:
        ValueError: a report is unreadable, or a file that had to be read
            is corrupt.
    """
    return sum(count if count is not None else _count_file_records(path)
               for path, count in expected_records(files).items())
