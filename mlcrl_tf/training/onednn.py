"""The training command's oneDNN default, set before TensorFlow loads.

TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it loads, and
`python -m mlcrl_tf.train` loads it (`mlcrl_tf/__init__.py`) before any
flag is parsed: so `set_train_default` reads `--onednn` from the raw
command line, flagfiles expanded, and sets the variable unless the user
did. The rule and its measurements: docs/design.md, Precision, oneDNN and
the CPU.
"""

import os
import sys

from mlcrl_tf.modeling import hardware
from mlcrl_tf.training import flagfiles

TRAIN_MODULE = "mlcrl_tf.train"
_FLAG_NAMES = ("--onednn", "-onednn")


def running_module(orig_argv):
    """The module of `python [options] -m MODULE ...`, or None."""
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        if arg == "-m":
            return orig_argv[i + 1] if i + 1 < len(orig_argv) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-X", "-W"):  # options with a separate value
            i += 2
            continue
        if not arg.startswith("-") or arg.startswith("-c") or arg == "-":
            return None  # a script, `-c` code or stdin: not -m
        i += 1
    return None


def command_line_setting(args):
    """The last valid `--onednn` among command-line arguments (flagfiles
    expanded), or "auto" when none is given.

    Args:
        args: the arguments without the program name; stops at `--`. A
            flagfile that cannot be read is skipped here (absl reports it).
    """
    try:
        args = flagfiles.expand(["prog"] + list(args))[1:]
    except flagfiles.FlagfileError:
        pass
    setting = "auto"
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if name not in _FLAG_NAMES:
            continue
        if not equals:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value in hardware.ONEDNN_SETTINGS:
            setting = value
    return setting


def set_train_default(orig_argv=None, argv=None, environ=None, flags=None):
    """Sets `TF_ENABLE_ONEDNN_OPTS` for `python -m mlcrl_tf.train`.

    Nothing happens for another program, or when the environment already
    has the variable (the user's value wins). Call it before TensorFlow
    loads (`mlcrl_tf/__init__.py` does).

    Args:
        orig_argv: default `sys.orig_argv` (which module `-m` runs).
        argv: default `sys.argv` (`["-m", ...]` while the package imports).
        environ: default `os.environ` (changed in place).
        flags: the CPU's flags (default `hardware.cpu_flags()`).

    Returns:
        The value set ("1" or "0"), or None when nothing was set.
    """
    orig_argv = sys.orig_argv if orig_argv is None else orig_argv
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if (running_module(orig_argv) != TRAIN_MODULE or not argv or argv[0] != "-m"
            or hardware.ONEDNN_ENV in environ):
        return None
    value = hardware.onednn_env_value(command_line_setting(argv[1:]), flags)
    if value is not None:
        environ[hardware.ONEDNN_ENV] = value
    return value
