"""bf16, the production dtype, against the official implementation run in bf16 (fixture README 8).

Two bf16 implementations never round alike, so nothing here is exact. Logits must stay within twice
the official run's own bf16-to-fp32 distance (0.5 at least), and greedy tokens must agree on every
step the official run decided by a margin of 0.5 or more.

Every execution choice the CPU can make (execution.py: native or upcast products, plain or
transposed few-row products, native or fp32 attention) is forced in turn, so that each passes
these bounds on any machine, whatever calibration would pick here.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from parity import (
    CHECKPOINTS, COMPILE_DECODE, DEVICE, case, conversation, model_cases, model_cases_bf16, model_inputs,
    model_logits, model_logits_bf16,
)  # fmt: skip

from deepseek_vl2 import DeepseekVL2, Engine, Processor
from deepseek_vl2.compute.execution import describe, valid_choices

# Products, attention and routing differ in rounding between torch's CPU kernel levels (Makefile).
pytestmark = pytest.mark.kernel_level

# bf16 logits of size 4-8 move in steps of 0.03-0.06: a top-1/top-2 gap under 0.5 (about 8 steps)
# may close either way in another implementation's rounding, so it decides nothing here.
FIRM_MARGIN = 0.5
# The logit bound is twice the case's official bf16-vs-fp32 distance, never below this.
MIN_LOGIT_BOUND = 0.5
# A router near-tie can flip one expert choice and move the logits by several units (the official
# bf16 run itself does so on tiny-mla-noaux/m_three); one case of the fifteen may do that.
MAY_EXCEED_BOUND = 1

KEYS = [c["key"] for c in model_cases()]


@pytest.fixture(scope="module", params=[describe(choices) for choices in valid_choices()])
def models(request) -> dict[str, DeepseekVL2]:
    names = sorted({c["checkpoint"] for c in model_cases()})
    return {
        name: DeepseekVL2.from_pretrained(
            CHECKPOINTS / name, device=DEVICE, dtype=torch.bfloat16, execution=request.param
        )
        for name in names
    }


@pytest.fixture(scope="module")
def engines(models) -> Iterator[dict[str, Engine]]:
    # Engines over the models already loaded, so the module reads each checkpoint once.
    engines = {
        name: Engine(model, Processor.from_pretrained(CHECKPOINTS / name), compile_decode=COMPILE_DECODE)
        for name, model in models.items()
    }
    yield engines
    for engine in engines.values():
        engine.close()


def logit_bound(key: str) -> float:
    return max(2 * model_cases_bf16()[key]["bf16_vs_fp32_max_abs_diff"], MIN_LOGIT_BOUND)


def firm_steps(margins: list[float]) -> int:
    """Leading greedy steps the official bf16 run decided with a margin of at least FIRM_MARGIN."""
    return next((i for i, m in enumerate(margins) if m < FIRM_MARGIN), len(margins))


def test_fixture_cases_line_up():
    # The bf16 records carry no inputs: they must describe exactly the fp32 cases we feed.
    assert sorted(model_cases_bf16()) == sorted(KEYS)
    for key in KEYS:
        c, ref = case(key), model_cases_bf16()[key]
        assert ref["logit_positions"] == c["logit_positions"]
        assert ref["logit_positions"][-1] == len(c["input_ids"]) - 1  # the last row is the last token
        assert model_logits_bf16()[f"{key}/at_positions"].shape == (len(c["logit_positions"]), 608)


def test_logits_match_official_bf16(models):
    rows, wrong_argmax = [], []
    for key in KEYS:
        c, ref = case(key), model_cases_bf16()[key]
        model = models[c["checkpoint"]]
        # Our model casts the fp32 pixels to its dtype before the vision tower, as the official
        # bf16 run did, so model_inputs serves both dtypes.
        assert model.dtype == torch.bfloat16
        with torch.inference_mode():
            logits = model(**model_inputs(c))[0, c["logit_positions"]].cpu()
        official = torch.from_numpy(model_logits_bf16()[f"{key}/at_positions"])
        diff, bound = float((logits - official).abs().max()), logit_bound(key)
        # For the table only: our own bf16 error, next to the official one (the bound's basis).
        to_fp32 = float((logits - torch.from_numpy(model_logits()[f"{key}/at_positions"])).abs().max())
        # The last stored row is the prompt's last token (test_fixture_cases_line_up). Only a clear
        # official winner there says which token must win for us too; below that, no assertion.
        top2 = official[-1].topk(2).values
        margin, ours = float(top2[0] - top2[1]), int(logits[-1].argmax())
        assert int(official[-1].argmax()) == ref["last_argmax_bf16"]
        if margin >= FIRM_MARGIN and ours != ref["last_argmax_bf16"]:
            wrong_argmax.append(key)
        rows.append((key, diff, bound, to_fp32, ref["bf16_vs_fp32_max_abs_diff"], margin, ours))

    # diff / bound / within: ours against the official bf16 logits; then, against the official fp32
    # logits, our bf16 run and the official one; then the official top-2 gap at the last token.
    print(f"\n{'case':24} {'diff':>7} {'bound':>7} within {'ours-fp32':>9} {'off-fp32':>9} {'margin':>7}")
    for key, diff, bound, ours_fp32, official_fp32, margin, _ in rows:
        verdict = "yes" if diff <= bound else "NO"
        print(
            f"{key:24} {diff:7.3f} {bound:7.3f} {verdict:6} {ours_fp32:9.3f} {official_fp32:9.3f} "
            f"{margin:7.3f}"
        )
    within = sum(diff <= bound for _, diff, bound, *_ in rows)
    print(f"{within} of {len(rows)} within bound")
    assert within >= len(rows) - MAY_EXCEED_BOUND
    assert wrong_argmax == [], "last-position argmax differs where the official margin is firm"


@pytest.mark.parametrize("key", KEYS)
def test_greedy_matches_official_bf16_on_firm_steps(engines, key):
    c, ref = case(key), model_cases_bf16()[key]["greedy_rp1"]
    messages, images = conversation(c)
    result = engines[c["checkpoint"]].generate(
        messages, images, max_new_tokens=24, temperature=0, repetition_penalty=1.0
    )
    assert result.prompt_tokens == len(c["input_ids"])
    expected, firm = ref["new_token_ids"], firm_steps(ref["step_margins"])
    print(f"\n{key}: {firm} firm steps, ours {result.token_ids}, official {expected}")
    # Either run may stop on EOS; a shorter list then differs exactly where the tokens do.
    assert result.token_ids[:firm] == expected[:firm]


def test_batched_greedy_matches_official_bf16_on_firm_steps(engines, monkeypatch):
    """A checkpoint's cases all at once: their decode steps run several rows through the few-row
    products (plain, transposed or upcast, as forced), and each request still agrees with the
    official bf16 run on its firm steps."""
    for name, engine in engines.items():
        keys = [key for key in KEYS if case(key)["checkpoint"] == name]
        batches: list[int] = []
        decode = engine.runner.decode

        def counted(tokens: torch.Tensor, positions: list[int], decode=decode) -> torch.Tensor:
            batches.append(len(positions))
            return decode(tokens, positions)

        monkeypatch.setattr(engine.runner, "decode", counted)

        def generate(key: str) -> list[int]:
            messages, images = conversation(case(key))
            result = engine.generate(messages, images, max_new_tokens=24, temperature=0, repetition_penalty=1.0)
            return result.token_ids

        with ThreadPoolExecutor(len(keys)) as pool:
            answers = dict(zip(keys, pool.map(generate, keys)))
        assert max(batches) > 1, f"{name}: no decode step ran more than one row"
        for key, tokens in answers.items():
            ref = model_cases_bf16()[key]["greedy_rp1"]
            firm = firm_steps(ref["step_margins"])
            assert tokens[:firm] == ref["new_token_ids"][:firm], key

