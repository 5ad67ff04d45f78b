"""The data layer: converters (COCO 2014, VOC 2007, CSV -> TFRecords), the
tf.data input pipeline and the "outfits" demo set of Fashion-MNIST photos.

Importing the package sets the console up before TensorFlow loads: a
`python -m pipelines.X` run hides TensorFlow's INFO logs unless asked for.
The folders and the decisions: docs/data.md (Layout; Console and progress).
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from pipelines.utils import console as _console  # noqa: E402
from pipelines.utils import module_aliases as _module_aliases  # noqa: E402

if "tensorflow" not in sys.modules and _console.quiet_tensorflow_logs():
    # TensorFlow prints a few INFO lines at load whatever the level: load it
    # now, with them filtered out.
    with _console.hidden_info_lines():
        try:
            import tensorflow as _tf  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(_console.INSTALL_HINT) from e

# Release 0.1's module path of the input pipeline (README's Python API).
_module_aliases.install({"pipelines.input_pipeline": "pipelines.tfdata.input_pipeline"})
