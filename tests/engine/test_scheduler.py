"""Continuous batching through the public API: concurrent requests with different prompts, images,
lengths and sampling settings each get exactly the tokens they get alone; arrivals, cancellations
and a full batch leave the running requests untouched; rows are reused, memory stays flat."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from parity import CHECKPOINTS, case, conversation

from deepseek_vl2 import Engine, GenerationResult, SamplingParams
from deepseek_vl2.engine.request import Stage
from deepseek_vl2.engine.scheduler import RequestCancelled


@dataclass
class Job:
    key: str  # fixture case: its conversation and images
    options: dict[str, Any] = field(default_factory=dict)
    robust: int | None = None  # greedy: tokens past the fixture's robust prefix may flip

    def run(self, engine: Engine) -> GenerationResult:
        messages, images = conversation(case(self.key))
        return engine.generate(messages, images, **self.options)


def greedy(key: str, penalty: float, max_new_tokens: int = 24) -> Job:
    [run] = [g for g in case(key)["generation"] if g["repetition_penalty"] == penalty]
    options = dict(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=penalty)
    return Job(key, options, robust=run["robust_prefix_len"])


def sampled(key: str, seed: int, **options: Any) -> Job:
    return Job(key, dict(max_new_tokens=24, seed=seed) | options)


def mixed_jobs(checkpoint: str) -> list[Job]:
    """Six requests for a batch of four: two queue. Image and text-only prompts of 14 to 2089
    tokens, greedy and seeded sampling with their own controls, one that stops after 7 tokens."""
    c = checkpoint
    return [
        greedy(f"{c}/m_one", 1.0),
        sampled(f"{c}/m_three", seed=5, temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.1),
        greedy(f"{c}/m_two", 1.1),
        sampled(f"{c}/m_text", seed=11, temperature=1.2, top_p=1.0, top_k=0, max_new_tokens=40),
        greedy(f"{c}/m_turns", 1.0),
        greedy(f"{c}/m_text", 1.0, max_new_tokens=7),
    ]


def assert_same_tokens(job: Job, together: list[int], alone: list[int]) -> None:
    if job.robust is None:  # seeded sampling: identical
        assert together == alone, job
    else:
        assert together[: job.robust] == alone[: job.robust], job


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Engine]]:
    engines = {
        name: Engine.from_pretrained(CHECKPOINTS / name, max_batch=4)
        for name in ("tiny-mha", "tiny-mla-noaux")
    }
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="module")
def alone(engines) -> dict[tuple[str, str], list[int]]:
    """Each job's tokens when it runs by itself."""
    results = {}
    for name, engine in engines.items():
        for job in mixed_jobs(name):
            results[name, repr(job)] = job.run(engine).token_ids
    return results


@pytest.mark.parametrize("checkpoint", ["tiny-mha", "tiny-mla-noaux"])
def test_concurrent_requests_get_the_tokens_they_get_alone(engines, alone, checkpoint):
    engine, jobs = engines[checkpoint], mixed_jobs(checkpoint)
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job.run(engine), jobs))
    for job, result in zip(jobs, results):
        assert_same_tokens(job, result.token_ids, alone[checkpoint, repr(job)])
    assert engine.scheduler.busy_rows == 0


def absolute(result: GenerationResult, token: int) -> float:
    return result.timings.started + result.timings.token_times[token]


def test_a_request_arriving_mid_decode_changes_no_running_tokens(engines, alone):
    engine = engines["tiny-mla-noaux"]
    long_job = sampled("tiny-mla-noaux/m_text", seed=11, temperature=0.6, top_k=5, max_new_tokens=300)
    late_job = greedy("tiny-mla-noaux/m_two", 1.1)  # a 2047-token prompt with two images
    long_alone = long_job.run(engine)
    assert len(long_alone.token_ids) > 100  # long enough to still be decoding when the other comes
    pieces = engine.stream(*conversation(case(long_job.key)), **long_job.options)
    text = next(pieces)  # the long request is decoding
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(late_job.run, engine)
        text += "".join(pieces)
        long_done = time.perf_counter()
    late_result = late.result()
    assert text == long_alone.text
    assert_same_tokens(late_job, late_result.token_ids, alone["tiny-mla-noaux", repr(late_job)])
    assert absolute(late_result, 0) < long_done  # the late prompt was prefilled mid-decode


def test_cancelling_one_request_leaves_the_others_unchanged(engines, alone):
    engine = engines["tiny-mha"]
    jobs = mixed_jobs("tiny-mha")[:3]
    messages, images = conversation(case("tiny-mha/m_text"))
    doomed = engine.stream(messages, images, max_new_tokens=200, temperature=0)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job.run, engine) for job in jobs]
        next(doomed)
        doomed.close()  # a client that goes away: the request leaves the batch
        results = [f.result() for f in futures]
    for job, result in zip(jobs, results):
        assert_same_tokens(job, result.token_ids, alone["tiny-mha", repr(job)])
    assert engine.scheduler.busy_rows == 0


def test_cancelling_the_awaiting_task_removes_the_request_within_a_step(engines, alone):
    engine = engines["tiny-mla-noaux"]
    job = mixed_jobs("tiny-mla-noaux")[0]
    messages, images = conversation(case("tiny-mla-noaux/m_text"))

    async def scenario() -> GenerationResult:
        doomed = asyncio.create_task(engine.generate_async(messages, images, max_new_tokens=3000))
        kept = asyncio.create_task(engine.generate_async(*conversation(case(job.key)), **job.options))
        while engine.scheduler.busy_rows < 2:  # both are in the cache
            await asyncio.sleep(0.01)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await kept

    result = asyncio.run(scenario())
    assert_same_tokens(job, result.token_ids, alone["tiny-mla-noaux", repr(job)])
    assert engine.scheduler.busy_rows == 0


def test_requests_beyond_the_batch_queue_in_arrival_order():
    with Engine.from_pretrained(CHECKPOINTS / "tiny-mla", max_batch=1) as engine:
        messages, images = conversation(case("tiny-mla/m_text"))
        results: list[GenerationResult] = []
        lock = threading.Lock()

        def run() -> None:
            result = engine.generate(messages, images, max_new_tokens=16, temperature=0)
            with lock:
                results.append(result)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # submitted in this order
        for thread in threads:
            thread.join()
    results.sort(key=lambda r: r.timings.started)
    starts = [absolute(r, 0) for r in results]
    assert starts == sorted(starts)
    assert [r.token_ids for r in results[1:]] == [results[0].token_ids] * 2
    # One row: each waits for the previous to finish.
    assert all(absolute(a, -1) <= absolute(b, 0) for a, b in zip(results, results[1:]))
    assert results[-1].timings.queue_s > 0


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_fifty_requests_reuse_the_rows_and_leave_memory_flat(engines):
    engine = engines["tiny-mla-noaux"]
    caches = [c.data_ptr() for c in engine.model.language.caches()]
    short = [  # every tenth has an image; all finish within a few steps
        greedy("tiny-mla-noaux/m_text", 1.0, max_new_tokens=6),
        sampled("tiny-mla-noaux/m_text", seed=3, temperature=0.8, max_new_tokens=9),
    ]
    with_image = greedy("tiny-mla-noaux/m_three", 1.0, max_new_tokens=4)

    def wave(count: int) -> None:
        jobs = [with_image if i % 10 == 0 else short[i % 2] for i in range(count)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda job: job.run(engine), jobs))

    wave(10)
    before = resident_bytes()
    wave(50)
    growth = resident_bytes() - before
    assert [c.data_ptr() for c in engine.model.language.caches()] == caches
    assert engine.scheduler.busy_rows == 0 and not engine.scheduler.waiting
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB"


def test_a_cancelled_request_raises_for_its_waiter(engines):
    engine = engines["tiny-mha"]
    messages, images = conversation(case("tiny-mha/m_text"))
    pieces = engine.stream(messages, images, max_new_tokens=500, temperature=0)
    next(pieces)
    # Cancel through the request the stream is waiting on (as predict's cancellation does).
    [request] = engine.scheduler.running
    request.cancel()
    with pytest.raises(RequestCancelled):
        list(pieces)
    assert engine.scheduler.busy_rows == 0


def test_a_request_that_fails_fails_alone(engines, alone, monkeypatch):
    engine = engines["tiny-mha"]
    jobs = mixed_jobs("tiny-mha")[:3]  # image prompts
    doomed_length = case("tiny-mha/m_text")["seq_len"]
    original = engine.runner.prompt_embeds

    def prompt_embeds(inputs, start, spans):
        if inputs.input_ids.shape[1] == doomed_length:
            raise RuntimeError("no memory left for this prompt")
        return original(inputs, start, spans)

    monkeypatch.setattr(engine.runner, "prompt_embeds", prompt_embeds)
    doomed = greedy("tiny-mha/m_text", 1.0)
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = [pool.submit(job.run, engine) for job in jobs]
        failure = pool.submit(doomed.run, engine)
        with pytest.raises(RuntimeError, match="no memory left for this prompt"):
            failure.result()
        for job, future in zip(jobs, futures):
            assert_same_tokens(job, future.result().token_ids, alone["tiny-mha", repr(job)])
    assert engine.scheduler.busy_rows == 0


def collect(events: list) -> list[int]:
    """The tokens of a finished request's events; raises the error that ended it, if any."""
    assert events and not any(e is None or isinstance(e, BaseException) for e in events[:-1]), events
    if isinstance(events[-1], BaseException):
        raise events[-1]
    assert events[-1] is None, events
    return events[:-1]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Steps driven from the test's thread: one intra-op thread keeps them quick. The test process
    has other threads with OpenMP worker pools, and with more workers than cores libgomp puts them
    to sleep after every parallel region (engine_thread.py): two threads ran about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("prefix_cache_bytes", [0, 2**30], ids=["prefix-cache-off", "prefix-cache-on"])
def test_a_new_image_prompt_longer_than_a_chunk_arriving_mid_decode_is_answered(
    prefix_cache_bytes, one_torch_thread
):
    """Issue 14: the image request was prefilled chunk by chunk while another answer decoded, and
    its second chunk read the tiles the end of its vision stage had dropped. Cold path: nothing
    was asked before, so its image goes through the vision tower."""
    path = CHECKPOINTS / "tiny-mla-noaux"
    talker = ([{"role": "user", "content": "Hello there."}], [])
    late = conversation(case("tiny-mla-noaux/m_one"))  # 1839 prompt tokens, 9 tiles
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=7)
    with Engine.from_pretrained(path, max_batch=2, prefix_cache_bytes=0, threaded=False) as solo:
        expected: list = []
        solo.submit(*late, 24, sampling, expected.append)
        while solo.scheduler.has_work:
            solo.scheduler.step()
    with Engine.from_pretrained(
        path, max_batch=2, prefill_chunk_size=512, vision_chunk_tiles=2,
        prefix_cache_bytes=prefix_cache_bytes, threaded=False,
    ) as engine:  # fmt: skip
        talked: list = []
        engine.submit(*talker, 200, SamplingParams(), talked.append)
        engine.scheduler.step()
        assert [r.stage for r in engine.scheduler.running] == [Stage.DECODING]
        answered: list = []
        progress: list[tuple[str, int, int, int]] = []
        engine.submit(*late, 24, sampling, answered.append, lambda *p: progress.append((*p, len(talked))))
        while engine.scheduler.has_work:
            engine.scheduler.step()
    assert collect(answered) == collect(expected)
    assert len(collect(talked)) == 200
    vision = [p for p in progress if p[0] == "vision"]
    prefill = [p for p in progress if p[0] == "prefill"]
    # Two tiles per step, then 512 tokens per step, each followed by a token of the other answer.
    assert [done for _, done, _, _ in vision] == [2, 4, 6, 8, 9]
    assert [done for _, done, _, _ in prefill] == [512, 1024, 1536, 1839]
    assert {total for _, _, total, _ in prefill} == {1839}
    assert [talked for *_, talked in progress] == list(range(2, 11))


def test_progress_reports_each_vision_batch_and_prefill_chunk(alone):
    job = mixed_jobs("tiny-mla-noaux")[2]  # two images, 2047 prompt tokens, alone: one unit each
    reports: list[tuple[str, int, int]] = []
    calls: list[str] = []

    def broken(stage: str, done: int, total: int) -> None:
        calls.append(stage)
        raise RuntimeError("the progress bar is gone")

    with Engine.from_pretrained(CHECKPOINTS / "tiny-mla-noaux", prefix_cache_bytes=0) as engine:
        messages, images = conversation(case(job.key))
        reported = engine.generate(messages, images, **job.options, progress=lambda *r: reports.append(r))
        # A callback that fails is dropped after its first call; the answer still comes.
        unreported = engine.generate(messages, images, **job.options, progress=broken)
    tiles = case(job.key)["n_tiles"]
    assert reports == [("vision", tiles, tiles), ("prefill", 2047, 2047)]
    assert calls == ["vision"]
    for result in (reported, unreported):
        assert_same_tokens(job, result.token_ids, alone["tiny-mla-noaux", repr(job)])


def test_no_event_runs_ahead_of_the_scheduler():
    # A caller acts on its events (predict cancels the request it holds; tests count busy rows),
    # so each event must find the scheduler as it says: a request is in the batch when its first
    # token arrives, and out of it when its answer, or its cancellation, arrives.
    path = CHECKPOINTS / "tiny-mha"
    with Engine.from_pretrained(path, max_batch=2, prefix_cache_bytes=0, threaded=False) as engine:
        scheduler = engine.scheduler
        seen: dict[str, list[tuple[str, bool]]] = {"answered": [], "cancelled": []}
        requests = {}

        def watcher(name: str):
            def notify(event) -> None:
                request = requests[name]
                if isinstance(event, int) and not seen[name]:
                    seen[name].append(("first token, in the batch", request in scheduler.running))
                elif event is None or isinstance(event, BaseException):
                    seen[name].append((type(event).__name__, request not in scheduler.running))

            return notify

        messages, images = conversation(case("tiny-mha/m_text"))
        params = SamplingParams(temperature=0)
        for name, tokens in (("answered", 6), ("cancelled", 500)):
            requests[name] = engine.submit(messages, images, tokens, params, watcher(name))
        while scheduler.has_work:
            scheduler.step()
            if len(requests["cancelled"].tokens) == 3:
                requests["cancelled"].cancel()
        assert seen == {
            "answered": [("first token, in the batch", True), ("NoneType", True)],
            "cancelled": [("first token, in the batch", True), ("RequestCancelled", True)],
        }
        assert scheduler.busy_rows == 0
