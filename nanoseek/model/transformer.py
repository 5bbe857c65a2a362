"""The decoder both models share (embedding, pre-norm blocks, final norm, output head; the forward,
the training loss, GRPO's log-probs), and DeepSeek-V3 on it: blocks of MLA + dense FFN or
DeepSeekMoE, and MTP. The dense student (`dense.py`) is the same decoder with GQA blocks."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.model.cache import KVCache
from nanoseek.model.head import LMHead
from nanoseek.hf.save import save_pretrained
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, MoE, balance_losses
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dim: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, **attn_kw) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), **attn_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(positions: torch.Tensor, kv_len: int | None, doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Bool mask [B, 1, T, S] (True = attend), or None when plain causal SDPA suffices.

    With a cache (kv_len given) key j is visible to a query at position p iff j <= p.
    With packed documents (doc_ids [B, T]) attention stays inside each document.
    """
    if kv_len is not None:
        keys = torch.arange(kv_len, device=positions.device)
        return (keys.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
    if doc_ids is not None:
        T = doc_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        return (causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))).unsqueeze(1)
    return None


class Decoder(nn.Module):
    """Token embedding, the blocks, final RMSNorm, output head (tied to the embedding if the config
    says so); `mtp` holds the MTP modules of a model that has them."""

    def __init__(self, cfg: ModelConfig | DenseConfig, make_block: Callable[[int], Block]):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make_block(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList()

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "gate_proj") and isinstance(m.gate_proj, nn.Parameter):  # stacked experts
            for p in (m.gate_proj, m.up_proj, m.down_proj):
                nn.init.normal_(p, std=std)
        elif hasattr(m, "e_score_correction_bias"):
            nn.init.normal_(m.weight, std=std)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, doc_ids: torch.Tensor | None = None,
                      absorb: bool | None = None, kv_len: int | None = None) -> tuple[torch.Tensor, dict]:
        """input_ids [B, T] -> final normed hidden [B, T, D], and the attention kwargs used.
        kv_len: with a cache, the keys visible this step (max position + 1); a caller that knows it
        (the engine) saves a host sync and keeps the forward traceable by torch.compile."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is None:
            kv_len = None
        else:
            kv_len = kv_len if kv_len is not None else int(positions.max()) + 1
            if kv_len > cache.max_len:
                raise ValueError(f"position {kv_len - 1} is past the cache length {cache.max_len}")
            cache.limit = kv_len
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        kw = dict(rotary=self.rotary, cos=cos, sin=sin, positions=positions,
                  mask=attention_mask(positions, kv_len, doc_ids), absorb=absorb)
        for layer in self.layers:
            x = layer(x, cache=cache, **kw)
        return self.norm(x), kw

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, doc_ids: torch.Tensor | None = None,
                absorb: bool | None = None, kv_len: int | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]."""
        h, _ = self.hidden_states(input_ids, positions, cache, doc_ids, absorb, kv_len)
        return self.lm_head(h)

    def mtp_hidden(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor, **attn_kw) -> torch.Tensor:
        """Depth-k MTP representation from h^{k-1} [B, T, D] and the tokens t_{i+k} [B, T]."""
        return self.mtp[k - 1](h_prev, self.embed_tokens(next_ids), **attn_kw)

    def mtp_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mtp[k - 1].head_norm(h))

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                       entropy: bool = False, mask: torch.Tensor | None = None,
                       mtp_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """GRPO's log pi(targets) [B, T] (fp32, pi = softmax(logits / temperature)); the entropy of pi
        [B, T] when asked (no grad); with mask [B, T], both only where it is set (0 elsewhere);
        with mtp_mask [B, T-1], the depth-1 MTP CE on targets[:, 1:] from a detached trunk (MTP learns
        the policy's own next-next token without pulling the policy), else None."""
        h, kw = self.hidden_states(input_ids)
        logp, ent = self.lm_head.log_probs(h, targets, temperature, entropy, mask)
        T = input_ids.shape[1] - 1
        if mtp_mask is None or not len(self.mtp) or T < 1:
            return logp, ent, None
        h1 = self.mtp_hidden(1, h[:, :T].detach(), input_ids[:, 1:], rotary=self.rotary, cos=kw["cos"][:, :T],
                             sin=kw["sin"][:, :T], positions=kw["positions"][:, :T], mask=None, absorb=None)
        return logp, ent, self.lm_head.cross_entropy(self.mtp[0].head_norm(h1), targets[:, 1:], mtp_mask)

    # ------------------------------------------------------------------ training loss
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None, mtp_weight: float = 0.3) -> dict[str, torch.Tensor]:
        """Next-token CE + lambda * mean_k MTP CE (V3 eq. 24-25) + sequence-wise balance loss (eq. 17-20).

        input_ids, targets [B, T]: targets[:, i] is the token after input_ids[:, i].
        loss_mask [B, T] (1 = train on this target). MTP depth k predicts targets[:, i+k] at
        position i, so its inputs/targets are the sequence shifted by k (within one document).
        """
        B, T = input_ids.shape
        mask = None if loss_mask is None else loss_mask.float()  # None: every target (no row selection)
        h, kw = self.hidden_states(input_ids, doc_ids=doc_ids)
        lm = self.lm_head.cross_entropy(h, targets, mask)
        out = {"lm_loss": lm}
        total = lm
        mtp_losses = []
        h_prev = h
        for k in range(1, len(self.mtp) + 1):
            if T - k < 1:
                break
            # position i (< T-k) sees token t_{i+k} = input_ids[:, i+k] and predicts targets[:, i+k]
            m = None if mask is None else mask[:, k:]
            d = None
            if doc_ids is not None:  # no prediction across a document boundary
                d = doc_ids[:, :T - k]
                same = (doc_ids[:, k:] == d).float()
                m = same if m is None else m * same
            sub_pos = kw["positions"][:, :T - k]
            cos, sin = kw["cos"][:, :T - k], kw["sin"][:, :T - k]
            h_k = self.mtp_hidden(k, h_prev[:, :T - k], input_ids[:, k:], rotary=self.rotary, cos=cos, sin=sin,
                                  positions=sub_pos, mask=attention_mask(sub_pos, None, d), absorb=None)
            mtp_losses.append(self.lm_head.cross_entropy(self.mtp[k - 1].head_norm(h_k), targets[:, k:], m))
            h_prev = h_k
        if mtp_losses:
            out["mtp_loss"] = torch.stack(mtp_losses).mean()
            total = total + mtp_weight * out["mtp_loss"]
        bal = balance_losses(self)
        if bal is not None:
            out["balance_loss"] = bal
            total = total + bal
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ sizes & I/O
    def num_parameters(self, active: bool = False, include_mtp: bool = False) -> int:
        """Parameter count; `active`: per token (only top-k of the routed experts count)."""
        total = 0
        for name, p in self.named_parameters():
            if not include_mtp and name.startswith("mtp."):
                continue
            n = p.numel()
            if active and ".experts." in name:
                n = n * self.config.num_experts_per_tok // self.config.n_routed_experts
            total += n
        return total

    def save_pretrained(self, path, **kw) -> None:
        save_pretrained(self, path, **kw)


class Transformer(Decoder):
    """DeepSeek-V3: blocks of MLA and a dense FFN (the first layers) or DeepSeekMoE, plus MTP (§2.2)."""
    config_class = ModelConfig

    def __init__(self, cfg: ModelConfig):
        def block(i: int) -> Block:
            attn = MLA(cfg, i)
            mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
            return Block(attn, mlp, cfg.hidden_size, cfg.rms_norm_eps)

        super().__init__(cfg, block)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, n + k, block(n + k)) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings, cfg.rope_interleave)
        self.apply(self._init_weights)

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, mtp: bool = False) -> KVCache:
        """Latent cache [c_kv | k_pe] per layer; `mtp` adds the MTP blocks' layers (ids n .. n+D-1)."""
        cfg = self.config
        p = next(self.parameters())
        layers = cfg.num_hidden_layers + (len(self.mtp) if mtp else 0)
        return KVCache(layers, batch, max_len, ((cfg.kv_lora_rank + cfg.qk_rope_head_dim,),), dtype or p.dtype, p.device)
