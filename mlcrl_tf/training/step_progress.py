"""Training's progress line: step, loss, speed and ETA (docs/design.md, Console)."""

import sys
import time

from pipelines.utils import progress


class StepProgress(progress.Progress):
    """Reports step, loss, speed and ETA of a training run.

    Args:
        total_steps: the run's last step number.
        global_batch_size: images per step (for images/s).
        stream: where to write (default sys.stdout).
        is_tty: override TTY detection (tests).
        clock: a function returning seconds (monotonic); for tests.

    Example:
    >>> import io
    >>> progress = StepProgress(total_steps=100, global_batch_size=32, is_tty=False,
    ...                         stream=io.StringIO())
    >>> progress.start(step=0)
    >>> sorted(progress.update(step=10, loss=0.5))
    ['images_per_sec', 'steps_per_sec']
    """

    def __init__(self, total_steps, global_batch_size, stream=None, is_tty=None,
                 clock=time.monotonic):
        super().__init__(total=int(total_steps), unit="steps",
                         stream=sys.stdout if stream is None else stream,
                         clock=clock, interval=0.0, is_tty=is_tty, tty_interval=0.0)
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.step = self.first_step = 0
        self.loss = None
        self.speed = {"steps_per_sec": 0.0, "images_per_sec": 0.0}
        self._run_start = self._last_time = clock()

    def start(self, step):
        """Marks the step the run (re)starts from; draws nothing."""
        self._run_start = self._last_time = self.clock()
        self.step = self.first_step = int(step)
        self.count = 0

    def resume(self):
        """Starts the next speed interval now, after a pause in training.

        Call it after an evaluation: the speed of the next report is then
        that of the training steps since, not diluted by the evaluation.
        """
        self._last_time = self.clock()

    def update(self, step, loss, extra=""):
        """Writes one report; returns the speed since the previous report.

        Returns:
            dict with `steps_per_sec` and `images_per_sec` of the last interval.
        """
        now = self.clock()
        steps_per_sec = (int(step) - self.step) / max(now - self._last_time, 1e-9)
        self.speed = {"steps_per_sec": steps_per_sec,
                      "images_per_sec": steps_per_sec * self.global_batch_size}
        self._last_time = now
        self.step, self.loss = int(step), float(loss)
        super().update(self.step - self.first_step - self.count, extra=extra)
        return dict(self.speed)

    def line(self):
        """The training line (see the module doc)."""
        overall = self.count / max(self.clock() - self._run_start, 1e-9)
        remaining = self.total_steps - self.step
        eta = progress.format_duration(remaining / overall) if overall > 0 else "?"
        width = len(str(self.total_steps))
        loss = f"{self.loss:.4f}" if self.loss is not None else "?"
        line = (f"step {self.step:>{width}}/{self.total_steps} "
                f"({100.0 * self.step / max(self.total_steps, 1):5.1f}%) "
                f"loss {loss} | {self.speed['steps_per_sec']:.2f} steps/s "
                f"{self.speed['images_per_sec']:.1f} img/s | ETA {eta}")
        return line + (f" | {self.extra}" if self.extra else "")
