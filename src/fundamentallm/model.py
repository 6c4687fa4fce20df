"""The decoder-only transformer, top to bottom in one file.

Pre-norm blocks (x + attn(norm(x)), x + mlp(norm(x))), causal self-attention through
torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels where available), token plus
learned position embeddings, a GELU MLP, dropout (on embeddings and block outputs; attention-weight dropout is
a separate option because it rules out fused attention kernels), and an output projection tied to the token
embedding. The
defaults are the training guide's architecture; RoPE, RMSNorm, SwiGLU, ReLU², QK-norm, zero-initialised
projections, residual and embedding-skip scalars and logit soft-capping are options in ModelConfig.

The model does math only: no devices, precision, compilation or files in here (train.py applies those; the one
exception: under CPU autocast attention computes in fp32, see _attention).
Shapes: B batch, T time (tokens), C = d_model, H heads, D = C / H head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fundamentallm.config import Config, ModelConfig


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    return nn.LayerNorm(dim, bias=cfg.bias)


def _rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    # Under autocast, queries and keys arrive in bf16 while the gain is fp32: matching the gain's dtype keeps
    # PyTorch on its fused kernel (a mismatch falls back to a slower composite one).
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


class KVCache:
    """Keys and values of every layer for the positions generated so far: each new token costs one position.

    Its rows advance together (`length` positions filled in each), or, in batched decoding, each row holds one
    sequence of its own length: a forward pass given `positions` puts row b's one new token at positions[b]
    and attends to that row's keys up to there (the caller keeps the lengths)."""

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (num_layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled in every row (unused while `positions` is set)
        self.max_len = max_len
        self.positions: torch.Tensor | None = None  # (B,): where each row's new token goes, in batched decoding
        self._span = 0  # keys attended to in a batched step: the longest row's
        self._mask: torch.Tensor | None = None  # (B, 1, 1, span): the keys each row may see; None if all

    def row(self, index: int) -> KVCache:
        """Row `index` alone as an empty cache of one row; its tensors are views of this cache's, so filling it
        (a prompt's forward pass) fills that row."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, index : index + 1], self.v[:, index : index + 1]
        view.length, view.max_len, view.positions, view._span, view._mask = 0, self.max_len, None, 0, None
        return view

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (a batch stays packed in its first rows when one leaves)."""
        self.k[:, target] = self.k[:, source]
        self.v[:, target] = self.v[:, source]

    def place(self, positions: list[int] | None, device: torch.device) -> None:
        """Set (or, with None, clear) each row's position for the next one-token forward pass."""
        if positions is None:
            self.positions, self._mask = None, None
            return
        self.positions = torch.tensor(positions, device=device)
        self._span = max(positions) + 1
        if self._span > self.max_len:
            raise ValueError(f"{self._span} positions exceed the context length {self.max_len}")
        # Rows of equal length need no mask: alone, a row then computes exactly what an unbatched step does.
        self._mask = None if min(positions) == self._span - 1 else \
            (torch.arange(self._span, device=device) <= self.positions[:, None])[:, None, None, :]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """Write the new keys and values (B, H, T, D) of `layer`; return every key and value the new queries
        attend to, the number of cached positions before them, and the mask of keys each row may see."""
        B = k.shape[0]  # the first B rows (a batch may hold fewer sequences than the cache has rows)
        if self.positions is None:
            past, T = self.length, k.shape[2]
            self.k[layer, :B, :, past : past + T] = k
            self.v[layer, :B, :, past : past + T] = v
            return self.k[layer, :B, :, : past + T], self.v[layer, :B, :, : past + T], past, None
        rows = torch.arange(B, device=k.device)
        self.k[layer, rows, :, self.positions] = k[:, :, 0]
        self.v[layer, rows, :, self.positions] = v[:, :, 0]
        span = self._span
        return self.k[layer, :B, :, :span], self.v[layer, :B, :, :span], span - 1, self._mask


def rope_tables(context_length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate each (first half, second half) pair of the head by a position-dependent angle.
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6) if cfg.qk_norm else None
        self.attention_dropout = cfg.attention_dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        if self.q_norm is not None:
            q, k = _rms_norm(q, self.q_norm), _rms_norm(k, self.k_norm)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past, mask = 0, None
        if cache is not None:
            k, v, past, mask = cache.store(layer, k, v)
        y = _attention(q, k, v, past, self.attention_dropout if self.training else 0.0, mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, dropout: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T new queries over `past` cached positions plus themselves: (B, H, T, D). A batched
    decoding step (T = 1) gives the `mask` of each row's keys when its rows differ in length."""
    T = q.shape[2]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # PyTorch's CPU flash-attention backward is several times slower in bf16 than in fp32 (13.4 against 3.8
        # ms per layer for fast-cpu's shapes, torch 2.13), so on a CPU attention runs in fp32 even under autocast.
        with torch.autocast("cpu", enabled=False):
            return _attention(q.float(), k.float(), v.float(), past, dropout, mask).to(torch.bfloat16)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    if T == 1:  # one new token attends to every cached position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # a chunk after a cached prefix: query i sees keys up to past + i
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.kind == "relu2":
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x))
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = _norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, context_length: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.context_length = cfg, vocab_size, context_length
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(context_length, cfg.d_model) if cfg.position_embedding == "learned" else None
        if cfg.position_embedding == "rope":
            cos, sin = rope_tables(context_length, cfg.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.residual_scalars:  # before block i: x = resid_scale[i] * x + x0_scale[i] * (embedding output)
            self.resid_scale = nn.Parameter(torch.ones(cfg.num_layers))
            self.x0_scale = nn.Parameter(torch.zeros(cfg.num_layers))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_f = _norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by depth, so its variance stays
        # roughly constant however many blocks add to it.
        # With zero_init_proj they start at zero instead: every block begins as the identity (the gradients
        # reaching the projections are not zero, so they still learn from the first step).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @classmethod
    def from_config(cls, config: Config, vocab_size: int) -> GPT:
        return cls(config.model, vocab_size=vocab_size, context_length=config.training.sequence_length)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Every trainable number, shared (tied) tensors counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6 per weight of every matrix multiply, plus the
        attention scores and weighted sums over a full context (PaLM appendix B)."""
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 12 * self.cfg.num_layers * self.cfg.d_model * self.context_length
        return 6 * matmul_weights + attention

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.cfg.num_layers, batch, self.cfg.num_heads, self.context_length, self.cfg.head_dim,
                       device, dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, given targets (B, T), the mean cross-entropy over the
        targets that are not -1. With a cache, idx continues the cached positions and only the last position's
        logits are computed (B, 1, V). Batched decoding gives `positions` too: one token per row (T = 1), row b's
        at positions[b] of its own row of the cache, which then leaves its `length` alone."""
        T = idx.shape[1]
        if positions is not None:
            assert cache is not None and T == 1, "positions are for one-token steps over a cache"
            cache.place(positions, idx.device)
            try:
                return self._forward(idx, targets, cache, cache.positions[:, None])
            finally:
                cache.place(None, idx.device)
        start = cache.length if cache is not None else 0
        if start + T > self.context_length:
            raise ValueError(f"{start + T} positions exceed the context length {self.context_length}")
        logits, loss = self._forward(idx, targets, cache, torch.arange(start, start + T, device=idx.device))
        if cache is not None:
            cache.length += T
        return logits, loss

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor | None, cache: KVCache | None,
                 pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pass itself; `pos` holds the tokens' positions: (T,) shared by every row, or (B, 1) per row."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        rope = None
        if self.cfg.position_embedding == "rope":  # (T, D/2), or (B, 1, 1, D/2) to broadcast over heads
            rope = (self.rope_cos[pos], self.rope_sin[pos]) if pos.dim() == 1 else \
                (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])
        x = x0 = self.drop(x)
        for layer, block in enumerate(self.blocks):
            if self.cfg.residual_scalars:
                x = self.resid_scale[layer] * x + self.x0_scale[layer] * x0
            x = block(x, rope, cache, layer)
        if cache is not None:
            x = x[:, -1:]
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if self.cfg.logit_softcap:  # bounded logits: no single output can run away early in training
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss
