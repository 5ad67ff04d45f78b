"""mlcrl_tf: multi-label image classification by feature/label co-projection
with a constrained ranking loss (Keras 3 on TensorFlow).

The command lines are `python -m mlcrl_tf.{train,evaluate,export,predict,visualize}`;
the Python API is in `mlcrl_tf.modeling` (README, Python API). The folders are
the layers (docs/design.md, Package layout).
"""

import os
import sys

# The training loop, tf.data pipeline and SavedModel export are TensorFlow
# code: pin Keras to its TensorFlow backend before keras is first imported.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Before TensorFlow loads (the import of `pipelines` below loads it):
# `python -m mlcrl_tf.train` turns TensorFlow's oneDNN kernels on where
# TensorFlow would leave them off, unless --onednn or the user's
# TF_ENABLE_ONEDNN_OPTS says otherwise (docs/design.md, Precision, oneDNN and
# the CPU).
from mlcrl_tf.training import onednn as _onednn  # noqa: E402

if "tensorflow" not in sys.modules:
    _onednn.set_train_default()

# Before TensorFlow loads (10-20 s): `python -m mlcrl_tf.train` with data that
# does not exist stops at once, in one line.
from mlcrl_tf.training import preflight as _preflight  # noqa: E402

_preflight.check_before_tensorflow()

# Before TensorFlow loads: a `python -m mlcrl_tf.X` run hides TensorFlow's
# INFO logs unless --verbosity >= 0 or the user's TF_CPP_MIN_LOG_LEVEL asks
# for them (`pipelines.utils.console`; the import of `pipelines` does it).
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
