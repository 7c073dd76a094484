"""The off-policy SFT baseline: the student is trained by SFT on responses *sampled by the teacher*.

Wiring (a generate-function plug-in, as slime swaps behaviour in)::

    --use-opd --opd-type sglang (--opd-teacher-hf-checkpoint DIR | --rm-url http://TEACHER:PORT/generate)
    --custom-generate-function-path slime.rollout.sft_baseline.generate_with_teacher
    --loss-type sft_loss

``--use-opd --opd-type sglang`` gives the teacher server (started from ``--opd-teacher-hf-checkpoint``
by the RolloutManager, which sets ``args.rm_url``, or a running one at ``--rm-url``). For each training
prompt the teacher samples the response with the rollout's sampling parameters (``--rollout-temperature``,
top-p/top-k, ``--rollout-max-response-len``); the sample's response tokens and ``loss_mask`` are the
teacher's answer, so ``sft_loss`` (−log p_S(y_t) over kept tokens) trains the student on it. The OPD reward
(the teacher's prefill of the same tokens) still runs: its log-probs give the logged forward-KL estimate
``train/teacher_fkl_sampled`` (mean of log p_T(y) − log p_S(y) over the teacher's own samples), and its
post-process applies ``--opd-budget-mask`` to the teacher's tokens (``full`` for the plain baseline).
Evaluation (``evaluation=True``) generates with the *student*, so the held-out accuracy is the student's.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from slime.rollout.sglang_rollout import generate
from slime.utils.arguments import SFT_BASELINE_GENERATE as GENERATE_WITH_TEACHER
from slime.utils.types import Sample

__all__ = ["GENERATE_WITH_TEACHER", "generate_with_teacher"]


async def generate_with_teacher(
    args: Namespace, sample: Sample, sampling_params: dict[str, Any], evaluation: bool = False
) -> Sample:
    """Training: the teacher server at ``args.rm_url`` samples the response. Evaluation: the student does."""
    if evaluation:
        return await generate(args, sample, sampling_params)
    if not args.use_opd or args.opd_type != "sglang" or not args.rm_url:
        raise ValueError(
            f"{GENERATE_WITH_TEACHER} samples from the teacher server: it needs --use-opd --opd-type sglang with "
            "--opd-teacher-hf-checkpoint DIR (a teacher server is started) or --rm-url http://HOST:PORT/generate; "
            f"got use_opd={args.use_opd}, opd_type={args.opd_type}, rm_url={args.rm_url}"
        )
    return await generate(args, sample, sampling_params, url=args.rm_url, student=False)
