"""One GRPO step (rollout + reward + loss + backward + AdamW): nanoseek vs TRL's GRPOTrainer (no vLLM).

Same tiny model (ours exported with save_pretrained, TRL loads it as DeepseekV3ForCausalLM), same
prompts, 8 prompts x G=8, exactly `completion_len` new tokens on both sides (EOS ignored), the
same trivial reward, fp32, beta = 0 (no reference model) and one optimizer step per generation.
Both run in this process; each side's step time is the median over `reps` steps after a warm-up.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from benchmarks.common import Row


def _trivial_reward(text: str) -> float:
    return (len(text) % 7) / 7.0  # cheap, varies across a group: every group has a signal


def run(reps: int = 2, prompts: int = 8, group: int = 8, completion_len: int = 128, preset: str = "tiny") -> list[Row]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.config import get_preset
    from nanoseek.data.corpus import default_corpus
    from nanoseek.data.tasks import mix
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.grpo import GRPO, Options
    from nanoseek.train.rollout import make_rollout

    questions = [s.prompt for s in mix(["add"], prompts, "train", 2, seed=0)]
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(default_corpus(500, seed=1), 4096, f"{d}/tok")
        torch.manual_seed(0)
        cfg = get_preset(preset).replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                         pad_token_id=tok.pad_id, num_nextn_predict_layers=0)  # HF has no MTP
        ours = Transformer(cfg)
        ours.save_pretrained(f"{d}/model", tokenizer=tok)

        # ---------------------------------------------------------------- nanoseek
        o = Options(steps=reps + 1, prompts_per_step=prompts, group_size=group, max_new_tokens=completion_len,
                    lr=1e-6, beta=0.0, mtp_weight=0.0, micro_batch=prompts * group, bias_gamma=0.001)

        def reward_fn(samples, texts, n_tokens):
            return [SimpleNamespace(total=_trivial_reward(t), accuracy=0.0, format=0.0, language=0.0, length=0.0)
                    for t in texts]

        class Bench(GRPO):
            def prompts_at(self, step):
                return [SimpleNamespace(prompt=q) for q in questions]

            def encode_prompt(self, s):
                return tok.encode(s.prompt, add_bos=True)

        ours_times: dict[bool, list[float]] = {}
        for compile in (False, True):  # the same start weights for both; the first step (compiling) is not timed
            run_ = Bench(copy.deepcopy(ours).train(), tok, o, reward_fn=reward_fn, stop_ids=None,  # always completion_len
                         rollout_fn=make_rollout("engine", compile))
            ours_times[compile] = []
            for s in range(reps + 1):
                t = time.perf_counter()
                row = run_.step(s)
                ours_times[compile].append(time.perf_counter() - t)
            assert row["response_len"] == completion_len

        # ---------------------------------------------------------------- TRL
        hf_tok = AutoTokenizer.from_pretrained(f"{d}/model")
        times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

        args = GRPOConfig(output_dir=f"{d}/trl", per_device_train_batch_size=prompts * group, num_generations=group,
                          max_completion_length=completion_len, max_steps=reps + 1, learning_rate=1e-6, beta=0.0,
                          temperature=1.0, use_vllm=False, report_to=[], save_strategy="no", logging_steps=10_000,
                          use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                          generation_kwargs={"min_new_tokens": completion_len},  # same length as ours
                          gradient_checkpointing=False)
        data = Dataset.from_dict({"prompt": questions * (reps + 2)})
        trainer = GRPOTrainer(model=f"{d}/model", reward_funcs=lambda completions, **kw: [_trivial_reward(c) for c in completions],
                              args=args, train_dataset=data, processing_class=hf_tok, callbacks=[Timer()])
        trainer.train()

    b = statistics.median(times[1:])
    what = f"({preset}, {prompts} prompts x G={group}, {completion_len} new tokens, fp32, cpu)"
    note = "rollout + reward + loss + backward + AdamW; TRL without vLLM"
    rows = []
    for compile, label in ((False, ""), (True, ", compiled rollouts")):
        a = statistics.median(ours_times[compile][1:])
        extra = f"; --compile, first step with compiling {ours_times[compile][0]:.0f} s, not timed" if compile else ""
        rows.append(Row(f"GRPO step{label} {what}", a, b, "s/step", b / a, note + extra))
    return rows


if __name__ == "__main__":
    from benchmarks.common import print_table
    print_table(run())
