"""Training data: pack token sequences into fixed-length rows, iterate batches resumably.

Every row is T+1 tokens (inputs = row[:-1], targets = row[1:]) with a document id per token,
so attention stays inside a document (the model's block-diagonal mask) and no target is
"predict the first token of the next, unrelated document".

  * pretraining: documents are one token stream chopped into rows (no padding, nothing
    wasted; a document may continue in the next row);
  * SFT: whole examples are packed greedily into rows and never split, the rest of a row is
    padding with loss mask 0; the loss mask marks the assistant tokens.

`BatchIterator` walks a seeded permutation per epoch; its (epoch, index) is all the state a
checkpoint needs to continue with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    tokens: torch.Tensor   # [N, T+1] long
    doc_ids: torch.Tensor  # [N, T+1] long, equal id = same document within a row
    mask: torch.Tensor     # [N, T+1] bool, train on predicting this token

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1


def pack_stream(docs: list[list[int]], seq_len: int) -> Packed:
    """Concatenate documents and cut the stream into rows of seq_len+1 (the tail is dropped)."""
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d) for d in docs]))
    row = seq_len + 1
    n = len(tokens) // row
    if n == 0:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one row of {row}: add documents or lower seq_len")
    tokens, doc = tokens[: n * row].view(n, row), doc[: n * row].view(n, row)
    return Packed(tokens, doc - doc[:, :1], torch.ones_like(tokens, dtype=torch.bool))


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Packed:
    """Greedy first-fit packing of whole (ids, loss_mask) examples into rows of seq_len+1.

    An example longer than a row is truncated (its start is kept: the prompt and the first part
    of the answer). Padding gets its own document id and mask 0.
    """
    row = seq_len + 1
    rows: list[list[tuple[list[int], list[int]]]] = []
    free: list[int] = []
    for ids, m in examples:
        ids, m = ids[:row], m[:row]
        for i, f in enumerate(free):
            if f >= len(ids):
                rows[i].append((ids, m))
                free[i] -= len(ids)
                break
        else:
            rows.append([(ids, m)])
            free.append(row - len(ids))
    tokens = torch.full((len(rows), row), pad_id, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), row), dtype=torch.long)
    mask = torch.zeros((len(rows), row), dtype=torch.bool)
    for r, items in enumerate(rows):
        pos = 0
        for d, (ids, m) in enumerate(items):
            tokens[r, pos: pos + len(ids)] = torch.tensor(ids)
            mask[r, pos: pos + len(ids)] = torch.tensor(m, dtype=torch.bool)
            doc_ids[r, pos: pos + len(ids)] = d
            pos += len(ids)
        doc_ids[r, pos:] = len(items)  # padding: a document of its own, never a target
    return Packed(tokens, doc_ids, mask)


def make_batch(p: Packed, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows -> model inputs. A target counts only if it is marked and in the same document as its input."""
    tok, doc, m = p.tokens[rows], p.doc_ids[rows], p.mask[rows]
    same_doc = doc[:, 1:] == doc[:, :-1]
    return {"input_ids": tok[:, :-1], "targets": tok[:, 1:], "doc_ids": doc[:, :-1],
            "loss_mask": m[:, 1:] & same_doc}


class BatchIterator:
    """Endless, seeded, resumable batches of `batch_size` rows from a Packed set."""

    def __init__(self, data: Packed, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} packed rows < batch size {batch_size}: add data or lower the batch size")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # own generator: global RNG untouched
        return torch.randperm(len(self.data), generator=g)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index + self.batch_size > len(self.data):  # drop the ragged tail: every batch is full
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.index: self.index + self.batch_size]
        self.index += self.batch_size
        return make_batch(self.data, rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rows": len(self.data)}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if s.get("rows") != len(self.data) or s.get("seed") != self.seed:
            raise ValueError(f"data position was saved for {s.get('rows')} rows / seed {s.get('seed')}, but this run "
                             f"has {len(self.data)} rows / seed {self.seed}: resume with the same data and seed")
        self.epoch, self.index = s["epoch"], s["index"]
        self._order = self._permutation()
