import torch
from transformers import AutoModelForCausalLM

from slime.embedded.models import PADDED_VOCAB
from slime.embedded.tokenizer import load_tokenizer, vocab


def test_tokenizer_round_trip(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = "12+7*3=33\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_id == vocab()["<|im_end|>"]
    assert tok.pad_token_id == vocab()["<|endoftext|>"]


def test_chat_template_renders_specials_as_single_tokens(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    text = tok.decode(ids)
    assert text == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == vocab()["<|im_start|>"]


def test_tiny_checkpoint_loads_offline(tiny_student_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, local_files_only=True)
    out = model(torch.tensor([[1, 5, 6]]))
    assert out.logits.shape == (1, 3, PADDED_VOCAB)
