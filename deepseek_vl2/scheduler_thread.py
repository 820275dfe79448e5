"""The engine's scheduler thread: it owns the model, steps the scheduler while there is work and
sleeps while there is none. The stepping itself is in scheduler.py, so that tests can drive it from
their own thread, one step at a time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from .request import Request
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class SchedulerThread:
    def __init__(self, scheduler: Scheduler, warm_up: Callable[[], None]) -> None:
        """Start the thread; returns once `warm_up` (compiling the decode step) has run on it."""
        self.scheduler = scheduler
        self._wakeup = threading.Condition()
        self._stopping = False
        warmed_up = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(warm_up, warmed_up), name="deepseek-vl2-scheduler", daemon=True
        )
        self._thread.start()
        warmed_up.wait()

    def submit(self, request: Request) -> None:
        with self._wakeup:
            self.scheduler.submit(request)
            self._wakeup.notify()

    def close(self) -> None:
        """Stop stepping; unfinished requests fail with EngineClosed."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join()

    def _loop(self, warm_up: Callable[[], None], warmed_up: threading.Event) -> None:
        with torch.inference_mode():
            # Compiled graphs (CUDA graph trees) belong to the thread that records them.
            try:
                warm_up()
            except Exception:
                log.exception("decode warm-up failed; requests will compile or run eagerly")
            finally:
                warmed_up.set()
            while True:
                with self._wakeup:
                    while not self._stopping and not self.scheduler.has_work:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                try:
                    self.scheduler.step()
                except Exception as error:  # a scheduler bug must fail requests, never hang them
                    log.exception("scheduler step failed")
                    self.scheduler.fail_all(error)
            self.scheduler.close()
