"""Chat with a model in the terminal: streamed replies, the reasoning shown dimmed. Ctrl-D or /exit quits."""
from __future__ import annotations

from dataclasses import dataclass, field

POSITIONAL = (("model", "model directory (HF layout, with tokenizer files)"),)


@dataclass
class Options:
    model: str = field(default="", metadata={"help": "model directory"})
    max_tokens: int = field(default=512, metadata={"help": "new tokens per reply"})
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    system: str = field(default="", metadata={"help": "optional system prompt"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})


def run(opts: Options) -> None:
    from rich.console import Console

    from nanoseek.data.chat import parse_completion
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.generate import load
    from nanoseek.infer.sampling import SamplingParams

    console = Console()
    model, tok = load(opts.model, opts.device)
    eng = Engine(model, tok, max_batch=1, max_len=model.config.max_position_embeddings)
    history = [{"role": "system", "content": opts.system}] if opts.system else []
    console.print(f"[bold]nanoseek chat[/] with {opts.model} — /exit or Ctrl-D to quit")
    while True:
        try:
            user = console.input("[bold green]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if user in ("/exit", "/quit"):
            break
        if not user:
            continue
        history.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        ids = ids[-(eng.max_len - 8):]  # keep the newest context if the conversation outgrows the window
        rid = eng.add_request(ids, SamplingParams(temperature=opts.temperature, top_p=opts.top_p,
                                                  max_tokens=min(opts.max_tokens, eng.max_len - len(ids))))
        thinking, text = True, ""
        console.print("[bold blue]nanoseek>[/] ", end="")
        while eng.has_work():
            for ev in eng.step():
                if ev.request_id != rid or not ev.text:
                    continue
                text += ev.text
                if thinking and "</think>" in text:
                    before, after = ev.text.split("</think>", 1) if "</think>" in ev.text else ("", ev.text)
                    console.print(before, style="dim", end="")
                    console.print("\n", end="")
                    console.print(after.lstrip("\n"), end="")
                    thinking = False
                else:
                    console.print(ev.text, style="dim" if thinking else None, end="", markup=False)
        console.print()
        parsed = parse_completion(eng.requests.pop(rid).outputs[0].text)
        history.append({"role": "assistant", "content": parsed.answer.strip()})
