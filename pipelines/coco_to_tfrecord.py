r"""python -m pipelines.coco_to_tfrecord --annotations=coco/annotations/instances_train2014.json \
    --image_dir=coco/train2014 --output_dir=data/coco

Converts one COCO split with `pipelines.converters.coco_lib.convert`: progress
on stderr, the summary line on stdout, a failure as one `error:` line.
Decisions: docs/data.md, Converters; limits: docs/reliability.md, Converters.
"""

import sys

from absl import app
from absl import flags

from pipelines.converters import coco_lib
from pipelines.converters import writer_flags
from pipelines.records import split_report
from pipelines.utils import console
from pipelines.utils import progress


def define_flags():
    """Defines this script's flags (only when run as a script)."""
    flags.DEFINE_string("annotations", None, "COCO instances_*.json file.",
                        required=True)
    flags.DEFINE_string("image_dir", None, "Folder of the split's images.",
                        required=True)
    flags.DEFINE_string("split", None, "Split name (default: from the "
                        "annotations file name, e.g. train2014).")
    writer_flags.define_writer_flags(num_shards=8)


def main(argv):
    del argv
    f = flags.FLAGS
    with progress.Progress(unit="images") as bar:
        try:
            report = coco_lib.convert(f.annotations, f.image_dir, f.output_dir,
                                      split=f.split, progress=bar,
                                      **writer_flags.writer_options(f))
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
    print(split_report.format_summary(report, f.output_dir)
          + f"; {report['dropped_unannotated']} unannotated images dropped")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
