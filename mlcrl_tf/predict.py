"""Labels image files with an export: one JSON line per image.

    python -m mlcrl_tf.predict --saved_model=saved_models/demo/1 IMAGE_OR_DIR... \
        [--threshold=0.5 | --top_k=3] [--batch_size=16] [--output=preds.jsonl] \
        [--all_probabilities] [--overwrite] [--max_image_bytes=268435456] \
        [--format=saved_model|onnx]

Each line is `{"filename": ..., "labels": [...], "scores": [...]}` or
`{"filename": ..., "error": ...}` (`mlcrl_tf.serving.predict_lib`).
"""

import sys

from absl import app
from absl import flags

from mlcrl_tf.serving import onnx_export
from mlcrl_tf.serving import predict_lib
from pipelines.utils import console
from pipelines.utils import files
from pipelines.utils import progress


def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("saved_model", None, "An export's version directory (or its "
                        "base directory: the highest version is used).", required=True)
    flags.DEFINE_float("threshold", None, "Label classes with probability >= threshold; "
                       "default the export's.")
    flags.DEFINE_integer("top_k", None, "Label the k most probable classes instead.")
    flags.DEFINE_integer("batch_size", 16, "Images per signature call.")
    flags.DEFINE_string("output", None, "Write the JSON lines here instead of stdout; "
                        "refused if it has an image extension, is one of the inputs or "
                        "exists (without --overwrite).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")
    flags.DEFINE_integer("max_image_bytes", predict_lib.DEFAULT_MAX_IMAGE_BYTES,
                         "Larger files are reported and not read.")
    flags.DEFINE_bool("all_probabilities", False, "Add every class's probability.")
    flags.DEFINE_enum("format", "saved_model", list(onnx_export.FORMATS),
                      "saved_model (TensorFlow) or onnx: the export's onnx/model.onnx "
                      "(`export --format=onnx`) in onnxruntime, same decoding and labels; "
                      "--saved_model may then also name the .onnx file or its folder.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one image file or directory.")
    f = flags.FLAGS
    # Progress on stderr: stdout may carry the JSON lines.
    with progress.Progress(unit="images", description="predict") as bar:
        try:
            code = predict_lib.run(f.saved_model, paths, f.threshold, f.top_k,
                                   f.batch_size, f.output, f.all_probabilities,
                                   overwrite=f.overwrite,
                                   max_image_bytes=f.max_image_bytes, progress=bar,
                                   model_format=f.format)
        except ValueError as e:
            sys.exit(f"error: {e}")
        except files.IO_ERRORS as e:  # e.g. an unreadable export
            sys.exit(f"error: {type(e).__name__}: {files.error_text(e)}")
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
