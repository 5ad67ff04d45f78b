"""SIGTERM and SIGINT during training: finish the step, save, stop in one line.

Cloud schedulers and spot machines send SIGTERM, then SIGKILL after a grace
period; Ctrl-C sends SIGINT. Either makes the training loop finish its
current step, save a checkpoint and stop with `StopRequested`
(docs/reliability.md, Preemption).
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """Training stopped on a signal; the message names the checkpoint to resume from.

    Attributes:
        signal_number: the signal received (the command line exits with
            128 + it, as a process killed by it would).
    """

    def __init__(self, signal_number, message):
        super().__init__(message)
        self.signal_number = signal_number


class StopSignals:
    """Turns SIGTERM and SIGINT into a request the training loop honours.

    While installed (a context manager; only in the main thread, where Python
    delivers signals; a signal the process was started ignoring, as under
    `nohup` or `cmd &`, stays ignored), a first signal sets `received`: the loop saves after
    the step in flight and raises `StopRequested`. Inside `immediate()` (an
    evaluation, after the epoch's checkpoint was saved) the signal raises
    `StopRequested` at once. A second signal restores the default action and
    delivers itself again: the process ends as it would have without us.

    Example:
    >>> with StopSignals() as signals:
    ...     signals.received is None
    True
    """

    def __init__(self):
        self.received = None
        self._immediate = False
        self._message = ""
        self._previous = {}

    def __enter__(self):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:  # nohup, `cmd &`
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    @contextlib.contextmanager
    def immediate(self, message):
        """Within the block a signal raises `StopRequested` at once, with
        `message` ("{signal}" in it becomes the signal's name)."""
        self._message = message
        if self.received is not None:
            raise self._stop(self.received)
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False

    def _handle(self, number, unused_frame):
        if self.received is not None:  # the second one: stop the default way
            signal.signal(number, signal.SIG_DFL)
            signal.raise_signal(number)
            return
        self.received = number
        if self._immediate:
            raise self._stop(number)

    def _stop(self, number):
        return StopRequested(number, self._message.format(signal=signal.Signals(number).name))
