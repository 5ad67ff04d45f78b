"""Exports the inference branch as a SavedModel in TF Serving's layout.

`export_model(model, export_dir, class_names)` writes
`<export_dir>/<version>/` (saved_model.pb, variables/, assets/labels.txt),
the layout `tensorflow_model_server --model_base_path=<export_dir>` watches;
`export_from_model_dir` restores a training run first. The signatures and
what they return are the contract in `mlcrl_tf.serving`; docs/serving.md
shows clients. The command line is `mlcrl_tf.export`.

Decisions (also in docs/serving.md):

- Only the inference branch is exported: the input normalisation, backbone,
  direct head and `f_conv`, i.e. `model.inference_model`, wrapped in a
  `serving.ServingModule`. The variables tracked are exactly those the
  serving functions capture, so the image and label projectors (training
  only) are not in the SavedModel: a crl export holds D x C + C more
  parameters than a baseline export, no more.
- Versions: the next free integer by default (1 for a new directory); an
  existing version is never overwritten (ValueError). The SavedModel is
  written to a hidden, non-integer sibling `.tmp-<version>-<random>` and
  renamed into place when complete (atomic on local/POSIX file systems), so
  TF Serving never sees a half-written version; a failed export removes its
  temporary directory.
- Resource limits of a request are export options stored in `metadata`:
  `max_batch_size` (default 64 images per request) and `max_image_pixels`
  (default 100 million pixels per image, read from the header before
  decoding); above them a request fails with INVALID_ARGUMENT naming the
  limit (docs/reliability.md).
- An export directory that cannot be created or written, a disk that fills
  up and a checkpoint that cannot be read are one ValueError naming the
  path; `export_from_model_dir` checks the directory before restoring.
- `jit_compile=True` wraps the model's forward pass (float images ->
  logits, not the string decoding) in `tf.function(jit_compile=True)`;
  recorded in `metadata`. Off by default: mostly slower on the build machine's
  CPU (docs/serving.md), and TF Serving runs it only with
  `--xla_cpu_compilation_enabled=true` on CPU.
"""

import os
import tempfile
import uuid

from absl import logging
import tensorflow as tf

from mlcrl_tf.run_dir import restore
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import serving_module
from pipelines.utils import files
from pipelines.utils import output_checks

DEFAULT_TOP_K = 5
TEMP_PREFIX = ".tmp-"


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


def _check_arguments(model, class_names, threshold, top_k):
    """Validates export_model's arguments; returns (class_names, top_k)."""
    needed = ("inference_model", "backbone_name", "image_size", "num_classes", "variant")
    if not all(hasattr(model, a) for a in needed):
        raise ValueError(
            f"model must be an mlcrl_tf MLCRLModel (from model.build_model or "
            f"checkpoints.restore_model), got {type(model).__name__}.")
    if isinstance(class_names, (str, bytes)):
        raise ValueError("class_names must be a list of strings, got one string.")
    class_names = list(class_names)
    if len(class_names) != model.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the model has "
                         f"{model.num_classes} classes.")
    for name in class_names:
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"class_names must be non-empty one-line strings, got {name!r}.")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names contains duplicates.")
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
                 jit_compile=False):
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

    Returns:
        The path of the written version directory.

    Raises:
        ValueError: a bad argument (named in the message), an existing
            version, or an export directory that cannot be created or
            written (full disk included).
    """
    class_names, top_k = _check_arguments(model, class_names, threshold, top_k)
    _check_limits(max_batch_size, max_image_pixels)
    _check_jit_compile(jit_compile)
    output_checks.ensure_output_dir(export_dir, "export_dir")
    version = _resolve_version(export_dir, version)
    with tempfile.TemporaryDirectory() as local:
        labels_path = os.path.join(local, contract.LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        info = contract.ServingInfo(
            class_names=tuple(class_names), backbone=model.backbone_name,
            image_size=model.image_size, threshold=float(threshold), top_k=top_k,
            variant=model.variant, max_batch_size=max_batch_size,
            max_image_pixels=max_image_pixels, antialias=bool(antialias),
            precision=model.dtype_policy.name, jit_compile=jit_compile)
        module = serving_module.ServingModule(model.inference_model, info, labels_path)
        final_dir = _save_atomically(module, export_dir, version)
    logging.info("Exported %s/%s (%d classes) to %s", model.variant, model.backbone_name,
                 len(class_names), final_dir)
    return final_dir


def _save_atomically(module, export_dir, version):
    """Saves into a hidden temporary sibling, then renames it to `version`."""
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
        try:
            tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)
        except tf.errors.OpError as e:
            raise ValueError(
                f"could not move the export into {final_dir!r} (another export "
                f"took version {version}?): {e.message}") from e
    finally:
        try:
            if tf.io.gfile.exists(temp_dir):
                tf.io.gfile.rmtree(temp_dir)
        except files.IO_ERRORS as e:
            logging.warning("Could not remove %s: %s", temp_dir, files.error_text(e))
    return final_dir


def export_from_model_dir(model_dir, export_dir, version=None, checkpoint=None,
                          best=False, use_ema=True, threshold=None, top_k=None,
                          max_batch_size=contract.DEFAULT_MAX_BATCH_SIZE,
                          max_image_pixels=contract.DEFAULT_MAX_IMAGE_PIXELS,
                          precision="float32", jit_compile=False):
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
            model (float32 variables and outputs; faster on AMX/AVX512-BF16
            CPUs and recent GPUs; docs/performance.md has its accuracy).
        jit_compile: see `export_model`.

    Raises:
        ValueError: see `export_model`; also an export directory that cannot
            be written (checked before restoring) and a checkpoint that cannot
            be read (named).
    """
    _check_limits(max_batch_size, max_image_pixels)
    _check_jit_compile(jit_compile)
    output_checks.ensure_output_dir(export_dir, "export_dir")
    model, config, class_names, path = restore.restore_model(
        model_dir, checkpoint=checkpoint, best=best, use_ema=use_ema, precision=precision)
    logging.info("Restored %s", path)
    return export_model(model, export_dir, class_names,
                        threshold=config.threshold if threshold is None else threshold,
                        version=version, top_k=top_k, max_batch_size=max_batch_size,
                        max_image_pixels=max_image_pixels, antialias=config.antialias,
                        jit_compile=jit_compile)
