"""Keras dtype policies, scoped to the model being built; where bfloat16 is native.

`native_bfloat16_problem` says when this machine would compute bfloat16
slowly (docs/design.md, Precision, oneDNN and the CPU).
"""

import contextlib

import keras
import tensorflow as tf

from mlcrl_tf.modeling import hardware

# What --precision=mixed_bfloat16 costs on a CPU without native bfloat16, as
# measured (docs/design.md, Precision, oneDNN and the CPU).
SLOW_BFLOAT16_TRAINING = (
    "training measured 7-13x slower than float32 on an AVX2-only AMD EPYC (ResNet-50, "
    "224 px, batch 8: 30-66 s vs 2.3-9.0 s per step in two runs), while an Intel Xeon with "
    "AMX-BF16 trains 1.4-1.5x faster")
SLOW_BFLOAT16_SERVING = (
    "serving measured 1.04-1.28x slower than float32 on an AVX2-only AMD EPYC (small CNN "
    "at 96 px, ResNet-50 at 224 px, batch 1 and 8), while an Intel Xeon with AMX-BF16 "
    "serves in 0.64-0.72x the float32 time")


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


def gpu_compute_capabilities():
    """(major, minor) of each visible NVIDIA GPU (empty without one)."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability:
            capabilities.append(tuple(capability))
    return capabilities


def native_bfloat16_problem():
    """Why this machine computes bfloat16 slowly, or None.

    The model runs on the GPUs when TensorFlow sees any (each needs compute
    capability >= 8.0), else on the CPU (it needs AMX-BF16 or AVX-512 BF16,
    read from /proc/cpuinfo; unknown flags, e.g. off Linux, are no problem).

    Returns:
        None, or a phrase such as "AMD EPYC (AVX2, no AMX-BF16 nor AVX-512
        BF16), a CPU without native bfloat16".
    """
    gpus = gpu_compute_capabilities()
    if gpus:
        slow = [c for c in gpus if not hardware.gpu_has_native_bfloat16(c)]
        if slow:
            return (f"a GPU of compute capability {slow[0][0]}.{slow[0][1]} (native "
                    "bfloat16 needs 8.0 or more)")
        return None
    flags = hardware.cpu_flags()
    if hardware.cpu_has_native_bfloat16(flags) is False:
        return f"{hardware.describe_cpu(flags)}, a CPU without native bfloat16"
    return None
