r"""python -m pipelines.csv_to_tfrecord --csv=my_data/train.csv --image_dir=my_data/images \
    --output_dir=data/my_data --split=train

Converts the images a CSV lists with `pipelines.converters.csv_lib.convert`:
progress on stderr, the summary line on stdout, a failure as one `error:`
line. The CSV format and the decisions: docs/data.md, Converters; limits:
docs/reliability.md, Converters.
"""

import sys

from absl import app
from absl import flags

from pipelines.converters import csv_lib
from pipelines.converters import writer_flags
from pipelines.records import split_report
from pipelines.utils import console
from pipelines.utils import progress


def define_flags():
    """Defines this script's flags (only when run as a script)."""
    flags.DEFINE_string("csv", None, "CSV file: filename,label1|label2",
                        required=True)
    flags.DEFINE_string("image_dir", None, "Folder the CSV filenames are "
                        "relative to.", required=True)
    flags.DEFINE_string("classes", None, "Comma-separated class names or a "
                        "labels.txt file; default: sorted names in the CSV.")
    flags.DEFINE_string("split", "train", "Output split name.")
    writer_flags.define_writer_flags(num_shards=4)


def main(argv):
    del argv
    f = flags.FLAGS
    with progress.Progress(unit="images") as bar:
        try:
            report = csv_lib.convert(f.csv, f.image_dir, f.output_dir,
                                     classes=f.classes, split=f.split, progress=bar,
                                     **writer_flags.writer_options(f))
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
    print(split_report.format_summary(report, f.output_dir))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
