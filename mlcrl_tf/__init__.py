"""mlcrl_tf: multi-label image classification by feature/label co-projection
with a constrained ranking loss (Keras 3 on TensorFlow).

Public modules: `mlcrl_tf.model` (build_model), `mlcrl_tf.losses`,
`mlcrl_tf.metrics`; command-line entry points `mlcrl_tf.train`,
`mlcrl_tf.evaluate`, `mlcrl_tf.export`, `mlcrl_tf.predict`,
`mlcrl_tf.visualize`.
"""

import os

# The training loop, tf.data pipeline and SavedModel export are TensorFlow
# code: pin Keras to its TensorFlow backend before keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Before TensorFlow loads: a `python -m mlcrl_tf.X` run hides TensorFlow's
# INFO logs unless --verbosity >= 0 or the user's TF_CPP_MIN_LOG_LEVEL asks
# for them (`pipelines.console`; the import of `pipelines` does it).
from pipelines.utils import console as _console  # noqa: E402
from pipelines.utils import module_aliases as _module_aliases  # noqa: E402

try:
    import tensorflow as _tf  # noqa: F401,E402
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(_console.INSTALL_HINT) from e

__version__ = "0.2.0"

# Release 0.1's module paths of the Python API (README) and of `.keras` files.
_module_aliases.install({
    "mlcrl_tf.model": "mlcrl_tf.modeling.model",
    "mlcrl_tf.backbones": "mlcrl_tf.modeling.backbones",
    "mlcrl_tf.losses": "mlcrl_tf.modeling.losses",
    "mlcrl_tf.optim": "mlcrl_tf.modeling.optim",
    "mlcrl_tf.metrics": "mlcrl_tf.evaluation.metrics",
})
