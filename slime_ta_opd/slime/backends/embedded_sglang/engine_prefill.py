"""The embedded engine's admission and prefill: batched prompt forwards, the prompt cache (prefix reuse) and the
input log-probs of scoring requests. Mixed into ``Engine``; every method runs on the engine's worker thread."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import torch

from slime.backends.embedded_sglang.engine_types import (
    EngineRequestError,
    GenRequest,
    GenResult,
    _Prefilled,
    _Row,
    _Running,
)
from slime.backends.embedded_sglang.sampling import topk_rows

logger = logging.getLogger("slime.backends.embedded_sglang.engine")

_LOGPROB_CHUNK = 1024  # prompt positions per lm-head chunk when computing input log-probs


class PrefillMixin:
    """Admission, prefill and the prompt cache of ``Engine`` (see its attributes)."""

    def _admit(self) -> None:
        if not self._waiting:
            return
        free = self.max_running_requests - (len(self._running) if self._running is not None else 0)
        batch: list[tuple[GenRequest, Future]] = []
        rest: list[tuple[GenRequest, Future]] = []
        tokens = 0
        seen: set[tuple[int, ...]] = set()
        for req, fut in self._waiting:
            key = tuple(req.input_ids)
            cost = 0 if (key in seen or key in self._prompt_cache) else len(req.input_ids)
            generating = req.max_new_tokens > 0
            fits_tokens = not batch or tokens + cost <= self.max_prefill_tokens
            if fits_tokens and (free > 0 or not generating):
                batch.append((req, fut))
                tokens += cost
                seen.add(key)
                free -= int(generating)
            else:
                rest.append((req, fut))
        self._waiting = rest
        if batch:
            self._prefill_isolated(batch)

    def _prefill_isolated(self, batch: list[tuple[GenRequest, Future]]) -> None:
        """Prefill ``batch``; when that fails, prefill its requests one by one, so that exactly the requests that
        fail get the error and the others of the batch are served."""
        try:
            self._prefill(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._fail_prefill(batch, exc)
                return
            logger.warning("a prefill batch of %d failed (%r): prefilling its requests one by one", len(batch), exc)
        for item in batch:
            if item[1].done():  # answered before the failure (prefill-only scoring)
                continue
            try:
                self._prefill([item])
            except Exception as exc:
                self._fail_prefill([item], exc)

    def _fail_prefill(self, batch: list[tuple[GenRequest, Future]], exc: Exception) -> None:
        logger.error("prefill failed for %s: %r", [req.rid for req, _ in batch], exc)
        err = EngineRequestError(f"the engine failed while prefilling this request: {type(exc).__name__}: {exc}")
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    def _prefill(self, batch: list[tuple[GenRequest, Future]]) -> None:
        start = time.time()
        prompts: dict[tuple[int, ...], _Prefilled | None] = {}
        for req, _ in batch:
            key = tuple(req.input_ids)
            if key not in prompts:
                prompts[key] = self._prompt_cache.get(key)
                if prompts[key] is not None:
                    self._prompt_cache.move_to_end(key)
        misses = [k for k, v in prompts.items() if v is None]
        fresh: set[tuple[int, ...]] = set(misses)
        if misses:
            need_cache = any(req.max_new_tokens > 0 for req, _ in batch)
            for key, pre in zip(misses, self._forward_prompts(misses, need_cache), strict=True):
                prompts[key] = pre
        cache_keys = {tuple(req.input_ids) for req, _ in batch if req.max_new_tokens > 0}
        for key in cache_keys & fresh:
            self._remember(key, prompts[key])

        gen_rows: list[_Row] = []
        gen_keys: list[tuple[int, ...]] = []
        reused: set[tuple[int, ...]] = set()
        for req, fut in batch:
            key = tuple(req.input_ids)
            pre = prompts[key]
            assert pre is not None
            result = GenResult(output_ids=[], finish_reason={}, prompt_tokens=len(req.input_ids))
            self._input_logprobs(req, pre.hidden, result)
            if req.max_new_tokens == 0:
                result.finish_reason = {"type": "length", "length": 0}
                result.e2e_latency = time.time() - start
                fut.set_result(result)
                continue
            stop_ids = sorted(set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.eos_token_ids)))
            # A prompt prefilled earlier (prompt cache) or by an earlier row of this batch counts as cached,
            # as SGLang's radix cache reports it.
            cached = len(req.input_ids) if (key not in fresh or key in reused) else 0
            reused.add(key)
            row = _Row(req, fut, start, cached, result, stop_ids, max((len(s) for s in req.stop_strs), default=0))
            gen_rows.append(row)
            gen_keys.append(key)
        if not gen_rows:
            return
        new = self._rows_from_prompts(gen_rows, [prompts[k] for k in gen_keys])
        last_logits = torch.stack([prompts[k].last_logits for k in gen_keys])  # type: ignore[union-attr]
        finished = self._sample_and_record(new, last_logits)
        self._drop_finished(new, finished)
        if len(new) == 0:
            return
        if self._running is None or len(self._running) == 0:
            self._running = new
        else:
            self._running.merge(new)

    def _forward_prompts(self, prompts: list[tuple[int, ...]], need_cache: bool) -> list[_Prefilled]:
        """One right-padded forward over distinct prompts; per prompt its KV rows, hidden states, last logits."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lens.max())
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()  # [U, W]
        pos = torch.arange(width, device=self.device)[None, :].expand(len(prompts), width)
        # Right padding: a real token never attends to a pad (causal), so no row is fully masked.
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=need_cache)
        hidden = out.last_hidden_state  # [U, W, H]
        last_logits = self.lm_head(hidden[torch.arange(len(prompts), device=self.device), lens - 1]).float()  # [U, V]
        result = []
        for u, p in enumerate(prompts):
            n = len(p)
            kv = None
            if need_cache:
                kv = [
                    (layer.keys[u : u + 1, :, :n], layer.values[u : u + 1, :, :n])
                    for layer in out.past_key_values.layers
                ]
            result.append(_Prefilled(kv, hidden[u, :n], last_logits[u]))
        return result

    def _remember(self, key: tuple[int, ...], pre: _Prefilled | None) -> None:
        """Keep a generated prompt's prefill for later requests with the same prompt (n samples)."""
        if pre is None or pre.kv is None or self.prompt_cache_tokens <= 0:
            return
        kv = [(k.clone(), v.clone()) for k, v in pre.kv]  # detach from the batch tensors so they can be freed
        self._prompt_cache[key] = _Prefilled(kv, pre.hidden.clone(), pre.last_logits.clone())
        self._prompt_cache_size += len(key)
        while self._prompt_cache_size > self.prompt_cache_tokens and self._prompt_cache:
            old, _ = self._prompt_cache.popitem(last=False)
            self._prompt_cache_size -= len(old)

    def _rows_from_prompts(self, rows: list[_Row], pres: list[_Prefilled | None]) -> _Running:
        """A running batch whose row ``b`` starts from the prefill ``pres[b]`` (shared prompts share tensors)."""
        from transformers import DynamicCache

        width = max(len(r.req.input_ids) for r in rows)
        layers = []
        for li in range(len(pres[0].kv)):  # type: ignore[union-attr, arg-type]
            ks, vs = [], []
            for pre in pres:
                k, v = pre.kv[li]  # type: ignore[union-attr, index]
                extra = width - k.shape[2]
                if extra:
                    k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])], 2)
                    v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])], 2)
                ks.append(k)
                vs.append(v)
            layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
        lens = torch.tensor([len(r.req.input_ids) for r in rows], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()
        last = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        return _Running(rows, DynamicCache(ddp_cache_data=layers), mask, lens, last, self.device)

    def _input_logprobs(self, req: GenRequest, hidden: torch.Tensor, result: GenResult) -> None:
        """Fill SGLang-layout input log-probs of one request from its prompt's hidden states ``[W, H]``."""
        n = len(req.input_ids)
        start = n if (not req.return_logprob or req.logprob_start_len < 0) else req.logprob_start_len
        if start >= n:
            return
        ids = req.input_ids
        result.input_token_logprobs_idx = list(ids[start:])
        result.input_token_logprobs_val = [None]
        want_top = req.top_logprobs_num > 0
        want_ids = req.token_ids_logprob is not None
        if want_top:
            result.input_top_logprobs_val, result.input_top_logprobs_idx = [None], [None]
        if want_ids:
            result.input_token_ids_logprobs_val, result.input_token_ids_logprobs_idx = [None], [None]
        temp = req.logprob_temperature or 1.0
        # Position j predicts token j+1: positions start .. n-2 give the log-probs of tokens start+1 .. n-1.
        for lo in range(start, n - 1, _LOGPROB_CHUNK):
            hi = min(lo + _LOGPROB_CHUNK, n - 1)
            logp = torch.log_softmax(self.lm_head(hidden[lo:hi]).float() / temp, dim=-1)  # [C, V]
            nxt = torch.tensor(ids[lo + 1 : hi + 1], dtype=torch.long, device=logp.device)
            result.input_token_logprobs_val += logp.gather(1, nxt[:, None])[:, 0].tolist()
            if want_top:
                vals, tids = topk_rows(logp, req.top_logprobs_num)
                result.input_top_logprobs_val += vals.tolist()
                result.input_top_logprobs_idx += tids.tolist()
            if want_ids:
                req_ids = torch.tensor(req.token_ids_logprob, dtype=torch.long, device=logp.device)
                result.input_token_ids_logprobs_val += logp.index_select(1, req_ids).tolist()
                result.input_token_ids_logprobs_idx += [list(req.token_ids_logprob)] * (hi - lo)
