"""Prefix cache: the KV-cache contents of earlier requests, kept by token prefix and reused by later ones.

A radix tree over token ids whose edges are blocks of up to `block_size` tokens. Each node holds a copy
of the engine cache's values for its block (for MLA the compressed latent c_kv | k_pe of every layer, for
the dense student k and v), so a new prompt that starts like an earlier one copies those positions into its
cache row and prefills only the rest. Matching is per token: a prompt may use the head of a block (a
shared system prompt rarely ends on a block boundary), and the tail of a sequence is kept as a short block.

Nodes are copies, not views into cache rows, so every request that shares a prefix reads the same nodes
while its own row evolves, and a node outlives the request that made it. Memory is capped in bytes; past
the cap the least recently used leaf goes first (a parent is only evicted after its children, so a kept
node is always reachable). Keys are the token tuples themselves: no hash can collide.

Only the engine thread touches it. Speculative (MTP) decoding does not use it: the MTP layer's entry at a
position depends on the *next* token, which a block does not determine.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from nanoseek.model.cache import KVCache


class _Node:
    __slots__ = ("parent", "tokens", "values", "children", "nbytes")

    def __init__(self, parent: "_Node | None", tokens: tuple[int, ...], values: list[tuple[torch.Tensor, ...]]):
        self.parent, self.tokens, self.values = parent, tokens, values  # values: per layer, per cache buffer
        self.children: dict[tuple[int, ...], _Node] = {}
        self.nbytes = sum(t.numel() * t.element_size() for layer in values for t in layer)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PrefixCache:
    def __init__(self, capacity_bytes: int, block_size: int = 16):
        if capacity_bytes <= 0 or block_size <= 0:
            raise ValueError("the prefix cache needs a positive capacity and block size")
        self.capacity, self.block = capacity_bytes, block_size
        self.root = _Node(None, (), [])
        self.lru: OrderedDict[_Node, None] = OrderedDict()  # oldest first
        self.used = 0
        self.stats = {"lookup_tokens": 0, "hit_tokens": 0, "evicted_blocks": 0}

    def __len__(self) -> int:
        return len(self.lru)

    def match(self, ids: list[int], limit: int) -> list[tuple[_Node, int]]:
        """The longest cached prefix of ids[:limit], as (node, tokens used of it) from the root down."""
        node, n, path = self.root, 0, []
        while n < limit:
            chunk = tuple(ids[n:min(n + self.block, limit)])
            child = node.children.get(chunk)
            if child is not None and len(chunk) == self.block:
                path.append((child, len(chunk)))
                node, n = child, n + len(chunk)
                continue
            best, used = None, 0  # no whole block: the child that shares the longest head with this chunk
            for c in node.children.values():
                k = _common_prefix(c.tokens, chunk)
                if k > used:
                    best, used = c, k
            if best is not None:
                path.append((best, used))
            break
        self._touch([nd for nd, _ in path])
        self.stats["lookup_tokens"] += limit
        self.stats["hit_tokens"] += sum(k for _, k in path)
        return path

    def load(self, path: list[tuple[_Node, int]], cache: KVCache, row: int) -> int:
        """Copy a matched prefix into positions 0.. of a cache row; returns its length in tokens."""
        n = sum(k for _, k in path)
        if n:
            for layer, bufs in enumerate(cache.layers):
                for b, buf in enumerate(bufs):
                    buf[row, :n] = torch.cat([nd.values[layer][b][:k] for nd, k in path])
        return n

    def store(self, ids: list[int], cache: KVCache, row: int) -> None:
        """Keep the values of tokens `ids`, which sit at positions 0..len(ids)-1 of a cache row."""
        node, n, path = self.root, 0, []
        while n < len(ids):
            chunk = tuple(ids[n:n + self.block])
            child = node.children.get(chunk)
            if child is None and len(chunk) < self.block:  # a short tail: kept unless a longer block holds it
                child = next((c for t, c in node.children.items() if t[:len(chunk)] == chunk), None)
            if child is None:
                child = self._add(node, chunk, [tuple(buf[row, n:n + len(chunk)].clone() for buf in bufs)
                                                for bufs in cache.layers])
                if child is None:
                    break
            path.append(child)
            node, n = child, n + len(chunk)
        self._touch(path)

    def _add(self, parent: _Node, tokens: tuple[int, ...], values) -> _Node | None:
        node = _Node(parent, tokens, values)
        if node.nbytes > self.capacity:
            return None
        if len(tokens) == self.block:  # a short sibling this block extends is now redundant
            for short in [c for t, c in parent.children.items() if len(t) < self.block and tokens[:len(t)] == t]:
                self._evict(short)
        while self.used + node.nbytes > self.capacity:
            victim = next((v for v in self.lru if not v.children and v is not parent), None)
            if victim is None:
                return None
            self._evict(victim)
            self.stats["evicted_blocks"] += 1
        parent.children[tokens] = node
        self.lru[node] = None
        self.used += node.nbytes
        return node

    def _evict(self, node: _Node) -> None:
        del node.parent.children[node.tokens]
        del self.lru[node]
        self.used -= node.nbytes

    def _touch(self, nodes: list[_Node]) -> None:
        # deepest first, so a parent is always more recent than its children and leaves age out first
        for nd in reversed(nodes):
            self.lru.move_to_end(nd)
