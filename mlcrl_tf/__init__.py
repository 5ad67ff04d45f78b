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

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mlcrl_tf needs TensorFlow 2.21: install it with `pip install .[cpu]` "
        "(tensorflow-cpu) or `pip install .[gpu]` (tensorflow[and-cuda])."
    ) from e

__version__ = "0.1.0"
