r"""python -m pipelines.demo_dataset --output_dir=data/demo --preview=docs/demo_preview.png

Builds the "outfits" demo set with `pipelines.demo.outfits.generate`: JPEG
canvases, COCO annotations, then TFRecords; progress on stderr, the summary on
stdout. What a canvas is and the output layout: docs/data.md, The outfits demo
set.
"""

import json
import os
import sys

from absl import app
from absl import flags

from pipelines.demo import outfits
from pipelines.utils import console
from pipelines.utils import progress


def define_flags():
    """Defines this script's flags (only when run as a script)."""
    flags.DEFINE_string("output_dir", None, "Root of the demo set.",
                        required=True)
    flags.DEFINE_integer("num_train", 4000, "Training canvases.")
    flags.DEFINE_integer("num_test", 1000, "Test canvases.")
    flags.DEFINE_integer("canvas_size", 96, "Canvas side in pixels.")
    flags.DEFINE_integer("seed", 0, "Generation seed.")
    flags.DEFINE_bool("occlusion", False, "Harder setting: occluded and "
                      "edge-cropped items (>= 25 % visible).")
    flags.DEFINE_string("fashion_mnist_dir", None, "Directory of the "
                        "Fashion-MNIST *-ubyte.gz files (default: the Debian "
                        "package, the Keras cache, then a download).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing demo set.")
    flags.DEFINE_string("preview", None, "Also write a PNG grid of 16 train "
                        "canvases with their labels, e.g. docs/demo_preview.png.")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        with progress.Progress(unit="images") as bar:
            summary = outfits.generate(f.output_dir, f.num_train, f.num_test,
                                        f.canvas_size, f.seed, f.occlusion,
                                        f.fashion_mnist_dir, f.overwrite, progress=bar)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for split, s in summary.items():
        report = s.pop("report")
        print(f"{split}: {report['num_records']} canvases in "
              f"{report['num_shards']} shards ({report['num_skipped']} "
              f"skipped), {s.pop('seconds')} s")
        print("  " + json.dumps(s))
    print(f"TFRecords: {os.path.join(f.output_dir, 'tfrecords')}")
    if f.preview:
        try:
            outfits.write_preview(f.output_dir, f.preview)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        print(f"preview: {f.preview}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
