"""JSONL prompt data: errors with line numbers, deterministic shuffles, groups, save/load of the position."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from slime.rollout.data_source import Dataset, RolloutDataSource, RolloutDataSourceWithBuffer


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def make_args(tmp_path, prompt_data, **kw):
    base = dict(
        prompt_data=prompt_data,
        rollout_global_dataset=True,
        hf_checkpoint=None,
        apply_chat_template=False,
        apply_chat_template_kwargs={},
        rollout_max_prompt_len=None,
        rollout_max_response_len=4,
        rollout_max_context_len=None,
        rollout_filter_long_prompts=False,
        input_key="prompt",
        label_key="label",
        metadata_key="metadata",
        tool_key=None,
        rollout_shuffle=False,
        rollout_seed=42,
        n_samples_per_prompt=2,
        save=str(tmp_path / "ckpt"),
        load=str(tmp_path / "ckpt"),
        buffer_filter_path=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"prompt": "a", "label": "1"}', "{not json"], r"data.jsonl:2: malformed JSON"),
        ([{"prompt": "a", "label": "1"}, {"label": "2"}], r"data.jsonl:2: missing prompt key 'prompt'"),
        ([{"prompt": "a"}], r"data.jsonl:1: missing label key 'label'"),
        ([{"prompt": "", "label": "1"}], r"data.jsonl:1: empty prompt"),
        (["[1, 2]"], r"data.jsonl:1: expected a JSON object"),
        ([{"prompt": [{"role": "user", "content": "x"}], "label": "1"}], "pass --apply-chat-template"),
    ],
)
def test_bad_lines_name_file_line_and_key(tmp_path, rows, message):
    with pytest.raises((ValueError, KeyError), match=message):
        Dataset(write(tmp_path / "data.jsonl", rows), prompt_key="prompt", label_key="label")


def test_chat_template_and_prompt_length(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    path = write(tmp_path / "d.jsonl", [{"prompt": "1+2=", "label": "3"}, {"prompt": "9" * 50, "label": "9"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: prompt has \d+ tokens > --rollout-max-prompt-len 30"):
        Dataset(path, tokenizer=tok, max_length=30, prompt_key="prompt", label_key="label", apply_chat_template=True)
    ds = Dataset(
        path, tokenizer=tok, max_length=30, prompt_key="prompt", label_key="label",
        apply_chat_template=True, filter_long_prompts=True,
    )  # fmt: skip
    assert len(ds) == 1 and ds.num_filtered == 1
    assert ds.samples[0].prompt == tok.apply_chat_template(
        [{"role": "user", "content": "1+2="}], tokenize=False, add_generation_prompt=True
    )


def test_groups_epochs_and_deterministic_shuffle(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "label": str(i)} for i in range(5)])
    args = make_args(tmp_path, path, rollout_shuffle=True)
    a, b = RolloutDataSource(args), RolloutDataSource(args)
    ga, gb = a.get_samples(3), b.get_samples(3)
    assert [[s.prompt for s in g] for g in ga] == [[s.prompt for s in g] for g in gb]
    assert all(len(g) == 2 and g[0].prompt == g[1].prompt for g in ga)
    assert [s.index for g in ga for s in g] == list(range(6)) and [g[0].group_index for g in ga] == [0, 1, 2]
    more = a.get_samples(4)  # crosses into epoch 1 (reshuffled)
    assert a.epoch_id == 1 and len(more) == 4
    first_epoch = [g[0].prompt for g in ga] + [g[0].prompt for g in more[:2]]
    assert sorted(first_epoch) == [f"p{i}" for i in range(5)]


def test_save_load_resumes_position(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "label": str(i)} for i in range(5)])
    args = make_args(tmp_path, path, rollout_shuffle=True)
    a = RolloutDataSource(args)
    a.get_samples(4)
    a.save(7)
    expected = [[s.prompt for s in g] for g in a.get_samples(3)]
    b = RolloutDataSource(args)
    b.load()  # latest
    assert b.sample_index == 8 and b.epoch_id == 0
    assert [[s.prompt for s in g] for g in b.get_samples(3)] == expected
    assert (tmp_path / "ckpt" / "rollout" / "global_dataset_state_dict_7.json").exists()


def test_buffer_serves_given_back_groups_first(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "label": str(i)} for i in range(3)])
    ds = RolloutDataSourceWithBuffer(make_args(tmp_path, path))
    groups = ds.get_samples(1)
    ds.add_samples(groups)
    assert ds.get_samples(2)[0] is groups[0]
    with pytest.raises(ValueError, match="groups of n_samples_per_prompt=2"):
        ds.add_samples([groups[0][:1]])
    assert len(ds) == 3
