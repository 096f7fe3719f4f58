"""Live progress of a run: case i/N, its phase (reference / load / export / compile / engine / first call /
warm-up / measure / parity), the run's elapsed time and the expected time left.

On a terminal one line is rewritten in place (\\r, erase to end of line) and refreshed twice a second, so the clock
moves during a long engine build. Elsewhere (CI logs, pipes, TERM=dumb) every change of phase is one plain line,
without escape codes, and a phase that lasts long repeats its line every minute.

The runner and the backends report through the module functions (case_started, phase, calls, tick, case_done),
which do nothing unless a reporter is active (`with reporting(Progress(...))`). Time left: the expected seconds of
the cases still to run (from earlier records); a case without one counts as the mean of the cases done so far (or,
before the first is done, of the expected ones); unknown when nothing is known.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterator, Sequence, TextIO

LIVE_REFRESH_S = 0.5
PLAIN_HEARTBEAT_S = 60.0


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """stream: where lines go (default stdout), live when it is a terminal; write_line: a function to send plain
    lines to instead (pytest's terminal), never live and without a refresher thread."""

    def __init__(self, case_ids: Sequence[str], expected: dict[str, float] | None = None,
                 stream: TextIO | None = None, write_line: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.monotonic):
        self.case_ids, self.expected, self.now = list(case_ids), dict(expected or {}), now
        self.stream = stream or sys.stdout
        self.write_line = write_line
        self.live = write_line is None and _is_terminal(self.stream)
        self.started = now()
        self.done_s: list[float] = []
        self.current: str | None = None
        self.position = 0
        self.started_ids: set[str] = set()
        self.case_start = self.phase_start = self.started
        self.phase_name = ""
        self.warmup = self.repeats = self.calls_done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._printed_at = self.started
        self._printed_kind = ""
        self._thread = None
        if write_line is None:
            self._thread = threading.Thread(target=self._refresh, name="diffbench-progress", daemon=True)
            self._thread.start()

    # -- what the run reports ------------------------------------------------------------------------------------
    def case_started(self, case_id: str) -> None:
        with self._lock:
            self.position += 1
            self.started_ids.add(case_id)
            self.current, self.case_start = case_id, self.now()
            self._set_phase("start")

    def phase(self, name: str) -> None:
        with self._lock:
            if self.current is not None:
                self._set_phase(name)

    def calls(self, warmup: int, repeats: int) -> None:
        """Warm-up and measured calls follow; tick() after each."""
        with self._lock:
            self.warmup, self.repeats, self.calls_done = warmup, repeats, 0
            if self.current is not None:
                self._set_phase("warm-up" if warmup else "measure")

    def tick(self) -> None:
        """One pipeline call done. Only counts: it runs inside the timed region, the refresher draws."""
        self.calls_done += 1

    def case_done(self) -> None:
        with self._lock:
            if self.current is None:
                return
            self.done_s.append(self.now() - self.case_start)
            self.current, self.phase_name = None, ""
            if self.live:
                self._emit("\r\033[K")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            if self.live and self.current is not None:
                self._emit("\r\033[K")

    # -- the line --------------------------------------------------------------------------------------------------
    def phase_text(self) -> str:
        if self.phase_name in ("warm-up", "measure") and (self.warmup or self.repeats):
            n = self.calls_done
            if n < self.warmup:
                return f"warm-up {n + 1}/{self.warmup}"
            return f"measure {min(n - self.warmup + 1, self.repeats)}/{self.repeats}"
        return self.phase_name

    def time_left(self) -> float | None:
        """Expected seconds still to run: what remains of the current case, and the cases not started."""
        known = list(self.expected.values())
        # a case without an expected time: the mean of the cases done so far, else of the expected ones
        mean_done = (sum(self.done_s) / len(self.done_s) if self.done_s else
                     sum(known) / len(known) if known else None)
        left = 0.0
        if self.current is not None:
            expected = self.expected.get(self.current, mean_done)
            if expected is None:
                return None
            left += max(0.0, expected - (self.now() - self.case_start))
        for case_id in self.case_ids:
            if case_id not in self.started_ids:
                expected = self.expected.get(case_id, mean_done)
                if expected is None:
                    return None
                left += expected
        return left

    def line(self) -> str:
        now = self.now()
        return (f"[{self.position}/{len(self.case_ids)}] {self.current}: {self.phase_text()}  "
                f"(elapsed {clock(now - self.started)}, ~{clock(self.time_left())} left)")

    # -- drawing ---------------------------------------------------------------------------------------------------
    def _set_phase(self, name: str) -> None:
        self.phase_name, self.phase_start = name, self.now()
        self._draw()

    def _draw(self) -> None:
        if self.live:
            width = shutil.get_terminal_size((100, 20)).columns
            self._emit("\r" + self.line()[:max(20, width - 1)] + "\033[K")
        else:
            self._print_plain()

    def _print_plain(self) -> None:
        self._printed_at, self._printed_kind = self.now(), self.phase_text().split(" ")[0]
        text = self.line()
        if self.write_line is not None:
            self.write_line(text)
        else:
            self._emit(text + "\n")

    def _refresh(self) -> None:
        while not self._stop.wait(LIVE_REFRESH_S):
            with self._lock:
                if self.current is None:
                    continue
                if self.live:
                    self._draw()
                elif (self.phase_text().split(" ")[0] != self._printed_kind
                      or self.now() - self._printed_at >= PLAIN_HEARTBEAT_S):
                    self._print_plain()     # warm-up turned into measure, or a long phase: say it is still on

    def _emit(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed or broken stdout must not end the run
            pass


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


# -- the active reporter ----------------------------------------------------------------------------------------------
_active: Progress | None = None


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    global _active
    previous, _active = _active, progress
    try:
        yield progress
    finally:
        progress.close()
        _active = previous


def case_started(case_id: str) -> None:
    if _active is not None:
        _active.case_started(case_id)


def phase(name: str) -> None:
    if _active is not None:
        _active.phase(name)


def calls(warmup: int, repeats: int) -> None:
    if _active is not None:
        _active.calls(warmup, repeats)


def tick() -> None:
    if _active is not None:
        _active.tick()


def case_done() -> None:
    if _active is not None:
        _active.case_done()
