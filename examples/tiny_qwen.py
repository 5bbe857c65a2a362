"""Write a tiny random Qwen2 checkpoint with a ChatML tokenizer, the way a user's own model arrives: saved by
transformers, with a vocabulary, special tokens and chat template nanoseek never made (no think tokens at all).

    python examples/tiny_qwen.py runs/tiny-qwen        # a few seconds on a CPU; needs transformers

It stands in for a real download (Qwen2.5, DeepSeek-R1-Distill-Qwen) where there is no network: every
nanoseek command treats it exactly as it would one of those.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (  # Qwen2.5's layout: a default system turn, no think block in the generation prompt
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [f"What is {a} + {b}? The answer is {a + b}. Let me think step by step." for a in range(30) for b in range(30)]


def main(out: str) -> None:
    d = Path(out)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_max_length=2048)
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(d)
    print(f"wrote a Qwen2 model ({model.num_parameters() / 1e6:.1f}M parameters) "
          f"and its ChatML tokenizer ({len(tok)} tokens) to {d}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen")
