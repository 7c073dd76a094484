"""Teacher scoring in the embedded engine: the shared-prompt prefix reuse and the batched input log-probs.

A scoring request (``max_new_tokens=0``, log-probs from ``logprob_start_len``) is answered from its prefix's
KV (prefilled once per distinct prefix, kept in the prompt cache) plus a forward of its remaining tokens.
The answers must equal a whole prefill of each request (``scoring_prefix_reuse=False``) and a direct HF
forward, for every log-prob output (chosen token, top-k, token_ids_logprob, logprob temperature).
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slime.backends.embedded_sglang.engine import Engine, GenRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scoring requests it measures
from common import scoring_requests  # noqa: E402


@pytest.fixture(scope="module")
def engines(tiny_teacher_dir):
    on = Engine(str(tiny_teacher_dir), scoring_prefix_reuse=True)
    off = Engine(str(tiny_teacher_dir), scoring_prefix_reuse=False)
    yield on, off
    on.shutdown()
    off.shutdown()


def _batch():
    """3 prompts of different lengths x 3 samples (responses of different lengths), as an OPD step sends them."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    out = []
    for p in prompts:
        for m in (1, 4, 7):
            out.append((p, torch.randint(3, 90, (m,), generator=gen).tolist()))
    return out


def _requests(batch):
    return scoring_requests(
        batch,
        3,
        token_ids_logprob=lambda i: [4, 9] if i % 4 == 0 else None,
        logprob_temperature=lambda i: 0.5 if i % 3 == 0 else None,
    )


def test_prefix_reuse_matches_whole_prefill_and_hf_forward(engines, tiny_teacher_dir):
    on, off = engines
    batch = _batch()
    on.flush_cache().result()
    got, want = on.generate(_requests(batch)), off.generate(_requests(batch))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_teacher_dir), local_files_only=True).eval()
    for i, ((p, r), a, b) in enumerate(zip(batch, got, want, strict=True)):
        seq, temp = p + r, 0.5 if i % 3 == 0 else 1.0
        assert a.input_token_logprobs_idx == b.input_token_logprobs_idx == seq[len(p) - 1 :]
        assert a.input_token_logprobs_val[0] is None and len(a.input_token_logprobs_val) == len(r) + 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float() / temp, -1)
        ref = [logp[j, seq[j + 1]].item() for j in range(len(p) - 1, len(seq) - 1)]
        assert a.input_token_logprobs_val[1:] == pytest.approx(ref, abs=1e-5)
        assert a.input_token_logprobs_val[1:] == pytest.approx(b.input_token_logprobs_val[1:], abs=1e-5)
        assert a.input_top_logprobs_idx[1:] == b.input_top_logprobs_idx[1:]
        assert [row[0] for row in a.input_top_logprobs_val[1:]] == pytest.approx(
            [logp[j].max().item() for j in range(len(p) - 1, len(seq) - 1)], abs=1e-5
        )
        if i % 4 == 0:
            assert a.input_token_ids_logprobs_idx[1:] == [[4, 9]] * len(r)
            flat = [v for row in a.input_token_ids_logprobs_val[1:] for v in row]
            ref_ids = [logp[j, t].item() for j in range(len(p) - 1, len(seq) - 1) for t in (4, 9)]
            assert flat == pytest.approx(ref_ids, abs=1e-5)
        assert a.finish_reason == {"type": "length", "length": 0} and a.output_ids == []


def test_samples_of_one_prompt_share_one_prefill(engines):
    """The first sample of a prompt prefills it; the others (same batch or later) read it from the cache."""
    on, off = engines
    batch = _batch()
    on.flush_cache().result()
    first = on.generate(_requests(batch))
    assert [a.cached_tokens for a in first] == [0, 4, 4, 0, 8, 8, 0, 1, 1]
    again = on.generate(_requests(batch[:1]))  # a later request with a cached prompt
    assert again[0].cached_tokens == 4
    assert [a.cached_tokens for a in off.generate(_requests(batch))] == [0] * len(batch)


def test_first_token_scoring_and_generation_keep_the_whole_prefill_path(engines):
    """logprob_start_len 0 (no prefix) and generation requests are not routed through the prefix path."""
    on, _ = engines
    seq = [5, 6, 7, 8]
    whole = on.generate(
        [GenRequest(rid="a", input_ids=seq, max_new_tokens=0, return_logprob=True, logprob_start_len=0)]
    )
    assert len(whole[0].input_token_logprobs_val) == 4 and whole[0].cached_tokens == 0
    gen = on.generate([GenRequest(rid="g", input_ids=seq, max_new_tokens=2, temperature=0.0, ignore_eos=True)])
    assert len(gen[0].output_ids) == 2
