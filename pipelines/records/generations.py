"""Switching a split from its old shards to the new ones in one atomic step.

`write_journal` commits a new generation, `apply_switch` carries it out,
`finish_interrupted_switch` completes one that a kill interrupted, and
`check_no_switch` is how readers refuse a split while its journal exists.
Decisions: docs/data.md, Generation switch; guarantees: docs/reliability.md,
Converters.
"""

import json
import os
import re

from absl import logging
import tensorflow as tf

from pipelines.records import schema
from pipelines.utils import files

_SWITCH_RE = re.compile(r"^\.(?P<split>.+)" + re.escape(schema.SWITCH_SUFFIX) + "$")


def check_no_switch(directory, split=None, listing=None):
    """Raises ValueError if a generation switch was interrupted in `directory`.

    Args:
        directory: the shards' directory ("" for the working directory).
        split: the split to check, or None for any split.
        listing: the directory's file names, if already listed.
    """
    if listing is None:
        listing = tf.io.gfile.listdir(directory or ".")
    for name in listing:
        match = _SWITCH_RE.match(name)
        if match and split in (None, match.group("split")):
            raise ValueError(
                f"split {match.group('split')!r} in {directory or '.'} is "
                "half-way through a switch to newly converted files (the "
                f"converter was interrupted; journal {name}): rerun the "
                "conversion of that split (with --overwrite) to finish it")


def _read_journal(path):
    """The journal at `path`; ConversionError unless it names plain files only."""
    try:
        with open(path, encoding="utf-8") as f:
            journal = json.load(f)
        names = [name for pair in journal["rename"] for name in pair]
        names += list(journal["remove"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise schema.ConversionError(
            f"switch journal {path} is unreadable ({e}); delete it and the "
            "split's files, then convert the split again") from None
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name or (
                name in ("", ".", "..")):
            raise schema.ConversionError(f"switch journal {path}: bad file name "
                                  f"{name!r}; delete it and convert again")
    return journal


def apply_switch(output_dir, journal_path):
    """Does (or finishes) the renames and removals of a journal, then
    deletes the journal. Safe to repeat after a kill at any point."""
    journal = _read_journal(journal_path)
    try:
        for tmp_name, final_name in journal["rename"]:
            tmp = os.path.join(output_dir, tmp_name)
            final = os.path.join(output_dir, final_name)
            if os.path.exists(tmp):
                os.replace(tmp, final)
            elif not os.path.exists(final):
                raise schema.ConversionError(
                    f"switch journal {journal_path}: neither {tmp} nor "
                    f"{final} exists; delete the journal and the split's "
                    "files, then convert the split again")
        for name in journal["remove"]:
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        files.fsync_path(output_dir)
        os.remove(journal_path)
        files.fsync_path(output_dir)
    except OSError as e:
        raise schema.ConversionError(
            f"switching to the new files in {output_dir} failed "
            f"({e.strerror or e}: {e.filename}); the split stays refused "
            "until a rerun of the conversion finishes the switch") from None


def finish_interrupted_switch(output_dir, split):
    """Completes a generation switch of `split` that a kill interrupted.

    Args:
        output_dir: the shards' directory.
        split: the split name.

    Returns:
        True if there was one to finish.

    Raises:
        ConversionError: the journal or its files are unusable.
    """
    journal = schema.switch_journal_path(output_dir, split)
    if not os.path.exists(journal):
        return False
    logging.warning("Finishing the switch of split %r that an interrupted "
                    "run left (%s).", split, journal)
    apply_switch(output_dir, journal)
    return True


def write_journal(output_dir, split, renames, removals):
    """Writes the switch journal atomically: the step that commits a new
    generation (before it the old files stand, after it a rerun rolls
    forward with `apply_switch`).

    Args:
        output_dir: the shards' directory.
        split: the split name.
        renames: `(temporary path, final path)` pairs.
        removals: the old files no new file replaces.

    Raises:
        ConversionError: the journal cannot be written.
    """
    journal = {
        "split": split,
        "rename": [[os.path.basename(a), os.path.basename(b)]
                   for a, b in renames],
        "remove": [os.path.basename(p) for p in removals],
    }
    path = schema.switch_journal_path(output_dir, split)
    try:
        files.fsync_path(output_dir)  # The temporaries' names are durable first.
        files.write_atomically(path, json.dumps(journal, indent=1) + "\n")
    except OSError as e:
        raise schema.ConversionError(f"cannot write {path}: {e.strerror or e}"
                              ) from None
