"""Model runner: chunked prefill into any cache row, batched decode with per-row positions, row
moves, and the compiled decode on the path CUDA takes."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from parity import CHECKPOINTS, case, conversation

from deepseek_vl2 import DeepseekVL2, Processor
from deepseek_vl2.compute.execution import Execution
from deepseek_vl2.engine import memory
from deepseek_vl2.engine.memory import Memory
from deepseek_vl2.engine.runner import (
    CPU_VISION_TILES_AT_ONCE, ModelRunner, batch_buckets, cache_bytes_per_row, default_max_batch,
)  # fmt: skip

# The fixtures' config.json sets a 4096-token context; fp32 paths agree to rounding.
ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> dict[str, DeepseekVL2]:
    return {
        name: DeepseekVL2.from_pretrained(CHECKPOINTS / name)
        for name in ("tiny-mha", "tiny-mla", "tiny-mla-noaux")
    }


def prompt(model: DeepseekVL2, key: str):
    """(input ids [1, T], embeddings [T, D]) of a fixture case, through our processor."""
    messages, images = conversation(case(key))
    inputs = Processor.from_pretrained(CHECKPOINTS / case(key)["checkpoint"])(messages, images)
    with torch.inference_mode():
        embeds = model.embed(
            inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask, inputs.images_spatial_crop
        )[0]
    return inputs, embeds


def prefill(runner: ModelRunner, row: int, embeds: torch.Tensor, chunk: int) -> torch.Tensor:
    for start in range(0, embeds.shape[0], chunk):
        hidden = runner.prefill(row, embeds[start : start + chunk], start)
    return runner.logits(hidden[None])[0]


@pytest.mark.parametrize("checkpoint", ["tiny-mha", "tiny-mla"])
@torch.inference_mode()
def test_chunked_prefill_in_any_row_equals_the_full_forward(models, checkpoint):
    model = models[checkpoint]
    inputs, embeds = prompt(model, f"{checkpoint}/m_two")
    full = model(
        inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask, inputs.images_spatial_crop
    )[0, -1]
    runner = ModelRunner(model, max_batch=3)
    chunked = prefill(runner, 2, embeds, chunk=100)
    one_shot = prefill(runner, 0, embeds, chunk=4096)
    torch.testing.assert_close(chunked, one_shot, rtol=0, atol=ATOL)
    torch.testing.assert_close(one_shot, full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("checkpoint", ["tiny-mha", "tiny-mla", "tiny-mla-noaux"])
@torch.inference_mode()
def test_cached_decode_equals_full_recomputation(models, checkpoint):
    model = models[checkpoint]
    inputs, embeds = prompt(model, f"{checkpoint}/m_one")
    prompt_len = inputs.input_ids.shape[1]
    runner = ModelRunner(model, max_batch=1)
    logits = [prefill(runner, 0, embeds, chunk=512)]
    tokens = [int(logits[0].argmax())]
    for step in range(6):
        logits.append(runner.decode(torch.tensor([tokens[-1]]), [prompt_len + step])[0])
        tokens.append(int(logits[-1].argmax()))

    ids = torch.cat([inputs.input_ids, torch.tensor([tokens[:-1]])], dim=1)
    mask = torch.cat([inputs.images_seq_mask, torch.zeros(1, len(tokens) - 1, dtype=torch.bool)], dim=1)
    full = model(ids, inputs.pixel_values, mask, inputs.images_spatial_crop)[0, prompt_len - 1 :]
    torch.testing.assert_close(torch.stack(logits), full, rtol=0, atol=ATOL)


def decode_alone(runner: ModelRunner, embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy logits of one prompt decoded as a batch of one in row 0."""
    logits = [prefill(runner, 0, embeds, chunk=512)]
    for step in range(steps):
        token = torch.tensor([int(logits[-1].argmax())])
        logits.append(runner.decode(token, [embeds.shape[0] + step])[0])
    return logits


@pytest.mark.parametrize("checkpoint", ["tiny-mha", "tiny-mla"])
@torch.inference_mode()
def test_batched_decode_rows_equal_each_prompt_alone(models, checkpoint):
    """Rows of different lengths (so different positions and visible cache lengths) decoded in one
    step give each row the logits it gets alone."""
    model = models[checkpoint]
    runner = ModelRunner(model, max_batch=3)
    prompts = [prompt(model, f"{checkpoint}/{name}")[1] for name in ("m_one", "m_text", "m_two")]
    alone = [decode_alone(runner, embeds, steps=4) for embeds in prompts]

    batched = [[prefill(runner, row, embeds, chunk=300)] for row, embeds in enumerate(prompts)]
    for step in range(4):
        tokens = torch.tensor([int(rows[-1].argmax()) for rows in batched])
        logits = runner.decode(tokens, [embeds.shape[0] + step for embeds in prompts])
        for rows, row_logits in zip(batched, logits):
            rows.append(row_logits)
    for row_alone, row_batched in zip(alone, batched):
        torch.testing.assert_close(torch.stack(row_batched), torch.stack(row_alone), rtol=0, atol=ATOL)


@torch.inference_mode()
def test_moved_row_decodes_like_the_original(models):
    model = models["tiny-mla"]
    runner = ModelRunner(model, max_batch=3)
    _, embeds = prompt(model, "tiny-mla/m_three")
    expected = decode_alone(runner, embeds, steps=2)
    first = prefill(runner, 2, embeds, chunk=512)
    runner.move_row(2, 0, embeds.shape[0])
    runner.language.caches()[0][2].fill_(float("nan"))  # the old row must no longer be read
    second = runner.decode(torch.tensor([int(first.argmax())]), [embeds.shape[0]])[0]
    torch.testing.assert_close(torch.stack([first, second]), torch.stack(expected[:2]), rtol=0, atol=ATOL)


def test_batch_buckets_cover_every_size_up_to_max_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("experts", ["gathered", "dense"])
@torch.inference_mode()
def test_compiled_decode_on_the_cuda_path_gives_the_eager_tokens(models, experts):
    """The decode step CUDA compiles (sync-free experts, whole-context masked attention, padded
    bucket), compiled on the CPU with fullgraph=True: no graph break, the eager tokens."""
    model = models["tiny-mla-noaux"]
    cuda_path = dataclasses.replace(
        Execution.for_device(torch.device("cuda"), torch.bfloat16), sync_free_experts=experts
    )
    model.set_execution(cuda_path)
    try:
        prompts = [prompt(model, key)[1] for key in ("tiny-mla-noaux/m_one", "tiny-mla-noaux/m_text")]

        def greedy(runner: ModelRunner, batch: list[torch.Tensor]) -> list[list[int]]:
            tokens = [[int(prefill(runner, row, e, chunk=512).argmax())] for row, e in enumerate(batch)]
            for step in range(6):
                logits = runner.decode(
                    torch.tensor([t[-1] for t in tokens]), [e.shape[0] + step for e in batch]
                )
                for row_tokens, row_logits in zip(tokens, logits):
                    row_tokens.append(int(row_logits.argmax()))
            return tokens

        eager = greedy(ModelRunner(model, max_batch=4), prompts)
        compiled_runner = ModelRunner(model, max_batch=4, compile_decode=True)
        # Three rows: they run padded to the bucket of 4.
        compiled = greedy(compiled_runner, prompts + prompts[:1])
        assert compiled_runner.decode_compiled, "the compiled decode fell back to eager"
        assert compiled == eager + eager[:1]
    finally:
        model.set_execution(Execution.for_device(model.device, model.dtype))


def test_the_cpu_encodes_a_few_tiles_at_a_time_with_the_same_features(models, monkeypatch):
    model = models["tiny-mla"]
    inputs, _ = prompt(model, "tiny-mla/m_one")
    tiles = inputs.pixel_values[0]
    assert tiles.shape[0] > CPU_VISION_TILES_AT_ONCE
    runner = ModelRunner(model, 1)
    with torch.inference_mode():
        whole = model.encode_tiles(tiles)
        batches: list[int] = []
        encode = model.encode_tiles
        monkeypatch.setattr(model, "encode_tiles", lambda t: batches.append(t.shape[0]) or encode(t))
        features = runner.encode_tiles(tiles)
    assert max(batches) == CPU_VISION_TILES_AT_ONCE and sum(batches) == tiles.shape[0]
    torch.testing.assert_close(features, whole, atol=ATOL, rtol=0)


def test_cpu_rows_fit_in_half_of_the_memory_the_process_may_take(models, monkeypatch, caplog):
    model = models["tiny-mla"]
    row = cache_bytes_per_row(model)

    def rows(found: Memory, wanted: int | None = None) -> int:
        monkeypatch.setattr(memory, "read_memory", lambda: found)
        return default_max_batch(model, wanted)

    plenty = 2**40
    assert rows(Memory(plenty)) == 4  # the CPU default
    assert rows(Memory(plenty), wanted=8) == 8
    assert rows(Memory(None)) == 4  # nothing known: as asked
    assert "cache rows" not in caplog.text
    # A cgroup limit leaving 6 rows' worth: half of it holds 3 rows, whatever the host has free.
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2.engine.runner"):
        assert rows(Memory(plenty, limit=10 * row, usage=4 * row), wanted=8) == 3
    assert "host memory holds 3 cache rows of the whole context" in caplog.text and "not 8" in caplog.text
    assert rows(Memory(plenty, limit=10 * row, usage=4 * row), wanted=2) == 2
    assert rows(Memory(5 * row)) == 2  # the host's own MemAvailable caps too
    assert rows(Memory(plenty, limit=10 * row, usage=10 * row)) == 1  # never fewer than one row
    assert rows(Memory(plenty, limit=10 * row, usage=9 * row), wanted=4) == 1
