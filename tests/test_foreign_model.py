"""Your own model: checkpoints transformers wrote, with tokenizers nanoseek never made, through every command.

The models are tiny random Qwen2 / DeepseekV3 checkpoints saved by transformers' own `save_pretrained`,
beside tokenizer directories from tests/tokenizer_layouts.py: Qwen2.5 ChatML (no think tokens, eos
`<|im_end|>`, the generation prompt opens no think block) and DeepSeek-R1 (its markers, `<think>` a plain
added token, the generation prompt opens `<think>`). Each command runs in-process through `nanoseek.cli.main`,
as a user would type it, and must finish, say which prompt template it used and write what it promises.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")

import tokenizer_layouts as layouts  # noqa: E402  (tests/ is on sys.path: it has no __init__.py)
from nanoseek.cli import main  # noqa: E402
from nanoseek.data.chat import ThinkSplitter, parse_completion  # noqa: E402
from nanoseek.errors import UsageError  # noqa: E402
from nanoseek.infer.server import BackgroundServer, Options  # noqa: E402
from nanoseek.tokenizer import load_tokenizer  # noqa: E402


def save_model(d: Path, layout: str, arch: str) -> Path:
    """A tokenizer layout plus a random model of transformers' own class with that vocabulary."""
    layouts.LAYOUTS[layout](d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    else:
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            moe_intermediate_size=32, first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_group=2, topk_group=1,
            num_experts_per_tok=2, n_shared_experts=1, **common))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("foreign") / "qwen", "qwen25_chatml", "qwen2")


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("foreign") / "deepseek", "deepseek_r1", "deepseek_v3")


def run(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def tokenizer_files(d: Path) -> dict[str, str]:
    return {f: (d / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
            if (d / f).exists()}


def test_generate_and_eval_say_their_template(qwen, deepseek, tmp_path, capsys):
    out = run(capsys, "generate", qwen, "--prompt", "What is 2 + 3?", "--max-tokens", "8", "--temperature", "0")
    assert "prompt template r1 (the model's chat template" in out and "<|im_start|>assistant" in out
    assert "does not open <think>" in out and "8 tokens in" in out
    out = run(capsys, "generate", deepseek, "--prompt", "What is 2 + 3?", "--max-tokens", "8", "--template", "r1-zero")
    assert "prompt template r1-zero" in out and "it opens <think>" in out
    out = run(capsys, "eval", deepseek, "--tasks", "add,sort", "--n", "3", "--k", "2", "--max-tokens", "12",
              "--out", tmp_path / "ev")
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report["tasks"]) == {"add", "sort"} and report["overall"]["n"] == 6
    assert "'<｜Assistant｜><think>\\n'" in out  # DeepSeek-R1's generation prompt, printed at the start


def test_terminal_chat_answers_turn_after_turn(qwen, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\nAnd 4 + 4?\n/exit\n"))
    out = run(capsys, "chat", qwen, "--max-tokens", "6", "--temperature", "0")
    assert "does not open <think>" in out and out.count("nanoseek>") == 2  # two replies, then /exit


def test_grpo_then_eval_on_a_qwen2_with_a_chatml_tokenizer(qwen, tmp_path, capsys):
    """A few GRPO steps and an eval of the result: the R1 recipe on a model nanoseek did not make."""
    out = run(capsys, "grpo", qwen, "--tasks", "add", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2",
              "--max-new-tokens", "12", "--eval-n", "4", "--out", tmp_path / "grpo")
    assert "prompt template r1" in out and "step 2/2" in out and "held-out accuracy" in out
    final = tmp_path / "grpo" / "final"
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward" in r for r in rows) and any("eval_accuracy" in r for r in rows)
    assert tokenizer_files(final) == tokenizer_files(qwen)  # the model keeps its own tokenizer, byte for byte
    tok = load_tokenizer(final)
    assert tok.eos_token == "<|im_end|>" and tok.think_end_id is None
    run(capsys, "eval", final, "--tasks", "add", "--n", "4", "--k", "2", "--max-tokens", "12", "--out", tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["overall"]["n"] == 4
    # transformers still loads what nanoseek wrote, with the same logits
    ours = __import__("nanoseek").from_pretrained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                           add_generation_prompt=True))])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4


def test_r1_zero_grpo_sft_rejection_export_on_deepseek(deepseek, tmp_path, capsys):
    out = run(capsys, "grpo", deepseek, "--mode", "r1-zero", "--tasks", "add", "--steps", "1", "--prompts-per-step",
              "2", "--group-size", "2", "--max-new-tokens", "12", "--eval-n", "0", "--out", tmp_path / "zero")
    assert "prompt template r1-zero" in out and (tmp_path / "zero" / "final" / "model.safetensors").exists()
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + 1?"},
        {"role": "assistant", "reasoning_content": f"{a} plus one", "content": str(a + 1)}]}) + "\n" for a in range(12)))
    run(capsys, "sft", deepseek, "--data", data, "--steps", "2", "--batch-size", "4", "--seq-len", "64",
        "--out", tmp_path / "sft")
    assert tokenizer_files(tmp_path / "sft" / "final") == tokenizer_files(deepseek)
    out = run(capsys, "rejection-sample", deepseek, "--tasks", "add", "--n-prompts", "4", "--k", "2",
              "--max-new-tokens", "12", "--out", tmp_path / "rs")
    assert "prompt template r1" in out and (tmp_path / "rs" / "rejection.jsonl").exists()
    out = run(capsys, "export", deepseek, "--out", tmp_path / "export", "--verify")
    assert (tmp_path / "export" / "tokenizer.json").exists()


def test_distillation_across_tokenizers_is_by_traces(deepseek, qwen, tmp_path, capsys):
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + 2?"},
        {"role": "assistant", "reasoning_content": f"{a} and two", "content": str(a + 2)}]}) + "\n" for a in range(16)))
    run(capsys, "distill", "--teacher", deepseek, "--student", qwen, "--data", data, "--method", "sft", "--steps", "2",
        "--batch-size", "4", "--seq-len", "64", "--out", tmp_path / "sft")
    student = next((tmp_path / "sft").glob("*/final"))
    assert tokenizer_files(student) == tokenizer_files(qwen)  # the student's own tokenizer, not the teacher's
    assert main(["distill", "--teacher", str(deepseek), "--student", str(qwen), "--data", str(data),
                 "--method", "logits", "--out", str(tmp_path / "logits")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method sft" in err
    assert not (tmp_path / "logits").exists()  # refused before anything was written
    assert main(["distill", "--teacher", str(deepseek), "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "nodata")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err and not (tmp_path / "nodata").exists()


def test_errors_are_one_line(qwen, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(qwen, bare)
    (bare / "tokenizer.json").unlink()
    for argv, says in ((["eval", str(bare)], "has no tokenizer.json"),
                       (["generate", str(tmp_path / "nowhere")], "does not exist"),
                       (["generate", str(qwen), "--template", "chatml"], "--template must be one of")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"nanoseek {argv[0]}: error:") and says in err, err
    with pytest.raises(UsageError, match="tokenizer.json"):  # --debug: the exception itself, for the traceback
        main(["--debug", "eval", str(bare)])
    base = tmp_path / "base"  # a base model: no chat template, so only the plain R1-Zero prompt can ask
    shutil.copytree(qwen, base)
    (base / "chat_template.jinja").unlink()
    for argv in (["grpo", str(base), "--steps", "1"], ["sft", str(base), "--steps", "1"],
                 ["rejection-sample", str(base)]):
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no default chat template" in err and "r1-zero" in err, err
        assert not (tmp_path / "run").exists()  # refused before the run folder was made


# ------------------------------------------------------------------------------------------ serving

@pytest.fixture(scope="module")
def served(qwen, deepseek, tmp_path_factory):
    """Both foreign models behind one server each, plus a copy of the Qwen2 model whose template refuses
    system messages (as some real templates do)."""
    strict = tmp_path_factory.mktemp("strict") / "qwen"
    shutil.copytree(qwen, strict)
    template = (qwen / "chat_template.jinja").read_text()
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + template)
    servers = {name: BackgroundServer(Options(model=str(d), served_model_name=name, max_batch=4, max_len=256,
                                              request_timeout=60, shutdown_timeout=2))
               for name, d in (("qwen", qwen), ("deepseek", deepseek), ("strict", strict))}
    for s in servers.values():
        s.__enter__()
    yield {name: (s, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60))
           for name, s in servers.items()}
    for s in servers.values():
        s.__exit__(None, None, None)


def test_served_foreign_models_pass_the_openai_client_checks(served):
    for name, (server, client) in served.items():
        if name == "strict":
            continue
        assert [m.id for m in client.models.list().data] == [name]
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
        r = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=16)
        msg, u = r.choices[0].message, r.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0
        text = (msg.model_extra.get("reasoning_content") or "") + (msg.content or "")
        stream = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=16, stream=True,
                                                stream_options={"include_usage": True})
        reasoning, content, usage = "", "", None
        for c in stream:
            usage = c.usage or usage
            for ch in c.choices:
                reasoning += ch.delta.model_extra.get("reasoning_content") or ""
                content += ch.delta.content or ""
        assert (reasoning, content) == (msg.model_extra.get("reasoning_content") or "", msg.content or "")
        assert usage.completion_tokens == u.completion_tokens
        if name == "deepseek":  # the prompt opened <think> and a random model never closes it: all reasoning
            assert msg.content == "" and text and u.completion_tokens_details.reasoning_tokens == u.completion_tokens
        else:  # ChatML opens no think block: a random model's text is all answer
            assert msg.model_extra.get("reasoning_content") is None and msg.content
            assert u.completion_tokens_details.reasoning_tokens == 0
        two = client.chat.completions.create(model=name, messages=msgs, temperature=0.9, max_tokens=8, n=2, seed=3)
        assert [c.index for c in two.choices] == [0, 1]
        legacy = client.completions.create(model=name, prompt="2 + 3 =", max_tokens=5, temperature=0, logprobs=2)
        assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_template_that_refuses_a_conversation_is_a_400(served):
    _, client = served["strict"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="strict", messages=[{"role": "system", "content": "x"},
                                                                 {"role": "user", "content": "hi"}], max_tokens=4)
    assert "System role not supported" in e.value.body["message"]
    ok = client.chat.completions.create(model="strict", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------- think tags of several tokens

@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1,
               max_size=30).filter(str.strip),
       st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1,
               max_size=30).filter(str.strip))
def test_streamed_split_with_multi_token_think_tags(chatml_tok, reasoning, answer):
    """With ChatML's vocabulary `<think>` is several tokens: streamed token by token (as the engine
    decodes), the split still finds reasoning and answer, and agrees with the whole-text parser."""
    text = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    ids = chatml_tok.encode(text)
    assert len(chatml_tok.encode("<think>")) > 1
    split, got_r, got_a, shown = ThinkSplitter(opened=False), "", "", ""
    for i in range(1, len(ids) + 1):
        full = chatml_tok.decode(ids[:i])
        if full.endswith("\ufffd"):  # a partial character: the engine waits for the rest
            continue
        r, a = split.feed(full[len(shown):], final=i == len(ids))
        got_r, got_a, shown = got_r + r, got_a + a, full
    p = parse_completion(text, opened_think=False)
    assert (got_r.strip(), got_a.strip()) == (p.reasoning, p.answer) == (reasoning.strip(), answer.strip())


@pytest.fixture(scope="module")
def chatml_tok(qwen):
    return load_tokenizer(qwen)
