"""Checks of the training command that run before TensorFlow loads.

TensorFlow takes 10-20 s to start; `python -m mlcrl_tf.train` with data that
does not exist should not wait for it. `mlcrl_tf/__init__.py` calls
`check_before_tensorflow()` first: it reads the command line (flagfiles
expanded) and stops in one line when a local `--train_files`,
`--eval_files` or `--selection_files` glob matches no file, naming the
directory it looked in and the converter command of the flagfile
(docs/reliability.md, Training runs and checkpoints). Nothing here imports
TensorFlow.
"""

import glob
import os
import sys

from mlcrl_tf.training import flagfiles
from mlcrl_tf.training import onednn

DATA_FLAGS = ("train_files", "eval_files", "selection_files")
_NO_RUN_FLAGS = ("only_check_args", "help", "helpfull", "helpshort", "helpxml", "h", "?")
_CONVERTERS = ("python -m pipelines.coco_to_tfrecord, voc_to_tfrecord, csv_to_tfrecord "
               "or demo_dataset (README, Data)")


def _flag_values(args, names):
    """{name: last value} of `--name=value` / `--name value` in `args`."""
    values = {}
    for i, arg in enumerate(args):
        for name in names:
            for prefix in (f"--{name}", f"-{name}"):
                if arg.startswith(prefix + "="):
                    values[name] = arg[len(prefix) + 1:]
                elif arg == prefix and i + 1 < len(args):
                    values[name] = args[i + 1]
    return values


def converter_commands(flagfile):
    """The `python -m pipelines...` commands in a flagfile's header comments
    (continuation lines joined), in order."""
    commands, current = [], None
    with open(flagfile, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if current is not None:
                current += " " + text.rstrip("\\").strip()
            elif text.startswith("python -m pipelines."):
                current = text.rstrip("\\").strip()
            if current is not None and not text.endswith("\\"):
                commands.append(current)
                current = None
    return commands


def missing_data_problem(argv, cwd="."):
    """Why the command line's data flags cannot work, or None.

    Args:
        argv: the command line, program name first.
        cwd: the working directory relative paths are relative to.
    """
    try:
        values = _flag_values(flagfiles.expand(argv)[1:], DATA_FLAGS)
        named = [flagfiles.resolve(value) for value in
                 _flag_values(argv[1:], ("flagfile",)).values()]
    except (flagfiles.FlagfileError, OSError):
        return None  # absl reports it, after TensorFlow loaded
    for name in DATA_FLAGS:
        pattern = values.get(name)
        if not pattern or "://" in pattern or pattern.startswith("tfds:"):
            continue
        matched = [p for p in glob.glob(os.path.join(cwd, pattern))
                   if not os.path.basename(p).startswith(".")]
        if matched:
            continue
        where = os.path.abspath(os.path.join(cwd, os.path.dirname(pattern) or "."))
        commands = [c for path in named for c in converter_commands(path)]
        make = ("; ".join(commands) + f" (from {os.path.basename(named[0])})" if commands
                else _CONVERTERS)
        return (f"--{name}={pattern!r} matches no file: looked in {where} (a relative path "
                f"is relative to the working directory, {os.path.abspath(cwd)}). Make the "
                f"shards first: {make}.")
    return None


def check_before_tensorflow(orig_argv=None, argv=None):
    """Exits with one `error:` line if `python -m mlcrl_tf.train` names data
    that does not exist; does nothing for any other program."""
    orig_argv = sys.orig_argv if orig_argv is None else orig_argv
    if onednn.running_module(orig_argv) != onednn.TRAIN_MODULE:
        return
    argv = sys.argv if argv is None else argv
    if any(arg.lstrip("-").split("=")[0] in _NO_RUN_FLAGS for arg in argv[1:]):
        return  # absl answers these without running the training
    problem = missing_data_problem(argv)
    if problem:
        sys.exit(f"error: {problem}")
