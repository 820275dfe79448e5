"""The engine's thread: jobs, closing, and the rule that it is the only thread running torch's
parallel kernels (engine_thread.py says why)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from parity import CHECKPOINTS, case, conversation

from deepseek_vl2 import DeepseekVL2, Engine, Processor
from deepseek_vl2.engine.engine_thread import EngineThread
from deepseek_vl2.engine.runner import ModelRunner
from deepseek_vl2.engine.scheduler import EngineClosed, Scheduler, StepFailed

ROOT = Path(__file__).resolve().parent.parent


def test_a_job_runs_on_the_thread_and_its_result_or_error_comes_back():
    thread = EngineThread()
    try:
        ran_on = thread.call(threading.current_thread)
        assert ran_on is not threading.current_thread() and ran_on.name == "deepseek-vl2-engine"
        assert thread.call(lambda: thread.call(lambda: 7)) == 7  # a job may call in again

        def broken() -> None:
            raise KeyError("from the job")

        with pytest.raises(KeyError, match="from the job"):
            thread.call(broken)
        assert thread.call(lambda: "still running") == "still running"
    finally:
        thread.close()
    with pytest.raises(EngineClosed):
        thread.call(lambda: None)


def test_the_model_is_built_warmed_up_and_stepped_on_the_engine_thread(monkeypatch):
    path = CHECKPOINTS / "tiny-mla"
    threads: dict[str, set[threading.Thread]] = {"build": set(), "runner": set(), "warm_up": set(), "step": set()}

    def recorded(name, method):
        def wrapper(*args, **kwargs):
            threads[name].add(threading.current_thread())
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ModelRunner, "__init__", recorded("runner", ModelRunner.__init__))
    monkeypatch.setattr(ModelRunner, "warm_up", recorded("warm_up", ModelRunner.warm_up))
    monkeypatch.setattr(Scheduler, "step", recorded("step", Scheduler.step))
    build = recorded("build", lambda: DeepseekVL2.from_pretrained(path, dtype=torch.float32))
    with Engine.from_pretrained(path, dtype=torch.float32, max_batch=1) as from_path:
        from_path.generate(*conversation(case("tiny-mla/m_text")), max_new_tokens=2)
    with Engine(build, Processor.from_pretrained(path), max_batch=1) as from_function:
        from_function.generate(*conversation(case("tiny-mla/m_text")), max_new_tokens=2)
    assert len(threads["build"]) == 1 and len(threads["runner"]) == 2
    assert threads["build"] <= threads["runner"] == threads["warm_up"] == threads["step"]
    assert threading.current_thread() not in threads["runner"]


def test_a_failing_build_stops_the_engine_thread():
    def broken() -> DeepseekVL2:
        raise OSError("no weights here")

    before = set(threading.enumerate())
    with pytest.raises(OSError, match="no weights here"):
        Engine(broken, Processor.from_pretrained(CHECKPOINTS / "tiny-mla"))
    assert not [t for t in set(threading.enumerate()) - before if t.name == "deepseek-vl2-engine"]


# Run in a fresh process: the test process's own threads have long since started OpenMP pools.
OPENMP_WORKERS = textwrap.dedent(
    """
    import asyncio, os, sys, threading, time
    import torch
    from deepseek_vl2 import Engine
    from parity import case, conversation

    torch.set_num_threads(2)  # workers to count even where the machine has one core

    def workers() -> set[int]:  # threads that Python did not start: OpenMP's, torch's, ...
        python = {thread.native_id for thread in threading.enumerate()}
        return {int(task) for task in os.listdir("/proc/self/task")} - python

    before = workers()
    text, image = case("tiny-mla/m_text"), case("tiny-mla/m_one")
    with Engine.from_pretrained(sys.argv[1], max_batch=2, prefix_cache_bytes=2**30) as engine:
        engine.generate(*conversation(image), max_new_tokens=3)  # tiled and hashed on this thread

        async def both():
            return await asyncio.gather(
                engine.generate_async(*conversation(image), max_new_tokens=3),
                engine.generate_async(*conversation(text), max_new_tokens=3),
            )

        asyncio.run(both())
        # asyncio's worker threads have just left threading.enumerate() but may not have exited
        # yet: wait for them. OpenMP workers stay as long as the thread that started them.
        deadline = time.monotonic() + 10
        while len(workers() - before) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        print(len(workers() - before))
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_only_the_engine_thread_starts_openmp_workers():
    """A thread that runs a parallel kernel keeps one OpenMP worker per extra torch thread; with
    two threads each, the engine's thread is to be the only one to have any."""
    environment = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="2")
    finished = subprocess.run(
        [sys.executable, "-c", OPENMP_WORKERS, str(CHECKPOINTS / "tiny-mla")],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.split()[-1] == "1", finished.stdout


def test_a_failing_step_answers_every_caller_and_the_engine_serves_on():
    """A decode step that raises, with generate, stream and generate_async callers in flight or
    queued: every caller returns in time, those in the batch with an error naming the fault, the
    others with their answer; later requests are answered as before."""
    with Engine.from_pretrained(CHECKPOINTS / "tiny-mha", dtype=torch.float32, max_batch=2) as engine:
        messages, images = conversation(case("tiny-mha/m_text"))
        options = dict(max_new_tokens=16, temperature=1.0, seed=5)
        result = engine.generate(messages, images, **options)
        alone = {"generate": result.token_ids, "stream": result.text, "generate_async": result.token_ids}
        decode, calls = engine.runner.decode, []

        def failing(*args):
            calls.append(None)
            if len(calls) == 3:
                raise RuntimeError("injected: the kernel failed")
            return decode(*args)

        engine.runner.decode = failing
        callers = {
            "generate": lambda: engine.generate(messages, images, **options).token_ids,
            "stream": lambda: "".join(engine.stream(messages, images, **options)),
            "generate_async": lambda: asyncio.run(engine.generate_async(messages, images, **options)).token_ids,
        }
        with ThreadPoolExecutor(len(callers)) as pool:
            futures = {name: pool.submit(call) for name, call in callers.items()}
            outcomes = {}
            for name, future in futures.items():
                try:
                    outcomes[name] = future.result(timeout=120)  # a hang fails here
                except StepFailed as error:
                    outcomes[name] = error
        failed = [name for name, outcome in outcomes.items() if isinstance(outcome, StepFailed)]
        assert failed, outcomes
        for name, outcome in outcomes.items():
            if isinstance(outcome, StepFailed):
                assert "the decode step raised RuntimeError: injected: the kernel failed" in str(outcome)
            else:
                assert outcome == alone[name], name
        assert engine.generate(messages, images, **options).token_ids == alone["generate"]
        assert engine.scheduler.busy_rows == 0 and not engine.scheduler.in_flight
