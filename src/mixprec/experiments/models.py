"""Small built-in models for the built-in data sets.

Every GEMM is an ``nn.Linear``, an ``nn.Conv2d`` or a ``torch.matmul``, so the precision
recipes see (and round) all of them; attention is written out with matmul and softmax
rather than a fused kernel for the same reason.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["digits_mlp", "digits_cnn", "CausalSelfAttention", "TransformerBlock",
           "CharTransformer"]


def digits_mlp(num_classes: int = 10, *, hidden: int = 128, in_features: int = 64) -> nn.Module:
    """Flatten -> Linear(64, hidden) -> ReLU -> Linear(hidden, hidden) -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Conv(1->16, 3x3)-BN-ReLU, Conv(16->32, 3x3)-BN-ReLU, 2x2 max-pool, Linear(512 -> 10)
    for (B, 1, 8, 8) inputs: about 10K parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from Linear, matmul and softmax.

    att = softmax(mask(q k^T / sqrt(d_head))) ; out = proj(att v)
    """

    def __init__(self, d_model: int, n_head: int, context: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.n_head, self.d_head = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_head, self.d_head).transpose(1, 2) for z in (q, k, v))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        # -inf before softmax: the softmax runs in FP32 under every recipe
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(scores, dim=-1)
        out = torch.matmul(att, v).transpose(1, 2).reshape(b, t, c)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_head: int, context: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, context)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small GPT-style byte-level language model: token + position embeddings,
    ``n_layer`` blocks, final layer norm, linear head -> (B, T, vocab) logits."""

    def __init__(self, vocab: int = 256, *, context: int = 64, d_model: int = 64,
                 n_head: int = 4, n_layer: int = 2):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_head, context)
                                    for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for m in self.modules():    # GPT-2 style small init keeps early logits tame
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
