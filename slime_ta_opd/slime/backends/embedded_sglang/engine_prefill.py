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


def _stack_prefix_kv(pres: list, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cached prefixes' per-layer (K, V), zero-padded to ``width`` positions and stacked on the batch."""
    layers = []
    for li in range(len(pres[0].kv)):
        ks, vs = [], []
        for pre in pres:
            k, v = pre.kv[li]
            extra = width - k.shape[2]
            if extra:
                k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])], 2)
                v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])], 2)
            ks.append(k)
            vs.append(v)
        layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
    return layers


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
        scoring = [item for item in batch if self._scores_past_prefix(item[0])]
        if scoring:
            self._score_from_prefix(scoring, start)
            batch = [item for item in batch if not self._scores_past_prefix(item[0])]
            if not batch:
                return
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

        results = [GenResult(output_ids=[], finish_reason={}, prompt_tokens=len(req.input_ids)) for req, _ in batch]
        self._input_logprobs(
            [(req, prompts[tuple(req.input_ids)].hidden, 0, res) for (req, _), res in zip(batch, results, strict=True)]
        )  # type: ignore[union-attr]
        gen_rows: list[_Row] = []
        gen_keys: list[tuple[int, ...]] = []
        reused: set[tuple[int, ...]] = set()
        for (req, fut), result in zip(batch, results, strict=True):
            key = tuple(req.input_ids)
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
        layers = _stack_prefix_kv(pres, width)
        lens = torch.tensor([len(r.req.input_ids) for r in rows], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < lens[:, None]).long()
        last = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        return _Running(rows, DynamicCache(ddp_cache_data=layers), mask, lens, last, self.device)

    def _scores_past_prefix(self, req: GenRequest) -> bool:
        """A scoring request (no new tokens) whose log-probs start past its first token: its prefix
        ``input_ids[:logprob_start_len]`` (the prompt, for a teacher scoring a sample) is prefilled once and kept in
        the prompt cache, so the ``n`` samples of one prompt pay for one prefill of it."""
        scoring = self.scoring_prefix_reuse and req.max_new_tokens == 0 and req.return_logprob
        return scoring and 0 < req.logprob_start_len < len(req.input_ids)

    def _score_from_prefix(self, items: list[tuple[GenRequest, Future]], start: float) -> None:
        """Answer scoring requests from their prefixes' KV (prompt cache, or one batched prefill of the distinct
        missing prefixes) plus one batched forward of the remaining tokens."""
        keys = [tuple(req.input_ids[: req.logprob_start_len]) for req, _ in items]
        prefixes: dict[tuple[int, ...], _Prefilled | None] = {}
        for key in keys:
            if key not in prefixes:
                prefixes[key] = self._prompt_cache.get(key)
                if prefixes[key] is not None:
                    self._prompt_cache.move_to_end(key)
        misses = [k for k, v in prefixes.items() if v is None]
        if misses:
            for key, pre in zip(misses, self._forward_prompts(misses, need_cache=True), strict=True):
                prefixes[key] = pre
                self._remember(key, pre)
        pres = [prefixes[k] for k in keys]
        hidden = self._forward_suffixes([req for req, _ in items], pres)  # type: ignore[arg-type]
        results = [GenResult(output_ids=[], finish_reason={}, prompt_tokens=len(req.input_ids)) for req, _ in items]
        self._input_logprobs(
            [(req, h, req.logprob_start_len, res) for (req, _), h, res in zip(items, hidden, results, strict=True)]
        )
        fresh, done = set(misses), time.time()
        for (_, fut), key, result in zip(items, keys, results, strict=True):
            # a prefix prefilled earlier (prompt cache) or by an earlier request of this batch counts as cached
            result.cached_tokens = len(key) if key not in fresh else 0
            fresh.discard(key)
            result.finish_reason = {"type": "length", "length": 0}
            result.e2e_latency = done - start
            fut.set_result(result)

    def _forward_suffixes(self, reqs: list[GenRequest], pres: list[_Prefilled]) -> list[torch.Tensor]:
        """Hidden states ``[n - s, H]`` of each request's tokens ``input_ids[s:]`` (s = its ``logprob_start_len``),
        from one right-padded forward over the batch that reads its prefix's KV (``pres[b]``) as the past."""
        from transformers import DynamicCache

        dev = self.device
        plens = torch.tensor([req.logprob_start_len for req in reqs], device=dev)
        slens = torch.tensor([len(req.input_ids) - req.logprob_start_len for req in reqs], device=dev)
        width, span = int(plens.max()), int(slens.max())
        layers = _stack_prefix_kv(pres, width)
        ids = torch.zeros((len(reqs), span), dtype=torch.long, device=dev)
        for b, req in enumerate(reqs):
            tail = req.input_ids[req.logprob_start_len :]
            ids[b, : len(tail)] = torch.tensor(tail, dtype=torch.long, device=dev)
        cols = torch.arange(max(width, span), device=dev)[None, :]
        # the prefix columns past a row's own prefix are zero padding (masked); the suffix is right-padded (causal)
        mask = torch.cat([(cols[:, :width] < plens[:, None]), (cols[:, :span] < slens[:, None])], 1).long()
        pos = plens[:, None] + cols[:, :span]
        out = self.decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=DynamicCache(ddp_cache_data=layers),
            use_cache=True,
        )
        hidden = out.last_hidden_state  # [B, S, H]
        return [hidden[b, : int(slens[b])] for b in range(len(reqs))]

    def _input_logprobs(self, items: list[tuple[GenRequest, torch.Tensor, int, GenResult]]) -> None:
        """Fill the SGLang-layout input log-probs of requests, batched: ``(req, hidden, first, result)`` where
        ``hidden[i]`` is the hidden state at prompt position ``first + i``. One lm-head, log-softmax and top-k per
        chunk of ``_LOGPROB_CHUNK`` positions across all requests, one ``tolist`` per output."""
        jobs = []  # (req, result, hidden rows, next ids)
        for req, hidden, first, result in items:
            n = len(req.input_ids)
            start = n if (not req.return_logprob or req.logprob_start_len < 0) else req.logprob_start_len
            if start >= n:
                continue
            ids = req.input_ids
            result.input_token_logprobs_idx = list(ids[start:])
            result.input_token_logprobs_val = [None]
            if req.top_logprobs_num > 0:
                result.input_top_logprobs_val, result.input_top_logprobs_idx = [None], [None]
            if req.token_ids_logprob is not None:
                result.input_token_ids_logprobs_val, result.input_token_ids_logprobs_idx = [None], [None]
            if start < n - 1:  # position j predicts token j+1: positions start .. n-2 score tokens start+1 .. n-1
                jobs.append((req, result, hidden[start - first : n - 1 - first], ids[start + 1 : n]))
        if not jobs:
            return
        dev = self.device
        rows = torch.cat([h for _, _, h, _ in jobs])  # [P, H]
        nxt = torch.tensor([t for *_, nx in jobs for t in nx], dtype=torch.long, device=dev)
        temps = torch.tensor(
            [req.logprob_temperature or 1.0 for req, _, h, _ in jobs for _ in range(h.shape[0])], device=dev
        )
        k_max = max(req.top_logprobs_num for req, *_ in jobs)
        offsets = [0]
        for _, _, h, _ in jobs:
            offsets.append(offsets[-1] + h.shape[0])
        chosen, top_v, top_i = [], [], []
        by_ids = [(j, job) for j, job in enumerate(jobs) if job[0].token_ids_logprob is not None]
        ids_vals: dict[int, list[torch.Tensor]] = {j: [] for j, _ in by_ids}
        for lo in range(0, rows.shape[0], _LOGPROB_CHUNK):
            hi = min(lo + _LOGPROB_CHUNK, rows.shape[0])
            logp = torch.log_softmax(self.lm_head(rows[lo:hi]).float() / temps[lo:hi, None], dim=-1)  # [C, V]
            chosen.append(logp.gather(1, nxt[lo:hi, None])[:, 0])
            if k_max > 0:
                vals, tids = topk_rows(logp, k_max)
                top_v.append(vals)
                top_i.append(tids)
            for j, (req, *_) in by_ids:
                a, b = max(offsets[j], lo), min(offsets[j + 1], hi)
                if a < b:
                    want = torch.tensor(req.token_ids_logprob, dtype=torch.long, device=dev)
                    ids_vals[j].append(logp[a - lo : b - lo].index_select(1, want))
        chosen_l = torch.cat(chosen).tolist()
        top_vl = torch.cat(top_v).tolist() if top_v else []
        top_il = torch.cat(top_i).tolist() if top_i else []
        for j, (req, result, _, _) in enumerate(jobs):
            a, b = offsets[j], offsets[j + 1]
            result.input_token_logprobs_val += chosen_l[a:b]
            k = req.top_logprobs_num
            if k > 0:
                result.input_top_logprobs_val += [v[:k] for v in top_vl[a:b]]
                result.input_top_logprobs_idx += [i[:k] for i in top_il[a:b]]
            if req.token_ids_logprob is not None:
                result.input_token_ids_logprobs_val += torch.cat(ids_vals[j]).tolist()
                result.input_token_ids_logprobs_idx += [list(req.token_ids_logprob)] * (b - a)
