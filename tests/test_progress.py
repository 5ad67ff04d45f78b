"""Tests of pipelines.progress with a fake clock and an in-memory stream."""

import io

import pytest

from pipelines.utils import progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class TtyStream(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("seconds,text", [
    (None, "?"), (0, "0:00"), (65, "1:05"), (3725.2, "1:02:05"),
    (59.6, "1:00")])
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text


def test_log_stream_gets_one_full_line_per_interval():
    clock, stream = FakeClock(), io.StringIO()
    p = progress.Progress(unit="images", description="train", stream=stream,
                          clock=clock, interval=10)
    assert not p.is_tty
    p.start(total=1000)
    for _ in range(30):  # 30 updates of 10 images, one per second.
        clock.now += 1
        p.update(10)
    p.message("skipped a.jpg: empty file")
    clock.now += 0.5
    p.update(700)
    p.close()
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue()
    assert lines[0] == "train: 0/1000 images (0.0%)"
    # One line at 10 s and one at 20 s, 30 s: rate = 10 images/s.
    assert lines[1] == "train: 100/1000 images (10.0%), 10.0 images/s, ETA 1:30"
    assert lines[2].startswith("train: 200/1000 images (20.0%)")
    assert lines[3] == "train: 300/1000 images (30.0%), 10.0 images/s, ETA 1:10"
    assert lines[4] == "skipped a.jpg: empty file"
    assert lines[5] == "train: 1000 images in 0:30 (32.8 images/s)"
    assert lines[6:] == [""]


def test_tty_redraws_one_line_and_keeps_messages():
    clock, stream = FakeClock(), TtyStream()
    p = progress.Progress(total=4, unit="steps", stream=stream, clock=clock,
                          tty_interval=0.1)
    assert p.is_tty
    p.start()
    clock.now += 1
    p.update(1, extra="loss 0.5")
    p.update(1)  # Within tty_interval of the last draw: not drawn.
    clock.now += 1
    p.message("checkpoint saved")
    clock.now += 2
    p.update(2)
    p.close()
    text = stream.getvalue()
    assert "\n" not in text.split("checkpoint saved")[0]  # Redrawn in place.
    frames = text.replace("\n", "\r").split("\r")
    assert "1/4 steps (25.0%), 1.0 steps/s, ETA 0:03, loss 0.5" in [
        f.rstrip() for f in frames]
    assert "checkpoint saved" in frames
    assert text.endswith("4 steps in 0:04 (1.0 steps/s), loss 0.5\n")
    # After the message the progress line is drawn again (2 done so far).
    after = text.split("checkpoint saved\n")[1]
    assert after.startswith("\r2/4 steps (50.0%)")


def test_unknown_total_and_rate_before_any_unit():
    clock, stream = FakeClock(), io.StringIO()
    p = progress.Progress(stream=stream, clock=clock)
    assert p.line() == "0 items" and p.rate is None and p.eta is None
    clock.now += 4
    p.update(2)
    assert p.line() == "2 items, 0.5 items/s"
    assert p.eta is None


def test_exception_in_with_block_prints_no_summary():
    clock, stream = FakeClock(), TtyStream()
    with pytest.raises(KeyError):
        with progress.Progress(total=2, stream=stream, clock=clock) as p:
            p.start()
            raise KeyError("x")
    assert stream.getvalue().endswith("\n")
    assert " in 0:00" not in stream.getvalue()
