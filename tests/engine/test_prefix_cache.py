"""Prefix cache: hits give the answers a miss gives, keys never confuse images, tilings or weights,
the budget holds, and concurrency or cancellation leave nothing wrong behind."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from parity import CHECKPOINTS, IMAGES
from PIL import Image

from deepseek_vl2 import DeepseekVL2, DeepseekVL2Config, Engine, GenerationResult, Processor
from deepseek_vl2.engine import memory
from deepseek_vl2.engine.memory import Memory
from deepseek_vl2.engine.prefix_cache import PrefixCache, PromptKeys, cache_budget, image_span_ranges
from deepseek_vl2.engine.runner import ModelRunner, cache_bytes_per_row
from deepseek_vl2.engine.scheduler import RequestCancelled
from deepseek_vl2.inputs.images import load_image

QUESTIONS = ("Describe each stage of this image in detail", "Which stage comes last?")


def ask(engine: Engine, image: Image.Image, question: str, **options) -> GenerationResult:
    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    return engine.generate(messages, [image], max_new_tokens=12, temperature=0, **options)


def seed_image() -> Image.Image:
    return Image.open(IMAGES / "vqa_1.jpg").convert("RGB")


def other_image() -> Image.Image:
    return Image.open(IMAGES / "multi_image_1.jpeg").convert("RGB")


@pytest.fixture(scope="module", params=["tiny-mha", "tiny-mla"])
def engines(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Engine]]:
    """An engine with a prefix cache and one without, over one model each."""
    path = CHECKPOINTS / request.param
    with Engine.from_pretrained(path) as cached, Engine.from_pretrained(path, prefix_cache_bytes=0) as plain:
        assert cached.prefix_cache is not None and plain.prefix_cache is None
        yield cached, plain


def test_a_follow_up_question_reuses_the_image_prefix_and_answers_alike(engines):
    cached, plain = engines
    image = seed_image()
    first = ask(cached, image, QUESTIONS[0])
    ask(cached, other_image(), QUESTIONS[0])  # overwrites the cache row the first one used
    second = ask(cached, image, QUESTIONS[1])
    batch = cached.processor([{"role": "user", "content": f"<image>\n{QUESTIONS[1]}"}], [image])
    [(_, image_end)] = image_span_ranges(batch)
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == image_end >= batch.image_token_counts[0]
    assert second.timings.vision_s == 0
    assert second.token_ids == ask(plain, image, QUESTIONS[1]).token_ids
    assert first.token_ids == ask(plain, image, QUESTIONS[0]).token_ids


def test_another_image_reuses_nothing(engines):
    cached, _ = engines
    ask(cached, seed_image(), QUESTIONS[0])
    never_seen = Image.open(IMAGES / "gray_300x500.png").convert("RGB")  # by this engine
    assert ask(cached, never_seen, QUESTIONS[0]).cached_prompt_tokens == 0


def test_text_before_the_image_reuses_its_embeddings(engines):
    """No KV prefix matches when the text before the image differs; the image's embeddings do."""
    cached, plain = engines
    image = other_image()
    ask(cached, image, QUESTIONS[0])
    messages = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "<image>\nWhat is in this picture?"},
    ]
    result = cached.generate(messages, [image], max_new_tokens=12, temperature=0)
    assert result.cached_prompt_tokens == 0 and result.timings.vision_s == 0
    assert result.token_ids == plain.generate(messages, [image], max_new_tokens=12, temperature=0).token_ids


@torch.inference_mode()
def test_first_logits_after_a_copied_prefix_match_a_full_prefill():
    model = DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mla")
    processor = Processor.from_pretrained(CHECKPOINTS / "tiny-mla")
    runner = ModelRunner(model, max_batch=2)
    batch = processor([{"role": "user", "content": f"<image>\n{QUESTIONS[1]}"}], [seed_image()])
    embeds = model.embed(batch.input_ids, batch.pixel_values, batch.images_seq_mask, batch.images_spatial_crop)[0]
    [(_, boundary)] = image_span_ranges(batch)
    full = runner.logits(runner.prefill(0, embeds, 0)[None])
    cache = PrefixCache(2**30)
    assert cache.put("prefix", runner.read_prefix(0, boundary), boundary)
    _, prefix = cache.longest_prefix(PromptKeys([(0, boundary)], [], ["prefix"]), batch.input_ids.shape[1])
    runner.write_prefix(1, prefix)
    reused = runner.logits(runner.prefill(1, embeds[boundary:], boundary)[None])
    torch.testing.assert_close(reused, full, rtol=0, atol=1e-5)


def test_keys_follow_pixels_not_encodings(tmp_path: Path):
    processor = Processor.from_pretrained(CHECKPOINTS / "tiny-mla")
    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}]
    original = seed_image().resize((800, 320))
    for name in ("same.png", "same.bmp", "lossy.jpg"):
        original.save(tmp_path / name)
    keys = {
        name: PromptKeys.of(processor(messages, [load_image(tmp_path / name, name, allow_local_files=True)]), "w")
        for name in ("same.png", "same.bmp", "lossy.jpg")
    }
    assert keys["same.png"] == keys["same.bmp"]  # identical pixels, whatever the file format
    assert keys["lossy.jpg"].images != keys["same.png"].images  # other pixels
    other_weights = PromptKeys.of(processor(messages, [original]), "other weights")
    assert other_weights.prefixes != keys["same.png"].prefixes and other_weights.images != keys["same.png"].images


def test_another_tiling_of_the_same_picture_is_another_key():
    processor = Processor.from_pretrained(CHECKPOINTS / "tiny-mla")
    image = seed_image()
    alone = PromptKeys.of(processor([{"role": "user", "content": "<image>\nHi"}], [image]), "w")
    # With three images every image is reduced to one tile: the first image's pixels differ.
    three = PromptKeys.of(
        processor([{"role": "user", "content": "<image>\n<image>\n<image>\nHi"}], [image, image, image]), "w"
    )
    assert alone.images[0] != three.images[0]
    assert alone.prefixes[0] != three.prefixes[0]
    assert three.images[0] == three.images[1] == three.images[2]


def test_the_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit(caplog):
    cache = PrefixCache(budget_bytes=3 * 400)
    tensor = lambda: torch.zeros(100)  # noqa: E731 (400 bytes)
    assert cache.put("a", [tensor()], 1) and cache.put("b", [tensor()], 1) and cache.put("c", [tensor()], 1)
    assert cache.image("a") is not None  # "a" is now the most recently used
    assert cache.put("d", [tensor()], 1)
    assert "b" not in cache and all(key in cache for key in "acd")
    assert cache.used_bytes == 1200 <= cache.budget_bytes
    with caplog.at_level(logging.INFO, logger="deepseek_vl2.engine.prefix_cache"):
        assert not cache.put("huge", [torch.zeros(400)], 7)
    assert "huge" not in cache and len(cache) == 3 and "exceed its" in caplog.text


def test_a_budget_larger_than_free_memory_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2.engine.prefix_cache"):
        assert cache_budget(torch.device("cpu"), free_bytes=2**30, requested_bytes=2**31) == 0
    assert "refused" in caplog.text
    assert cache_budget(torch.device("cpu"), free_bytes=2**32, requested_bytes=2**30) == 2**30
    assert cache_budget(torch.device("cpu"), free_bytes=2**32, requested_bytes=None) == 2**30
    assert cache_budget(torch.device("cpu"), free_bytes=2**40, requested_bytes=None) == 2 * 2**30


def test_an_engine_respects_its_budget():
    path = CHECKPOINTS / "tiny-mla"
    per_token = DeepseekVL2Config.from_pretrained(path).language.cache_values_per_token * 4  # fp32
    prefix_bytes = 1900 * per_token  # a little more than one seed-image prefix (1823 tokens)
    with Engine.from_pretrained(path, prefix_cache_bytes=prefix_bytes) as engine:
        for image in (seed_image(), other_image(), seed_image()):
            ask(engine, image, QUESTIONS[0])
            assert engine.prefix_cache.used_bytes <= prefix_bytes
        assert len(engine.prefix_cache) >= 1


def test_concurrent_requests_on_one_new_image_answer_alike(engines):
    cached, plain = engines
    image = Image.open(IMAGES / "multi_image_2.jpeg").convert("RGB")
    expected = {q: ask(plain, image, q).token_ids for q in QUESTIONS}
    questions = [QUESTIONS[i % 2] for i in range(6)]
    with ThreadPoolExecutor(len(questions)) as pool:
        results = list(pool.map(lambda q: ask(cached, image, q), questions))
    assert [r.token_ids for r in results] == [expected[q] for q in questions]
    assert cached.scheduler.busy_rows == 0


def test_a_request_cancelled_during_prefill_leaves_no_prefix():
    path = CHECKPOINTS / "tiny-mla"
    # Small chunks so that the prefill spans many steps while another answer is decoding.
    with Engine.from_pretrained(path, prefill_chunk_size=32, vision_chunk_tiles=1) as engine:
        talker = engine.stream([{"role": "user", "content": "Hello there."}], [], max_new_tokens=3000)
        next(talker)
        outcome: list[BaseException] = []

        def doomed() -> None:
            try:
                ask(engine, Image.open(IMAGES / "multi_image_3.jpeg").convert("RGB"), QUESTIONS[0])
            except RequestCancelled as error:
                outcome.append(error)

        thread = threading.Thread(target=doomed)
        thread.start()
        deadline = time.monotonic() + 30
        request = None
        while time.monotonic() < deadline:
            request = engine.scheduler.admitting
            if request is not None and 0 < request.prefilled < request.prompt_len:
                break
            time.sleep(0.001)
        assert request is not None and 0 < request.prefilled < request.prompt_len
        request.cancel()
        thread.join()
        talker.close()
        assert outcome and isinstance(outcome[0], RequestCancelled)
        assert request.keys.prefixes[-1] not in engine.prefix_cache
        # The cancelled request's image embeddings are complete and correct; they may stay.


def test_the_engine_sizes_its_caches_within_the_cgroup_limit(monkeypatch, caplog):
    """The KV rows and the prefix cache budget follow what the cgroup leaves, not the host's
    MemAvailable (memory.read_memory is what runner and engine ask)."""
    path = CHECKPOINTS / "tiny-mla"
    model, processor = DeepseekVL2.from_pretrained(path), Processor.from_pretrained(path)
    row = cache_bytes_per_row(model)
    for name in ("DEEPSEEK_VL2_MAX_BATCH", "COG_MAX_CONCURRENCY", "DEEPSEEK_VL2_PREFIX_CACHE_GB"):
        monkeypatch.delenv(name, raising=False)

    def build(found: Memory) -> tuple[int, int]:
        monkeypatch.setattr(memory, "read_memory", lambda: found)
        with Engine(model, processor, threaded=False) as engine:
            return engine.max_batch, engine.prefix_cache.budget_bytes if engine.prefix_cache is not None else 0

    host = 100 * 2**30
    with caplog.at_level(logging.INFO, logger="deepseek_vl2.engine.engine"):
        assert build(Memory(host)) == (4, 2 * 2**30)  # no limit: the defaults
    # The ready line reports the budget (an empty PrefixCache is falsy: it has a length).
    assert "memory: no cgroup limit" in caplog.text and "prefix cache 2.00 GiB" in caplog.text
    # 3 GiB left under the limit: 4 rows, and a quarter of what they leave.
    with caplog.at_level(logging.INFO, logger="deepseek_vl2.engine.engine"):
        assert build(Memory(host, limit=4 * 2**30, usage=2**30)) == (4, (3 * 2**30 - 4 * row) // 4)
    assert "memory: cgroup limit 4.00 GiB, 3.00 GiB available" in caplog.text
    # 6 rows' worth left: the 3 rows half of it holds, then a quarter of the other half.
    assert build(Memory(host, limit=2**30, usage=2**30 - 6 * row)) == (3, 3 * row // 4)


def test_low_and_auto_detail_never_share_entries_and_answer_as_alone(engines):
    """The seed image at "auto" (4x2 tiles) and "low" (1x1), alternated with the prefix cache on:
    each answer is its answer with no cache, and a request only ever hits its own detail's entries
    (the global view is the same in both, so a key that hashed less than the grid and every tile
    would mix them)."""
    cached, plain = engines
    image = seed_image().resize((2507, 1002))  # an image neither engine has seen: the cache is cold
    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}]
    keys = {d: PromptKeys.of(cached.processor(messages, [image], d), "w") for d in ("auto", "low")}
    assert not set(keys["auto"].images + keys["auto"].prefixes) & set(keys["low"].images + keys["low"].prefixes)
    alone = {d: ask(plain, image, QUESTIONS[0], image_detail=d) for d in ("auto", "low")}
    [(low_start, low_end)] = keys["low"].spans
    assert low_end - low_start == 421 and alone["auto"].prompt_tokens > alone["low"].prompt_tokens
    for turn, detail in enumerate(("auto", "low", "auto", "low")):
        result = ask(cached, image, QUESTIONS[0], image_detail=detail)
        assert result.token_ids == alone[detail].token_ids, (turn, detail)
        assert result.prompt_tokens == alone[detail].prompt_tokens
        if turn < 2:  # the other detail's entries are in the cache by now, and must not be used
            assert result.cached_prompt_tokens == 0 and result.timings.vision_s > 0, (turn, detail)
        else:  # its own prefix, up to the end of its own image span
            [(_, image_end)] = keys[detail].spans
            assert result.cached_prompt_tokens == image_end, (turn, detail)
