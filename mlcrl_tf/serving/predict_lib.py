"""Labelling image files with an export: what `mlcrl_tf.predict` does.

`iter_predictions` gives one dict per image, `run` writes them as JSON lines;
a bad file gets an error line, never stops the run (docs/serving.md,
Labelling files; docs/reliability.md, predict and visualize).
"""

import contextlib
import math
import os
import sys

import numpy as np

from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import onnx_client
from mlcrl_tf.serving import onnx_export
from mlcrl_tf.serving import request_checks
from pipelines.records import image_files
from pipelines.utils import files
from pipelines.utils import output_checks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# An --output with one of these would replace a picture with JSON lines.
_PICTURE_EXTENSIONS = IMAGE_EXTENSIONS + (".tif", ".tiff", ".heic", ".heif", ".avif",
                                          ".jxl", ".ico")
DEFAULT_MAX_IMAGE_BYTES = image_files.DEFAULT_MAX_IMAGE_BYTES


def _file_problem(path):
    """Why `path` cannot be read as an image file (from stat; it is never
    opened here), or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        kind = "broken symbolic link" if os.path.islink(path) else "no such file"
        return f"{kind} or directory"
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    kind = files.special_file_kind(info.st_mode)
    return f"not a regular file ({kind}), not read" if kind else None


def _walk(top, found, seen_dirs):
    """Appends (image path, None) or (directory, error) of a tree to `found`:
    depth-first, sorted, symlinks followed, each real directory once."""
    stack = [top]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as e:
            found.append((directory, f"cannot list the directory: {e.strerror or e}"))
            continue
        subdirectories = []
        for entry in entries:
            if _is_directory(entry):
                subdirectories.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((entry.path, None))
        stack.extend(reversed(subdirectories))


def _is_directory(entry):
    try:
        return entry.is_dir()  # Follows symlinks.
    except OSError:
        return False


def search_images(paths):
    """Expands files and directories into image paths, each real file once.

    Args:
        paths: file or directory paths. Directories are walked recursively
            for `IMAGE_EXTENSIONS` files (sorted, symlinks followed, each real
            directory once); files are kept as given, whatever their name.

    Returns:
        (found, duplicates): `found` is a list of (path, error) pairs, error
        None or why the path cannot be read (missing, not a regular file);
        `duplicates` lists the paths skipped because an earlier path names
        the same real file.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    found, seen_dirs = [], set()
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            _walk(path, found, seen_dirs)
        else:
            found.append((path, None))
    found, duplicates = files.unique_real_paths(found, key=lambda entry: entry[0])
    found = [(path, error or _file_problem(path)) for path, error in found]
    return found, [path for path, _ in duplicates]


def find_images(paths):
    """`search_images` without the duplicates: a list of (path, error)."""
    return search_images(paths)[0]


def check_output(output, found, overwrite=False):
    """Refuses an `--output` that would destroy an input or a file.

    Args:
        output: the JSON-lines file to write.
        found: `search_images`'s (path, error) pairs.
        overwrite: replace an existing file.

    Raises:
        ValueError: an image extension, one of the inputs (by real path), an
            existing file without `overwrite`, a directory, or a location
            that cannot be created or written.
    """
    if output.lower().endswith(_PICTURE_EXTENSIONS):
        raise ValueError(f"--output={output!r} has an image file extension: it would be "
                         "replaced by JSON lines; name the output e.g. preds.jsonl.")
    real = os.path.realpath(output)
    for path, _ in found:
        if os.path.realpath(path) == real:
            raise ValueError(f"--output={output!r} is one of the input files ({path}).")
    if files.exists(output) and not overwrite:
        raise ValueError(f"--output={output!r} already exists; pass --overwrite to "
                         "replace it.")
    output_checks.ensure_output_file(output, "output")


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
              "scores": [_score(probabilities[i]) for i in chosen]}
    if all_probabilities:
        record["probabilities"] = {name: _score(p)
                                   for name, p in zip(class_names, probabilities)}
    return record


def _score(probability):
    """Rounded for the JSON line (a NaN, of a model that outputs NaN, is null there)."""
    return round(float(probability), 6)


def iter_predictions(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16,
                     all_probabilities=False, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
                     model_format="saved_model"):
    """One dict per image path, in order (see the module docstring).

    The arguments are checked and the export loaded by this call, before
    any image is read; the images are then read and scored as the returned
    iterator is consumed.

    Args:
        saved_model_dir: an export version directory (or its base directory).
        paths: image files and/or directories, or `search_images`'s found
            (path, error) pairs.
        threshold: label when probability >= threshold; default the export's.
        top_k: label the k most probable classes instead.
        batch_size: images read and scored together (sent in requests of at
            most the export's `max_batch_size`).
        all_probabilities: add every class's probability to each record.
        max_image_bytes: larger files get an error line, unread.
        model_format: "saved_model", or "onnx" to score with the export's
            `onnx/model.onnx` in onnxruntime (the same decoding and labels).

    Returns:
        An iterator of {"filename", "labels", "scores"[, "probabilities"]}
        or {"filename", "error"}.

    Raises:
        ValueError: bad arguments or not an mlcrl_tf export.
    """
    for name, value in (("batch_size", batch_size), ("max_image_bytes", max_image_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if model_format not in onnx_export.FORMATS:
        raise ValueError(f"format={model_format!r} is unknown; choose one of "
                         f"{', '.join(onnx_export.FORMATS)}.")
    client = (onnx_client.OnnxClient(saved_model_dir) if model_format == "onnx"
              else export_client.ExportClient(saved_model_dir))
    _check_choice(threshold, top_k, len(client.class_names))
    if threshold is None and top_k is None:
        threshold = client.threshold
    found = list(paths) if _is_found(paths) else find_images(paths)
    labelling = (threshold, top_k, all_probabilities)
    return _predictions(client, found, labelling, batch_size, max_image_bytes)


def _predictions(client, found, labelling, batch_size, max_image_bytes):
    """`iter_predictions`'s records of the `found` (path, error) pairs;
    `labelling` is (threshold, top_k, all_probabilities)."""
    for start in range(0, len(found), batch_size):
        records, readable = _read_chunk(found[start:start + batch_size], max_image_bytes)
        kept, logits, problems = client.score([data for _, _, data in readable])
        for problem in problems:
            i, path, _ = readable[problem.index]
            records[i] = {"filename": path, "error": _problem_text(problem.reason)}
        for k, row in zip(kept, logits):
            i, path, _ = readable[k]
            records[i] = _record(path, row, client.class_names, *labelling)
        yield from records


def _problem_text(reason):
    undecodable = (request_checks.EMPTY, request_checks.UNKNOWN_FORMAT, request_checks.CORRUPT)
    return f"not a decodable image: {reason}" if reason in undecodable else reason


def _is_found(paths):
    return (isinstance(paths, list) and bool(paths)
            and all(isinstance(p, tuple) and len(p) == 2 for p in paths))


def _read_chunk(chunk, max_image_bytes):
    """Error records for unreadable files; (index, path, bytes) for the rest."""
    records, readable = [None] * len(chunk), []
    for i, (path, error) in enumerate(chunk):
        if error is None:
            try:
                readable.append((i, path, image_files.read_image_file(path,
                                                                       max_image_bytes)))
            except image_files.ImageError as e:
                error = e.reason
        if error is not None:
            records[i] = {"filename": path, "error": error}
    return records, readable


def predict_files(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16,
                  all_probabilities=False, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
                  model_format="saved_model"):
    """`iter_predictions` as a list."""
    return list(iter_predictions(saved_model_dir, paths, threshold, top_k, batch_size,
                                 all_probabilities, max_image_bytes, model_format))


def run(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16, output=None,
        all_probabilities=False, stdout=None, stderr=None, overwrite=False,
        max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, progress=None, model_format="saved_model"):
    """Writes JSON lines for `paths`; returns the process exit code.

    `output` is checked (`check_output`) before any image is read, and
    created only once the export has loaded and the options are checked (a
    bad `saved_model_dir` leaves no file behind); an optional
    `pipelines.utils.progress.Progress` counts the images.

    Returns:
        0 when at least one image was labelled, 1 otherwise.

    Raises:
        ValueError: bad arguments, a refused or unwritable `output` (also
            when a write fails, e.g. a full disk), not an export.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    found, duplicates = search_images(paths)
    if output:
        check_output(output, found, overwrite)
    # The export and the options are checked before `output` is created.
    records = iter_predictions(saved_model_dir, found, threshold, top_k, batch_size,
                               all_probabilities, max_image_bytes, model_format)
    if progress is not None:
        progress.start(total=len(found))
    try:
        with (files.atomic_output(output) if output
              else contextlib.nullcontext(stdout)) as out:
            labelled, failed = _write_records(records, out, stderr, progress)
    except files.IO_ERRORS as e:
        where = f"--output={output!r}" if output else "the standard output"
        raise ValueError(f"{where}: cannot write: {files.error_text(e)}") from None
    stderr.write(f"Labelled {labelled} image(s), {failed} error(s)"
                 + (f", {len(duplicates)} duplicate path(s) skipped" if duplicates else "")
                 + (f"; wrote {output}" if output else "") + ".\n")
    return 0 if labelled else 1


def _write_records(records, out, stderr, progress=None):
    """Writes JSON lines; returns (labelled, failed) counts."""
    labelled = failed = 0
    for record in records:
        out.write(files.strict_json(record) + "\n")
        out.flush()
        if progress is not None:
            progress.update(1)
        if "error" in record:
            failed += 1
            stderr.write(f"warning: {record['filename']}: {record['error']}\n")
        else:
            labelled += 1
    return labelled, failed
