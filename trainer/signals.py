"""Preemption handling: SIGTERM / SIGUSR1 ask for a checkpoint and a clean exit at the
next step boundary; the first SIGINT does the same, a second one aborts at once.

Where signals cannot reach the training thread (a Ray Train worker runs the loop outside
its process's main thread), ``request_stop`` asks the same from code."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again to resume
EXIT_COLLECTIVE_TIMEOUT = 124  # a collective outlived cluster.timeout_s: another rank hung or died


_requested_by_code: str | None = None


def request_stop(reason: str) -> None:
    """Ask this process's training loop to checkpoint and stop at its next step boundary,
    as SIGTERM would; also holds for a loop that starts later in this process."""
    global _requested_by_code
    if _requested_by_code is None:
        log.warning("%s: will checkpoint and stop at the next step boundary", reason)
        _requested_by_code = reason


def clear_stop_request() -> None:
    global _requested_by_code
    _requested_by_code = None


class PreemptionGuard:
    def __init__(self) -> None:
        self._signalled: str | None = None
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> str | None:
        """What asked this process to stop (a signal's name or ``request_stop``'s reason)."""
        return self._signalled or _requested_by_code

    def install(self) -> PreemptionGuard:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a Ray worker actor)
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            # After a stop request this process is leaving with its checkpoint saved; a
            # repeated SIGTERM / SIGUSR1 (SLURM signals every process of a step, again when
            # srun --kill-on-bad-exit ends the other nodes) must not turn exit 75 into a death.
            late = self.requested is not None and sig != signal.SIGINT
            signal.signal(sig, _ignore_late_stop if late else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 2:
                raise KeyboardInterrupt
        log.warning("received %s: will checkpoint and stop at the next step boundary", name)
        self._signalled = self._signalled or name


def _ignore_late_stop(signum: int, frame) -> None:
    log.info("received %s while stopping: ignored", signal.Signals(signum).name)
