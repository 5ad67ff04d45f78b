"""Class activation maps as in the paper's Fig. 3, saved as PNG panels.

    python -m mlcrl_tf.visualize --model_dir=runs/demo IMAGE... \
        [--classes=Bag,Sandal | --top_k=3] --output_dir=cams/ [--best] [--tile_size=224]

For one image and one class c, a panel shows side by side:

1. the image as the model saw it (resized to S x S by `preprocess_eval`);
2. the class activation map of the direct head (Zhou et al.'s CAM):
   CAM_c = sum_d W[d, c] * Fx[..., d], with W the kernel of
   `model.classifier` (its first D rows for variant `tbc`, whose other C
   rows read GMP(Fconv)); the bias is left out, as in CAM;
3. the `f_conv` map Fconv[..., c] (variants with `f_conv`), whose global
   max is the context logit of class c.

Each map is computed at the feature-map resolution (S / stride), upsampled
bilinearly to the image size, min-max normalised to [0, 1] per map, coloured
with a NumPy jet colormap and blended over the image. A caption names the
class and its probability. Files are `<output_dir>/<image stem>_<class>.png`.
"""

import os
import re
import sys
import weakref

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow as tf

from mlcrl_tf import backbones

_FEATURE_MODELS = weakref.WeakKeyDictionary()
_CAPTION_HEIGHT = 14


# --------------------------------------------------------------------------
# Maps.
# --------------------------------------------------------------------------

def _feature_model(model):
    """`model.feature_model()`, built once per model."""
    feature_model = _FEATURE_MODELS.get(model)
    if feature_model is None:
        feature_model = model.feature_model()
        _FEATURE_MODELS[model] = feature_model
    return feature_model


def direct_head_kernel(model):
    """W (D, C): the classifier rows that read the pooled features Fx."""
    kernel = np.asarray(model.classifier.kernel.numpy(), np.float32)
    return kernel[:backbones.feature_dim(model.backbone_name)]


def compute_cams(model, images_normalised, class_ids):
    """Class maps at feature-map resolution for some classes of each image.

    Args:
        model: an `MLCRLModel`.
        images_normalised: float (N, S, S, 3), normalised for the backbone
            (`preprocess_eval`'s output).
        class_ids: the classes to map: an int (the same for every image), a
            sequence of N ints (one per image) or an (N, K) array.

    Returns:
        dict with `direct` float32 (N, K, h, w) (the direct head's CAM),
        `f_conv` float32 (N, K, h, w) or None (variants without f_conv),
        `class_ids` int (N, K) and `probabilities` float32 (N, C).

    Raises:
        ValueError: images of the wrong shape or a class id out of range.
    """
    images = np.asarray(images_normalised, np.float32)
    size = model.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images_normalised must have shape (N, {size}, {size}, 3), "
                         f"got {images.shape}.")
    n = images.shape[0]
    ids = np.asarray(class_ids)
    if ids.ndim == 0:
        ids = np.full((n, 1), int(ids))
    elif ids.ndim == 1:
        ids = ids.reshape(n, 1) if len(ids) == n else None
    if ids is None or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class_ids must be an int, {n} ints or an ({n}, K) int array, "
                         f"got {class_ids!r}.")
    if ids.size and (ids.min() < 0 or ids.max() >= model.num_classes):
        raise ValueError(f"class_ids must be in [0, {model.num_classes}), got {class_ids!r}.")
    outputs = _feature_model(model)(images, training=False)
    features = np.asarray(tf.cast(outputs["features"], tf.float32))  # (N, h, w, D)
    kernel = direct_head_kernel(model)  # (D, C)
    # CAM for the chosen classes only: (N, h, w, D) x (N, D, K) -> (N, K, h, w).
    direct = np.einsum("nhwd,ndk->nkhw", features, kernel[:, ids].transpose(1, 0, 2))
    fconv = None
    if "class_maps" in outputs:
        maps = np.asarray(tf.cast(outputs["class_maps"], tf.float32))  # (N, h, w, C)
        fconv = np.take_along_axis(maps.transpose(0, 3, 1, 2),
                                   ids[:, :, None, None], axis=1)
    probabilities = np.asarray(tf.sigmoid(tf.cast(outputs["logits"], tf.float32)))
    return {"direct": direct.astype(np.float32),
            "f_conv": None if fconv is None else fconv.astype(np.float32),
            "class_ids": ids, "probabilities": probabilities}


def upsample_and_normalise(cam, height, width):
    """Bilinear resize of one (h, w) map to (height, width), then to [0, 1].

    A constant map becomes all zeros.
    """
    cam = np.asarray(cam, np.float32)
    resized = tf.image.resize(cam[:, :, None], (height, width), method="bilinear")
    resized = resized.numpy()[:, :, 0]
    low, high = float(resized.min()), float(resized.max())
    if high - low < 1e-12:
        return np.zeros_like(resized)
    return (resized - low) / (high - low)


def jet(values):
    """The jet colormap in NumPy: [0, 1] (H, W) -> uint8 (H, W, 3).

    0 is dark blue, 0.5 green-yellow, 1 dark red (matplotlib's "jet").
    """
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)],
                   axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def overlay(image_uint8, heat, alpha=0.5):
    """Blends jet(heat) (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
    colours = jet(heat).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(image_uint8, np.float32) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Panels.
# --------------------------------------------------------------------------

def _resize_uint8(image, size):
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _caption(width, text):
    """A black strip (_CAPTION_HEIGHT, width, 3) with white text."""
    strip = Image.new("RGB", (width, _CAPTION_HEIGHT), (0, 0, 0))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255),
                               font=ImageFont.load_default())
    return np.asarray(strip)


def render_cam_panel(image_uint8, cams, class_name, score=None, tile_size=None,
                     alpha=0.5):
    """image | direct-head CAM | f_conv map, with a caption, as one picture.

    Args:
        image_uint8: RGB uint8 (H, W, 3), the image the maps belong to
            (normally the model-size square image).
        cams: dict with `direct` (h, w) and optionally `f_conv` (h, w) (None
            or missing for variants without f_conv): one image's maps for one
            class at feature resolution (from `compute_cams`).
        class_name: shown in the caption.
        score: the class probability, shown when given.
        tile_size: side of each square tile; default the image's height.
        alpha: heat-map opacity.

    Returns:
        uint8 (tile + caption height, 2 or 3 tiles wide, 3).
    """
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_uint8 must be uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}.")
    tile = int(tile_size or image.shape[0])
    image = _resize_uint8(image, tile)
    tiles, titles = [image], ["image"]
    for key, title in (("direct", "CAM"), ("f_conv", "f_conv")):
        cam = cams.get(key)
        if cam is not None:
            tiles.append(overlay(image, upsample_and_normalise(cam, tile, tile), alpha))
            titles.append(title)
    body = np.concatenate(tiles, axis=1)
    text = class_name if score is None else f"{class_name} {score:.2f}"
    text += "  [" + " | ".join(titles) + "]"
    return np.concatenate([_caption(body.shape[1], text), body], axis=0)


def save_png(array, path):
    """Writes an RGB uint8 array as PNG (creating the directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, format="PNG")


def _safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "class"


def visualize_files(model, backbone, class_names, paths, output_dir, classes=None,
                    top_k=3, tile_size=224):
    """Writes one CAM panel per (image, class); returns the PNG paths.

    Args:
        model: an `MLCRLModel`.
        backbone: its backbone name.
        class_names: the C class names.
        paths: image files (decoded with `input_pipeline.decode_image`).
        output_dir: where the PNGs go.
        classes: class names to map for every image; default the `top_k`
            most probable classes of each image.
        top_k: used when `classes` is None.
        tile_size: side of each panel tile.

    Raises:
        ValueError: an unknown class name or a bad top_k.
    """
    from pipelines import input_pipeline  # pylint: disable=import-outside-toplevel
    class_names = list(class_names)
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise ValueError(f"classes: unknown class name(s) {unknown}; the model knows "
                             f"{class_names}.")
        fixed = [class_names.index(c) for c in classes]
    elif not 1 <= top_k <= len(class_names):
        raise ValueError(f"top_k must be in [1, {len(class_names)}], got {top_k}.")
    written = []
    for path in paths:
        with open(path, "rb") as f:
            image = input_pipeline.decode_image(f.read())
        normalised = input_pipeline.preprocess_eval(image, model.image_size, backbone)
        shown = np.clip(np.round(backbones.denormalize_images(normalised, backbone).numpy()),
                        0, 255).astype(np.uint8)
        if classes:
            ids = np.asarray([fixed])
        else:
            logits = model.inference_model(normalised[None], training=False)
            ids = np.argsort(-np.asarray(logits)[0], kind="stable")[None, :top_k]
        maps = compute_cams(model, normalised.numpy()[None], ids)
        stem = os.path.splitext(os.path.basename(path))[0]
        for k, c in enumerate(maps["class_ids"][0]):
            cams = {"direct": maps["direct"][0, k],
                    "f_conv": None if maps["f_conv"] is None else maps["f_conv"][0, k]}
            panel = render_cam_panel(shown, cams, class_names[c],
                                     score=float(maps["probabilities"][0, c]),
                                     tile_size=tile_size)
            out = os.path.join(output_dir, f"{stem}_{_safe_name(class_names[c])}.png")
            save_png(panel, out)
            written.append(out)
    return written


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------

def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.", required=True)
    flags.DEFINE_string("output_dir", "cams", "Where the PNG panels go.")
    flags.DEFINE_list("classes", None, "Class names to map (comma-separated); default "
                      "the --top_k most probable of each image.")
    flags.DEFINE_integer("top_k", 3, "Map this many most probable classes per image.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Use the best-by-mAP checkpoint.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.DEFINE_integer("tile_size", 224, "Side of each tile of a panel, in pixels.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one image file.")
    from mlcrl_tf import checkpoints  # pylint: disable=import-outside-toplevel
    f = flags.FLAGS
    try:
        model, config, class_names, _ = checkpoints.restore_model(
            f.model_dir, checkpoint=f.checkpoint, best=f.best, use_ema=f.use_ema)
        written = visualize_files(model, config.backbone, class_names, paths,
                                  f.output_dir, classes=f.classes, top_k=f.top_k,
                                  tile_size=f.tile_size)
    except (ValueError, OSError, tf.errors.InvalidArgumentError) as e:
        sys.exit(f"error: {getattr(e, 'message', None) or e}")
    for path in written:
        print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
