"""Keras dtype policies, scoped to the model being built."""

import contextlib

import keras


@contextlib.contextmanager
def dtype_policy(policy):
    """Builds layers under a Keras dtype policy, then restores the global one.

    Layers keep the policy they were built with, so float32 and
    mixed-precision models can live in one process.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
