"""Exports a training run's inference branch for TF Serving.

    python -m mlcrl_tf.export --model_dir=runs/demo --export_dir=saved_models/demo \
        [--version=N] [--best | --checkpoint=PREFIX] [--use_ema=true] \
        [--threshold=0.5] [--top_k=5] [--max_batch_size=64] \
        [--max_image_pixels=100000000] [--precision=float32|mixed_bfloat16] \
        [--jit_compile] [--format=saved_model|onnx]

Writes `<export_dir>/<version>/`, with --format=onnx also its onnx/model.onnx
(`mlcrl_tf.serving.export_lib`; the contract and clients in docs/serving.md).
Every failure is one `error: ...` line.
"""

import os
import sys
import time

from absl import app
from absl import flags

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import onnx_export
from pipelines.utils import console
from pipelines.utils import files
from pipelines.utils import progress


def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.", required=True)
    flags.DEFINE_string("export_dir", None, "Export base directory; the version goes "
                        "in <export_dir>/<version>/.", required=True)
    flags.DEFINE_integer("version", None, "Version number; default the next free one.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Export best/: the checkpoint with the highest mAP on "
                      "the run's --selection_files if it had them, else on its "
                      "--eval_files (for COCO/VOC the test split: selected on the "
                      "test set).")
    flags.DEFINE_bool("use_ema", True, "Export the EMA weights when the run kept them.")
    flags.DEFINE_float("threshold", None, "Threshold of the `predicted` output; "
                       "default the run's --threshold.")
    flags.DEFINE_integer("top_k", None, "k of the top_k_* outputs; default min(5, C).")
    flags.DEFINE_integer("max_batch_size", contract.DEFAULT_MAX_BATCH_SIZE,
                         "The most images one request may hold (both image signatures); "
                         "a larger request fails with INVALID_ARGUMENT.")
    flags.DEFINE_integer("max_image_pixels", contract.DEFAULT_MAX_IMAGE_PIXELS,
                         "Pixel budget of one encoded image (width x height, x frames "
                         "for a GIF), read from its header before decoding; a request "
                         "with a larger image fails with INVALID_ARGUMENT.")
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                      "Compute precision of the served model: mixed_bfloat16 serves in "
                      "0.64-0.72x the float32 time on an Intel Xeon with AMX-BF16, but "
                      "slower on an AVX2-only AMD EPYC (a warning says so on a CPU "
                      "without AMX-BF16/AVX-512 BF16); GPUs need compute capability "
                      ">= 8.0. Variables, inputs and outputs stay float32; "
                      "docs/performance.md has its accuracy.")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the model's forward pass (not the "
                      "image decoding); mostly slower on the build machine's CPU "
                      "(docs/serving.md). TF Serving runs such an export on CPU only with "
                      "--xla_cpu_compilation_enabled=true.")
    flags.DEFINE_enum("format", "saved_model", list(onnx_export.FORMATS),
                      "saved_model, or onnx: the SavedModel plus onnx/model.onnx and "
                      "onnx/labels.txt in the same version (images -> logits; float32 "
                      "only), refused unless onnxruntime's logits on up to 8 of the run's "
                      "images equal the SavedModel's within 1e-4 (+ 1e-6 x |logit|). Needs "
                      "`pip install 'mlcrl_tf[onnx]'`.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    # One opaque step (restore, trace the signatures, write): say it started.
    print(f"Exporting {f.model_dir} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        path = export_lib.export_from_model_dir(
            f.model_dir, f.export_dir, version=f.version, checkpoint=f.checkpoint,
            best=f.best, use_ema=f.use_ema, threshold=f.threshold, top_k=f.top_k,
            max_batch_size=f.max_batch_size, max_image_pixels=f.max_image_pixels,
            precision=f.precision, jit_compile=f.jit_compile, model_format=f.format)
    except (ValueError, checkpoints.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except files.IO_ERRORS as e:  # E.g. an unwritable temporary directory.
        path = getattr(e, "filename", None)
        sys.exit(f"error: the export failed{f' on {path!r}' if path else ''}: "
                 f"{type(e).__name__}: {files.error_text(e)}")
    print(f"Exported {f.model_dir} to {path}")
    if f.format == "onnx":
        print(f"ONNX model: {os.path.join(path, onnx_export.ONNX_DIR, onnx_export.ONNX_FILE)}"
              f" (its logits checked against the SavedModel's within "
              f"{onnx_export.MAX_ABS_DIFF:g} + {onnx_export.MAX_REL_DIFF:g} x |logit|)")
    print(f"export: done in {progress.format_duration(time.monotonic() - start)}",
          file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
