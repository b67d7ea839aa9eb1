"""GPU clocks, power and temperature sampled by ``nvidia-smi`` while something runs (``bench --gpu-clocks``).

:class:`ClockSampler` is a context manager: on enter it starts ``nvidia-smi --query-gpu=clocks.sm,clocks.mem,
power.draw,temperature.gpu --format=csv,noheader,nounits -lms 100 -i <index>`` with its output read by a thread,
and waits (up to ``startup_s``) for the first sample; on exit it interrupts the process and parses what came.
:func:`parse_clock_samples` and :func:`summarize_clocks` are pure. A missing or failing ``nvidia-smi`` never
raises: the sampler logs one warning per distinct message and :meth:`ClockSampler.summary` returns
``{"error": "…"}``.

``-i`` takes ``nvidia-smi``'s index, which equals the CUDA index only when ``CUDA_VISIBLE_DEVICES`` is unset and
the orders agree (the usual one-GPU machine).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from .log import get_logger

log = get_logger("gpu_clocks")

QUERY = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
_WARNED: set[str] = set()


@dataclass(frozen=True)
class ClockSample:
    """One ``nvidia-smi`` line; ``None`` where it printed ``[N/A]`` (or anything that is not a number)."""

    sm_mhz: float | None
    mem_mhz: float | None
    power_w: float | None
    temp_c: float | None


def nvidia_smi_command(index: int = 0, interval_ms: int = 100) -> list[str]:
    """The ``nvidia-smi`` command line that prints one CSV line of :data:`QUERY` every ``interval_ms``."""
    return ["nvidia-smi", f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits",
            "-lms", str(interval_ms), "-i", str(index)]


def _number(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None


def parse_clock_samples(text: str) -> list[ClockSample]:
    """Samples from ``nvidia-smi``'s CSV output (:data:`QUERY`, no header, no units).

    Only newline-terminated lines count (the text after the last newline is a line cut short when the process
    was stopped); blank lines, lines without exactly four fields and lines with no number at all are skipped;
    a non-numeric field (``[N/A]``) becomes ``None``."""
    samples = []
    for line in text.split("\n")[:-1]:
        fields = line.strip().split(",")
        if len(fields) != len(QUERY):
            continue
        values = [_number(f.strip()) for f in fields]
        if any(v is not None for v in values):
            samples.append(ClockSample(*values))
    return samples


def _present(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize_clocks(samples: Sequence[ClockSample]) -> dict[str, float | int | None]:
    """Median, minimum and maximum SM clock (MHz), median memory clock (MHz), median and maximum power (W),
    maximum temperature (°C) and the sample count. ``None`` for a quantity with no value (no samples, or all
    ``[N/A]``); medians of an even count are the mean of the two middle values."""
    sm = _present([s.sm_mhz for s in samples])
    mem = _present([s.mem_mhz for s in samples])
    power = _present([s.power_w for s in samples])
    temp = _present([s.temp_c for s in samples])
    return {
        "samples": len(samples),
        "sm_mhz_median": statistics.median(sm) if sm else None,
        "sm_mhz_min": min(sm) if sm else None,
        "sm_mhz_max": max(sm) if sm else None,
        "mem_mhz_median": statistics.median(mem) if mem else None,
        "power_w_median": statistics.median(power) if power else None,
        "power_w_max": max(power) if power else None,
        "temp_c_max": max(temp) if temp else None,
    }


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _wait(proc: subprocess.Popen[str], timeout_s: float = 2.0) -> None:
    """Wait for ``proc`` to end; kill it if it does not within ``timeout_s``."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt ``proc`` (SIGINT on POSIX, so it can flush its output; terminate elsewhere) and wait for it."""
    try:
        proc.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
    except OSError:  # already gone
        pass
    _wait(proc)


class ClockSampler:
    """Samples GPU clocks, power and temperature with ``nvidia-smi`` for the duration of a ``with`` block.

    After the block, :attr:`samples` holds the parsed samples and :attr:`error` the reason when nothing could be
    sampled (``nvidia-smi`` missing, or exiting on its own with an error); :meth:`summary` gives
    :func:`summarize_clocks` or ``{"error": …}``. An instance can be entered again (each block starts afresh).

    Args:
        index: ``nvidia-smi``'s GPU index (``-i``).
        interval_ms: sampling period.
        command: the command to run instead of :func:`nvidia_smi_command` (tests).
        startup_s: how long entering waits for the first sample, so that the block is sampled from its start.
    """

    def __init__(self, index: int = 0, interval_ms: int = 100, command: Sequence[str] | None = None,
                 startup_s: float = 2.0) -> None:
        self.command = list(command) if command is not None else nvidia_smi_command(index, interval_ms)
        self.startup_s = startup_s
        self.samples: list[ClockSample] = []
        self.error: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lines: list[str] = []
        self._first = threading.Event()

    def __enter__(self) -> ClockSampler:
        self.samples, self.error, self._lines = [], None, []
        self._first.clear()
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        except OSError as exc:
            self._fail(f"could not start {self.command[0]}: {exc}")
            return self
        self._thread = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._thread.start()
        self._first.wait(self.startup_s)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        try:
            for line in proc.stdout or ():
                self._lines.append(line)
                self._first.set()
        finally:
            self._first.set()

    def _fail(self, reason: str) -> None:
        self.error = reason
        _warn_once(f"GPU clocks not recorded: {reason}")
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stop(self) -> list[ClockSample]:
        """End the sampling (if running) and return the samples; also called on leaving the ``with`` block."""
        proc, self._proc = self._proc, None
        if proc is None:
            return self.samples
        # ended on its own, before being asked to: exited, or its output closed (it is exiting)
        exited = proc.poll() is not None or (self._thread is not None and not self._thread.is_alive())
        if exited:
            _wait(proc)
        else:
            _stop(proc)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if proc.stdout is not None:
            proc.stdout.close()
        text = "".join(self._lines)
        self.samples = parse_clock_samples(text)
        if exited and proc.returncode != 0 and not self.samples:
            self._fail(f"{self.command[0]} exited with {proc.returncode}: {self._stderr_text() or text.strip()[:200]}")
        elif self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return self.samples

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[:200]

    def summary(self) -> dict[str, Any]:
        """:func:`summarize_clocks` of the samples, or ``{"error": …}``."""
        return {"error": self.error} if self.error else summarize_clocks(self.samples)


__all__ = ["QUERY", "ClockSample", "ClockSampler", "nvidia_smi_command", "parse_clock_samples", "summarize_clocks"]
