r"""Converts PASCAL VOC 2007 (a `VOCdevkit/VOC2007` folder) to TFRecords.

`convert` is the entry point: the ids of `ImageSets/Main/<split>.txt`, labels
from `Annotations/<id>.xml`, the 20 classes in alphabetical order; a class is
difficult for an image iff every object of it there is marked difficult.
Decisions: docs/data.md, Converters; malformed files: docs/reliability.md.

    python -m pipelines.voc_to_tfrecord --voc_dir=VOCdevkit/VOC2007 --split=trainval \
        --output_dir=data/voc2007
"""

import os
import xml.etree.ElementTree as ElementTree

from pipelines.records import image_paths
from pipelines.records import shard_writer
from pipelines.utils import files

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_SPLITS = ("trainval", "test", "train", "val")


def read_annotation(xml_path):
    """Reads one VOC annotation.

    Args:
        xml_path: `Annotations/<id>.xml`.

    Returns:
        `(labels, difficult, num_objects, num_difficult_objects)`: sorted
        class ids present, sorted class ids whose objects are all difficult,
        and object counts.

    Raises:
        ValueError: the file is missing or malformed, or names an unknown
            class.
    """
    files.check_input_file(xml_path, "annotation")
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as e:
        raise ValueError(
            f"annotation {xml_path} is not valid XML: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read annotation {xml_path}: "
                         f"{e.strerror or e}") from None
    # Per class: does a non-difficult object exist? (False: the class is difficult.)
    has_easy = {}
    num_difficult = 0
    objects = root.findall("object")
    for obj in objects:
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"annotation {xml_path}: unknown class {name!r}")
        text = (obj.findtext("difficult") or "0").strip() or "0"
        if text not in ("0", "1"):
            raise ValueError(f"annotation {xml_path}: <difficult> is {text!r}, "
                             "expected 0 or 1")
        is_difficult = text == "1"
        num_difficult += is_difficult
        class_id = VOC_CLASSES.index(name)
        has_easy[class_id] = has_easy.get(class_id, False) or not is_difficult
    labels = sorted(has_easy)
    difficult = sorted(c for c, easy in has_easy.items() if not easy)
    return labels, difficult, len(objects), num_difficult


def read_split_ids(list_file):
    """Reads `ImageSets/Main/<split>.txt`: the first word of each line.

    Returns:
        List of `(line_number, image_id)`.

    Raises:
        ValueError: naming the file and line: not UTF-8, an id that is not
            a plain file stem, a repeated id, or no id at all.
    """
    files.check_input_file(list_file, "VOC split file")
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"VOC split file {list_file} is not UTF-8: {e}"
                         ) from None
    ids = []
    first = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if (image_id in (".", "..") or os.sep in image_id
                or "/" in image_id or "\0" in image_id):
            raise ValueError(f"{list_file}, line {number}: image id "
                             f"{image_id!r} is not a plain file name")
        if image_id in first:
            raise ValueError(f"{list_file}, line {number}: image id "
                             f"{image_id} already listed on line "
                             f"{first[image_id]}")
        first[image_id] = number
        ids.append((number, image_id))
    if not ids:
        raise ValueError(f"VOC split file {list_file} lists no image")
    return ids


def _check_voc_dir(voc_dir, split):
    """Returns the split file and the image folder of a VOC tree."""
    if split not in VOC_SPLITS:
        raise ValueError(f"split {split!r} must be one of {VOC_SPLITS}")
    if not os.path.isdir(voc_dir):
        raise ValueError(f"voc_dir {voc_dir} is not a directory")
    list_file = os.path.join(voc_dir, "ImageSets", "Main", split + ".txt")
    image_dir = os.path.join(voc_dir, "JPEGImages")
    for path, what in ((list_file, "file"), (image_dir, "directory"),
                       (os.path.join(voc_dir, "Annotations"), "directory")):
        exists = os.path.isfile if what == "file" else os.path.isdir
        if not exists(path):
            raise ValueError(f"VOC {what} {path} does not exist (is voc_dir "
                             "the VOC2007 folder inside VOCdevkit?)")
    return list_file, image_dir


def convert(voc_dir, split, output_dir, num_shards=4, num_workers=None,
            overwrite=False, limits=None, allow_paths_outside_image_dir=False,
            progress=None):
    """Converts one VOC split to sharded TFRecords.

    Args:
        voc_dir: `.../VOCdevkit/VOC2007`.
        split: one of `VOC_SPLITS`; also the output split name.
        output_dir: where shards, labels.txt and the report go.
        num_shards: number of shard files.
        num_workers: processes reading images (default: see `write_split`).
        overwrite: replace an existing split in output_dir.
        limits: `image_files.ImageLimits` (default: the defaults).
        allow_paths_outside_image_dir: accept images whose real path is
            outside JPEGImages (symlinks).
        progress: a `pipelines.utils.progress.Progress`, or None (silent).

    Returns:
        The report dict (also `<output_dir>/<split>_report.json`).

    Raises:
        ValueError: bad split, missing VOC folders/files, a bad or repeated
            id, malformed XML, an image outside JPEGImages, existing output
            without overwrite, or an output that cannot be written.
    """
    list_file, image_dir = _check_voc_dir(voc_dir, split)
    paths = image_paths.ImagePaths(image_dir, allow_paths_outside_image_dir)
    records = []
    num_objects = num_difficult_objects = 0
    for line, image_id in read_split_ids(list_file):
        labels, difficult, n, n_difficult = read_annotation(
            os.path.join(voc_dir, "Annotations", image_id + ".xml"))
        num_objects += n
        num_difficult_objects += n_difficult
        records.append(shard_writer.ImageRecord(
            path=paths.resolve(image_id + ".jpg", f"{list_file}, line {line}"),
            filename=image_id + ".jpg",
            labels=tuple(labels), difficult=tuple(difficult)))
    extra = {
        "source": "voc",
        "voc_dir": os.path.abspath(voc_dir),
        "num_objects": num_objects,
        "num_difficult_objects": num_difficult_objects,
    }
    return shard_writer.write_split(
        records, output_dir, split, list(VOC_CLASSES), num_shards,
        num_workers=num_workers, overwrite=overwrite, extra_report=extra,
        limits=limits, progress=progress)
