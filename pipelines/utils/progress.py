"""Progress of a long job: count/total, rate per second and ETA: `Progress`.

One line redrawn in place on a terminal, a full line every 10 s otherwise (a
log stays readable). Pure Python, so the converters, evaluation and training
all use it. The behaviour in detail: docs/reliability.md, Progress reporting.
"""

import sys
import time


def format_duration(seconds):
    """`3725.2` -> "1:02:05"; `65` -> "1:05"; None -> "?"."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


def _is_tty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # No isatty, or a closed stream.
        return False


class Progress:
    """Reports the progress of a job to a stream: count, rate, ETA.

    `start` (re)starts the count, `update` adds done units, `message` prints
    a line that stays, and `close` (also on leaving a `with` block without an
    exception) prints the final line: count, elapsed time and mean rate.

    Args:
        total: number of units the job has, or None if unknown (no
            percentage, no ETA). `start()` may set it later.
        unit: what is counted, plural ("images", "steps").
        description: a prefix of every line (e.g. the split name).
        stream: where to write; default `sys.stderr` at construction.
        clock: a function returning seconds (monotonic); for tests.
        interval: seconds between lines when the stream is not a terminal.
        is_tty: redraw one line in place; default: `stream.isatty()`.
        tty_interval: minimum seconds between redraws on a terminal.

    Example:

    >>> import io
    >>> out, now = io.StringIO(), [0.0]
    >>> with Progress(unit="images", stream=out, clock=lambda: now[0], is_tty=False) as bar:
    ...     bar.start(total=100, description="train")
    ...     now[0] = 10.0
    ...     bar.update(50)
    >>> print(out.getvalue(), end="")
    train: 0/100 images (0.0%)
    train: 50/100 images (50.0%), 5.0 images/s, ETA 0:10
    train: 50 images in 0:10 (5.0 images/s)
    """

    def __init__(self, total=None, unit="items", description="", stream=None,
                 clock=time.monotonic, interval=10.0, is_tty=None,
                 tty_interval=0.1):
        self.unit = unit
        self.description = description
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.interval = float(interval)
        self.tty_interval = float(tty_interval)
        self.is_tty = _is_tty(self.stream) if is_tty is None else is_tty
        self.total = total
        self.count = 0
        self.extra = ""
        self._start = self.clock()
        self._last_draw = None
        self._drawn_width = 0  # Width of the progress line on a terminal.

    # === Reading the state ===

    @property
    def elapsed(self):
        """Seconds since `start()` (or construction)."""
        return max(0.0, self.clock() - self._start)

    @property
    def rate(self):
        """Mean units per second since `start()`; None before any unit."""
        elapsed = self.elapsed
        if self.count <= 0 or elapsed <= 0:
            return None
        return self.count / elapsed

    @property
    def eta(self):
        """Seconds left at the mean rate; None if unknown."""
        rate = self.rate
        if rate is None or self.total is None:
            return None
        return max(0, self.total - self.count) / rate

    def line(self):
        """The current progress line (without a newline)."""
        parts = [f"{self.count}/{self.total}" if self.total is not None
                 else str(self.count)]
        parts[0] += f" {self.unit}"
        if self.total:
            parts[0] += f" ({100.0 * self.count / self.total:.1f}%)"
        rate = self.rate
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s")
        eta = self.eta
        if eta is not None and self.count < self.total:
            parts.append(f"ETA {format_duration(eta)}")
        if self.extra:
            parts.append(self.extra)
        return self._prefix() + ", ".join(parts)

    def summary(self):
        """The final line: count, elapsed time and mean rate."""
        rate = self.rate
        text = (f"{self.count} {self.unit} in "
                f"{format_duration(self.elapsed)}")
        if rate is not None:
            text += f" ({rate:.1f} {self.unit}/s)"
        if self.extra:
            text += f", {self.extra}"
        return self._prefix() + text

    # === Changing the state ===

    def start(self, total=None, description=None):
        """Starts (or restarts) counting from 0 and draws the first line.

        Args:
            total: the job's size; None keeps the current one.
            description: a new prefix; None keeps the current one.
        """
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        self.count = 0
        self.extra = ""
        self._start = self.clock()
        self._last_draw = None
        self._draw(force=True)

    def update(self, n=1, extra=None):
        """Adds `n` done units; `extra` (if given) replaces the extra text
        shown after the rate (e.g. "loss 0.41")."""
        self.count += n
        if extra is not None:
            self.extra = str(extra)
        self._draw(force=False)

    def message(self, text):
        """Prints `text` on a line of its own that stays."""
        if self.is_tty and self._drawn_width:
            self._write("\r" + " " * self._drawn_width + "\r")
            self._write(f"{text}\n")
            self._drawn_width = 0
            self._draw(force=True)
        else:
            self._write(f"{text}\n")

    def close(self):
        """Prints the final line (and ends the terminal line)."""
        self._end_line(self.summary())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._end_line(None)  # Leave the last state; print no summary.
        return False

    # === Drawing ===

    def _prefix(self):
        return f"{self.description}: " if self.description else ""

    def _draw(self, force):
        now = self.clock()
        wait = self.tty_interval if self.is_tty else self.interval
        if not force and self._last_draw is not None and (
                now - self._last_draw < wait):
            return
        self._last_draw = now
        text = self.line()
        if self.is_tty:
            self._write("\r" + text.ljust(self._drawn_width))
            self._drawn_width = len(text)
        else:
            self._write(text + "\n")

    def _end_line(self, text):
        if self.is_tty:
            if text is not None:
                self._write("\r" + " " * self._drawn_width + "\r" + text
                            + "\n")
            elif self._drawn_width:
                self._write("\n")
            self._drawn_width = 0
        elif text is not None:
            self._write(text + "\n")

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()
