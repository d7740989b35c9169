"""One price rule for Claude, wherever a call is reserved or charged (issue 15)."""

from __future__ import annotations

import pytest

from aos_contracts.skills import (
    DEAREST_LLM_PRICE,
    LLM_PRICES,
    SKILL_CONTRACTS,
    llm_cost_cents,
    llm_price,
)
from aos_executor.skills.llm import TokenUsage

DATED_HAIKU = "claude-haiku-4-5-20251001"


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("claude-haiku-4-5", "claude-haiku-4-5"),
        (DATED_HAIKU, "claude-haiku-4-5"),
        ("claude-haiku-4-5@20251001", "claude-haiku-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ],
)
def test_a_model_id_is_priced_by_the_longest_table_name_it_starts_with(
    model: str, priced_as: str
) -> None:
    assert llm_price(model) == LLM_PRICES[priced_as]


@pytest.mark.parametrize(
    "model", ["some-new-model", "claude-haiku-4-50", "claude-haiku-4", "", "claude-opus-4-10"]
)
def test_an_unknown_model_or_a_name_matched_only_mid_token_is_priced_as_the_dearest(
    model: str,
) -> None:
    assert llm_price(model) == DEAREST_LLM_PRICE


def test_the_dated_haiku_costs_what_haiku_costs() -> None:
    # 1M input tokens at 100 cents and 1M output tokens at 500 cents per MTok.
    assert llm_cost_cents(DATED_HAIKU, 1_000_000, 1_000_000) == 600
    assert llm_cost_cents(DATED_HAIKU, 1_000_000, 0, 1_000_000, 1_000_000) == 100 + 125 + 10


def test_llm_invoke_reserves_a_dated_model_at_its_own_price() -> None:
    estimate = SKILL_CONTRACTS["llm_invoke"].estimate_cents
    params = {"prompt": "Summarise the notes.", "max_tokens": 10_000}
    haiku = estimate({**params, "model": "claude-haiku-4-5"})
    assert haiku == 6  # 10 000 output tokens at 500 cents per MTok: 5, + the input, rounded up
    assert estimate({**params, "model": DATED_HAIKU}) == haiku


def test_the_executor_charges_reported_usage_by_the_same_rule() -> None:
    usage = TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert usage.cost_cents(DATED_HAIKU) == llm_cost_cents(DATED_HAIKU, 1_000_000, 1_000_000)
    assert usage.cost_cents(DATED_HAIKU) == 600
