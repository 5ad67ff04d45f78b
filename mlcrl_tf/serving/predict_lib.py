"""Labels image files with an export (the `mlcrl_tf.predict` command line).

`iter_predictions(saved_model, paths)` gives one dict per image; `run`
writes them as JSON lines. Each line is
`{"filename": ..., "labels": [...], "scores": [...]}` (labels sorted by
decreasing score; with --all_probabilities also `probabilities`, a name ->
probability map; strict JSON, a NaN probability is null), or
`{"filename": ..., "error": ...}` for a file that could not be read or
decoded.

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
  the command line is tried whatever its extension. Each real directory is
  walked once (symlink loops such as `ln -s . l` end there), and each real
  file is labelled once: a second path to it (a symlink, `./a.jpg`, a path
  given twice) is skipped and counted in the summary.
- Only regular files are read, opened without blocking and checked on the
  open descriptor (`tfrecord_lib.read_image_file`): a FIFO, a device, a
  socket, a file larger than `max_image_bytes` (default 256 MiB) gets an
  error line with the reason, never a hang.
- Images above the export's pixel budget (`max_image_pixels` in its
  metadata) get an error line from their header, without being sent;
  requests hold at most the export's `max_batch_size` images.
- `--output` is checked before any image is read: it must not have an image
  extension, be one of the inputs (compared by real path) or exist (unless
  `overwrite`); its directory is created if missing and must be writable.
  The file itself is created only once the export has loaded and the
  options are checked, so a bad `--saved_model` leaves none behind. A write
  that fails (a full disk) is one error naming the file.
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
import stat
import sys

import numpy as np

from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import request_checks
from pipelines.records import image_files
from pipelines.utils import files
from pipelines.utils import output_checks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# An --output with one of these would replace a picture with JSON lines.
_PICTURE_EXTENSIONS = IMAGE_EXTENSIONS + (".tif", ".tiff", ".heic", ".heif", ".avif",
                                          ".jxl", ".ico")
DEFAULT_MAX_IMAGE_BYTES = image_files.DEFAULT_MAX_IMAGE_BYTES
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class _Search:
    """Image paths found so far, each real file and real directory once."""

    def __init__(self):
        self.found, self.duplicates = [], []
        self._files, self._dirs = set(), set()

    def add_file(self, path):
        """Adds a file (checked with stat, never opened) or its problem."""
        try:
            info = os.stat(path)
        except FileNotFoundError:
            kind = "broken symbolic link" if os.path.islink(path) else "no such file"
            self.found.append((path, f"{kind} or directory"))
            return
        except OSError as e:
            self.found.append((path, f"cannot read: {e.strerror or e}"))
            return
        if not stat.S_ISREG(info.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(info.st_mode)), "special")
            self.found.append((path, f"not a regular file ({kind}), not read"))
            return
        real = os.path.realpath(path)
        if real in self._files:
            self.duplicates.append(path)
        else:
            self._files.add(real)
            self.found.append((path, None))

    def walk(self, top):
        """Depth-first, sorted, symlinks followed, each real directory once."""
        stack = [top]
        while stack:
            directory = stack.pop()
            real = os.path.realpath(directory)
            if real in self._dirs:
                continue
            self._dirs.add(real)
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as e:
                self.found.append((directory,
                                   f"cannot list the directory: {e.strerror or e}"))
                continue
            subdirectories = []
            for entry in entries:
                if _is_directory(entry):
                    subdirectories.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    self.add_file(entry.path)
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
    search = _Search()
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            search.walk(path)
        else:
            search.add_file(path)
    return search.found, search.duplicates


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
    if os.path.lexists(output) and not overwrite:
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
    """Rounded for the JSON line; NaN (a model that outputs NaN) as None."""
    return round(float(probability), 6) if math.isfinite(probability) else None


def iter_predictions(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16,
                     all_probabilities=False, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
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

    Returns:
        An iterator of {"filename", "labels", "scores"[, "probabilities"]}
        or {"filename", "error"}.

    Raises:
        ValueError: bad arguments or not an mlcrl_tf export.
    """
    for name, value in (("batch_size", batch_size), ("max_image_bytes", max_image_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    client = export_client.ExportClient(saved_model_dir)
    _check_choice(threshold, top_k, len(client.class_names))
    if threshold is None and top_k is None:
        threshold = client.threshold
    files = list(paths) if _is_found(paths) else find_images(paths)
    labelling = (threshold, top_k, all_probabilities)
    return _predictions(client, files, labelling, batch_size, max_image_bytes)


def _predictions(client, files, labelling, batch_size, max_image_bytes):
    """`iter_predictions`'s records; `labelling` is (threshold, top_k,
    all_probabilities)."""
    for start in range(0, len(files), batch_size):
        records, readable = _read_chunk(files[start:start + batch_size], max_image_bytes)
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
                  all_probabilities=False, max_image_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """`iter_predictions` as a list."""
    return list(iter_predictions(saved_model_dir, paths, threshold, top_k, batch_size,
                                 all_probabilities, max_image_bytes))


def run(saved_model_dir, paths, threshold=None, top_k=None, batch_size=16, output=None,
        all_probabilities=False, stdout=None, stderr=None, overwrite=False,
        max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, progress=None):
    """Writes JSON lines for `paths`; returns the process exit code.

    `output` is checked (`check_output`) before any image is read, and
    created only once the export has loaded and the options are checked (a
    bad `saved_model_dir` leaves no file behind); an optional
    `pipelines.progress.Progress` counts the images.

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
                               all_probabilities, max_image_bytes)
    if progress is not None:
        progress.start(total=len(found))
    try:
        out = open(output, "w", encoding="utf-8") if output else stdout
        try:
            labelled, failed = _write_records(records, out, stderr, progress)
        finally:
            if output:
                out.close()
    except OSError as e:
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
        out.write(json.dumps(record, allow_nan=False) + "\n")
        out.flush()
        if progress is not None:
            progress.update(1)
        if "error" in record:
            failed += 1
            stderr.write(f"warning: {record['filename']}: {record['error']}\n")
        else:
            labelled += 1
    return labelled, failed
