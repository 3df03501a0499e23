"""Bundled model definitions (random init, nothing downloaded) for the CLI, tests and benchmarks.

`get_model(name)` returns (model in eval mode, example inputs). Names: resnet18, resnet50, mobilenet_v2,
bert_base (BERT-base shape: 12 layers, hidden 768, 12 heads, seq 128), bert_tiny, mlp (1024-4096-4096-1000).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["BertStyleEncoder", "SelfAttention", "MLP", "get_model", "MODELS"]


class SelfAttention(nn.Module):
    """Multi-head self-attention from plain Linear layers (traceable; heads live in `num_heads`).

    Head count is inferred from the projection widths at run time (view(..., -1, head_dim)), so pruning whole
    heads only shrinks q/k/v/out and updates `num_heads`.
    """

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.size(0), x.size(1)
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.attention = SelfAttention(hidden, num_heads)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attention(x)))
        return self.ffn_norm(x + self.ffn_dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class BertStyleEncoder(nn.Module):
    """A BERT-style encoder: token + position embeddings, LayerNorm, N post-norm layers, pooled tanh head.

    forward(input_ids: int64 (B, S)) -> (B, num_labels) logits from the [CLS] position.
    """

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12,
                 ffn: int = 3072, max_len: int = 512, num_labels: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.embed_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.embed_dropout = nn.Dropout(0.1)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids.narrow(1, 0, input_ids.size(1))
        x = self.embed_dropout(self.embed_norm(self.tokens(input_ids) + self.positions(pos)))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class MLP(nn.Module):
    def __init__(self, sizes=(1024, 4096, 4096, 1000)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _torchvision(name: str, size: int) -> Callable[[int], tuple]:
    def make(batch: int = 1):
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, name)().eval(), (torch.randn(batch, 3, size, size),)
    return make


def _bert(**kw) -> Callable[[int], tuple]:
    seq = kw.pop("seq", 128)

    def make(batch: int = 1):
        torch.manual_seed(0)
        model = BertStyleEncoder(**kw).eval()
        vocab = model.tokens.num_embeddings
        return model, (torch.randint(0, vocab, (batch, seq)),)
    return make


def _mlp(batch: int = 1):
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(batch, 1024),)


MODELS: dict[str, Callable[[int], tuple]] = {
    "resnet18": _torchvision("resnet18", 224),
    "resnet50": _torchvision("resnet50", 224),
    "mobilenet_v2": _torchvision("mobilenet_v2", 224),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", 224),
    "efficientnet_b0": _torchvision("efficientnet_b0", 224),
    "bert_base": _bert(seq=128),
    "bert_tiny": _bert(vocab=1000, hidden=128, layers=2, heads=2, ffn=512, seq=32),
    "mlp": _mlp,
}


def get_model(name: str, batch: int = 1) -> tuple[nn.Module, tuple]:
    """(model in eval mode with random weights, example inputs) for a bundled model name."""
    try:
        return MODELS[name](batch)
    except KeyError:
        from .errors import GraphoptError

        raise GraphoptError(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}") from None
