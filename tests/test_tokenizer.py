"""Tokenizer: special ids, digit splitting, lossless round trip, transformers parity."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nanoseek.data.chat import BOS, EOS, PAD
from nanoseek.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

TEXTS = [
    "What is 123 + 456? The answer is 579.",
    "Sort in ascending order: 5, 3, 9 <think>\nsmallest is 3\n</think>\n\n3, 5, 9",
    "안녕하세요, 딥시크 모델입니다. 这是一个测试。 Emoji 😀🚀 and ascii text.",
    "The quick brown fox jumps over the lazy dog while thinking about the answer.",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))


def test_special_ids_fixed(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.tk.id_to_token(i) for i in range(7)] == [
        BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
    assert tok.think_end_id == 6
    # tags are single tokens even glued to text
    assert tok.encode("x<think>y</think>z")[1::2] == [5, 6]


def test_vocab_size_and_bos(tok):
    assert 270 < tok.vocab_size <= 512
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.encode("hi")[0] != tok.bos_id


def test_digits_are_single_tokens(tok):
    # "123" appears 40 times in the corpus, so without digit splitting BPE would merge it
    ids = tok.encode("123456")
    assert len(ids) == 6
    assert [tok.decode([i]) for i in ids] == list("123456")


def test_skip_special_keeps_think_tags(tok):
    ids = tok.encode("<think>\nr\n</think>\n\n42") + [tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nr\n</think>\n\n42"
    assert tok.decode(ids).endswith(EOS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200) | st.sampled_from(["한국어 문장입니다 123", "中文测试，数字４５６", "👩‍👩‍👧 emoji ZWJ", "\x00\t\r\n  "]))
def test_round_trip_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    tok2 = load_tokenizer(tmp_path)
    s = "What is 42 * 7? 한국어 <think>\n</think>"
    assert tok2.encode(s) == tok.encode(s)
    assert tok2.vocab_size == tok.vocab_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def test_vocab_too_small_rejected():
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], vocab_size=100)


MESSAGES = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 is 5", "content": "5"},
    {"role": "user", "content": "And 5 * 4? 한국어로"},
    {"role": "assistant", "reasoning_content": "5 times 4\nis 20", "content": "20"},
]


@pytest.mark.parametrize("messages,gen", [(MESSAGES, False), (MESSAGES[:-1], True), (MESSAGES[:2], True)])
def test_transformers_parity(tok, tmp_path, messages, gen):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours == theirs
    ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert hf.decode(ids) == ours


def test_encode_chat_mask(tok):
    ids, mask = tok.encode_chat(MESSAGES)
    assert len(ids) == len(mask) and ids[-1] == tok.eos_id and mask[-1] == 1
    prompt_ids = tok.apply_chat_template(MESSAGES[:-1], add_generation_prompt=True, tokenize=True)
    assert ids[:len(prompt_ids)] == prompt_ids and sum(mask) == len(ids) - len(prompt_ids)
    assert tok.decode(ids[len(prompt_ids):]) == "5 times 4\nis 20\n</think>\n\n20" + EOS
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError):
        tok.encode_chat(MESSAGES[:-1])


def test_tokenizer_cli(tmp_path, capsys):
    from nanoseek.tokenizer import Options, run
    (tmp_path / "extra.txt").write_text("딥시크 모델은 추론을 합니다.\n\nAnother paragraph of text.")
    tok = run(Options(out=str(tmp_path / "tok"), vocab_size=1024, n_docs=300, text_files=[str(tmp_path / "extra.txt")]))
    assert (tmp_path / "tok" / "tokenizer.json").exists() and load_tokenizer(tmp_path / "tok").vocab_size == tok.vocab_size
    assert "wrote" in capsys.readouterr().out
    ids = tok.encode("What is 123 + 456?")
    assert tok.decode(ids) == "What is 123 + 456?" and len(ids) < 18  # merges learned from the task corpus
