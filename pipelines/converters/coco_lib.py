r"""Converts MS-COCO 2014 (`instances_*2014.json` and an image folder) to TFRecords.

`convert` is the entry point: the file's categories in id order are the
classes, an image is positive for the category of each of its annotations
(crowd ones too), and images without annotations are dropped and counted.
Decisions: docs/data.md, Converters; malformed files: docs/reliability.md.

    python -m pipelines.coco_to_tfrecord --annotations=coco/annotations/instances_train2014.json \
        --image_dir=coco/train2014 --output_dir=data/coco
"""

import json
import os
import re

from pipelines.records import image_paths
from pipelines.records import label_maps
from pipelines.records import shard_writer
from pipelines.utils import files


def default_split(annotations_file):
    """`.../instances_train2014.json` -> "train2014"; otherwise "train"."""
    match = re.match(r"^instances_(.+)\.json$",
                     os.path.basename(annotations_file))
    return match.group(1) if match else "train"


def _load_json(annotations_file):
    files.check_input_file(annotations_file, "annotations file")
    try:
        with open(annotations_file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotations file {annotations_file} is not valid "
                         f"JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"annotations file {annotations_file} is nested too "
                         "deeply to be a COCO instances file (Python's JSON "
                         "parser ran out of recursion depth)") from None
    except OSError as e:
        raise ValueError(f"cannot read annotations file {annotations_file}: "
                         f"{e.strerror or e}") from None


def _integer(value, what):
    """Returns `value` if it is a JSON integer, else raises ValueError naming
    `what` (a bool, a float, a string, 1e400, Infinity and NaN are not)."""
    if type(value) is not int:  # pylint: disable=unidiomatic-typecheck
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


def _entries(data, key, where):
    """`data[key]` as a list of dicts, or ValueError naming the entry."""
    entries = data[key]
    if not isinstance(entries, list):
        raise ValueError(f"{where}: '{key}' must be a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {key}[{i}] must be an object, got "
                             f"{entry!r:.80}")
    return entries


def _identified(data, key, where):
    """Yields `(label, entry, id)` for each entry of `data[key]`; `label`
    names it in errors, e.g. "images[3] (id 7)"."""
    for i, entry in enumerate(_entries(data, key, where)):
        entry_id = _integer(entry.get("id"), f"{where}: {key}[{i}] 'id'")
        yield f"{key}[{i}] (id {entry_id})", entry, entry_id


def _unique(seen, key, value, label, where):
    """Records that entry `label` has `key` = `value`; raises ValueError if
    another entry had it (`seen`: value -> label)."""
    if value in seen:
        raise ValueError(f"{where}: {label}: {key} {value!r} is also the "
                         f"{key} of {seen[value]}")
    seen[value] = label


def _categories(data, where):
    """Returns `(category_ids, class_names)` sorted by category id."""
    ids, names, pairs = {}, {}, []
    for label, category, category_id in _identified(data, "categories",
                                                    where):
        name = category.get("name")
        name = name.strip() if isinstance(name, str) else name
        problem = label_maps.class_name_problem(name)
        if problem:
            raise ValueError(f"{where}: {label}: name "
                             f"{category.get('name')!r} {problem}")
        _unique(ids, "id", category_id, label, where)
        _unique(names, "name", name, label, where)
        pairs.append((category_id, name))
    pairs.sort()
    return [c for c, _ in pairs], [name for _, name in pairs]


def _images(data, where):
    """Returns the `(image id, file_name, entry)` triples sorted by id;
    `entry` names the image in errors."""
    ids, file_names, images = {}, {}, []
    for label, image, image_id in _identified(data, "images", where):
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{where}: {label}: 'file_name' must be a "
                             f"non-empty string, got {file_name!r}")
        _unique(ids, "id", image_id, label, where)
        _unique(file_names, "file_name", file_name, label, where)
        images.append((image_id, file_name, f"{where}: {label}"))
    return sorted(images)


def _labels(data, where, class_of, image_ids):
    """Returns `(labels, num_crowd)`: image id -> set of class ids."""
    labels = {}
    num_crowd = 0
    for i, annotation in enumerate(_entries(data, "annotations", where)):
        entry = f"{where}: annotations[{i}] (id {annotation.get('id')!r})"
        image_id = _integer(annotation.get("image_id"), f"{entry} 'image_id'")
        category_id = _integer(annotation.get("category_id"),
                               f"{entry} 'category_id'")
        if category_id not in class_of:
            raise ValueError(f"{entry} has unknown category_id {category_id}")
        if image_id not in image_ids:
            raise ValueError(f"{entry} has unknown image_id {image_id}")
        crowd = annotation.get("iscrowd", 0)
        if type(crowd) is not int or crowd not in (0, 1):  # pylint: disable=unidiomatic-typecheck
            raise ValueError(f"{entry}: 'iscrowd' must be 0 or 1, got "
                             f"{crowd!r}")
        num_crowd += crowd
        labels.setdefault(image_id, set()).add(class_of[category_id])
    return labels, num_crowd


def load_annotations(annotations_file):
    """Reads and checks a COCO instances file.

    Args:
        annotations_file: path of `instances_*.json`.

    Returns:
        `(class_names, category_ids, images, labels, stats)`: class names and
        COCO category ids in class-id order, the file's `(image id,
        file_name, entry)` triples sorted by id (`entry` names the image in
        errors), a dict image id -> set of class ids, and annotation counts.

    Raises:
        ValueError: naming the file and the entry: the file is missing, not
            JSON, nested too deeply, not a COCO instances file, or has a
            non-integer or repeated id, a bad category name, an `iscrowd`
            other than 0/1, or an annotation of an unknown image/category.
    """
    data = _load_json(annotations_file)
    if not isinstance(data, dict) or not all(
            key in data for key in ("images", "annotations", "categories")):
        raise ValueError(f"annotations file {annotations_file} is not a COCO "
                         "instances file (needs 'images', 'annotations' and "
                         "'categories')")
    where = f"annotations file {annotations_file}"
    category_ids, class_names = _categories(data, where)
    images = _images(data, where)
    class_of = {cid: i for i, cid in enumerate(category_ids)}
    labels, num_crowd = _labels(data, where, class_of,
                                {image_id for image_id, _, _ in images})
    stats = {"num_annotations": len(data["annotations"]),
             "num_crowd_annotations": num_crowd}
    return class_names, category_ids, images, labels, stats


def convert(annotations_file, image_dir, output_dir, split=None, num_shards=8,
            num_workers=None, overwrite=False, limits=None,
            allow_paths_outside_image_dir=False, progress=None):
    """Converts one COCO split to sharded TFRecords.

    Args:
        annotations_file: `instances_*.json`.
        image_dir: folder holding the images named in the file.
        output_dir: where shards, labels.txt and the report go.
        split: split name; default from the annotations file name.
        num_shards: number of shard files.
        num_workers: processes reading images (default: see `write_split`).
        overwrite: replace an existing split in output_dir.
        limits: `image_files.ImageLimits` (default: the defaults).
        allow_paths_outside_image_dir: accept absolute file_names and names
            resolving outside image_dir.
        progress: a `pipelines.utils.progress.Progress`, or None (silent).

    Returns:
        The report dict (also `<output_dir>/<split>_report.json`).

    Raises:
        ValueError: missing/bad annotations file or image dir, an image
            name outside image_dir or naming another entry's file, existing
            output without overwrite, a labels.txt mismatch, or an output
            that cannot be written.
    """
    if not os.path.isdir(image_dir):
        raise ValueError(f"image_dir {image_dir} is not a directory")
    class_names, category_ids, images, labels, stats = load_annotations(
        annotations_file)
    split = split or default_split(annotations_file)
    paths = image_paths.ImagePaths(image_dir, allow_paths_outside_image_dir)
    records = [
        shard_writer.ImageRecord(path=paths.resolve(file_name, entry),
                                 filename=file_name,
                                 labels=tuple(sorted(labels[image_id])))
        for image_id, file_name, entry in images if image_id in labels]
    extra = {
        "source": "coco",
        "annotations_file": os.path.abspath(annotations_file),
        "image_dir": os.path.abspath(image_dir),
        "category_ids": category_ids,
        "num_images_in_annotations": len(images),
        "dropped_unannotated": len(images) - len(records),
        **stats,
    }
    return shard_writer.write_split(
        records, output_dir, split, class_names, num_shards,
        num_workers=num_workers, overwrite=overwrite, extra_report=extra,
        limits=limits, progress=progress)
