"""Score θ0, θτ... and the teacher on the same frozen contexts with full-vocabulary statistics (docs/method.md §6.2).

Usage:
    eval_fixed_context_bank --contexts contexts.jsonl --teacher TEACHER_HF \
        --student theta0=STUDENT_HF --student teachability=RUN/hf_final [--student NAME=PATH ...] \
        --out-dir OUT [--k 16] [--support-ks 8,16,32] [--contexts-per-chunk 8] [--chunk-tokens 1024] \
        [--format parquet|csv] [--device cpu] [--max-chunks N]
    eval_fixed_context_bank --contexts contexts.jsonl --teacher TEACHER_HF \
        --baseline-metrics THETA0/token_stats.parquet --student teachability=RUN/hf_final --out-dir OUT

Per response token: ``entropy_teacher`` and, for every student NAME, ``NAME.entropy_student``,
``NAME.kl_f`` = KL(p_T‖p_S), ``NAME.kl_r``, ``NAME.bc_full``, and per K the support statistics
(``NAME.cmass_exact_k16``, ``overlap``, ``jaccard``, shared teacher / student mass) and the union
statistics at K computed by ``ta_opd.stats`` (``NAME.kl_f_union_k16`` = D, ``entropy_norm`` = H,
``bc``, lower-bound ``cmass``). The reference student (first ``--student``, or ``--reference``) also
gets its top-K lists (``topk.*`` columns) so that the analysis can recompute every selector's score
with the training code. Models run on hidden states; the LM head is applied ``--chunk-tokens`` rows
at a time, so at most that many rows of [tokens × vocab] logits exist per model.

Resumable: contexts are processed in chunks of ``--contexts-per-chunk``; each chunk is written
atomically to ``OUT/chunks/`` and recorded in ``OUT/manifest.json``; a re-run with the same
arguments skips finished chunks. When all chunks exist they are merged into
``OUT/token_stats.{parquet,csv}``.

``--baseline-metrics`` names the ``token_stats`` of an earlier run on the same contexts whose first student is θ0
(e.g. one with ``--student theta0=STUDENT_HF`` only): θ0's columns, its top-K lists and the teacher's columns are
taken from it (every context, position and token id must match, else it is refused), and only the ``--student``
models given here are scored. ``--student-device`` / ``--teacher-device`` put the two sides on different devices
(default ``--device``). The original release's flag names are accepted: ``--context-bank`` (``--contexts``),
``--output-dir`` (``--out-dir``), ``--topk`` (``--k``). ``--allow-tokenizer-mismatch`` accepts a teacher whose
tokenizer differs from the student's only in added/special tokens (every shared id must decode to the same
string): the scored vocabulary is then the ids both share.

The manifest is keyed by the arguments *and* by a sha256 of every model's weight files
(``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth`` and ``config.json`` of each local checkpoint
directory; the digest of a file is reused from the manifest while its inode, size, mtime and ctime are
unchanged, so a resume does not re-read unchanged weights). When the weights at a path changed
since the chunks were written (a retrained θτ saved to the same directory), the run refuses to mix
old and new results and names the model; ``--overwrite`` discards the old chunks and starts fresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ta_opd.diagnostics.io import atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)
TOPK_COLUMNS = (
    "student_topk_ids",
    "student_topk_logp",
    "teacher_topk_ids",
    "teacher_topk_logp",
    "teacher_logp_on_student_topk",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_fixed_context_bank", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--contexts", "--context-bank", required=True, help="Context bank JSONL (export_bank).")
    p.add_argument("--teacher", required=True, help="Teacher HF checkpoint.")
    p.add_argument(
        "--student",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="A student checkpoint (repeat: θ0 first, then each θτ). NAME labels its columns.",
    )
    p.add_argument("--reference", default=None, help="Student NAME that is θ0 (default: the first --student).")
    p.add_argument("--baseline-metrics", default=None, help="token_stats of θ0 on the same contexts (not re-scored).")
    p.add_argument("--out-dir", "--output-dir", required=True)
    p.add_argument("--k", "--topk", type=int, default=16, help="Primary top-K (docs/method.md §2; default 16).")
    p.add_argument("--support-ks", default="8,16,32", help="K values for support statistics (comma list).")
    p.add_argument("--contexts-per-chunk", type=int, default=8, help="Contexts per resumable chunk / forward batch.")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="Rows of logits materialised at a time.")
    p.add_argument("--format", default="parquet", choices=["parquet", "csv"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--student-device", default=None, help="Device of the students (default --device).")
    p.add_argument("--teacher-device", default=None, help="Device of the teacher (default --device).")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="Accept tokenizers that differ only in added/special tokens (shared ids scored).")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--vocab-mode",
        default="auto",
        choices=["auto", "tokenizer"],
        help="auto: use the full logit width when all models agree, else truncate to the shared tokenizer "
        "(identical tokenizers required); tokenizer: always truncate to the tokenizer's length.",
    )
    p.add_argument("--max-chunks", type=int, default=None, help="Stop after this many new chunks (resume later).")
    p.add_argument("--overwrite", action="store_true", help="Discard chunks of a run with other arguments.")
    return p


def parse_students(specs: list[str]) -> dict[str, str]:
    students: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--student expects NAME=PATH, got {spec!r}")
        if "." in name or name in students or name == "topk":
            raise ValueError(f"--student name {name!r} is repeated, reserved or contains '.'")
        students[name] = path
    return students


def _file_digest(path: str, full: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_NAMES = ("config.json",)


def weight_files(path: str) -> list[Path]:
    """The files of a local checkpoint directory (or file) that decide its outputs; [] for a hub id."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(
        f for f in root.rglob("*") if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in WEIGHT_NAMES)
    )


def weights_digest(path: str, cache: dict[str, Any]) -> str | None:
    """sha256 over (relative name, content sha256) of ``weight_files(path)``; None when there are none.

    ``cache`` maps an absolute file path to its stat key and content digest (kept in the manifest): a file
    whose device, inode, size, mtime and ctime are unchanged is not read again. Rewriting a file in place
    changes its ctime and replacing it changes its inode, so either is hashed anew.
    """
    files = weight_files(path)
    if not files:
        return None
    root = Path(path)
    outer = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = cache.get(str(f.resolve()))
        if not (isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str)):
            entry = {"stat": key, "sha256": _file_digest(str(f), full=True)}
        cache[str(f.resolve())] = entry
        rel = f.name if f == root else str(f.relative_to(root))
        outer.update(f"{rel}\0{entry['sha256']}\n".encode())
    return outer.hexdigest()


def _load_model(path: str, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    return model


def _vocab_width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def resolve_vocab(paths: list[str], widths: list[int], mode: str, allow_mismatch: bool = False) -> int:
    """The shared logit width: all equal → that width; else identical tokenizers → tokenizer length.

    ``allow_mismatch``: tokenizers that differ only in added/special tokens (every id both have decodes to the same
    string) → the ids ``0 .. n-1`` that every tokenizer has with the same string (n = that common prefix)."""
    if mode == "auto" and len(set(widths)) == 1 and not allow_mismatch:
        return widths[0]
    from transformers import AutoTokenizer

    try:
        toks = [AutoTokenizer.from_pretrained(p) for p in paths]
    except Exception as exc:  # noqa: BLE001 - any loading failure means we cannot prove the vocabularies match
        raise ValueError(f"logit widths differ ({dict(zip(paths, widths, strict=True))}) and a tokenizer failed to "
                         f"load ({exc}); cannot check that the vocabularies are the same") from exc  # fmt: skip
    vocabs = [t.get_vocab() for t in toks]
    if allow_mismatch and any(v != vocabs[0] for v in vocabs[1:]):
        from ta_opd.diagnostics.vocab import added_tokens, shared_vocabulary

        added = set().union(*(added_tokens(t) for t in toks))
        pairs = zip(vocabs[1:], paths[1:], strict=True)
        shared = min(shared_vocabulary(vocabs[0], v, added, (paths[0], path)) for v, path in pairs)
        if shared > min(widths):
            raise ValueError(f"the shared vocabulary has {shared} ids but a model has only {min(widths)} logits")
        logger.warning("tokenizers differ in added/special tokens: scoring the %d ids they share", shared)
        return shared
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise ValueError(
            f"teacher and student tokenizers differ (logit widths {widths}); full-vocabulary KL needs one vocabulary"
            " (--allow-tokenizer-mismatch accepts tokenizers that differ only in added/special tokens)"
        )
    shared = len(toks[0])
    if shared > min(widths):
        raise ValueError(f"tokenizer has {shared} tokens but a model has only {min(widths)} logits")
    return shared


def _response_hidden(model: Any, contexts: list[dict[str, Any]], device: str) -> Any:
    """Final hidden states that predict each response token, concatenated over contexts: [n_tok, d]."""
    import torch

    seqs = [c["prompt_token_ids"] + c["response_token_ids"] for c in contexts]
    width = max(len(s) for s in seqs)
    pad = 0
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    with torch.no_grad():
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state  # [B, L, d]
    rows = []
    for b, c in enumerate(contexts):
        start = len(c["prompt_token_ids"]) - 1  # the hidden state at p-1 predicts response token 0
        rows.append(hidden[b, start : start + len(c["response_token_ids"])])
    return torch.cat(rows)


def eval_chunk(
    contexts: list[dict[str, Any]],
    teacher: Any,
    students: dict[str, Any],
    reference: str,
    vocab: int,
    ks: list[int],
    k: int,
    chunk_tokens: int,
    device: str,
    teacher_device: str | None = None,
) -> dict[str, Any]:
    """All per-token columns of one chunk of contexts (numpy arrays / lists); students on ``device``, the teacher
    on ``teacher_device`` (default the same; its logits are moved to ``device`` chunk by chunk)."""
    teacher_device = teacher_device or device
    import torch

    from ta_opd.diagnostics.fullvocab import TEACHER_STATS, chunked_fullvocab_token_stats

    lengths = [len(c["response_token_ids"]) for c in contexts]
    sampled = torch.tensor([t for c in contexts for t in c["response_token_ids"]], dtype=torch.long, device=device)
    if sampled.numel() and int(sampled.max()) >= vocab:
        raise ValueError(f"a response token id {int(sampled.max())} is outside the shared vocabulary of {vocab}")
    position = torch.cat([torch.arange(n) for n in lengths]).to(device)
    resp_len = torch.cat([torch.full((n,), n) for n in lengths]).to(device)
    sample_index = torch.cat([torch.full((n,), j) for j, n in enumerate(lengths)]).to(device)
    cols: dict[str, Any] = {
        "context_id": [c["context_id"] for c, n in zip(contexts, lengths, strict=True) for _ in range(n)],
        "prompt_id": [
            str(c.get("prompt_id", c["context_id"])) for c, n in zip(contexts, lengths, strict=True) for _ in range(n)
        ],  # fmt: skip
        "position": position.cpu().numpy(),
        "response_length": resp_len.cpu().numpy(),
        "token_id": sampled.cpu().numpy(),
    }
    t_hidden = _response_hidden(teacher, contexts, teacher_device)
    t_head = teacher.get_output_embeddings()
    keep = max([k, *ks])
    union_ks = sorted({k, *ks})
    for name, model in students.items():
        s_hidden = _response_hidden(model, contexts, device)
        s_head = model.get_output_embeddings()
        with torch.no_grad():
            stats = chunked_fullvocab_token_stats(
                lambda a, b, h=s_hidden, head=s_head: head(h[a:b])[:, :vocab],
                lambda a, b: t_head(t_hidden[a:b])[:, :vocab].to(device),
                sampled,
                chunk_tokens,
                ks=ks,
                union_ks=union_ks,
                keep_topk=keep if name == reference else 0,
                position=position,
                response_length=resp_len,
                sample_index=sample_index,
            )
        for stat, value in stats.items():
            value = value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
            if stat in TOPK_COLUMNS:
                cols[f"topk.{stat}"] = [json.dumps(row.tolist()) for row in value]
            elif stat in TEACHER_STATS:
                cols[stat] = value
            else:
                cols[f"{name}.{stat}"] = value
    return cols


def _labelled_models(teacher: Any, students: dict[str, Any]) -> dict[str, Any]:
    """``{"teacher": path, "student NAME": path, ...}``: one key per model (a student may be named teacher)."""
    return {"teacher": teacher, **{f"student {name}": path for name, path in students.items()}}


def _mismatch_message(manifest_path: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why the chunks under ``manifest_path`` cannot be resumed: changed weights first, then other arguments."""
    old_w = old.get("weights_sha256") if isinstance(old.get("weights_sha256"), dict) else None
    new_w = new["weights_sha256"]
    path_of = _labelled_models(new["teacher"], new["students"])
    how = "use another --out-dir, or --overwrite to discard the old chunks and start fresh"
    if old_w is None:
        return (
            f"{manifest_path} records no weight hashes (written by an older version or other arguments), so its "
            f"chunks cannot be shown to come from the current weights; refusing to mix results: {how}"
        )
    old_students = old.get("students") if isinstance(old.get("students"), dict) else {}
    old_paths = _labelled_models(old.get("teacher"), old_students)
    changed = [n for n in new_w if old_paths.get(n) == path_of[n] and old_w.get(n) != new_w[n]]
    if changed:
        detail = ", ".join(f"{n} ({path_of[n]}: {str(old_w[n])[:12]} -> {str(new_w[n])[:12]})" for n in changed)
        return (
            f"the weights of {detail} changed since {manifest_path} was written; its finished chunks hold "
            f"results of the old weights, so resuming would mix old and new results: {how}"
        )
    diff = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    return f"{manifest_path} was written with other arguments ({', '.join(diff)} differ); {how}"


def read_baseline(path: str, students: dict[str, str], reference: str | None) -> tuple[Any, str]:
    """The ``--baseline-metrics`` table and its θ0 name (its first student); a name clash is refused."""
    from ta_opd.diagnostics.cli.common import student_prefixes
    from ta_opd.diagnostics.io import read_table

    if not Path(path).is_file():
        raise SystemExit(f"--baseline-metrics {path}: no such file")
    base = read_table(path)
    names = student_prefixes(list(base.columns))
    if not names:
        raise SystemExit(f"--baseline-metrics {path}: no student columns (NAME.kl_f); expected a token_stats table")
    ref = reference or names[0]
    if ref not in names:
        raise SystemExit(f"--reference {ref!r} is not a student of --baseline-metrics {path} ({names})")
    if ref in students:
        raise SystemExit(f"--student {ref}=... repeats θ0 of --baseline-metrics {path}; give only the θτ students")
    missing = [c for c in ("context_id", "position", "token_id") if c not in base.columns]
    if missing:
        raise SystemExit(f"--baseline-metrics {path}: lacks column(s) {missing}")
    return base, ref


def attach_baseline(frame: Any, base: Any, reference: str, path: str) -> Any:
    """``frame`` (the θτ columns) with θ0's columns and top-K lists from ``base``; θ0's columns first.

    Refused when the tokens differ (another context bank) or the teacher's columns differ (another teacher)."""
    import numpy as np

    key = ["context_id", "position"]
    a = frame.sort_values(key, kind="stable").reset_index(drop=True)
    b = base.sort_values(key, kind="stable").reset_index(drop=True)
    same = len(a) == len(b) and all(np.array_equal(np.asarray(a[c]), np.asarray(b[c])) for c in [*key, "token_id"])
    if not same:
        raise SystemExit(
            f"--baseline-metrics {path} was computed on other contexts ({len(b)} tokens vs {len(a)} here, or other "
            "token ids): use the baseline of this context bank"
        )
    for col in ("entropy_teacher", "teacher_logp_sampled"):
        if col in a.columns and col in b.columns and not np.allclose(a[col], b[col], rtol=1e-3, atol=1e-4):
            raise SystemExit(f"--baseline-metrics {path}: its teacher column {col!r} differs from this teacher's")
    mine = [c for c in b.columns if c.startswith(f"{reference}.") or c.startswith("topk.")]
    shared = [c for c in a.columns if "." not in c]
    rest = [c for c in a.columns if "." in c]
    return a[shared].join(b[mine])[shared + mine].join(a[rest])


def main(argv: list[str] | None = None) -> int:
    import pandas as pd
    from tqdm import tqdm

    from ta_opd.diagnostics.io import read_table, write_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    students = parse_students(args.student)
    student_device = args.student_device or args.device
    teacher_device = args.teacher_device or args.device
    baseline = None
    if args.baseline_metrics:
        baseline, reference = read_baseline(args.baseline_metrics, students, args.reference)
    else:
        reference = args.reference or next(iter(students))
        if reference not in students:
            raise SystemExit(f"--reference {reference!r} is not one of the --student names {list(students)}")
    ks = sorted({int(x) for x in str(args.support_ks).split(",") if x.strip()} | {args.k})
    if min(ks) < 1 or args.contexts_per_chunk < 1 or args.chunk_tokens < 1:
        raise SystemExit("--k/--support-ks, --contexts-per-chunk and --chunk-tokens must be >= 1")
    contexts = read_jsonl(args.contexts)
    for i, c in enumerate(contexts):
        if not c.get("prompt_token_ids") or not c.get("response_token_ids"):
            raise SystemExit(f"{args.contexts}: context {i} needs non-empty prompt_token_ids and response_token_ids")
    out = Path(args.out_dir)
    chunk_dir = out / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "contexts": str(Path(args.contexts).resolve()),
        "contexts_sha256": _file_digest(args.contexts),
        "teacher": args.teacher,
        "students": students,
        "reference": reference,
        "k": args.k,
        "ks": ks,
        "contexts_per_chunk": args.contexts_per_chunk,
        "format": args.format,
        "vocab_mode": args.vocab_mode,
    }
    if baseline is not None:
        config["baseline_metrics"] = {"path": str(Path(args.baseline_metrics).resolve()),
                                      "sha256": _file_digest(args.baseline_metrics)}  # fmt: skip
    if args.allow_tokenizer_mismatch:
        config["allow_tokenizer_mismatch"] = True
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SystemExit(f"{manifest_path}: unreadable manifest ({e}); use another --out-dir or remove it") from e
        if not isinstance(manifest, dict):
            raise SystemExit(f"{manifest_path}: expected a JSON object; use another --out-dir or remove it")
    digest_cache = manifest.get("weights_cache") if isinstance(manifest.get("weights_cache"), dict) else {}
    # Keyed by content, not path: a θτ retrained into the same directory must not resume the old θτ's chunks.
    config["weights_sha256"] = {
        label: weights_digest(path, digest_cache) for label, path in _labelled_models(args.teacher, students).items()
    }
    n_chunks = (len(contexts) + args.contexts_per_chunk - 1) // args.contexts_per_chunk
    done: list[int] = []
    if manifest:
        old_config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        if old_config != config:
            if not args.overwrite:
                raise SystemExit(_mismatch_message(manifest_path, old_config, config))
            logger.info("--overwrite: discarding the chunks of %s", manifest_path)
            for f in [*chunk_dir.glob("chunk_*"), *out.glob("token_stats.*")]:
                f.unlink()
        else:
            done = [i for i in manifest.get("done", []) if (chunk_dir / f"chunk_{i:05d}.{args.format}").exists()]

    def save_manifest(complete: bool) -> None:
        body = {
            "config": config,
            "n_chunks": n_chunks,
            "done": sorted(done),
            "complete": complete,
            "weights_cache": digest_cache,
        }
        atomic_write_text(manifest_path, json.dumps(body, indent=2))

    save_manifest(False)
    todo = [i for i in range(n_chunks) if i not in set(done)]
    if todo:
        teacher = _load_model(args.teacher, teacher_device, args.dtype)
        order = [reference, *(n for n in students if n != reference)] if baseline is None else list(students)
        models = {name: _load_model(students[name], student_device, args.dtype) for name in order}  # θ0 first
        paths = [args.teacher, *students.values()]
        widths = [_vocab_width(teacher), *(_vocab_width(m) for m in models.values())]
        vocab = resolve_vocab(paths, widths, args.vocab_mode, args.allow_tokenizer_mismatch)
        if min(ks) > vocab or max(ks) > vocab:
            raise SystemExit(f"K values {ks} exceed the vocabulary size {vocab}")
        budget = len(todo) if args.max_chunks is None else min(len(todo), max(0, args.max_chunks))
        for i in tqdm(todo[:budget], desc="fixed-context chunks", unit="chunk"):
            part = contexts[i * args.contexts_per_chunk : (i + 1) * args.contexts_per_chunk]
            cols = eval_chunk(part, teacher, models, reference, vocab, ks, args.k, args.chunk_tokens, student_device,
                              teacher_device)  # fmt: skip
            write_table(chunk_dir / f"chunk_{i:05d}.{args.format}", pd.DataFrame(cols))
            done.append(i)
            save_manifest(False)
    if len(done) < n_chunks:
        logger.info("%d/%d chunks done; re-run the same command to resume", len(done), n_chunks)
        return 0
    frame = pd.concat([read_table(chunk_dir / f"chunk_{i:05d}.{args.format}") for i in range(n_chunks)])
    if baseline is not None:
        frame = attach_baseline(frame.reset_index(drop=True), baseline, reference, args.baseline_metrics)
    final = out / f"token_stats.{args.format}"
    write_table(final, frame.reset_index(drop=True))
    save_manifest(True)
    logger.info("wrote %d tokens × %d columns to %s", len(frame), frame.shape[1], final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
