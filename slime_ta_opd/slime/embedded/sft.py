"""Supervised fine-tuning of the embedded models (``slime.embedded.assets``), in one process or two.

:func:`sft_train` runs a :class:`ModelRecipe`: AdamW, a linear warm-up then cosine decay (:func:`lr_at`),
token-mean NLL on the response tokens, an optional stop at a dev accuracy. With ``grad_shards = 2`` a second
process can join a running :func:`sft_train` at any step boundary and share its work (data parallel):

1. the helper's process hosts a :class:`JoinPoint` (a TCP store on 127.0.0.1) and hands its address to the
   process that trains (:func:`sft_train` ``join=JoinListener(address)``);
2. the helper calls :func:`join_sft` when it has a core free; the training process sees the request before
   its next step and sends its weights, optimizer state, data-order RNG and step;
3. from that step on each process computes one of the two slices of every batch and the gradients are
   summed over a gloo group (``a + b`` in float32, as the one process sums its two slices), so the weights
   are bit-identical to a run without a helper, whenever it joined; only the training process evaluates,
   and a dev-accuracy stop reaches the helper as a broadcast flag.

The asset builder uses this to put the core that trained the (smaller) student to work on the teacher once
the student is done.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_JOIN, _STATE, _DONE = "sft/join", "sft/state", "sft/done"  # keys of the join protocol in the TCP store
_GROUP_PREFIX = "sft/group/"
_TIMEOUT = timedelta(minutes=10)  # a peer that stops answering (killed, hung) fails the step after this


@dataclass(frozen=True)
class ModelRecipe:
    """How one model is trained by SFT: AdamW, linear warm-up, then cosine decay.

    The LR schedule spans ``schedule_steps`` (default ``steps``) and training stops after
    ``steps`` of them. ``steps < schedule_steps`` trains a prefix of a longer schedule: the model
    stops mid-learning, at a still-high LR, instead of being annealed onto a plateau (this is how
    the demo's cold student gets past the "format right, digits wrong" plateau without learning
    the task fully).

    ``stop_at_dev_accuracy`` stops training earlier, at the first check (every ``dev_check_every``
    steps from ``dev_check_from`` on) where greedy accuracy on the recipe's dev prompts (disjoint
    from the SFT pool and the eval prompts) reaches it; ``steps`` is then the most steps taken.
    Mid-schedule the accuracy climbs steeply (0.3 to 1 point per step) from a step that varies with
    the seed and data by 200 steps or more, so stopping at a target accuracy, not a fixed step, is
    what lands a student reliably in a band.

    ``grad_shards`` splits each step's batch into that many equal slices whose gradients (each normalised by
    the whole batch's token count) are summed: the same step, computed in one process slice after slice or,
    with 2 shards, by two processes at once (:func:`join_sft`), with bit-identical results either way.
    """

    size: str  # a key of slime.embedded.models.SIZES
    steps: int  # optimizer steps actually taken
    lr: float  # peak LR
    batch_size: int = 64
    warmup_frac: float = 0.05  # of schedule_steps
    final_lr_frac: float = 0.1  # cosine decay to lr * final_lr_frac at the end of the schedule
    schedule_steps: int | None = None  # length of the LR schedule; None = steps
    stop_at_dev_accuracy: float | None = None  # None: always train `steps` steps
    dev_check_every: int = 10
    dev_check_from: int = 0
    grad_shards: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"ModelRecipe.steps must be >= 1, got {self.steps}")
        if self.schedule_steps is not None and self.schedule_steps < self.steps:
            raise ValueError(
                f"ModelRecipe.schedule_steps ({self.schedule_steps}) must be >= steps ({self.steps}): "
                "training runs a prefix of the schedule, never past its end"
            )
        if not self.lr > 0:
            raise ValueError(f"ModelRecipe.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"ModelRecipe.batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"ModelRecipe.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"ModelRecipe.final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        if self.stop_at_dev_accuracy is not None and not 0 < self.stop_at_dev_accuracy <= 1:
            raise ValueError(f"ModelRecipe.stop_at_dev_accuracy must be in (0, 1], got {self.stop_at_dev_accuracy}")
        if self.grad_shards < 1 or self.batch_size % self.grad_shards:
            raise ValueError(
                f"ModelRecipe.grad_shards must be >= 1 and divide batch_size {self.batch_size}, got {self.grad_shards}"
            )
        if self.dev_check_every < 1 or self.dev_check_from < 0:
            raise ValueError(
                f"ModelRecipe needs dev_check_every >= 1 and dev_check_from >= 0, "
                f"got {self.dev_check_every} and {self.dev_check_from}"
            )

    @property
    def schedule_len(self) -> int:
        return self.steps if self.schedule_steps is None else self.schedule_steps

    @property
    def warmup_steps(self) -> int:
        return max(1, int(self.warmup_frac * self.schedule_len))

    def sft_summary(self) -> dict[str, Any]:
        """The SFT recipe as recorded in the manifest (with the derived warm-up steps)."""
        return {
            "max_steps": self.steps,
            "schedule_steps": self.schedule_len,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "warmup_steps": self.warmup_steps,
            "warmup": "linear",
            "decay": f"cosine to {self.final_lr_frac:g} x lr at schedule_steps",
            "final_lr_frac": self.final_lr_frac,
            "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0), grad clip 1.0",
            "stop_at_dev_accuracy": self.stop_at_dev_accuracy,
            "dev_check_every": self.dev_check_every,
            "dev_check_from": self.dev_check_from,
            "grad_shards": self.grad_shards,
        }


def lr_at(step: int, r: ModelRecipe) -> float:
    """LR of 0-based ``step`` on ``r``'s schedule, which spans ``r.schedule_len`` steps (not ``r.steps``)."""
    total, warmup = r.schedule_len, r.warmup_steps
    if step < warmup:
        return r.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return r.lr * (r.final_lr_frac + (1 - r.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- join protocol


class JoinPoint:
    """Where a helper asks to join one SFT run: a TCP store on 127.0.0.1 with a free port, hosted by the
    helper's process (create it before starting the training process; pass it ``address``)."""

    def __init__(self) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=_TIMEOUT, wait_for_workers=False)
        self.address = ("127.0.0.1", int(self.store.port))


class JoinListener:
    """The training process's end of a :class:`JoinPoint`: polled before every step until a helper joins.
    ``joined_at``: the step the helper joined at (None: trained alone)."""

    def __init__(self, address: tuple[str, int]) -> None:
        host, port = address
        self.store = dist.TCPStore(host, int(port), None, False, timeout=_TIMEOUT)
        self.joined_at: int | None = None

    def requested(self) -> bool:
        return self.joined_at is None and self.store.check([_JOIN])

    def hand_over(self, step: int, model: Any, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
        """Send the state the helper starts from, then form the two-process group."""
        buf = io.BytesIO()
        torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, buf)
        self.store.set(_STATE, buf.getvalue())
        _init_group(self.store, rank=0)
        self.joined_at = step

    def finish(self) -> None:
        """Training ended (or failed): release a helper still waiting, or leave the group."""
        if self.joined_at is None:
            self.store.set(_DONE, "1")
        elif dist.is_initialized():
            dist.destroy_process_group()


def _init_group(store: Any, rank: int) -> None:
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(_GROUP_PREFIX, store), rank=rank, world_size=2, timeout=_TIMEOUT
    )


def join_sft(
    point: JoinPoint,
    r: ModelRecipe,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    poll_seconds: float = 0.02,
) -> int | None:
    """Join the :func:`sft_train` listening at ``point`` as its second process and train with it to its end.

    Returns the step joined at, or None when it finished first (or this process already belongs to a
    process group, or ``r`` does not split its batch in two). ``input_ids`` and ``loss_mask``: the same
    tensors the training process has."""
    from slime.embedded.models import build_tiny_model

    if r.grad_shards != 2 or dist.is_initialized():
        return None
    store = point.store
    store.set(_JOIN, "1")
    while not store.check([_STATE]):
        if store.check([_DONE]):
            return None
        time.sleep(poll_seconds)
    state = torch.load(io.BytesIO(store.get(_STATE)), weights_only=True)
    model = build_tiny_model(r.size, seed=0)  # the structure; every weight comes from the training process
    model.load_state_dict(state["model"])
    opt = _optimizer(model, r)
    opt.load_state_dict(state["opt"])
    gen = torch.Generator()
    gen.set_state(state["gen"])
    model.train()
    _init_group(store, rank=1)
    try:
        _loop(model, opt, gen, input_ids, loss_mask, r, state["step"], rank=1, world=2)
    finally:
        dist.destroy_process_group()
    return int(state["step"])


# --------------------------------------------------------------------------- training


def _optimizer(model: Any, r: ModelRecipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.98), weight_decay=0.0)


def _slice_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one slice's response tokens over the whole batch's token count ``total``."""
    width = int(mask.any(0).nonzero().max()) + 1  # drop all-padding columns
    ids, mask = ids[:, :width], mask[:, :width]
    # right padding + causal attention: real tokens never see the pads, whose loss is masked
    logits = model(input_ids=ids).logits  # [B, L, V]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]: token t+1 predicted at t
    return (nll * mask[:, 1:]).sum() / total


def _sum_over_processes(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum every gradient and the loss over the group in one collective; returns the summed loss."""
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    return flat[-1]


def _loop(
    model: Any,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    r: ModelRecipe,
    start: int,
    rank: int,
    world: int,
    dev_accuracy: Callable[[Any, int], float] | None = None,
    listener: JoinListener | None = None,
    bar: Any = None,
) -> list[float]:
    """Steps ``start`` .. the end (or the dev-accuracy stop) of ``r``; rank 0 evaluates, logs and listens."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    for step in range(start, r.steps):
        if listener is not None and world == 1 and listener.requested():
            listener.hand_over(step, model, opt, gen)
            world = 2
            logger.info("a second process joined the SFT at step %d", step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        idx = torch.randint(0, input_ids.shape[0], (r.batch_size,), generator=gen)
        total = loss_mask[idx, 1:].sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss = None
        for j, part in enumerate(idx.chunk(r.grad_shards)):
            if j % world == rank:
                part_loss = _slice_loss(model, input_ids[part], loss_mask[part], total)
                part_loss.backward()
                loss = part_loss.detach() if loss is None else loss + part_loss.detach()
        if world > 1:
            loss = _sum_over_processes(params, loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == r.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", procs=world)
        n = step + 1
        if (
            r.stop_at_dev_accuracy is not None
            and n < r.steps
            and n >= r.dev_check_from
            and (n - r.dev_check_from) % r.dev_check_every == 0
        ):
            stop = torch.zeros(1, dtype=torch.int32)
            if rank == 0:
                acc = dev_accuracy(model, n)
                stop[0] = int(acc >= r.stop_at_dev_accuracy)
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", dev=f"{acc:.1%}", procs=world)
            if world > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
    return losses


def sft_train(
    model: Any,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    r: ModelRecipe,
    seed: int,
    desc: str = "sft",
    dev_accuracy: Callable[[Any, int], float] | None = None,
    join: JoinListener | None = None,
) -> list[float]:
    """Supervised fine-tuning on response tokens (token-mean NLL); returns the loss per step taken.

    With ``r.stop_at_dev_accuracy`` set, ``dev_accuracy(model, steps_taken)`` (required then; it must leave the
    model's train/eval mode and the global RNG as it found them) is called after every
    ``r.dev_check_every``-th step from ``r.dev_check_from`` on, and training stops once it reaches
    the target; ``len(result)`` is the number of steps taken. ``join`` (with ``r.grad_shards == 2``): a helper
    process may join at a step boundary (module doc); the result is the same.
    """
    from tqdm import tqdm

    if r.stop_at_dev_accuracy is not None and dev_accuracy is None:
        raise ValueError(f"{desc}: the recipe stops at a dev accuracy, but no dev_accuracy function was given")
    if join is not None and r.grad_shards != 2:
        raise ValueError(f"{desc}: a helper process can join only a recipe with grad_shards=2, got {r.grad_shards}")
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, r)
    model.train()
    bar = tqdm(total=r.steps, desc=desc, unit="step", dynamic_ncols=True)
    try:
        losses = _loop(
            model, opt, gen, input_ids, loss_mask, r, 0, rank=0, world=1,
            dev_accuracy=dev_accuracy, listener=join, bar=bar,
        )  # fmt: skip
    finally:
        bar.close()
        if join is not None:
            join.finish()
    model.eval()
    return losses
