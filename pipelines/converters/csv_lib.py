r"""Converts your own labelled images, listed in a CSV file, to TFRecords.

`convert` is the entry point. A row is `filename,label1|label2`; the classes
come from `--classes` (names or a labels.txt) or are the sorted set of the
CSV's labels. The format in full and the decisions: docs/data.md, Converters.

    python -m pipelines.csv_to_tfrecord --csv=my_data/train.csv --image_dir=my_data/images \
        --output_dir=data/my_data --split=train
"""

import csv
import os

from absl import logging

from pipelines.records import image_paths
from pipelines.records import label_maps
from pipelines.records import shard_writer
from pipelines.utils import files


def parse_classes(classes):
    """Returns the class names `--classes` gives, or None.

    Args:
        classes: None, a list of names, the path of a labels.txt-style file
            (line i = name of class id i), or a comma-separated string.

    Raises:
        ValueError: empty or repeated names, or an unreadable labels file.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        if os.path.isfile(classes):
            return label_maps.read_class_names(classes)
        names = [name.strip() for name in classes.split(",")]
    else:
        names = [str(name).strip() for name in classes]
    if not names or "" in names:
        raise ValueError(f"classes {classes!r}: empty class name (give a "
                         "comma-separated list or an existing labels file)")
    return label_maps.check_class_names(names, f"classes {classes!r}")


def _parse_row(row, where):
    """Returns `(filename, label names)` of one data row."""
    if len(row) != 2:
        raise ValueError(f"{where}: expected 2 columns 'filename,labels', got "
                         f"{len(row)}")
    filename = row[0].strip()
    if not filename:
        raise ValueError(f"{where}: empty filename")
    names = sorted({name.strip() for name in row[1].split("|")} - {""})
    for name in names:
        problem = label_maps.class_name_problem(name)
        if problem:
            raise ValueError(f"{where}: label {name!r} {problem}")
    return filename, names


def _csv_rows(csv_path):
    """Yields `(line_number, row)` of the non-blank rows (the line where
    the row starts: a quoted field may hold line breaks)."""
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        line = 1
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield line, row
                line = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"{csv_path}, line {line}: {e} "
                             "(a field over 128 KB, or a quote left open?)"
                             ) from None
        except UnicodeDecodeError as e:
            raise ValueError(f"CSV file {csv_path} is not UTF-8 text: {e}"
                             ) from None


def read_csv(csv_path):
    """Reads the CSV (format: docs/data.md, Converters).

    Args:
        csv_path: the CSV file.

    Returns:
        List of `(line_number, filename, label_names)`.

    Raises:
        ValueError: naming the file and line: missing or unreadable file,
            bad row or label, repeated filename.
    """
    files.check_input_file(csv_path, "CSV file")
    rows = []
    first_line = {}  # filename -> line number
    header_allowed = True
    for line, row in _csv_rows(csv_path):
        is_header = len(row) == 2 and [row[0].strip().lower(),
                                       row[1].strip().lower()] == [
                                           "filename", "labels"]
        if header_allowed and is_header:
            header_allowed = False
            continue
        header_allowed = False
        filename, names = _parse_row(row, f"{csv_path}, line {line}")
        if filename in first_line:
            raise ValueError(f"{csv_path}, line {line}: {filename} "
                             f"already listed on line "
                             f"{first_line[filename]}")
        first_line[filename] = line
        rows.append((line, filename, names))
    if not rows:
        raise ValueError(f"CSV file {csv_path} lists no image")
    return rows


def _is_header(row, other_rows, image_dir, class_names):
    """Whether the first row is a header spelt otherwise than `filename,labels`
    (e.g. `file_name,classes`): it names no file of the image folder, its
    first field has no file extension (an image name has one), and its label
    names are no class (of `class_names`, or of the other rows)."""
    _, filename, names = row
    if (not names or os.path.splitext(filename)[1]
            or os.path.exists(os.path.join(image_dir, filename))):
        return False
    known = (set(class_names) if class_names is not None
             else {name for _, _, others in other_rows for name in others})
    return not set(names) & known


def _without_header(rows, csv_path, image_dir, class_names):
    """`rows` without a first row that is a header by its content (logged)."""
    if rows and rows[0][0] == 1 and _is_header(rows[0], rows[1:], image_dir, class_names):
        line, filename, names = rows[0]
        logging.warning("%s, line 1 (%s,%s) is read as a header: no file %s in %s, and "
                        "%s no class of the data.", csv_path, filename, "|".join(names),
                        filename, image_dir, "is" if len(names) == 1 else "are")
        return rows[1:]
    return rows


def _records(rows, csv_path, image_dir, class_names,
             allow_paths_outside_image_dir):
    """The `ImageRecord`s of the CSV rows (paths resolved and checked)."""
    paths = image_paths.ImagePaths(image_dir, allow_paths_outside_image_dir)
    class_id = {name: i for i, name in enumerate(class_names)}
    records = []
    for line, filename, names in rows:
        for name in names:
            if name not in class_id:
                raise ValueError(f"unknown class {name!r} in {csv_path}, line "
                                 f"{line} (not among the {len(class_names)} "
                                 "given classes)")
        records.append(shard_writer.ImageRecord(
            path=paths.resolve(filename, f"{csv_path}, line {line}"),
            filename=filename,
            labels=tuple(sorted(class_id[name] for name in names))))
    return records


def convert(csv_path, image_dir, output_dir, classes=None, split="train",
            num_shards=4, num_workers=None, overwrite=False, limits=None,
            allow_paths_outside_image_dir=False, progress=None):
    """Converts the images listed in a CSV to sharded TFRecords.

    Args:
        csv_path: the CSV file (format: docs/data.md, Converters).
        image_dir: folder the CSV's filenames are relative to.
        output_dir: where shards, labels.txt and the report go.
        classes: class names (list, comma-separated string or labels-file
            path); None infers the sorted set of names in the CSV.
        split: output split name.
        num_shards: number of shard files.
        num_workers: processes reading images (default: see `write_split`).
        overwrite: replace an existing split in output_dir.
        limits: `image_files.ImageLimits` (default: the defaults).
        allow_paths_outside_image_dir: accept absolute filenames and names
            resolving outside image_dir.
        progress: a `pipelines.utils.progress.Progress`, or None (silent).

    Returns:
        The report dict (also `<output_dir>/<split>_report.json`).

    Raises:
        ValueError: missing CSV / image dir, bad row, unknown class, a path
            outside image_dir or naming another row's file, existing output
            without overwrite, labels.txt mismatch, or an output that
            cannot be written.
    """
    class_names = parse_classes(classes)
    rows = read_csv(csv_path)
    if not os.path.isdir(image_dir):
        raise ValueError(f"image_dir {image_dir} is not a directory")
    rows = _without_header(rows, csv_path, image_dir, class_names)
    if class_names is None:
        class_names = sorted({name for _, _, names in rows for name in names})
        if not class_names:
            raise ValueError(f"CSV file {csv_path} has no labels at all and "
                             "no classes were given")
    records = _records(rows, csv_path, image_dir, class_names,
                       allow_paths_outside_image_dir)
    extra = {
        "source": "csv",
        "csv_path": os.path.abspath(csv_path),
        "image_dir": os.path.abspath(image_dir),
        "classes_inferred": classes is None,
    }
    return shard_writer.write_split(
        records, output_dir, split, class_names, num_shards,
        num_workers=num_workers, overwrite=overwrite, extra_report=extra,
        limits=limits, progress=progress)
