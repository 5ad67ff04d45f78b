"""`<split>_report.json`: what a conversion stored, skipped and re-encoded.

`make_report` builds it, `format_summary` gives a converter's summary line
(the keys: docs/data.md, Schema and split files).
"""

import os

import numpy as np

from pipelines.records import schema

# The keys `make_report` sets: a converter's `extra_report` may not use them.
RESERVED_REPORT_KEYS = (
    "split", "num_shards", "shards", "num_input_records", "num_records",
    "num_skipped", "skipped", "num_reencoded", "reencoded", "num_zero_label",
    "zero_label", "class_counts", "labels_file", "max_image_pixels",
    "max_image_bytes")


def format_summary(report, output_dir):
    """One line for a converter to print after `write_split`."""
    return (f"{report['split']}: wrote {report['num_records']} images "
            f"({report['num_skipped']} skipped, {report['num_reencoded']} "
            f"re-encoded) to "
            f"{os.path.join(output_dir, report['split'])}-*-of-"
            f"{report['num_shards']:05d}.tfrecord; report "
            f"{schema.report_path(output_dir, report['split'])}")


def make_report(records, outcome, split, class_names, shard_members, final,
                 limits):
    """The report of one split, without the converter's own keys.

    Args:
        records: the split's `ImageRecord`s, in the order given.
        outcome: one `(status, reason)` per record; status "written",
            "reencoded" or "skipped".
        split: the split name.
        class_names: class id i = class_names[i].
        shard_members: per shard, the indices in `records` of its records.
        final: the shards' final paths, in shard order.
        limits: the conversion's `ImageLimits`.

    Returns:
        The report dict.
    """
    stored = [r for r, (status, _) in zip(records, outcome)
              if status != "skipped"]
    positives = np.zeros(len(class_names), np.int64)
    difficult = np.zeros(len(class_names), np.int64)
    for record in stored:
        positives[sorted(set(record.labels))] += 1
        difficult[sorted(set(record.difficult))] += 1

    def listed(wanted):
        return [{"filename": r.filename, "reason": why}
                for r, (status, why) in zip(records, outcome)
                if status == wanted]

    skipped, reencoded = listed("skipped"), listed("reencoded")
    zero_label = [r.filename for r in stored if not r.labels]
    return {
        "split": split,
        "num_shards": len(final),
        "shards": [
            {"file": os.path.basename(path),
             "num_records": sum(outcome[i][0] != "skipped" for i in members)}
            for path, members in zip(final, shard_members)],
        "num_input_records": len(records),
        "num_records": len(stored),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_reencoded": len(reencoded),
        "reencoded": reencoded,
        "num_zero_label": len(zero_label),
        "zero_label": zero_label,
        "class_counts": [
            {"id": i, "name": name, "positives": int(positives[i]),
             "difficult": int(difficult[i])}
            for i, name in enumerate(class_names)],
        "labels_file": schema.LABELS_FILENAME,
        "max_image_pixels": limits.max_pixels,
        "max_image_bytes": limits.max_bytes,
    }
