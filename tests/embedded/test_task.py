"""The arithmetic task: chains, splits, verifier, reward plug-in, prompt builder (hand cases)."""

from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace

import pytest

from slime.embedded.task import (
    TaskConfig,
    accuracy,
    build_prompt,
    chain_is_valid,
    extract_answer,
    generate_splits,
    reward_func,
    sample_problem,
    solve,
    verify,
    write_splits,
)


def test_solve_hand_cases():
    p = solve([37, 48, 19], ["+", "-"])
    assert p.question == "37+48-19="
    assert p.chain == "37+48=85;85-19=66;#66"
    assert p.answer == 66 and p.label == "66"
    assert solve([5, 7], ["+"]).chain == "5+7=12;#12"
    with pytest.raises(ValueError, match="operands"):
        solve([1, 2], ["+", "-"])
    with pytest.raises(ValueError, match="operator"):
        solve([1, 2], ["*"])


def test_verify_reads_the_last_hash_answer():
    assert verify("37+48=85;85-19=66;#66", "66")
    assert verify("37+48=85;85-19=66;#66<|im_end|>", 66)
    assert verify("#12 then #66", "66")  # the last answer counts
    assert not verify("37+48=85;85-19=66;#67", "66")
    assert not verify("37+48=85;85-19=66;", "66")  # no final answer
    assert not verify("", "66")
    assert not verify("#66", "not a number")
    assert verify("#-3", "-3") and extract_answer("#-3") == -3
    assert extract_answer("no answer") is None


def test_chain_is_valid():
    assert chain_is_valid("37+48=85;85-19=66;#66")
    assert not chain_is_valid("37+48=84;84-19=65;#65")
    assert not chain_is_valid("#66")


def test_accuracy_and_reward_plugin():
    assert accuracy(["#3", "#4", "x"], ["3", "5", "1"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        accuracy(["#3"], ["3", "4"])
    good = SimpleNamespace(response="1+2=3;#3", label="3")
    bad = SimpleNamespace(response="1+2=4;#4", label="3")
    assert asyncio.run(reward_func(None, good)) == 1.0
    assert asyncio.run(reward_func(None, bad)) == 0.0
    assert asyncio.run(reward_func(None, [good, bad])) == [1.0, 0.0]


def test_sampled_problems_respect_the_knobs():
    cfg = TaskConfig(min_terms=3, max_terms=4, max_operand=20, ops="-", max_value=20)
    rng = random.Random(0)
    for _ in range(200):
        p = sample_problem(rng, cfg)
        operands = [int(x) for x in p.question[:-1].split("-")]
        assert 3 <= len(operands) <= 4 and all(0 <= x <= 20 for x in operands)
        assert chain_is_valid(p.chain) and verify(p.chain, p.label)
        assert 0 <= p.answer <= 20
    with pytest.raises(ValueError, match="ops"):
        TaskConfig(ops="*").validate()
    with pytest.raises(ValueError, match="min_terms"):
        TaskConfig(min_terms=1).validate()


def test_splits_are_seeded_and_disjoint(tmp_path):
    train_a, eval_a = generate_splits(300, 50, seed=3)
    train_b, eval_b = generate_splits(300, 50, seed=3)
    assert train_a == train_b and eval_a == eval_b
    assert generate_splits(300, 50, seed=4)[1] != eval_a
    assert len({p.question for p in eval_a}) == 50
    assert not {p.question for p in train_a} & {p.question for p in eval_a}
    # the held-out set does not depend on the train size
    assert generate_splits(10, 50, seed=3)[1] == eval_a

    train_path, eval_path = write_splits(tmp_path, 20, 5, seed=0)
    rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) >= {"prompt", "label"}
    assert verify(rows[0]["metadata"]["chain"], rows[0]["label"])
    assert len(train_path.read_text().splitlines()) == 20


def test_build_prompt_matches_the_chat_template(tiny_tokenizer_dir):
    from slime.embedded.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )
    assert build_prompt("1+2=", tok) == expected
    assert build_prompt("1+2=") == expected  # the embedded template without a tokenizer
