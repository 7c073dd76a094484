"""The embedded engine's decode step: one token for every running row, sampling, log-probs and stop rules.
Mixed into ``Engine``; every method runs on the engine's worker thread."""

from __future__ import annotations

import time
from typing import Any

import torch

from slime.backends.embedded_sglang.engine_types import _Row, _Running
from slime.backends.embedded_sglang.sampling import SamplingTensors, sample_next, scaled_logprobs, topk_rows


class DecodeMixin:
    """Decoding of ``Engine``'s running batch (see its attributes)."""

    def _decode_step(self) -> None:
        run = self._running
        assert run is not None
        mask = torch.cat([run.mask, torch.ones(len(run), 1, dtype=run.mask.dtype, device=self.device)], 1)
        out = self.decoder(
            input_ids=run.last_tokens[:, None],
            attention_mask=mask,
            position_ids=run.next_pos[:, None],
            past_key_values=run.cache,
            use_cache=True,
        )
        run.mask = mask
        run.next_pos = run.next_pos + 1
        logits = self.lm_head(out.last_hidden_state[:, -1]).float()  # [B, V]
        finished = self._sample_and_record(run, logits)
        self._drop_finished(run, finished)
        if len(run) == 0:
            self._running = None

    def _sample_and_record(self, run: _Running, logits: torch.Tensor) -> list[int]:
        """Sample one token for every row of ``run``, record it and its log-probs; return finished row indices."""
        rows = run.rows
        dev = self.device
        steps = torch.tensor([len(r.result.output_ids) for r in rows], dtype=torch.long, device=dev)
        min_new = torch.tensor([r.req.min_new_tokens for r in rows], dtype=torch.long, device=dev)
        width = max(1, max(len(r.stop_ids) for r in rows))
        stop_ids = torch.full((len(rows), width), -1, dtype=torch.long, device=dev)  # [B, S], -1 padded
        for i, r in enumerate(rows):
            if r.stop_ids:
                stop_ids[i, : len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.long, device=dev)
        # min_new_tokens: stop tokens cannot be sampled yet (SGLang's min-new-tokens penalizer).
        block = (steps < min_new)[:, None] & (stop_ids >= 0)
        if bool(block.any()):
            rows_i, cols_i = block.nonzero(as_tuple=True)
            logits = logits.index_put((rows_i, stop_ids[rows_i, cols_i]), torch.tensor(float("-inf"), device=dev))
        params = SamplingTensors(
            temperature=torch.tensor([r.req.temperature for r in rows], dtype=torch.float32, device=dev),
            top_k=torch.tensor([r.req.top_k for r in rows], dtype=torch.long, device=dev),
            top_p=torch.tensor([r.req.top_p for r in rows], dtype=torch.float32, device=dev),
            min_p=torch.tensor([r.req.min_p for r in rows], dtype=torch.float32, device=dev),
            seeds=torch.tensor([r.req.seed or 0 for r in rows], dtype=torch.long, device=dev),
            steps=steps,
        )
        logprobs = scaled_logprobs(logits, params.temperature)  # [B, V]
        nxt = sample_next(logprobs, params)  # [B]
        chosen = logprobs.gather(1, nxt[:, None])[:, 0]
        k_max = max(r.req.top_logprobs_num if r.req.return_logprob else 0 for r in rows)
        top_vals = top_ids = None
        if k_max > 0:
            v, i = topk_rows(logprobs, k_max)
            top_vals, top_ids = v.tolist(), i.tolist()
        nxt_l, chosen_l = nxt.tolist(), chosen.tolist()
        stop_hit = ((nxt[:, None] == stop_ids) & (stop_ids >= 0)).any(1).tolist()
        finished: list[int] = []
        for b, row in enumerate(rows):
            req, res = row.req, row.result
            res.output_ids.append(nxt_l[b])
            if req.return_logprob:
                res.output_token_logprobs_val.append(chosen_l[b])
                if req.top_logprobs_num > 0 and top_vals is not None and top_ids is not None:
                    res.output_top_logprobs_val.append(top_vals[b][: req.top_logprobs_num])
                    res.output_top_logprobs_idx.append(top_ids[b][: req.top_logprobs_num])
                if req.token_ids_logprob is not None:
                    res.output_token_ids_logprobs_val.append(logprobs[b, req.token_ids_logprob].tolist())
            reason = self._finish_reason(row, stop_hit[b])
            if reason is not None:
                res.finish_reason = reason
                finished.append(b)
        run.last_tokens = nxt
        return finished

    def _finish_reason(self, row: _Row, stop_token_hit: bool) -> dict[str, Any] | None:
        """SGLang's order: length first, then a stop token, then a stop string."""
        out = row.result.output_ids
        if len(out) >= row.req.max_new_tokens:
            return {"type": "length", "length": row.req.max_new_tokens}
        if len(out) < row.req.min_new_tokens:
            return None
        if stop_token_hit:
            return {"type": "stop", "matched": out[-1]}
        if row.req.stop_strs:
            tail = self.safe_decode(out[-(row.max_stop_chars + 1) :], skip_special_tokens=False)
            for s in row.req.stop_strs:
                if s in tail:
                    return {"type": "stop", "matched": s}
        return None

    def _drop_finished(self, run: _Running, finished: list[int]) -> None:
        if not finished:
            return
        done = set(finished)
        now = time.time()
        for b in finished:
            row = run.rows[b]
            row.result.cached_tokens = row.cached_tokens
            row.result.e2e_latency = now - row.start
            if not row.future.done():
                row.future.set_result(row.result)
        keep = [b for b in range(len(run)) if b not in done]
        run.select(keep)
