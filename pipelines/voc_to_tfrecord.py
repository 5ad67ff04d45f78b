r"""python -m pipelines.voc_to_tfrecord --voc_dir=VOCdevkit/VOC2007 --split=trainval \
    --output_dir=data/voc2007

Converts one VOC 2007 split with `pipelines.converters.voc_lib.convert`:
progress on stderr, the summary line on stdout, a failure as one `error:`
line. Decisions: docs/data.md, Converters; limits: docs/reliability.md,
Converters.
"""

import sys

from absl import app
from absl import flags

from pipelines.converters import voc_lib
from pipelines.converters import writer_flags
from pipelines.records import split_report
from pipelines.utils import console
from pipelines.utils import progress


def define_flags():
    """Defines this script's flags (only when run as a script)."""
    flags.DEFINE_string("voc_dir", None, ".../VOCdevkit/VOC2007",
                        required=True)
    flags.DEFINE_enum("split", None, list(voc_lib.VOC_SPLITS), "VOC split.",
                      required=True)
    writer_flags.define_writer_flags(num_shards=4)


def main(argv):
    del argv
    f = flags.FLAGS
    with progress.Progress(unit="images") as bar:
        try:
            report = voc_lib.convert(f.voc_dir, f.split, f.output_dir, progress=bar,
                                     **writer_flags.writer_options(f))
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
    print(split_report.format_summary(report, f.output_dir))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
