"""The "outfits" demo set: multi-label canvases of real Fashion-MNIST photos.

`generate` writes the canvases as JPEGs with COCO-format annotations and
converts them with the real COCO converter; `write_preview` draws a grid of
them. What a canvas is, the scenes, the visibility rule and the output layout:
docs/data.md, The outfits demo set.

    python -m pipelines.demo_dataset --output_dir=data/demo --preview=docs/demo_preview.png
"""

import colorsys
import io
import json
import os
import shutil
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from pipelines.converters import coco_lib
from pipelines.demo import fashion_mnist
from pipelines.utils import files

CLASS_NAMES = fashion_mnist.CLASS_NAMES
SCENES = {
    "summer": ("T-shirt/top", "Dress", "Sandal", "Bag"),
    "winter": ("Pullover", "Coat", "Ankle boot", "Trouser"),
    "sport": ("T-shirt/top", "Trouser", "Sneaker", "Bag"),
    "office": ("Shirt", "Trouser", "Bag", "Ankle boot"),
}
SCENE_PROBABILITY = 0.8   # an item comes from its scene's classes
REPEAT_PROBABILITY = 0.1  # an item repeats a class already on the canvas
MIN_ITEMS, MAX_ITEMS = 2, 4
DEFAULT_MIN_VISIBLE = 0.9
OCCLUDED_MIN_VISIBLE = 0.25
DEFAULT_SCALES = (0.9, 1.5)
OCCLUDED_SCALES = (1.1, 1.8)
REFERENCE_CANVAS = 96     # item scales are relative to this canvas size
JPEG_QUALITY = 95
NUM_SHARDS = {"train": 8, "test": 4}
SPLITS = ("train", "test")
_PLACEMENT_TRIES = 40
_SILHOUETTE_THRESHOLD = 8  # Fashion-MNIST background is 0


# --------------------------------------------------------------------------
# One item and one canvas.
# --------------------------------------------------------------------------

def silhouette(item):
    """28x28 uint8 item -> bool mask: bright pixels, enclosed holes filled.

    The background is the dark region connected to the image border; all
    the rest (including dark patches inside a garment) is the item.
    """
    dark = item <= _SILHOUETTE_THRESHOLD
    outside = np.zeros_like(dark)
    outside[0, :], outside[-1, :] = dark[0, :], dark[-1, :]
    outside[:, 0], outside[:, -1] = dark[:, 0], dark[:, -1]
    while True:  # grow the border's dark region through dark pixels
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= dark
        if (grown == outside).all():
            return ~outside
        outside = grown


def render_item(item, side):
    """Resizes a 28x28 item to `side` px: gray (float 0..255) and alpha (0..1).

    The generator and the tests use this one function, so the visibility in
    the annotations can be recomputed from `source_index` and `item_box`.
    """
    gray = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    mask = Image.fromarray(silhouette(item).astype(np.uint8) * 255)
    alpha = mask.resize((side, side), Image.BILINEAR)
    return (np.asarray(gray, np.float32),
            np.asarray(alpha, np.float32) / 255.0)


def _place(canvas_size, box):
    """Canvas slice and item slice of a square box [x, y, side, side]."""
    x, y, side, _ = box
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + side, canvas_size), min(y + side, canvas_size)
    if x1 <= x0 or y1 <= y0:
        return None
    return ((slice(y0, y1), slice(x0, x1)),
            (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)))


def visible_masks(alphas, boxes, canvas_size):
    """Per item (in paste order): its visible silhouette on the canvas.

    Args:
        alphas: list of (side, side) float alpha maps.
        boxes: list of [x, y, side, side] paste boxes.
        canvas_size: canvas side.

    Returns:
        (masks, fractions): bool (canvas, canvas) visible pixels per item, and
        visible pixels / silhouette pixels per item.
    """
    covered = np.zeros((canvas_size, canvas_size), bool)
    masks, fractions = [], []
    for alpha, box in zip(reversed(alphas), reversed(boxes)):
        mask = np.zeros_like(covered)
        where = _place(canvas_size, box)
        if where is not None:
            canvas_part, item_part = where
            mask[canvas_part] = alpha[item_part] >= 0.5
        visible = mask & ~covered
        covered |= mask
        masks.append(visible)
        fractions.append(visible.sum() / max((alpha >= 0.5).sum(), 1))
    return masks[::-1], fractions[::-1]


def _draw_classes(rng, num_items):
    """Scene name and the class ids of the items of one canvas."""
    scene = list(SCENES)[rng.integers(len(SCENES))]
    scene_ids = [CLASS_NAMES.index(name) for name in SCENES[scene]]
    classes = []
    for _ in range(num_items):
        if classes and rng.random() < REPEAT_PROBABILITY:
            classes.append(classes[rng.integers(len(classes))])
            continue
        pool = scene_ids if rng.random() < SCENE_PROBABILITY else range(10)
        pool = [c for c in pool if c not in classes] or [
            c for c in range(10) if c not in classes]
        classes.append(pool[rng.integers(len(pool))])
    return scene, classes


def _random_box(rng, canvas_size, side, occlusion, boxes):
    """A random paste box [x, y, side, side] for the next item."""
    if not occlusion or not boxes:
        if occlusion:  # may leave the canvas by up to half its side
            low, high = -side // 2, canvas_size - side // 2
        else:
            low, high = 0, canvas_size - side
        x, y = rng.integers(low, high + 1, size=2)
    else:  # near an existing item, so that they overlap
        bx, by, bside, _ = boxes[rng.integers(len(boxes))]
        cx, cy = (np.array([bx, by]) + bside / 2
                  + rng.uniform(-0.6, 0.6, size=2) * (bside + side) / 2)
        x, y = int(round(cx - side / 2)), int(round(cy - side / 2))
    return [int(x), int(y), side, side]


def make_canvas(rng, items, canvas_size, occlusion):
    """Composes one canvas from real items.

    Args:
        rng: `np.random.Generator` of this canvas.
        items: list of (class_id, source_index, 28x28 uint8 image).
        canvas_size: side in pixels.
        occlusion: the harder setting (docs/data.md, Visibility rule).

    Returns:
        (image uint8 (S, S, 3), pasted): `pasted` lists, in paste order,
        dicts with class_id, source_index, item_box, visible_fraction, bbox,
        area.
    """
    min_visible = OCCLUDED_MIN_VISIBLE if occlusion else DEFAULT_MIN_VISIBLE
    scale_low, scale_high = OCCLUDED_SCALES if occlusion else DEFAULT_SCALES
    background = np.array(colorsys.hsv_to_rgb(
        rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3))) * 255
    canvas = (np.broadcast_to(background, (canvas_size, canvas_size, 3))
              + rng.normal(0, 4, (canvas_size, canvas_size, 3)))
    kept, alphas, boxes = [], [], []
    for class_id, source_index, item in items:
        side = int(round(28 * rng.uniform(scale_low, scale_high)
                         * canvas_size / REFERENCE_CANVAS))
        side = min(side, canvas_size)
        gray, alpha = render_item(item, side)
        tint = np.array(colorsys.hsv_to_rgb(
            rng.random(), rng.uniform(0.0, 0.7), rng.uniform(0.75, 1.0)))
        for _ in range(_PLACEMENT_TRIES):
            box = _random_box(rng, canvas_size, side, occlusion, boxes)
            _, fractions = visible_masks(alphas + [alpha], boxes + [box],
                                         canvas_size)
            if min(fractions) >= min_visible:
                break
        else:
            continue  # no room: leave this item out
        canvas_part, item_part = _place(canvas_size, box)
        a = alpha[item_part][..., None]
        canvas[canvas_part] = (canvas[canvas_part] * (1 - a)
                               + gray[item_part][..., None] * tint * a)
        kept.append((class_id, source_index))
        alphas.append(alpha)
        boxes.append(box)
    masks, fractions = visible_masks(alphas, boxes, canvas_size)
    pasted = []
    for (class_id, source_index), box, mask, fraction in zip(
            kept, boxes, masks, fractions):
        ys, xs = np.nonzero(mask)
        pasted.append({
            "class_id": int(class_id),
            "source_index": int(source_index),
            "item_box": box,
            "visible_fraction": round(float(fraction), 4),
            "bbox": [int(xs.min()), int(ys.min()),
                     int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "area": int(mask.sum()),
        })
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, pasted


# --------------------------------------------------------------------------
# A split.
# --------------------------------------------------------------------------

def _generate_split(split, num_canvases, images, labels, canvas_size, seed,
                    occlusion, image_dir, progress=None):
    """Writes a split's JPEGs; returns its COCO dict."""
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    coco_images, annotations = [], []
    for index in range(num_canvases):
        # One generator per canvas: canvas i depends on (seed, split, i) only.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        scene, classes = _draw_classes(
            rng, int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1)))
        sources = [int(by_class[c][rng.integers(len(by_class[c]))])
                   for c in classes]
        items = [(c, s, images[s]) for c, s in zip(classes, sources)]
        canvas, pasted = make_canvas(rng, items, canvas_size, occlusion)
        file_name = f"{split}_{index:06d}.jpg"
        Image.fromarray(canvas).save(os.path.join(image_dir, file_name),
                                     "JPEG", quality=JPEG_QUALITY)
        if progress is not None:
            progress.update(1)
        image_id = index + 1
        coco_images.append({"id": image_id, "file_name": file_name,
                            "width": canvas_size, "height": canvas_size,
                            "scene": scene})
        for item in pasted:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": item["class_id"] + 1,
                "bbox": item["bbox"],
                "area": item["area"],
                "iscrowd": 0,
                "source_split": split,
                "source_index": item["source_index"],
                "item_box": item["item_box"],
                "visible_fraction": item["visible_fraction"],
            })
    return {
        "info": {
            "description": f"mlcrl_tf 'outfits' demo set, {split} split, "
                           "built from real Fashion-MNIST images",
            "seed": seed, "canvas_size": canvas_size,
            "occlusion": occlusion,
            "min_visible_fraction": (OCCLUDED_MIN_VISIBLE if occlusion
                                     else DEFAULT_MIN_VISIBLE),
            "scenes": {k: list(v) for k, v in SCENES.items()},
            "scene_probability": SCENE_PROBABILITY,
            "repeat_probability": REPEAT_PROBABILITY,
        },
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE)",
                      "url": "https://github.com/zalandoresearch/fashion-mnist"}],
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "fashion"}
                       for i, name in enumerate(CLASS_NAMES)],
    }


def split_stats(coco):
    """Label statistics of a demo COCO dict (cardinality, prior, visibility)."""
    num_images = len(coco["images"])
    labels = {image["id"]: set() for image in coco["images"]}
    for a in coco["annotations"]:
        labels[a["image_id"]].add(a["category_id"] - 1)
    cardinality = np.array([len(v) for v in labels.values()])
    counts = np.zeros(10, np.int64)
    for v in labels.values():
        counts[sorted(v)] += 1
    return {
        "num_images": num_images,
        "items_per_image": round(len(coco["annotations"]) / num_images, 3),
        "label_cardinality_mean": round(float(cardinality.mean()), 3),
        "label_cardinality_hist": {int(k): int((cardinality == k).sum())
                                   for k in np.unique(cardinality)},
        "label_prior": {CLASS_NAMES[c]: round(float(counts[c]) / num_images, 3)
                        for c in range(10)},
        "visible_fraction_mean": round(float(np.mean(
            [a["visible_fraction"] for a in coco["annotations"]])), 3),
    }


def generate(output_dir, num_train=4000, num_test=1000, canvas_size=96,
             seed=0, occlusion=False, fashion_mnist_dir=None, overwrite=False,
             num_workers=None, progress=None):
    """Generates the demo set: JPEGs, COCO annotations, then TFRecords.

    Args:
        output_dir: root directory (the layout: docs/data.md, Output).
        num_train, num_test: canvases per split.
        canvas_size: canvas side in pixels.
        seed: generation seed; the same seed gives identical files.
        occlusion: the harder, occluded setting.
        fashion_mnist_dir: optional Fashion-MNIST directory (see
            `fashion_mnist.load_fashion_mnist`).
        overwrite: replace an existing demo set in `output_dir`.
        num_workers: converter processes (None: the converter's default).
        progress: optional `pipelines.utils.progress.Progress`, restarted
            for the canvases and the conversion of each split.

    Returns:
        A dict: per split, `split_stats` plus the converter's report under
        "report", and "seconds".

    Raises:
        ValueError: bad sizes, or output exists and overwrite is False.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train={num_train}, num_test={num_test}: need "
                         "at least one canvas per split.")
    if canvas_size < 32:
        raise ValueError(f"canvas_size={canvas_size}: use at least 32 px.")
    output_dir = files.require_local(output_dir, "--output_dir",
                                     "the demo set (JPEG files, then the converter)")
    summary = {}
    for split, count in (("train", num_train), ("test", num_test)):
        start = time.perf_counter()
        image_dir = os.path.join(output_dir, "images", split)
        annotations_file = os.path.join(output_dir, "annotations",
                                        f"instances_{split}.json")
        if os.path.exists(image_dir) or os.path.exists(annotations_file):
            if not overwrite:
                raise ValueError(f"{image_dir} or {annotations_file} exists; "
                                 "pass --overwrite (overwrite=True) to "
                                 "replace the demo set.")
            shutil.rmtree(image_dir, ignore_errors=True)
        os.makedirs(image_dir)
        os.makedirs(os.path.dirname(annotations_file), exist_ok=True)
        images, labels = fashion_mnist.load_fashion_mnist(
            split, fashion_mnist_dir)
        if progress is not None:
            progress.start(total=count, description=f"{split} canvases")
        coco = _generate_split(split, count, images, labels, canvas_size,
                               seed, occlusion, image_dir, progress)
        files.write_atomically(annotations_file, json.dumps(coco, separators=(",", ":")))
        report = coco_lib.convert(
            annotations_file, image_dir, os.path.join(output_dir, "tfrecords"),
            split=split, num_shards=NUM_SHARDS[split], num_workers=num_workers,
            overwrite=overwrite, progress=progress)
        summary[split] = dict(split_stats(coco), report=report,
                              seconds=round(time.perf_counter() - start, 2))
    return summary


def write_preview(output_dir, path, split="train", num=16, columns=4,
                  zoom=2):
    """Draws a grid of canvases with their label names into a PNG.

    Args:
        output_dir: a generated demo set.
        path: the PNG to write.
        split: which split's canvases.
        num: how many (the first ones).
        columns: grid columns.
        zoom: integer upscaling of each canvas.
    """
    path = files.require_local(path, "--preview", "the preview picture")
    with open(os.path.join(output_dir, "annotations",
                           f"instances_{split}.json"), encoding="utf-8") as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    labels = {}
    for a in coco["annotations"]:
        labels.setdefault(a["image_id"], []).append(names[a["category_id"]])
    font = ImageFont.load_default()
    chosen = coco["images"][:num]
    side = chosen[0]["width"] * zoom
    text_h = 5 * 12 + 4
    rows = -(-len(chosen) // columns)
    sheet = Image.new("RGB", (columns * (side + 6) + 6,
                              rows * (side + text_h + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    for k, image in enumerate(chosen):
        x = 6 + (k % columns) * (side + 6)
        y = 6 + (k // columns) * (side + text_h + 6)
        canvas = Image.open(os.path.join(output_dir, "images", split,
                                         image["file_name"]))
        sheet.paste(canvas.resize((side, side), Image.NEAREST), (x, y))
        lines = [f"[{image['scene']}]"] + sorted(set(labels.get(image["id"], [])))
        draw.multiline_text((x, y + side + 2), "\n".join(lines), fill="black",
                            font=font, spacing=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    extension = os.path.splitext(path)[1].lower()
    sheet.save(buffer, format=Image.registered_extensions().get(extension, "PNG"))
    files.write_atomically(path, buffer.getvalue())
