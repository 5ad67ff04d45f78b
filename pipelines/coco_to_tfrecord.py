r"""python -m pipelines.coco_to_tfrecord --annotations=coco/annotations/instances_train2014.json --image_dir=coco/train2014 --output_dir=data/coco

Converts MS-COCO 2014 (`instances_{train,val}2014.json` + an image folder)
into the mlcrl_tf TFRecord schema (see `pipelines/tfrecord_lib.py`).

* Classes: the file's categories sorted by category id (COCO 2014: 80 classes,
  ids 1..90 with gaps); class id = position in that order, names from the
  JSON. They are written to `labels.txt`.
* Labels: an image is positive for every category of its annotations.
  Objects with `iscrowd=1` count too (they are instances of the class, just
  drawn as one region), as in ML-GCN and ASL.
* Images without any annotation are dropped (as ML-GCN and ASL do) and
  counted as `dropped_unannotated` in `<split>_report.json`.
* `--split` defaults to the file name's part after `instances_`
  (`instances_val2014.json` -> `val2014`), else "train".
* Unreadable images are skipped and listed in the report; EXIF-rotated
  photos are stored upright (see tfrecord_lib).
"""

import json
import os
import re
import sys

from absl import app
from absl import flags

from pipelines import tfrecord_lib


def default_split(annotations_file):
    """`.../instances_train2014.json` -> "train2014"; otherwise "train"."""
    match = re.match(r"^instances_(.+)\.json$",
                     os.path.basename(annotations_file))
    return match.group(1) if match else "train"


def load_annotations(annotations_file):
    """Reads a COCO instances file.

    Args:
        annotations_file: path of `instances_*.json`.

    Returns:
        `(class_names, category_ids, images, labels, stats)`: class names and
        COCO category ids in class-id order, the file's `(image id,
        file_name)` pairs sorted by id, a dict image id -> set of class ids,
        and annotation counts.

    Raises:
        ValueError: the file is missing, not JSON or not a COCO instances file.
    """
    if not os.path.isfile(annotations_file):
        raise ValueError(f"annotations file {annotations_file} does not exist")
    try:
        with open(annotations_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotations file {annotations_file} is not valid "
                         f"JSON: {e}") from None
    if not isinstance(data, dict) or not all(
            key in data for key in ("images", "annotations", "categories")):
        raise ValueError(f"annotations file {annotations_file} is not a COCO "
                         "instances file (needs 'images', 'annotations' and "
                         "'categories')")
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        category_ids = [int(c["id"]) for c in categories]
        class_names = [str(c["name"]).strip() for c in categories]
        images = sorted((int(image["id"]), str(image["file_name"]))
                        for image in data["images"])
        image_ids = {image_id for image_id, _ in images}
        class_of = {cid: i for i, cid in enumerate(category_ids)}
        labels = {}
        num_crowd = 0
        for annotation in data["annotations"]:
            image_id = int(annotation["image_id"])
            category_id = int(annotation["category_id"])
            if category_id not in class_of:
                raise ValueError(f"annotations file {annotations_file}: "
                                 f"annotation {annotation.get('id')} has "
                                 f"unknown category_id {category_id}")
            if image_id not in image_ids:
                raise ValueError(f"annotations file {annotations_file}: "
                                 f"annotation {annotation.get('id')} has "
                                 f"unknown image_id {image_id}")
            num_crowd += bool(annotation.get("iscrowd", 0))
            labels.setdefault(image_id, set()).add(class_of[category_id])
    except (KeyError, TypeError) as e:
        raise ValueError(f"annotations file {annotations_file}: malformed "
                         f"entry (missing or bad {e})") from None
    stats = {"num_annotations": len(data["annotations"]),
             "num_crowd_annotations": num_crowd}
    return class_names, category_ids, images, labels, stats


def convert(annotations_file, image_dir, output_dir, split=None, num_shards=8,
            num_workers=None, overwrite=False):
    """Converts one COCO split to sharded TFRecords.

    Args:
        annotations_file: `instances_*.json`.
        image_dir: folder holding the images named in the file.
        output_dir: where shards, labels.txt and the report go.
        split: split name; default from the annotations file name.
        num_shards: number of shard files.
        num_workers: writer processes (default: see `write_split`).
        overwrite: replace an existing split in output_dir.

    Returns:
        The report dict (also `<output_dir>/<split>_report.json`).

    Raises:
        ValueError: missing/bad annotations file or image dir, existing
            output without overwrite, or a labels.txt mismatch.
    """
    if not os.path.isdir(image_dir):
        raise ValueError(f"image_dir {image_dir} is not a directory")
    class_names, category_ids, images, labels, stats = load_annotations(
        annotations_file)
    split = split or default_split(annotations_file)
    records = [
        tfrecord_lib.ImageRecord(path=os.path.join(image_dir, file_name),
                                 filename=file_name,
                                 labels=tuple(sorted(labels[image_id])))
        for image_id, file_name in images if image_id in labels]
    extra = {
        "source": "coco",
        "annotations_file": os.path.abspath(annotations_file),
        "image_dir": os.path.abspath(image_dir),
        "category_ids": category_ids,
        "num_images_in_annotations": len(images),
        "dropped_unannotated": len(images) - len(records),
        **stats,
    }
    return tfrecord_lib.write_split(
        records, output_dir, split, class_names, num_shards,
        num_workers=num_workers, overwrite=overwrite, extra_report=extra)


def define_flags():
    """Defines this script's flags (only when run as a script)."""
    flags.DEFINE_string("annotations", None, "COCO instances_*.json file.",
                        required=True)
    flags.DEFINE_string("image_dir", None, "Folder of the split's images.",
                        required=True)
    flags.DEFINE_string("split", None, "Split name (default: from the "
                        "annotations file name, e.g. train2014).")
    tfrecord_lib.define_writer_flags(num_shards=8)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        report = convert(f.annotations, f.image_dir, f.output_dir,
                         split=f.split, num_shards=f.num_shards,
                         num_workers=f.num_workers, overwrite=f.overwrite)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(tfrecord_lib.format_summary(report, f.output_dir)
          + f"; {report['dropped_unannotated']} unannotated images dropped")


if __name__ == "__main__":
    define_flags()
    app.run(main)
