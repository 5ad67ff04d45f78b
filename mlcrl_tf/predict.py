"""Labels image files with an export: one JSON line per image.

    python -m mlcrl_tf.predict --saved_model=saved_models/demo/1 IMAGE_OR_DIR... \
        [--threshold=0.5 | --top_k=3] [--batch_size=16] [--output=preds.jsonl] \
        [--all_probabilities]

Each line is `{"filename": ..., "labels": [...], "scores": [...]}` (labels
sorted by decreasing score; with --all_probabilities also `probabilities`,
a name -> probability map), or `{"filename": ..., "error": ...}` for a file
that could not be read or decoded.

Decisions:

- The images go through the export's `serving_default` signature as raw
  file bytes, batched: predictions are exactly what a TF Serving client
  gets. Class names and the default threshold come from the export's
  `metadata` signature. `--saved_model` may also name the base directory:
  its highest integer version is used, as TF Serving would.
- Labels: probability >= threshold (default the export's), or the `top_k`
  most probable classes; not both.
- Directories are walked recursively (sorted, symlinks followed) for
  `.jpg .jpeg .png .gif .bmp .webp` files, case-insensitive; a file named on
  the command line is tried whatever its extension.
- A bad file never aborts the run: unreadable files are reported before
  batching; since the signature fails a whole batch when one element cannot
  be decoded, a failing batch is retried image by image and only the bad
  images get an error line (also written to stderr). The exit code is
  non-zero only if no image could be labelled.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
_PROBLEM = re.compile(r"\[problem:\] \[(.*?)\] \[\(expected")


def find_images(paths):
    """Expands files and directories into a list of image paths.

    Args:
        paths: file or directory paths. Directories are walked recursively
            for `IMAGE_EXTENSIONS` files (sorted); files are kept as given.

    Returns:
        A list of (path, error) pairs; error is None or a message for a
        path that does not exist.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    found = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        found.append((os.path.join(root, name), None))
        elif os.path.isfile(path):
            found.append((path, None))
        else:
            found.append((path, "no such file or directory"))
    return found


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


class Labeler:
    """An export's `serving_default` plus its class names and threshold.

    Args:
        saved_model_dir: a version directory (or its base directory).

    Raises:
        ValueError: not a SavedModel of `mlcrl_tf.export`.
    """

    def __init__(self, saved_model_dir):
        self.path = resolve_saved_model(saved_model_dir)
        loaded = tf.saved_model.load(self.path)
        signatures = loaded.signatures
        if "serving_default" not in signatures or "metadata" not in signatures:
            raise ValueError(f"saved_model={self.path!r} lacks the serving_default/"
                             "metadata signatures of mlcrl_tf.export.")
        self._loaded = loaded  # keeps the variables alive
        self._serve = signatures["serving_default"]
        metadata = signatures["metadata"]()
        self.class_names = [n.decode("utf-8") for n in metadata["class_names"].numpy()]
        self.threshold = float(metadata["threshold"].numpy())

    def probabilities(self, image_bytes):
        """(B, C) float32 probabilities; raises InvalidArgumentError on bad bytes."""
        out = self._serve(image_bytes=tf.constant(list(image_bytes), tf.string))
        return out["probabilities"].numpy()


def _decode_error(error):
    """A short message from the signature's InvalidArgumentError."""
    match = _PROBLEM.search(error.message)
    if match:
        return f"not a decodable image: {match.group(1)}"
    lines = [line.strip() for line in error.message.splitlines() if line.strip()]
    return "not a decodable image: " + (lines[-1] if lines else "unknown error")


def _check_choice(threshold, top_k, num_classes):
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold or top_k, not both.")
    if threshold is not None and (isinstance(threshold, bool) or not (0.0 < threshold < 1.0)):
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= num_classes):
        raise ValueError(f"top_k must be an integer in [1, {num_classes}], got {top_k!r}.")


def _record(path, probabilities, class_names, threshold, top_k, all_probabilities):
    order = np.argsort(-probabilities, kind="stable")
    if top_k is not None:
        chosen = order[:top_k]
    else:
        chosen = [i for i in order if probabilities[i] >= threshold]
    record = {"filename": path,
              "labels": [class_names[i] for i in chosen],
              "scores": [round(float(probabilities[i]), 6) for i in chosen]}
    if all_probabilities:
        record["probabilities"] = {name: round(float(p), 6)
                                   for name, p in zip(class_names, probabilities)}
    return record


def iter_predictions(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16,
                     all_probabilities=False):
    """Yields one dict per image path, in order (see the module docstring).

    Args:
        saved_model_dir: an export version directory (or its base directory).
        paths: image files and/or directories.
        threshold: label when probability >= threshold; default the export's.
        top_k: label the k most probable classes instead.
        batch_size: images per call of the signature.
        all_probabilities: add every class's probability to each record.

    Yields:
        {"filename", "labels", "scores"[, "probabilities"]} or
        {"filename", "error"}.

    Raises:
        ValueError: bad arguments or not an mlcrl_tf export.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    labeler = Labeler(saved_model_dir)
    _check_choice(threshold, top_k, len(labeler.class_names))
    if threshold is None and top_k is None:
        threshold = labeler.threshold
    files = find_images(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        records, readable = [None] * len(chunk), []
        for i, (path, error) in enumerate(chunk):
            if error is None:
                try:
                    with open(path, "rb") as f:
                        readable.append((i, path, f.read()))
                except OSError as e:
                    error = f"cannot read: {e.strerror or e}"
            if error is not None:
                records[i] = {"filename": path, "error": error}
        probabilities = {}
        if readable:
            try:
                batch = labeler.probabilities(data for _, _, data in readable)
                probabilities = {i: p for (i, _, _), p in zip(readable, batch)}
            except tf.errors.InvalidArgumentError:
                # One bad image fails the batch: retry each image alone.
                for i, path, data in readable:
                    try:
                        probabilities[i] = labeler.probabilities([data])[0]
                    except tf.errors.InvalidArgumentError as e:
                        records[i] = {"filename": path, "error": _decode_error(e)}
        for i, p in probabilities.items():
            records[i] = _record(chunk[i][0], p, labeler.class_names, threshold, top_k,
                                 all_probabilities)
        yield from records


def predict_files(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16,
                  all_probabilities=False):
    """`iter_predictions` as a list."""
    return list(iter_predictions(saved_model_dir, paths, threshold, top_k, batch_size,
                                 all_probabilities))


def run(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16, output=None,
        all_probabilities=False, stdout=None, stderr=None):
    """Writes JSON lines for `paths`; returns the process exit code.

    0 when at least one image was labelled, 1 otherwise.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    out = open(output, "w", encoding="utf-8") if output else stdout
    labelled = failed = 0
    try:
        for record in iter_predictions(saved_model_dir, paths, threshold, top_k,
                                       batch_size, all_probabilities):
            out.write(json.dumps(record) + "\n")
            out.flush()
            if "error" in record:
                failed += 1
                stderr.write(f"warning: {record['filename']}: {record['error']}\n")
            else:
                labelled += 1
    finally:
        if output:
            out.close()
    stderr.write(f"Labelled {labelled} image(s), {failed} error(s)"
                 + (f"; wrote {output}" if output else "") + ".\n")
    return 0 if labelled else 1


def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("saved_model", None, "An export's version directory (or its "
                        "base directory: the highest version is used).", required=True)
    flags.DEFINE_float("threshold", None, "Label classes with probability >= threshold; "
                       "default the export's.")
    flags.DEFINE_integer("top_k", None, "Label the k most probable classes instead.")
    flags.DEFINE_integer("batch_size", 16, "Images per signature call.")
    flags.DEFINE_string("output", None, "Write the JSON lines here instead of stdout.")
    flags.DEFINE_bool("all_probabilities", False, "Add every class's probability.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one image file or directory.")
    f = flags.FLAGS
    try:
        code = run(f.saved_model, paths, f.threshold, f.top_k, f.batch_size, f.output,
                   f.all_probabilities)
    except ValueError as e:
        sys.exit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main)
