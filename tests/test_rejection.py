"""Rejection sampling keeps only correct, well-formed, finished answers, deduplicated, shortest first."""
import json

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model.transformer import Transformer
from nanoseek.train.rejection import rejection_sample


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nanoseek.data.corpus import default_corpus
    from nanoseek.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("rej")
    tok = train_tokenizer(default_corpus(300, seed=1), 4096, d / "tok")
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                     vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    Transformer(cfg).save_pretrained(d / "model", tokenizer=tok)
    return d / "model"


def test_keeps_only_correct_well_formed_answers(model_dir, tmp_path):
    from nanoseek.data.tasks import mix
    from nanoseek.tokenizer import load_tokenizer
    tok = load_tokenizer(model_dir)
    samples = mix(["add"], 3, "train", 1, 0)
    answers = {tuple(tok.apply_chat_template([{"role": "user", "content": s.prompt}], True, tokenize=True)): s
               for s in samples}

    def canned(prompts, k, seed):
        out = []
        for p in prompts:
            s = answers[tuple(p)]
            a, b = s.meta["a"], s.meta["b"]
            good_long = f"{a} plus {b}: count up from {a} by {b}, that is {s.answer}\n</think>\n\n{s.answer}"
            good_short = f"{a} + {b} = {s.answer}\n</think>\n\n{s.answer}"
            texts = [
                (good_long, True),
                (good_short, True),
                (good_short.replace(" = ", "  =  "), True),           # same answer up to whitespace
                (f"{a} + {b}\n</think>\n\n{int(s.answer) + 1}", True),  # wrong
                (f"{a} + {b} = {s.answer}", True),                    # never closes the think block
                (f"</think>\n\n{s.answer}", True),                    # empty reasoning
                (f"{a} + {b} = {s.answer}\n</think>\n\n{s.answer}", False),  # cut off (no eos)
                ("정답 " + good_short, True),                          # mixed language reasoning
            ]
            assert len(texts) == k
            out += [tok.encode(t) + ([tok.eos_id] if fin else []) for t, fin in texts]
        return out

    path = rejection_sample(model_dir, sampler=canned, out=str(tmp_path), n_prompts=3, k=8, keep_per_prompt=2,
                            tasks=["add"], difficulty=1)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(records) == 6  # two distinct correct answers per prompt; duplicates and bad ones dropped
    for r in records:
        user, asst = r["messages"]
        s = next(x for x in samples if x.prompt == user["content"])
        assert user["role"] == "user" and asst["role"] == "assistant"
        assert asst["content"] == s.answer and asst["reasoning_content"].strip()
        assert "think>" not in asst["reasoning_content"] + asst["content"]
    # the shortest comes first for each prompt
    assert records[0]["messages"][1]["reasoning_content"].startswith(f"{samples[0].meta['a']} + ")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["kept"] == 6
    assert summary["kept_share_of_samples"] == pytest.approx(6 / 24) and summary["prompts_with_a_kept_answer"] == 1.0


def test_samples_from_a_real_model(model_dir, tmp_path):
    # an untrained model gets nothing right: the file exists, is empty, and the summary says so
    path = rejection_sample(model_dir, out=str(tmp_path), n_prompts=2, k=2, max_new_tokens=8, device="cpu")
    assert path.read_text() == ""
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == 0
