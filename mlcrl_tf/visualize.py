"""Class activation maps as in the paper's Fig. 3, saved as PNG panels.

    python -m mlcrl_tf.visualize --model_dir=runs/demo IMAGE... \
        [--classes=Bag,Sandal | --top_k=3] --output_dir=cams/ [--best] [--tile_size=224]

One panel per (image, class): the image, the direct head's CAM and the
`f_conv` map, in `<output_dir>/<image stem>_<class>.png`
(`mlcrl_tf.evaluation.visualize_lib`). An unreadable image is named on
stderr and skipped; the exit code is 1 only if no image was rendered.
"""

import sys

from absl import app
from absl import flags

from mlcrl_tf.evaluation import visualize_lib
from pipelines.records import image_files
from pipelines.records import image_header
from pipelines.utils import console
from pipelines.utils import files


def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.", required=True)
    flags.DEFINE_string("output_dir", "cams", "Where the PNG panels go.")
    flags.DEFINE_list("classes", None, "Class names to map (comma-separated); default "
                      "the --top_k most probable of each image.")
    flags.DEFINE_integer("top_k", 3, "Map this many most probable classes per image.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Use best/ (selected on the run's --selection_files, "
                      "else on its --eval_files).")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.DEFINE_integer("tile_size", 224, "Side of each tile of a panel, in pixels.")
    flags.DEFINE_integer("max_image_pixels", image_header.DEFAULT_MAX_PIXELS,
                         "Images above this many pixels (read from the header) are "
                         "skipped before decoding.")
    flags.DEFINE_integer("max_image_bytes", image_files.DEFAULT_MAX_IMAGE_BYTES,
                         "Larger files are skipped unread.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give at least one image file.")
    f = flags.FLAGS
    try:
        code = visualize_lib.run(f.model_dir, paths, f.output_dir,
                        {"checkpoint": f.checkpoint, "best": f.best, "use_ema": f.use_ema},
                        classes=f.classes, top_k=f.top_k, tile_size=f.tile_size,
                        max_pixels=f.max_image_pixels, max_bytes=f.max_image_bytes)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except files.IO_ERRORS as e:  # e.g. an unreadable run or checkpoint
        sys.exit(f"error: {type(e).__name__}: {files.error_text(e)}")
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
