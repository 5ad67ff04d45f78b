"""A quiet console for the command lines: TensorFlow's and absl's INFO
chatter only when asked for.

`quiet_tensorflow_logs` (called by both packages' `__init__` before TensorFlow
loads) sets `TF_CPP_MIN_LOG_LEVEL=1` for a `python -m` run without
`--verbosity`; `hidden_info_lines` filters the lines TensorFlow prints anyway;
`parse_flags`, every command line's `flags_parser`, keeps absl at WARNING.
Why, and the limits: docs/data.md, Console and progress.
"""

import contextlib
import os
import re
import sys
import tempfile

from absl import app
from absl import flags

ENV = "TF_CPP_MIN_LOG_LEVEL"
# C++ INFO and WARNING off (TensorFlow's performance hints, tf.data's
# "GeneratorDatasetOp ... will not be optimized" under MirroredStrategy);
# errors still shown. --verbosity=0 shows everything.
QUIET_LEVEL = "2"
WARNING = -1  # absl verbosity of a command line without --verbosity.
ABSEIL_NOTICE = ("WARNING: All log messages before absl::InitializeLog() is "
                 "called are written to STDERR")
INSTALL_HINT = ("mlcrl_tf needs TensorFlow 2.21: install it with `pip install "
                ".[cpu]` (tensorflow-cpu) or `pip install .[gpu]` "
                "(tensorflow[and-cuda]).")

# glog/abseil prefix of an INFO line ("I<mmdd> <time> <thread> <file>:<line>] ");
# before absl::InitializeLog the time reads 00:00:<epoch seconds>.
_INFO_LINE = re.compile(r"^I\d{4} \d+:\d+:\d+\.\d+\s+\d+ \S+:\d+\] ")
_VERBOSITY_FLAG = re.compile(r"^--?(?:verbosity|v)(?:=(?P<value>.*))?$")


def command_line_verbosity(args):
    """The value of the last `--verbosity`/`-v` among command-line arguments.

    Args:
        args: the arguments (without the program name). Accepts absl's
            spellings `--verbosity=N`, `--verbosity N`, `-v N`, `-v=N`,
            `--v=N`; stops at `--`.

    Returns:
        The integer, or None if absent or not an integer (absl then reports
        the bad value itself).
    """
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        match = _VERBOSITY_FLAG.match(arg)
        if not match:
            continue
        text = match.group("value")
        if text is None:
            text = args[i + 1] if i + 1 < len(args) else ""
        try:
            value = int(text)
        except ValueError:
            continue
    return value


def is_command_line_run(argv):
    """True while `python -m package.module` imports the package."""
    return bool(argv) and argv[0] == "-m"


def quiet_tensorflow_logs(argv=None, environ=None):
    """Chooses TensorFlow's C++ log level before TensorFlow loads.

    Args:
        argv: default `sys.argv`.
        environ: default `os.environ` (changed in place).

    Returns:
        True when TensorFlow's INFO lines are to be hidden: the environment
        (ours or the user's) asks for `TF_CPP_MIN_LOG_LEVEL` >= 1.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if is_command_line_run(argv) and ENV not in environ:
        verbosity = command_line_verbosity(argv[1:])
        if verbosity is None or verbosity < 0:
            environ[ENV] = QUIET_LEVEL
    try:
        return int(environ.get(ENV, "0")) >= 1
    except ValueError:
        return False


def drop_info_lines(text):
    """`text` without C++ INFO lines and abseil's pre-initialisation notice."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not _INFO_LINE.match(line)
                   and line.rstrip("\r\n") != ABSEIL_NOTICE)


@contextlib.contextmanager
def hidden_info_lines():
    """Captures file descriptor 2 in the block; writes back all but INFO lines.

    If the block raises, everything captured is written back unfiltered.
    Without a usable file descriptor 2 the block runs uncaptured.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = text if failed else drop_info_lines(text)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


INTERRUPTED = ("interrupted (Ctrl-C): stopped. Files are written whole or not at all: "
               "no partial output was left in place.")


def _interrupt_is_one_line(kind, value, tb):
    """`sys.excepthook` of a command line: a Ctrl-C (KeyboardInterrupt) ends
    in one line instead of a traceback (the exit status stays 130)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write(INTERRUPTED + "\n")
        return
    sys.__excepthook__(kind, value, tb)


def parse_flags(argv, parser=app.parse_flags_with_usage):
    """A CLI's `flags_parser`: absl's, with WARNING as the default verbosity.

    `app.run` raises an unset `--verbosity` to INFO right after parsing; an
    explicit value here keeps WARNING unless the user gave one. It also makes
    a Ctrl-C of the command one line (`_interrupt_is_one_line`).

    Args:
        argv: the command line.
        parser: the parser to wrap (e.g. `flagfiles.parse_flags_with_usage`).

    Returns:
        What `parser` returns.
    """
    sys.excepthook = _interrupt_is_one_line
    args = parser(argv)
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = WARNING
    return args
