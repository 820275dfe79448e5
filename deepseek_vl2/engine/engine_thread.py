"""The engine's thread: the one thread that runs the model's torch work, from building the model
and its KV cache to every scheduler step. The stepping itself is in scheduler.py, so that tests can
drive it from their own thread, one step at a time.

Why one thread for everything: torch's CPU kernels run on OpenMP (libgomp), which gives each thread
that starts a parallel region its own pool of worker threads, kept until that thread exits. Once
the process holds more such workers than it has cores, libgomp stops letting idle workers spin and
puts them to sleep after every region, so each of the thousand small regions of a decode step pays
for waking them. Loading the model on the caller's thread and decoding on another was that case:
on a 2-core AVX512 machine (torch 2.13) a 70k-element multiply took 72 us instead of 8 us, and
tiny decoded 1.3x (bf16) to 1.9x (int4) slower than with one pool.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from .request import Request
from .scheduler import EngineClosed, Scheduler

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineThread:
    """Runs jobs (`call`) and, once it `serve`s a scheduler, steps it while there is work; a job
    waits for the step in progress and runs before the next one."""

    def __init__(self) -> None:
        self._wakeup = threading.Condition()
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._scheduler: Scheduler | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deepseek-vl2-engine", daemon=True)
        self._thread.start()

    def call(self, job: Callable[[], T]) -> T:
        """`job()` run on this thread; its error is raised here."""
        if threading.current_thread() is self._thread:
            return job()
        future: Future[T] = Future()
        with self._wakeup:
            if self._stopping:
                raise EngineClosed("the engine is closed")
            self._jobs.append((job, future))
            self._wakeup.notify()
        return future.result()

    def serve(self, scheduler: Scheduler) -> None:
        """Step `scheduler` from now on whenever it has work."""
        with self._wakeup:
            self._scheduler = scheduler
            self._wakeup.notify()

    def submit(self, request: Request) -> None:
        with self._wakeup:
            if self._scheduler is None:
                raise RuntimeError("the engine thread serves no scheduler yet")
            self._scheduler.submit(request)
            self._wakeup.notify()

    def close(self) -> None:
        """Stop; unfinished requests and jobs that have not started fail with EngineClosed."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _has_work(self) -> bool:
        return bool(self._jobs) or (self._scheduler is not None and self._scheduler.has_work)

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._has_work():
                    self._wakeup.wait()
                if self._stopping:
                    break
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                self._run(*job)
                continue
            assert self._scheduler is not None
            try:
                with torch.inference_mode():
                    self._scheduler.step()
            except Exception as error:
                # `step` answers its own failures (scheduler.py); this is the last resort when
                # that recovery raises too: the scheduler's state is then unknown, so every queued
                # and in-flight request fails, and the thread goes on serving new ones.
                log.exception("scheduler step failed")
                self._scheduler.fail_all(error)
        if self._scheduler is not None:
            self._scheduler.close()
        with self._wakeup:
            jobs, self._jobs = list(self._jobs), deque()
        for _, future in jobs:
            future.set_exception(EngineClosed("the engine was closed before this job ran"))

    @staticmethod
    def _run(job: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(job())
        except BaseException as error:  # the caller gets it, whatever it is
            future.set_exception(error)
