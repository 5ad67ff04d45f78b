"""A progress display for long training runs that stays readable in log files.

On a terminal the line is redrawn in place; when stdout is not a TTY (a log
file, CI, `nohup`) a full line is printed at each report instead, so logs
never fill with carriage returns.
"""

import sys
import time


def format_duration(seconds):
    """3725 -> '1h02m05s'; 65 -> '1m05s'; 5.2 -> '5s'."""
    seconds = int(max(0, round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Reports step, loss, speed and ETA.

    Args:
        total_steps: the run's last step number.
        global_batch_size: images per step (for images/s).
        stream: where to write (default sys.stdout).
        is_tty: override TTY detection (tests).

    Example:
    >>> p = Progress(total_steps=100, global_batch_size=32, is_tty=False)
    >>> p.start(step=0)
    >>> line = p.update(step=10, loss=0.5)
    """

    def __init__(self, total_steps, global_batch_size, stream=None, is_tty=None):
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self._start_time = self._last_time = None
        self._start_step = self._last_step = 0

    def start(self, step):
        """Marks the step the run (re)starts from."""
        self._start_time = self._last_time = time.monotonic()
        self._start_step = self._last_step = int(step)

    def update(self, step, loss, extra=""):
        """Writes one report; returns the speed since the previous report.

        Returns:
            dict with `steps_per_sec` and `images_per_sec` of the last interval.
        """
        now = time.monotonic()
        steps = int(step) - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_sec = steps / elapsed
        total_elapsed = max(now - self._start_time, 1e-9)
        overall_rate = (int(step) - self._start_step) / total_elapsed
        remaining = self.total_steps - int(step)
        eta = format_duration(remaining / overall_rate) if overall_rate > 0 else "?"
        width = len(str(self.total_steps))
        line = (f"step {int(step):>{width}}/{self.total_steps} "
                f"({100.0 * int(step) / max(self.total_steps, 1):5.1f}%) "
                f"loss {loss:.4f} | {steps_per_sec:.2f} steps/s "
                f"{steps_per_sec * self.global_batch_size:.1f} img/s | ETA {eta}")
        if extra:
            line += f" | {extra}"
        self._write(line)
        self._last_time, self._last_step = now, int(step)
        return {"steps_per_sec": steps_per_sec,
                "images_per_sec": steps_per_sec * self.global_batch_size}

    def message(self, text):
        """A line that must stay in the log (epoch summaries, checkpoints)."""
        if self.is_tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def _write(self, line):
        if self.is_tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
