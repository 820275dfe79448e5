"""Deterministic schedule exploration of the scheduler (used by test_schedules.py).

A seed draws a whole run: the checkpoint, the engine's settings (rows, chunk sizes, prefix cache),
a workload of requests made from the fixture cases, when each arrives and whether and at which
stage it is cancelled; and, for a share of the seeds, a fault: the Nth call of one of the runner's
methods or of a sampler raises, and one more request arrives after it. The harness then steps the scheduler itself, from this thread, and after
every step checks the invariants; after the drain, every finished request must have the tokens it
gets alone on a fresh engine with the prefix cache off. Nothing depends on timing, so a seed
replays exactly.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache

import torch
from parity import CHECKPOINTS, case, conversation
from PIL import Image

from deepseek_vl2 import DeepseekVL2, Engine, Processor, SamplingParams
from deepseek_vl2.engine.prefix_cache import PrefixCache
from deepseek_vl2.engine.request import IN_FLIGHT, Event, Request, Stage
from deepseek_vl2.engine.sampling import Sampler
from deepseek_vl2.engine.scheduler import RequestCancelled, Scheduler
from deepseek_vl2.model.model import tile_ranges

REPLAY = "SEEDS={seed}-{seed} .venv/bin/python -m pytest -q tests/engine/test_schedules.py"
CHECKPOINT_NAMES = ("tiny-mha", "tiny-mla-noaux")
# Fixture cases and how often a workload asks them: text only, one tiled image, two tiled images,
# three single-tile images, and a conversation with an image in each of two user turns.
CASES = {"m_text": 4, "m_one": 2, "m_two": 1, "m_three": 2, "m_turns": 1}
CANCEL_STAGES = ("queued", "encoding", "prefilling", "decoding", "finishing")
MAX_STEPS = 20_000  # a run that has not drained by then is stuck
PAD_WORD = " lorem"  # text that brings a prompt close to the context limit
# How far a request's logits may be from its solo logits: fp32 in another batch size, chunking and
# prefix copy differs by about 1e-5 (measured); a wrong row, prefix or image by far more.
LOGIT_NOISE = 1e-4
FAULT_SHARE = 0.25  # of the seeds, drawn by each seed's own generator
# Where a fault may be injected, and the highest call number drawn for each (about how many calls
# a run makes, so that most drawn faults fire): the runner's methods a step calls, and "sample",
# any request's sampler.
FAULT_POINTS = {
    "write_prefix": 2, "read_prefix": 2, "encode_tiles": 3, "image_spans": 2, "prompt_embeds": 4,
    "prefill": 6, "logits": 4, "sample": 40, "decode": 40, "move_row": 6,
}  # fmt: skip
FAULT_ERRORS = (RuntimeError, ValueError, IndexError, torch.OutOfMemoryError)


@dataclass(frozen=True)
class Job:
    """What one request asks: a fixture case, as-is, with its images flipped left-right (same
    text, other pixels) or with its question padded close to the context limit."""

    checkpoint: str
    case: str
    variant: str  # "as-is", "flipped" or "padded"
    max_new_tokens: int
    params: SamplingParams
    pad_words: int = 0
    robust: int | None = None  # greedy: the fixture's robust prefix; None: seeded, every token

    def conversation(self) -> tuple[list[dict], list[Image.Image]]:
        messages, images = conversation(case(f"{self.checkpoint}/{self.case}"))
        if self.variant == "flipped":
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
        if self.pad_words:
            messages[-2]["content"] += PAD_WORD * self.pad_words  # the last question, before the answer
        return messages, images


@dataclass
class Arrival:
    job: Job
    step: int  # arrives before this step...
    after: int | None = None  # ...or as soon as that earlier request has left the queue
    cancel_at: str | None = None  # one of CANCEL_STAGES
    cancel_wait: int = 0  # steps spent in that stage before the cancel
    after_fault: bool = False  # arrives right after the injected fault (or, if it never fires, when all is idle)


@dataclass(frozen=True)
class Fault:
    """The `call`th call of `target` (a ModelRunner method, or "sample": any request's sampler)
    raises `error` instead of running."""

    target: str
    call: int
    error: type[Exception]

    @property
    def message(self) -> str:
        return f"injected fault: call {self.call} of {self.target}"


@dataclass
class Run:
    seed: int
    checkpoint: str
    max_batch: int
    prefill_chunk_size: int
    vision_chunk_tiles: int
    cache_mode: str  # "off", "tiny" or "large"
    arrivals: list[Arrival]
    fault: Fault | None = None

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {self.checkpoint}, max_batch {self.max_batch}, prefill chunks "
            f"{self.prefill_chunk_size}, vision batches {self.vision_chunk_tiles}, "
            f"prefix cache {self.cache_mode}"
            + (f", {self.fault.error.__name__} on call {self.fault.call} of {self.fault.target}" if self.fault else "")
        ]
        for i, a in enumerate(self.arrivals):
            when = f"after #{a.after} leaves the queue" if a.after is not None else f"at step {a.step}"
            when = "after the fault" if a.after_fault else when
            cancel = f", cancelled when {a.cancel_at} (+{a.cancel_wait})" if a.cancel_at else ""
            lines.append(
                f"  #{i} {a.job.case} {a.job.variant} pad {a.job.pad_words} max {a.job.max_new_tokens} "
                f"{a.job.params} {when}{cancel}"
            )
        return "\n".join(lines)


# ---- models and the oracle --------------------------------------------------------------------


@cache
def loaded(checkpoint: str, role: str) -> tuple[DeepseekVL2, Processor]:
    """One model per checkpoint and role: the explored engines share "explore", the solo runs
    "oracle", so that building an engine for one never reallocates the other's cache."""
    path = CHECKPOINTS / checkpoint
    model = DeepseekVL2.from_pretrained(path, device="cpu", dtype=torch.float32)
    return model, Processor.from_pretrained(path)


def drain(scheduler: Scheduler) -> None:
    for _ in range(MAX_STEPS):
        if not scheduler.has_work:
            return
        scheduler.step()
    raise AssertionError(f"not drained after {MAX_STEPS} steps")


@contextmanager
def recorded_logits() -> Iterator[dict[int, list[torch.Tensor]]]:
    """The logits every sampler is given while the block runs, by the sampler's id."""
    seen: dict[int, list[torch.Tensor]] = {}
    sample = Sampler.__call__

    def recording(sampler: Sampler, logits: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(sampler), []).append(logits[0].clone())
        return sample(sampler, logits)

    Sampler.__call__ = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        Sampler.__call__ = sample  # type: ignore[method-assign]


@dataclass(frozen=True)
class Solo:
    tokens: tuple[int, ...]
    logits: tuple[torch.Tensor, ...]  # what each token was sampled from
    eos_id: int


@cache
def solo(job: Job) -> Solo:
    """The job alone on a fresh engine with the prefix cache off (cached per job)."""
    model, processor = loaded(job.checkpoint, "oracle")
    with recorded_logits() as logits, Engine(
        model, processor, max_batch=1, prefix_cache_bytes=0, threaded=False
    ) as engine:
        events: list[Event] = []
        request = engine.submit(*job.conversation(), job.max_new_tokens, job.params, events.append)
        drain(engine.scheduler)
    assert events and events[-1] is None, events
    tokens, sampled = tuple(events[:-1]), tuple(logits.get(id(request.sampler), []))
    return Solo(tokens, sampled, engine.eos_id)  # type: ignore[arg-type]


@cache
def padding_rate(checkpoint: str, case_name: str) -> tuple[int, int]:
    """(prompt tokens unpadded, tokens per padding word) of a case."""
    _, processor = loaded(checkpoint, "explore")
    base = Job(checkpoint, case_name, "as-is", 1, SamplingParams())
    lengths = [
        processor(*replace(base, pad_words=words).conversation()).input_ids.shape[1] for words in (0, 100)
    ]
    return lengths[0], (lengths[1] - lengths[0]) // 100


# ---- drawing a run ----------------------------------------------------------------------------


def draw_sampling(
    rng: random.Random, checkpoint: str, case_name: str, greedy_allowed: bool
) -> tuple[SamplingParams, int | None]:
    """Greedy (only for the fixture's own prompts, whose robust prefix is known) or seeded
    sampling with its own controls; and the tokens that must match."""
    if greedy_allowed and rng.random() < 0.4:
        run = rng.choice(case(f"{checkpoint}/{case_name}")["generation"])
        return SamplingParams(repetition_penalty=run["repetition_penalty"]), run["robust_prefix_len"]
    params = SamplingParams(
        temperature=rng.choice([0.5, 0.8, 1.0, 1.3]),
        top_p=rng.choice([1.0, 0.95, 0.8]),
        top_k=rng.choice([0, 5, 20, 50]),
        repetition_penalty=rng.choice([1.0, 1.1, 1.3]),
        seed=rng.randrange(2**31),
    )
    return params, None


def draw_max_new_tokens(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.06:
        return 0
    if roll < 0.16:
        return 1
    if roll < 0.26:
        return 2
    return rng.randint(3, 24) if roll < 0.8 else rng.randint(25, 64)


def draw_job(rng: random.Random, checkpoint: str, context: int, earlier: list[Job]) -> Job:
    """A new job, or one about an earlier job's images: the same images asked again (a follow-up,
    or the same new image in several requests at once), or the same text with flipped pixels."""
    image_jobs = [j for j in earlier if j.case != "m_text"]
    roll = rng.random()
    if image_jobs and roll < 0.35:
        base = rng.choice(image_jobs)
        case_name = base.case
        # Half of them flip the pixels under the same text: a prefix cache keyed on the tokens
        # alone would serve them the other image's prefix.
        variant = base.variant if rng.random() < 0.5 else ("flipped" if base.variant == "as-is" else "as-is")
    else:
        case_name = rng.choices(list(CASES), weights=list(CASES.values()))[0]
        variant = "flipped" if case_name != "m_text" and rng.random() < 0.25 else "as-is"
    pad_words, max_new_tokens = 0, draw_max_new_tokens(rng)
    if case_name in ("m_text", "m_three") and rng.random() < 0.08:
        # Close to the context limit: the context guard leaves 1 to 40 tokens for the answer.
        base_len, per_word = padding_rate(checkpoint, case_name)
        pad_words = (context - rng.randint(1, 40) - base_len) // per_word
        max_new_tokens = rng.randint(1, 64)
    greedy_allowed = variant == "as-is" and not pad_words
    params, robust = draw_sampling(rng, checkpoint, case_name, greedy_allowed)
    return Job(checkpoint, case_name, variant, max_new_tokens, params, pad_words, robust)


def draw_run(seed: int) -> Run:
    rng = random.Random(seed)
    checkpoint = rng.choice(CHECKPOINT_NAMES)
    context = loaded(checkpoint, "explore")[0].config.language.max_position_embeddings
    arrivals: list[Arrival] = []
    jobs: list[Job] = []
    step = 0
    for index in range(rng.randint(2, 6)):
        job = draw_job(rng, checkpoint, context, jobs)
        jobs.append(job)
        step += rng.choice([0, 0, 1, 2, rng.randint(3, 40)])  # bursts, then gaps
        after = rng.randrange(index) if index and rng.random() < 0.2 else None
        cancel_at = rng.choice(CANCEL_STAGES) if rng.random() < 0.3 else None
        arrivals.append(Arrival(job, step, after, cancel_at, rng.choice([0, 0, 1, 3])))
    run = Run(
        seed, checkpoint, max_batch=rng.randint(1, 4),
        prefill_chunk_size=rng.choice([rng.randint(16, 64), rng.randint(65, 600)]),
        vision_chunk_tiles=rng.randint(1, 3), cache_mode=rng.choice(["off", "tiny", "large"]),
        arrivals=arrivals,
    )  # fmt: skip
    # The fault from a generator of its own: the runs drawn above stay what they were without it.
    rng = random.Random(f"{seed}/fault")
    if rng.random() < FAULT_SHARE:
        target = rng.choice(list(FAULT_POINTS))
        run.fault = Fault(target, rng.randint(1, FAULT_POINTS[target]), rng.choice(FAULT_ERRORS))
        arrivals.append(Arrival(draw_job(rng, checkpoint, context, jobs), step, after_fault=True))
    return run


def cache_bytes(run: Run, model: DeepseekVL2, rng: random.Random) -> int:
    """Off; tiny: room for about one image's embeddings up to one short KV prefix, so that
    entries evict each other constantly; large: everything fits."""
    if run.cache_mode == "off":
        return 0
    c = model.config.language
    if run.cache_mode == "tiny":
        return rng.randint(400 * c.hidden_size * 4, 1400 * c.cache_values_per_token * 4)
    return 256 * 2**20


# ---- the audited prefix cache -----------------------------------------------------------------


def identity(request: Request, key: str) -> str:
    """What `key` must stand for in `request`, computed from its inputs and not from the keys:
    an image's grid and pixels, or the prompt's token ids up to an image's end and the pixels of
    every image up to it."""
    keys = request.keys
    assert keys is not None
    inputs = request.inputs
    crops = inputs.images_spatial_crop[0].tolist()
    pixels = [
        hashlib.sha256(f"{crop}".encode() + inputs.pixel_values[0][tiles].numpy().tobytes()).hexdigest()
        for crop, tiles in zip(crops, tile_ranges(crops))
    ]
    if key in keys.images:
        return "image " + pixels[keys.images.index(key)]
    index = keys.prefixes.index(key)
    ids = inputs.input_ids[0, : keys.spans[index][1]].numpy().tobytes()
    return "prefix " + hashlib.sha256(ids + "".join(pixels[: index + 1]).encode()).hexdigest()


class AuditedPrefixCache(PrefixCache):
    """A prefix cache that remembers what each entry was stored for, and records every time it
    serves an entry to a request whose tokens or pixels differ."""

    def __init__(self, budget_bytes: int, scheduler: Scheduler) -> None:
        super().__init__(budget_bytes)
        self.scheduler = scheduler
        self.stored_for: dict[str, str] = {}
        self.wrong: list[str] = []
        self.served = 0

    def put(self, key: str, tensors, tokens: int) -> bool:
        fresh = key not in self
        stored = super().put(key, tensors, tokens)
        if stored and fresh:  # an existing entry keeps its tensors
            self.stored_for[key] = identity(self._admitting(), key)
        return stored

    def longest_prefix(self, keys, prompt_len):
        hit = super().longest_prefix(keys, prompt_len)
        if hit is not None:
            ends = [end for _, end in keys.spans]
            self._check(keys.prefixes[ends.index(hit[0])])
        return hit

    def image(self, key: str):
        span = super().image(key)
        if span is not None:
            self._check(key)
        return span

    def _admitting(self) -> Request:
        request = self.scheduler.admitting
        assert request is not None, "the prefix cache is used only for the request being admitted"
        return request

    def _check(self, key: str) -> None:
        self.served += 1
        request = self._admitting()
        if self.stored_for[key] != identity(request, key):
            self.wrong.append(f"request {request.id} was served {key} stored for other tokens or pixels")


# ---- the injected fault -----------------------------------------------------------------------


class Injector:
    """Counts the calls of the fault's target and makes the drawn one raise; remembers which
    requests the scheduler had taken out of its queue at that moment."""

    def __init__(self, fault: Fault, scheduler: Scheduler) -> None:
        self.fault, self.scheduler = fault, scheduler
        self.calls = 0
        self.in_flight: set[int] | None = None  # ids of the requests in flight when it fired

    @property
    def fired(self) -> bool:
        return self.in_flight is not None

    def wrap(self, method: Callable) -> Callable:
        @functools.wraps(method)
        def faulty(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fault.call:
                s = self.scheduler
                taken = [*s.in_flight, *s.running, s.admitting]  # admitting: also while admitted
                self.in_flight = {id(r) for r in taken if r is not None}
                raise self.fault.error(self.fault.message)
            return method(*args, **kwargs)

        return faulty

    def failed(self, end: Event) -> bool:
        """Whether `end` is the error the fault caused (its message names the fault)."""
        return self.fired and isinstance(end, BaseException) and self.fault.message in str(end)


@contextmanager
def injected(fault: Fault | None, engine: Engine) -> Iterator[Injector | None]:
    """The run's fault wired into its engine's runner (a new one per engine) or, for "sample",
    into every sampler while the block runs."""
    if fault is None:
        yield None
        return
    injector = Injector(fault, engine.scheduler)
    if fault.target != "sample":
        setattr(engine.runner, fault.target, injector.wrap(getattr(engine.runner, fault.target)))
        yield injector
        return
    sample = Sampler.__call__
    Sampler.__call__ = injector.wrap(sample)  # type: ignore[method-assign]
    try:
        yield injector
    finally:
        Sampler.__call__ = sample  # type: ignore[method-assign]


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class Tracked:
    arrival: Arrival
    request: Request | None = None
    events: list[Event] = field(default_factory=list)
    stage_steps: int = 0  # steps seen in the current stage, for the cancel's wait
    last_stage: Stage | None = None
    cancelled_after: int | None = None  # tokens when the harness cancelled it
    progress: list[tuple[str, int, int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # what its tokens were sampled from
    flipped: bool = False  # seeded sampling left the solo tokens at a near-tie (check_sampling_flip)
    after_fault: bool = False  # submitted after the injected fault fired

    @property
    def ended(self) -> bool:
        return bool(self.events) and not isinstance(self.events[-1], int)


@dataclass
class Stats:
    runs: int = 0
    steps: int = 0
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    cache_served: int = 0
    chunked_prefills: int = 0  # requests prefilled in several chunks while others decoded
    sampling_flips: int = 0  # seeded draws that fp32 noise moved across a boundary
    faults: int = 0  # injected faults that fired
    fault_failures: int = 0  # requests the injected faults failed
    served_after_fault: int = 0  # requests submitted after a fault fired that got their answer

    def add(self, other: Stats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __str__(self) -> str:
        return (
            f"{self.runs} runs, {self.steps} steps, {self.requests} requests ({self.finished} "
            f"finished, {self.cancelled} cancelled), {self.chunked_prefills} chunked prefills, "
            f"{self.cache_served} prefix-cache entries served, {self.sampling_flips} sampling flips, "
            f"{self.faults} injected faults ({self.fault_failures} requests failed by them, "
            f"{self.served_after_fault} answered after them)"
        )


def cancel_due(t: Tracked) -> bool:
    """Whether the harness cancels this request before the next step."""
    a, r = t.arrival, t.request
    if a.cancel_at is None or r is None or t.cancelled_after is not None or r.stage is Stage.FINISHED:
        return False
    if a.cancel_at == "finishing":  # on the step that would give its last token
        return r.stage is Stage.DECODING and len(r.tokens) == r.max_new_tokens - 1
    return r.stage is Stage[a.cancel_at.upper()] and t.stage_steps >= a.cancel_wait


def check_invariants(scheduler: Scheduler, tracked: list[Tracked], cache: AuditedPrefixCache | None) -> None:
    running, admitting, waiting = scheduler.running, scheduler.admitting, list(scheduler.waiting)
    assert [r.row for r in running] == list(range(len(running))), "running requests must occupy rows 0..B-1"
    assert all(r.stage is Stage.DECODING for r in running)
    assert all(r.stage is Stage.QUEUED and r.row == -1 for r in waiting)
    places = running + waiting + ([admitting] if admitting else [])
    # Between steps, what the scheduler has taken out of its queue is exactly what it is working on.
    assert set(scheduler.in_flight) == set(running + ([admitting] if admitting else [])), "a request in flight is lost"
    assert all(r.stage in IN_FLIGHT for r in scheduler.in_flight)
    assert len({id(r) for r in places}) == len(places), "a request is in two places"
    if admitting is not None:
        assert admitting.stage in (Stage.ENCODING, Stage.PREFILLING)
        assert len(running) <= admitting.row < scheduler.runner.max_batch, "the admitted request has no row of its own"
    for t in tracked:
        if t.request is None:
            continue
        ends = [i for i, e in enumerate(t.events) if not isinstance(e, int)]
        assert ends in ([], [len(t.events) - 1]), f"request {t.request.id}: events after its end: {t.events}"
        inside = sum(r is t.request for r in places)
        assert inside == (0 if t.ended else 1), f"request {t.request.id}, {t.request.stage}, is in {inside} places"
        assert t.ended == (t.request.stage is Stage.FINISHED)
    if cache is not None:
        assert cache.used_bytes <= cache.budget_bytes, "the prefix cache is over its budget"
        assert not cache.wrong, cache.wrong


def check_answers(tracked: list[Tracked], injector: Injector | None = None) -> None:
    """Every request has its solo answer, or the beginning of it before its cancel; with a fault,
    a request in flight when it fired may instead end with an error naming it, after the
    beginning of its solo answer, and at least one does."""
    for index, t in enumerate(tracked):
        job, events = t.arrival.job, t.events
        tokens, end = events[:-1], events[-1]
        alone = solo(job)
        expected = list(alone.tokens)
        if injector is not None and injector.failed(end):
            assert t.request is not None and injector.in_flight is not None
            assert id(t.request) in injector.in_flight, f"#{index} was not in flight at the fault but failed: {end!r}"
            expected = expected[: len(tokens)]
        elif t.cancelled_after is not None:
            assert isinstance(end, RequestCancelled), f"#{index} was cancelled but ended with {end!r}"
            assert len(tokens) == t.cancelled_after, f"#{index} got tokens after its cancel"
            expected = expected[: len(tokens)]
        else:
            assert end is None, f"#{index} failed: {end!r}"
        if job.robust is not None:
            tokens, expected = tokens[: job.robust], expected[: job.robust]
        check_progress(index, t)
        if job.robust is None and tokens != expected:
            check_sampling_flip(index, t, alone)
        else:
            assert tokens == expected, f"#{index} got {tokens}, alone {expected}"
    if injector is not None and injector.fired:
        assert any(injector.failed(t.events[-1]) for t in tracked), "the fault failed no request"


def check_sampling_flip(index: int, t: Tracked, alone: Solo) -> None:
    """Seeded sampling that left the solo tokens: allowed only where fp32 noise moved a draw
    across a boundary. The answer must really diverge: a first index, within both answers, where
    their tokens differ (an answer that is only a prefix of the solo one, or empty, is a request
    cut short, not a flip). Unless it was cancelled or failed, its length must be what the
    scheduler's stopping rule gives its own tokens (Scheduler._accept): EOS only as its last
    token, and max_new_tokens tokens unless it ends with EOS; so as long as the solo answer's when
    neither stopped on EOS. Up to the divergence the logits must equal the solo ones within
    LOGIT_NOISE, and a fresh sampler with the request's seed, given the logits the request was
    given, must draw exactly its tokens (its own generator, nothing shared)."""
    tokens, request = t.events[:-1], t.request
    assert request is not None
    first = next((i for i, (a, b) in enumerate(zip(tokens, alone.tokens)) if a != b), None)
    assert first is not None, (
        f"#{index} got {tokens}, alone {list(alone.tokens)}: no token differs, it is only shorter or longer"
    )
    if t.events[-1] is None:  # it ran to its end: that end must follow the stopping rule
        eos = alone.eos_id
        assert eos not in tokens[:-1], f"#{index} went on after EOS: {tokens}"
        if tokens[-1] != eos:
            assert len(tokens) == request.max_new_tokens, (
                f"#{index} stopped after {len(tokens)} of {request.max_new_tokens} tokens without EOS: {tokens}"
            )
        assert len(tokens) <= request.max_new_tokens, f"#{index} got {len(tokens)} of {request.max_new_tokens} tokens"
    given = t.logits
    assert len(given) == len(tokens), (index, len(given), len(tokens))
    for step in range(first + 1):
        gap = float((given[step] - alone.logits[step]).abs().max())
        assert gap <= LOGIT_NOISE, f"#{index}: logits {gap:.2e} from the solo ones at token {step}"
    replay = Sampler(t.arrival.job.params, given[0].shape[-1], request.inputs.input_ids)
    drawn = [int(replay(logits[None])[0]) for logits in given]
    assert drawn == tokens, f"#{index}: its seed draws {drawn} from its logits, it got {tokens}"
    t.flipped = True


def check_progress(index: int, t: Tracked) -> None:
    """Each stage's reports count up; a request that got a token reported its whole prompt."""
    for stage in ("vision", "prefill"):
        reports = [(done, total) for name, done, total in t.progress if name == stage]
        assert all(a[0] < b[0] and a[1] == b[1] for a, b in zip(reports, reports[1:])), (index, reports)
        assert all(0 < done <= total for done, total in reports), (index, reports)
    if t.events[0] is not None and isinstance(t.events[0], int):
        assert t.request is not None
        assert t.progress[-1] == ("prefill", t.request.prompt_len, t.request.prompt_len), (index, t.progress)


def explore(seed: int) -> Stats:
    """Draw and run one seed; raises AssertionError (with the run and how to replay it) on any
    broken invariant or answer."""
    run = draw_run(seed)
    try:
        return execute(run)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{run.describe()}\nreplay: {REPLAY.format(seed=seed)}") from error


def execute(run: Run) -> Stats:
    rng = random.Random(f"{run.seed}/cache")
    model, processor = loaded(run.checkpoint, "explore")
    budget = cache_bytes(run, model, rng)
    tracked = [Tracked(a) for a in run.arrivals]
    stats = Stats(runs=1)
    engine = Engine(
        model, processor, max_batch=run.max_batch, prefill_chunk_size=run.prefill_chunk_size,
        vision_chunk_tiles=run.vision_chunk_tiles, prefix_cache_bytes=0, threaded=False,
    )  # fmt: skip
    scheduler = engine.scheduler
    cache = None
    if budget:  # the engine's own cache, audited; requests get keys as with any cache
        cache = engine.prefix_cache = scheduler.prefiller.prefix_cache = AuditedPrefixCache(budget, scheduler)
    try:
        step = 0
        with recorded_logits() as logits, injected(run.fault, engine) as injector:
            while any(t.request is None for t in tracked) or scheduler.has_work:
                assert step < MAX_STEPS, f"not drained after {MAX_STEPS} steps"
                arrive(engine, tracked, step, injector)
                for t in tracked:
                    if cancel_due(t):
                        assert t.request is not None
                        t.cancelled_after = len(t.request.tokens)
                        t.request.cancel()
                if scheduler.has_work:
                    scheduler.step()
                    stats.steps += 1
                    check_invariants(scheduler, tracked, cache)
                observe(tracked)
                step += 1
                if injector is not None and injector.fired and not any(t.after_fault for t in tracked):
                    # The follow-up came before the fault (all else was idle and it made it fire):
                    # the same job once more, now after it.
                    [early] = [t for t in tracked if t.arrival.after_fault]
                    if early.request is not None:
                        tracked.append(Tracked(early.arrival))
        for t in tracked:
            if t.request is not None and t.request.sampler is not None:
                t.logits = logits.get(id(t.request.sampler), [])  # none if its first draw failed
        assert not scheduler.waiting and scheduler.admitting is None and not scheduler.running
        assert scheduler.busy_rows == 0 and not scheduler.in_flight
        check_answers(tracked, injector)
    finally:
        engine.close()
    stats.requests = len(tracked)
    stats.finished = sum(t.events[-1] is None for t in tracked)
    stats.cancelled = sum(t.cancelled_after is not None for t in tracked)
    stats.cache_served = cache.served if cache else 0
    stats.chunked_prefills = sum(sum(r[0] == "prefill" for r in t.progress) > 1 for t in tracked)
    stats.sampling_flips = sum(t.flipped for t in tracked)
    if injector is not None and injector.fired:
        stats.faults = 1
        stats.fault_failures = sum(injector.failed(t.events[-1]) for t in tracked)
        stats.served_after_fault = sum(t.after_fault and t.events[-1] is None for t in tracked)
    return stats


def arrive(engine: Engine, tracked: list[Tracked], step: int, injector: Injector | None) -> None:
    for t in tracked:
        a = t.arrival
        if t.request is not None:
            continue
        if a.after_fault:
            idle = not engine.scheduler.has_work and all(o.request is not None for o in tracked if o is not t)
            if not (injector is not None and injector.fired) and not idle:
                continue
            t.after_fault = injector is not None and injector.fired
        elif a.after is not None:
            leader = tracked[a.after].request
            if leader is None or leader.stage is Stage.QUEUED:
                continue
        elif step < a.step:
            continue
        t.request = engine.submit(
            *a.job.conversation(), a.job.max_new_tokens, a.job.params, t.events.append,
            lambda *report, t=t: t.progress.append(report),
        )  # fmt: skip
        t.last_stage = t.request.stage


def observe(tracked: list[Tracked]) -> None:
    for t in tracked:
        if t.request is None:
            continue
        stage = t.request.stage
        t.stage_steps = t.stage_steps + 1 if stage is t.last_stage else 0
        t.last_stage = stage
