"""Flagfiles by name: `--flagfile=coco.flags` from any directory.

An include is resolved relative to the including file, then to the working
directory, then as a flagfile shipped in `mlcrl_tf/configs/`
(docs/ecosystem.md, Flagfiles by name).
"""

import os
import sys

from absl import app
from absl import flags

# mlcrl_tf/configs/: the flagfiles shipped in the package.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_LEGACY_PREFIX = "configs" + os.sep
_DIRECTIVES = ("--flagfile", "-flagfile")


class FlagfileError(flags.Error, ValueError):
    """A flagfile that cannot be found, read or expanded (cycle)."""


def shipped_names():
    """Names of the flagfiles shipped with the package, sorted."""
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith(".flags"))


def shipped_path(name):
    """Path of a shipped flagfile by name (`coco.flags` or `configs/coco.flags`).

    Returns:
        The absolute path, or None when no shipped flagfile has that name.
    """
    name = os.path.normpath(name).removeprefix(_LEGACY_PREFIX)
    if os.sep in name or name in (os.curdir, os.pardir):
        return None
    path = os.path.join(CONFIGS_DIR, name)
    return path if os.path.isfile(path) else None


def resolve(name, including_file=None):
    """Finds the flagfile that `--flagfile=name` means.

    Args:
        name: the value of the `--flagfile` directive (`~` is expanded).
        including_file: path of the flagfile holding the directive, or None
            for the command line.

    Returns:
        The path of the file (absolute when it came from the shipped configs
        or the including file's directory).

    Raises:
        FlagfileError: no such file; the message lists what was tried and
            the shipped names.
    """
    name = os.path.expanduser(name.strip())
    if not name:
        raise FlagfileError("--flagfile is empty")
    candidates = []
    if including_file is not None and not os.path.isabs(name):
        candidates.append(os.path.join(os.path.dirname(including_file), name))
    candidates.append(name)
    for path in candidates:
        if os.path.isfile(path):
            return path
    shipped = shipped_path(name)
    if shipped:
        return shipped
    where = f" (included from {including_file})" if including_file else ""
    tried = ", ".join(dict.fromkeys(candidates))
    raise FlagfileError(
        f"--flagfile={name}{where}: no such file (tried {tried}) and no shipped "
        f"flagfile of that name; shipped: {', '.join(shipped_names()) or 'none'}")


def _read_lines(path):
    """The flag lines of a flagfile: stripped, without blanks and comments."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FlagfileError(f"--flagfile={path}: cannot read it ({e})") from None
    lines = (line.strip() for line in lines)
    return [line for line in lines
            if line and not line.startswith(("#", "//"))]


def _directive_value(arg):
    """`x` for `--flagfile=x` / `-flagfile=x`, "" for a bare directive, else None."""
    for directive in _DIRECTIVES:
        if arg == directive:
            return ""
        if arg.startswith(directive + "="):
            return arg[len(directive) + 1:]
    return None


def _expand_file(path, stack):
    """The flags of one flagfile with its includes expanded, in order."""
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join(list(stack.values()) + [path])
        raise FlagfileError(f"--flagfile include cycle: {chain}")
    stack[real] = path
    out = []
    for line in _read_lines(path):
        value = _directive_value(line)
        if value is None:
            out.append(line)
        elif not value:
            raise FlagfileError(f"--flagfile={path}: a bare '{line}' line needs "
                                "'=NAME' (one flag per line)")
        else:
            out.extend(_expand_file(resolve(value, including_file=path), stack))
    del stack[real]
    return out


def expand(argv):
    """Expands every flagfile directive of a command line, recursively.

    Args:
        argv: the full command line, program name first (like `sys.argv`).
            Arguments after `--` are left alone.

    Returns:
        A new argv without flagfile directives: each one is replaced in place
        by its file's flags, so later flags still override earlier ones.

    Raises:
        FlagfileError: a missing or unreadable file, an include cycle, or
            `--flagfile` without a value.
    """
    out, rest = list(argv[:1]), list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            out.append(arg)
            out.extend(rest)
            break
        value = _directive_value(arg)
        if value is None:
            out.append(arg)
            continue
        if not value:
            if not rest:
                raise FlagfileError(f"{arg} needs a file name")
            value = rest.pop(0)
        out.extend(_expand_file(resolve(value), {}))
    return out


def parse_flags_with_usage(argv):
    """absl flags parser that resolves flagfiles by name first.

    For `app.run(main, flags_parser=parse_flags_with_usage)`. A flagfile
    error is reported like any other flag error: one `FATAL Flags parsing
    error: ...` line on stderr and exit status 1, no traceback.

    Args:
        argv: the full command line, program name first.

    Returns:
        The remaining arguments (program name first), as absl returns them.
    """
    try:
        expanded = expand(argv)
    except FlagfileError as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.exit(1)
    return app.parse_flags_with_usage(expanded)
