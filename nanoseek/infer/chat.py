"""Chat with a model in the terminal: streamed replies, the reasoning shown dimmed. Ctrl-D or /exit quits."""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from nanoseek.data.chat import ChatTemplateError, ThinkSplitter, describe_template, opens_think, parse_completion
from nanoseek.infer.engine import Engine
from nanoseek.infer.generate import load
from nanoseek.infer.sampling import SamplingParams

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
    console = Console()
    model, tok = load(opts.model, opts.device)
    eng = Engine(model, tok, max_batch=1, max_len=model.config.max_position_embeddings)
    history = [{"role": "system", "content": opts.system}] if opts.system else []
    console.print(f"[bold]nanoseek chat[/] with {opts.model} — /exit or Ctrl-D to quit")
    console.print(describe_template(tok), style="dim", markup=False)
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
        try:
            prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        except ChatTemplateError as e:  # the model's template refuses this conversation: say so, keep chatting
            console.print(f"error: {e}", style="red", markup=False)
            history.pop()
            continue
        ids = tok.encode(prompt)[-(eng.max_len - 8):]  # keep the newest context if the conversation outgrows the window
        rid = eng.add_request(ids, SamplingParams(temperature=opts.temperature, top_p=opts.top_p,
                                                  max_tokens=min(opts.max_tokens, eng.max_len - len(ids))))
        opened = opens_think(prompt)
        split = ThinkSplitter(opened)
        console.print("[bold blue]nanoseek>[/] ", end="")
        while eng.has_work():
            for ev in eng.step():
                if ev.request_id != rid:
                    continue
                reasoning, answer = split.feed(ev.text, final=ev.finished)
                console.print(reasoning, style="dim", end="", markup=False)
                console.print(answer, end="", markup=False)
        console.print()
        parsed = parse_completion(eng.requests.pop(rid).outputs[0].text, opened_think=opened)
        history.append({"role": "assistant", "content": parsed.answer.strip()})
