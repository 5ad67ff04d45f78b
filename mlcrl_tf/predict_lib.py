"""Labels image files with an export (the `mlcrl_tf.predict` command line).

`iter_predictions(saved_model, paths)` yields one dict per image; `run`
writes them as JSON lines. Each line is `{"filename": ..., "labels": [...], "scores": [...]}` (labels
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
  most probable classes; not both. Both are decided on the export's logits
  (float32 probabilities saturate at 1.0); the scores shown are their
  float64 sigmoid.
- Directories are walked recursively (sorted, symlinks followed) for
  `.jpg .jpeg .png .gif .bmp .webp` files, case-insensitive; a file named on
  the command line is tried whatever its extension.
- A bad file never aborts the run: unreadable files are reported before
  batching; since the signature fails a whole batch when one element cannot
  be decoded, a failing batch is retried image by image
  (`serving.ExportClient.score`) and only the bad images get an error line
  (also written to stderr). The exit code is non-zero only if no image could
  be labelled.
"""

import json
import math
import os
import sys

import numpy as np

from mlcrl_tf import serving

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


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


def _check_choice(threshold, top_k, num_classes):
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold or top_k, not both.")
    if threshold is not None and (isinstance(threshold, bool) or not (0.0 < threshold < 1.0)):
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= num_classes):
        raise ValueError(f"top_k must be an integer in [1, {num_classes}], got {top_k!r}.")


def _record(path, logits, class_names, threshold, top_k, all_probabilities):
    logits = np.asarray(logits, np.float64)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    order = np.argsort(-logits, kind="stable")
    if top_k is not None:
        chosen = order[:top_k]
    else:
        cut = math.log(threshold) - math.log1p(-threshold)  # probability >= threshold
        chosen = [i for i in order if logits[i] >= cut]
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
    client = serving.ExportClient(saved_model_dir)
    _check_choice(threshold, top_k, len(client.class_names))
    if threshold is None and top_k is None:
        threshold = client.threshold
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
        kept, logits, problems = client.score([data for _, _, data in readable])
        for problem in problems:
            i, path, _ = readable[problem.index]
            records[i] = {"filename": path,
                          "error": f"not a decodable image: {problem.reason}"}
        for k, row in zip(kept, logits):
            i, path, _ = readable[k]
            records[i] = _record(path, row, client.class_names, threshold, top_k,
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
