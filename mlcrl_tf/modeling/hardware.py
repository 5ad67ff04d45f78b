"""What the CPU computes natively, read from /proc/cpuinfo without TensorFlow.

Importable before TensorFlow loads (the training CLI's oneDNN default is
decided then). Native bfloat16 and the oneDNN rules: docs/design.md,
Precision, oneDNN and the CPU.
"""

import platform

CPUINFO = "/proc/cpuinfo"
# x86 flags (Linux's names) of the units that compute bfloat16 natively; `bf16`
# is the aarch64 feature (Armv8.6 BF16 instructions).
NATIVE_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# The flags with which TensorFlow 2.21 turns its oneDNN kernels on by itself
# on Linux x86 (DefaultOneDnnPolicy in tensorflow/core/util/port.cc).
TENSORFLOW_ONEDNN_CPU_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
                               "amx_int8", "amx_bf16")
# GPUs compute bfloat16 natively from compute capability 8.0 (Ampere) on.
NATIVE_BFLOAT16_GPU_CAPABILITY = (8, 0)
_FLAG_KEYS = ("flags", "features")  # x86, aarch64
# --onednn of the training command, and the variable TensorFlow reads when it loads.
ONEDNN_SETTINGS = ("auto", "on", "off")
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
_ENV_TRUE, _ENV_FALSE = ("1", "true"), ("0", "false")


def cpu_flags(path=None):
    """The CPU's feature flags, or None when they cannot be read (not Linux).

    Args:
        path: the cpuinfo file; default `CPUINFO` (read at call time, so a
            test can point it at a fake file).

    Returns:
        A frozenset of lower-case flag names (those of the first processor).
    """
    path = CPUINFO if path is None else path
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in _FLAG_KEYS:
            return frozenset(value.lower().split())
    return None


def cpu_name(path=None):
    """The CPU's model name from cpuinfo (e.g. "AMD EPYC"), or "this CPU"."""
    path = CPUINFO if path is None else path
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return "this CPU"


def cpu_has_native_bfloat16(flags):
    """True/False from `cpu_flags()`'s set; None when the flags are unknown."""
    if flags is None:
        return None
    return any(flag in flags for flag in NATIVE_BFLOAT16_CPU_FLAGS)


def gpu_has_native_bfloat16(capability):
    """True for a GPU of compute capability (major, minor) >= 8.0."""
    return tuple(capability) >= NATIVE_BFLOAT16_GPU_CAPABILITY


def tensorflow_enables_onednn(flags, machine=None, system=None):
    """Whether TensorFlow 2.21 turns oneDNN on by itself on this CPU.

    Its rule on Linux x86: on with any of `TENSORFLOW_ONEDNN_CPU_FLAGS`,
    off otherwise; None where this module does not know the rule (other
    systems and architectures, unreadable flags).
    """
    if not is_linux_x86(machine, system) or flags is None:
        return None
    return any(flag in flags for flag in TENSORFLOW_ONEDNN_CPU_FLAGS)


def is_linux_x86(machine=None, system=None):
    """True on Linux x86-64 (the platform whose oneDNN default we measured)."""
    machine = (platform.machine() if machine is None else machine).lower()
    system = (platform.system() if system is None else system).lower()
    return system == "linux" and machine in ("x86_64", "amd64")


def describe_cpu(flags, path=None):
    """"AMD EPYC (no AMX-BF16 nor AVX-512 BF16)"-style text for messages."""
    name = cpu_name(path)
    if flags is None:
        return f"{name} (flags unknown)"
    native = [flag for flag in NATIVE_BFLOAT16_CPU_FLAGS if flag in flags]
    if native:
        return f"{name} ({', '.join(native)})"
    best = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return f"{name} ({best.upper() + ', ' if best else ''}no AMX-BF16 nor AVX-512 BF16)"


def onednn_env_value(setting, flags=None, machine=None, system=None):
    """The `TF_ENABLE_ONEDNN_OPTS` value the training command sets for `--onednn`.

    Args:
        setting: "on", "off" or "auto" (on where TensorFlow would leave
            oneDNN off on Linux x86-64: measured faster training there).
        flags: `cpu_flags()` (default: read now).
        machine, system: default `platform`'s (for tests).

    Returns:
        "1", "0", or None to leave TensorFlow's own default.
    """
    if setting == "on":
        return "1"
    if setting == "off":
        return "0"
    flags = cpu_flags() if flags is None else flags
    return "1" if tensorflow_enables_onednn(flags, machine, system) is False else None


def onednn_warning(setting, environ):
    """One line when `--onednn=setting` did not decide this process's oneDNN.

    Args:
        setting: the run's `--onednn`.
        environ: the environment TensorFlow was loaded with (`os.environ`).

    Returns:
        None, or the warning: the user's `TF_ENABLE_ONEDNN_OPTS` overrode the
        flag, or the flag came too late (not `python -m mlcrl_tf.train`, which
        applies it before TensorFlow loads).
    """
    if setting == "auto":
        return None
    value = environ.get(ONEDNN_ENV)
    if value is None:
        return (f"--onednn={setting} has no effect here: `python -m mlcrl_tf.train` "
                "applies it before TensorFlow loads; elsewhere set "
                f"{ONEDNN_ENV}={'1' if setting == 'on' else '0'} before importing "
                "TensorFlow.")
    wanted = _ENV_TRUE if setting == "on" else _ENV_FALSE
    if value.strip().lower() not in wanted:
        return (f"--onednn={setting} is overridden by {ONEDNN_ENV}={value} in the "
                "environment (the variable wins; TensorFlow read it when it loaded).")
    return None
