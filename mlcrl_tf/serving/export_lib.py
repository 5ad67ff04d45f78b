"""Exports the inference branch as a SavedModel in TF Serving's layout.

`export_model` writes `<export_dir>/<version>/` (saved_model.pb, variables/,
assets/labels.txt, and with `model_format="onnx"` onnx/model.onnx checked
against it) atomically; `export_from_model_dir` restores a run first.
Decisions: docs/serving.md, Export and ONNX.
"""

import functools
import os
import tempfile
import uuid

from absl import logging
import tensorflow as tf

from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import onnx_export
from mlcrl_tf.serving import serving_module
from pipelines.records import label_maps
from pipelines.utils import files
from pipelines.utils import output_checks

DEFAULT_TOP_K = 5
TEMP_PREFIX = ".tmp-"
SAVED_MODEL_FILE = "saved_model.pb"


# --------------------------------------------------------------------------
# Versions and the atomic write.
# --------------------------------------------------------------------------

def existing_versions(export_dir):
    """Sorted integer version numbers present in `export_dir` (TF Serving's)."""
    if not tf.io.gfile.isdir(export_dir):
        return []
    names = (n.rstrip("/") for n in tf.io.gfile.listdir(export_dir))
    return sorted(int(n) for n in names if n.isdigit())


def _resolve_version(export_dir, version):
    versions = existing_versions(export_dir)
    if version is None:
        return versions[-1] + 1 if versions else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}.")
    if version in versions:
        raise ValueError(
            f"version={version} already exists in export_dir={export_dir!r}; exports "
            "are never overwritten. Omit the version to take the next free one "
            f"({versions[-1] + 1}).")
    return version


def _check_limits(max_batch_size, max_image_pixels):
    for name, value in (("max_batch_size", max_batch_size),
                        ("max_image_pixels", max_image_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if max_batch_size > 2 ** 31 - 1:
        raise ValueError(f"max_batch_size must be below 2**31, got {max_batch_size}.")


def _check_jit_compile(jit_compile):
    if not isinstance(jit_compile, bool):
        raise ValueError(f"jit_compile must be True or False, got {jit_compile!r}.")


def _check_format(model_format, precision):
    """Refuses an unknown format, and ONNX of a non-float32 model."""
    if model_format not in onnx_export.FORMATS:
        raise ValueError(f"format={model_format!r} is unknown; choose one of "
                         f"{', '.join(onnx_export.FORMATS)}.")
    if model_format == "onnx" and precision != "float32":
        raise ValueError(f"--format=onnx exports float32 models only, not "
                         f"--precision={precision} (onnxruntime's CPU kernels have no "
                         "bfloat16 convolutions); export it with --precision=float32.")
    if model_format == "onnx":
        onnx_export.check_available()  # before any work


def _warn_slow_precision(precision):
    """One warning line for a bfloat16 export on a machine without native bfloat16."""
    problem = (precision_lib.native_bfloat16_problem()
               if precision == "mixed_bfloat16" else None)
    if problem:
        logging.warning(
            "--precision=mixed_bfloat16 on %s: if it is served here, %s; export "
            "--precision=float32 for this machine, or serve this export where bfloat16 "
            "is native.", problem, precision_lib.SLOW_BFLOAT16_SERVING)


def _check_arguments(model, class_names, threshold, top_k):
    """Validates export_model's arguments; returns (class_names, top_k)."""
    needed = ("inference_model", "backbone_name", "image_size", "num_classes", "variant")
    if not all(hasattr(model, a) for a in needed):
        raise ValueError(
            f"model must be an mlcrl_tf MLCRLModel (from model.build_model or "
            f"restore.restore_model), got {type(model).__name__}.")
    if isinstance(class_names, (str, bytes)):
        raise ValueError("class_names must be a list of strings, got one string.")
    class_names = list(class_names)
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the model has "
                         f"{model.num_classes} classes.")
    label_maps.check_class_names(class_names)  # the converters' rule: labels.txt lines
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0.0 < threshold < 1.0):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}.")
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, model.num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not (
            1 <= top_k <= model.num_classes):
        raise ValueError(f"top_k must be an integer in [1, {model.num_classes}], "
                         f"got {top_k!r}.")
    return class_names, top_k


def export_model(model, export_dir, class_names, threshold=0.5, version=None, top_k=None,
                 max_batch_size=contract.DEFAULT_MAX_BATCH_SIZE,
                 max_image_pixels=contract.DEFAULT_MAX_IMAGE_PIXELS, antialias=False,
                 jit_compile=False, model_format="saved_model", check_images=None):
    """Writes the inference branch as `<export_dir>/<version>/` for TF Serving.

    Args:
        model: an `MLCRLModel` (its `inference_model` is exported).
        export_dir: the model's base directory (TF Serving's
            `--model_base_path`); created if needed.
        class_names: the C class names, in class-id order.
        threshold: probability threshold of the `predicted` output, and the
            default of `mlcrl_tf.predict`.
        version: integer version; default the next free one. An existing
            version is never overwritten.
        top_k: k of the `top_k_*` outputs; default min(5, C).
        max_batch_size: the most images one request may hold (both image
            signatures); a larger request fails with INVALID_ARGUMENT.
        max_image_pixels: the pixel budget of one encoded image
            (`serving_default`), checked on its header before decoding.
        antialias: the resize of the run (`serving_default` resizes like
            the run's evaluation did).
        jit_compile: XLA-compile the model's forward pass in both image
            signatures (recorded in `metadata`).
        model_format: "saved_model", or "onnx" for the SavedModel plus
            `onnx/model.onnx` and `onnx/labels.txt` in the same version,
            refused unless onnxruntime's logits on `check_images` equal the
            SavedModel's within `onnx_export.MAX_ABS_DIFF` +
            `MAX_REL_DIFF` x |logit| (float32 only).
        check_images: float32 (N, S, S, 3) RGB in [0, 255] for that check
            (real images); default fixed random pixels.

    Returns:
        The path of the written version directory.

    Raises:
        ValueError: a bad argument (named in the message), an existing
            version, an export directory that cannot be created or written
            (full disk included), missing ONNX packages, a failed ONNX check.
    """
    class_names, top_k = _check_arguments(model, class_names, threshold, top_k)
    _check_limits(max_batch_size, max_image_pixels)
    _check_jit_compile(jit_compile)
    _check_format(model_format, model.dtype_policy.name)
    output_checks.ensure_output_dir(export_dir, "export_dir")
    version = _resolve_version(export_dir, version)
    with tempfile.TemporaryDirectory() as local:
        labels_path = os.path.join(local, contract.LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as f:
            f.write(label_maps.labels_file_text(class_names))
        info = contract.ServingInfo(
            class_names=tuple(class_names), backbone=model.backbone_name,
            image_size=model.image_size, threshold=float(threshold), top_k=top_k,
            variant=model.variant, max_batch_size=max_batch_size,
            max_image_pixels=max_image_pixels, antialias=bool(antialias),
            precision=model.dtype_policy.name, jit_compile=jit_compile)
        module = serving_module.ServingModule(model.inference_model, info, labels_path)
        finish = None
        if model_format == "onnx":
            finish = functools.partial(
                onnx_export.add_onnx, inference_model=model.inference_model, info=info,
                labels_text=label_maps.labels_file_text(class_names),
                check_images=(onnx_export.random_check_images(info.image_size)
                              if check_images is None else check_images))
        final_dir = _save_atomically(module, export_dir, version, finish)
    logging.info("Exported %s/%s (%d classes) to %s", model.variant, model.backbone_name,
                 len(class_names), final_dir)
    return final_dir


def _save_atomically(module, export_dir, version, finish=None):
    """Saves into a hidden temporary sibling, then renames it to `version`.

    `finish(temp_dir)`, if given, adds to the version before it moves (the
    ONNX model); an exception there leaves no version.
    """
    final_dir = os.path.join(export_dir, str(version))
    # Hidden and not an integer: TF Serving and existing_versions ignore it.
    temp_dir = os.path.join(export_dir, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            tf.saved_model.save(module, temp_dir, signatures=module.signatures())
        except files.IO_ERRORS as e:
            raise ValueError(f"--export_dir={export_dir!r}: cannot write the export "
                             f"(disk full or unwritable?): {files.error_text(e)}"
                             ) from None
        if finish is not None:
            finish(temp_dir)
        _move_version(temp_dir, final_dir, version)
    finally:
        try:
            if tf.io.gfile.exists(temp_dir):
                tf.io.gfile.rmtree(temp_dir)
        except files.IO_ERRORS as e:
            logging.warning("Could not remove %s: %s", temp_dir, files.error_text(e))
    return final_dir


def _move_version(temp_dir, final_dir, version):
    """Moves the written SavedModel to its version directory, whole.

    Locally one directory rename (atomic). On other file systems (`gs://`,
    `ram://`) a directory rename is a copy or not supported (`ram://` leaves
    the files behind), so the files move one by one, `saved_model.pb` last
    (TF Serving loads a version once that file is there), and the version is
    loaded back before it is reported.

    Raises:
        ValueError: the version exists already, or does not load once moved.
    """
    try:
        if files.local_path(final_dir) is not None:
            tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)
            return
        if tf.io.gfile.exists(final_dir):
            raise ValueError(f"could not move the export into {final_dir!r}: version "
                             f"{version} exists (another export took it?)")
        names = sorted(name for name in _files_under(temp_dir) if name != SAVED_MODEL_FILE)
        for name in names + [SAVED_MODEL_FILE]:
            target = os.path.join(final_dir, name)
            tf.io.gfile.makedirs(os.path.dirname(target))
            tf.io.gfile.rename(os.path.join(temp_dir, name), target, overwrite=False)
        tf.saved_model.load(final_dir)  # what TF Serving will do
    except files.IO_ERRORS as e:
        raise ValueError(f"could not move the export into {final_dir!r} (another export "
                         f"took version {version}, or the file system refused): "
                         f"{files.error_text(e)}") from None


def _files_under(directory):
    """Paths of every file below `directory`, relative to it."""
    found = []
    for root, _, names in tf.io.gfile.walk(directory):
        relative = os.path.relpath(root, directory) if root != directory else ""
        found += [os.path.join(relative, name) for name in names]
    return found


def export_from_model_dir(model_dir, export_dir, version=None, checkpoint=None,
                          best=False, use_ema=True, threshold=None, top_k=None,
                          max_batch_size=contract.DEFAULT_MAX_BATCH_SIZE,
                          max_image_pixels=contract.DEFAULT_MAX_IMAGE_PIXELS,
                          precision="float32", jit_compile=False,
                          model_format="saved_model"):
    """Restores a training run and exports it; returns the version directory.

    Args:
        model_dir: a training run's directory (run.json + checkpoints).
        export_dir: the export base directory.
        version: explicit version, default the next free one.
        checkpoint: an explicit checkpoint prefix; default the latest.
        best: export the best-by-mAP checkpoint.
        use_ema: export the EMA weights when the run kept them.
        threshold: default the run's --threshold.
        top_k: default min(5, C).
        max_batch_size: see `export_model`.
        max_image_pixels: see `export_model`.
        precision: "float32", or "mixed_bfloat16" for a bfloat16 serving
            model (float32 variables and outputs; 0.64-0.72x the float32 time
            on an Intel Xeon with AMX-BF16, slower on an AVX2-only AMD EPYC,
            where it warns; docs/performance.md has its accuracy).
        jit_compile: see `export_model`.
        model_format: see `export_model`; the ONNX check uses up to 8 images
            of the run's --eval_files (else --selection_files, --train_files;
            random pixels, with a warning, when none can be read here).

    Raises:
        ValueError: see `export_model`; also an export directory that cannot
            be written (checked before restoring) and a checkpoint that cannot
            be read (named).
    """
    _check_limits(max_batch_size, max_image_pixels)
    _check_jit_compile(jit_compile)
    _check_format(model_format, precision)
    _warn_slow_precision(precision)
    output_checks.ensure_output_dir(export_dir, "export_dir")
    model, config, class_names, path = restore.restore_model(
        model_dir, checkpoint=checkpoint, best=best, use_ema=use_ema, precision=precision)
    logging.info("Restored %s", path)
    check_images = (onnx_export.run_check_images(config, len(class_names))
                    if model_format == "onnx" else None)
    return export_model(model, export_dir, class_names,
                        threshold=config.threshold if threshold is None else threshold,
                        version=version, top_k=top_k, max_batch_size=max_batch_size,
                        max_image_pixels=max_image_pixels, antialias=config.antialias,
                        jit_compile=jit_compile, model_format=model_format,
                        check_images=check_images)
