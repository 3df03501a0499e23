"""Seeded random networks for fuzzing the passes and the backend.

`random_model(seed)` builds a small eval-mode nn.Module and example inputs from one seed, the same on every
machine. It mixes what the passes and the lowering must handle together: plain, strided, dilated, depthwise
(with a channel multiplier) and grouped convs, Linear layers, residual adds, concat of branches, split/chunk
of channels, BatchNorm/GroupNorm/LayerNorm, squeeze-excite gating, pooling, nn.MultiheadAttention and
hand-written attention through F.scaled_dot_product_attention (causal or not), a dozen activations, random
channel counts and spatial sizes that are rarely multiples of anything, one or two outputs. Every model is
symbolically traceable and gives finite outputs on its inputs (BatchNorm statistics are randomized so fold_bn
has something to fold). `describe` is a one-line summary of the layers, for reports. `idioms=True` writes
some of the same layers the way Python code often does (in-place activations, keyword calls, a block applied
twice), which the capture and the passes must read as the same computation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RandomModel", "random_model", "without_idioms", "randomize_norms", "ACTIVATIONS", "INPLACE"]

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "mish": nn.Mish,
    "softplus": nn.Softplus, "identity": nn.Identity,
}


@dataclass
class RandomModel:
    seed: int
    model: nn.Module
    inputs: tuple
    describe: str

    def fresh_inputs(self, seed: int = 1, shape: tuple | None = None) -> tuple:
        """Inputs of the same shapes as `inputs` (or the one input at `shape`), drawn anew (to check on data the
        compiler never saw)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + seed)
        return tuple(torch.randn(shape or x.shape, generator=g) for x in self.inputs)


# ------------------------------------------------------------------------------------------------- blocks
# activations as in-place ops (idioms): a Tensor method, or F.<name>(y, inplace=True) (extra positional args)
INPLACE = {"relu": ("relu_",), "sigmoid": ("sigmoid_",), "tanh": ("tanh_",), "relu6": ("F.relu6",),
           "silu": ("F.silu",), "hardswish": ("F.hardswish",), "hardsigmoid": ("F.hardsigmoid",), "elu": ("F.elu", 1.0),
           "leaky_relu": ("F.leaky_relu", 0.1), "mish": ("F.mish",)}


class ConvBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None, act: nn.Module, inplace: tuple | None = None,
                 keyword: bool = False):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm or nn.Identity(), act
        self.inplace, self.keyword = inplace, keyword

    def forward(self, x):
        y = self.norm(self.conv(input=x) if self.keyword else self.conv(x))
        if self.inplace is None:
            return self.act(y)
        name, *extra = self.inplace
        if name.startswith("F."):
            getattr(F, name[2:])(y, *extra, inplace=True)         # result unused: y itself changes
        else:
            getattr(y, name)()
        return y


class Residual(nn.Module):
    def __init__(self, body: nn.Module, post: nn.Module):
        super().__init__()
        self.body, self.post = body, post

    def forward(self, x):
        return self.post(x + self.body(x))


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, dim: int = 1):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=self.dim)


class SplitProcess(nn.Module):
    """Split channels (torch.split with uneven sizes, or chunk), process each part, concatenate."""

    def __init__(self, sizes: list[int], parts: list[nn.Module], use_chunk: bool, dim: int = 1):
        super().__init__()
        self.sizes, self.parts, self.use_chunk, self.dim = sizes, nn.ModuleList(parts), use_chunk, dim

    def forward(self, x):
        pieces = x.chunk(len(self.sizes), dim=self.dim) if self.use_chunk else torch.split(x, self.sizes,
                                                                                          dim=self.dim)
        return torch.cat([p(pieces[i]) for i, p in enumerate(self.parts)], dim=self.dim)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int, use_linear: bool):
        super().__init__()
        self.use_linear = use_linear
        if use_linear:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        if self.use_linear:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class ToSequence(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class SeqNorm(nn.Module):
    """LayerNorm over features, or BatchNorm1d over features (transposed around it)."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(d) if kind == "ln" else nn.BatchNorm1d(d)

    def forward(self, x):
        if self.kind == "ln":
            return self.norm(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class MHABlock(nn.Module):
    def __init__(self, d: int, heads: int, pre_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return x + out


class SDPABlock(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, causal: bool, fused_qkv: bool):
        super().__init__()
        self.heads, self.head_dim, self.causal, self.fused = heads, head_dim, causal, fused_qkv
        inner = heads * head_dim
        if fused_qkv:
            self.qkv = nn.Linear(d, 3 * inner)
        else:
            self.q, self.k, self.v = nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner)
        self.out = nn.Linear(inner, d)

    def forward(self, x):
        n, l = x.shape[0], x.shape[1]
        if self.fused:
            qkv = self.qkv(x).chunk(3, dim=-1)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.reshape(n, l, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.out(y.transpose(1, 2).reshape(n, l, self.heads * self.head_dim))


class MLPBlock(nn.Module):
    def __init__(self, d: int, hidden: int, act: nn.Module):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), act, nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: nn.Module, aux: bool):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.aux = aux

    def forward(self, x):
        feats = self.blocks(x)
        y = self.head(feats)
        if self.aux:
            return y, feats
        return y


class ImageHead(nn.Module):
    def __init__(self, kind: str, c: int, h: int, w: int, classes: int):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(c if kind == "gap" else c * h * w, classes) if kind != "conv" else nn.Conv2d(
            c, classes, 1)

    def forward(self, x):
        if self.kind == "gap":
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        if self.kind == "flatten":
            return self.fc(torch.flatten(x, 1))
        return self.fc(x)


class SeqHead(nn.Module):
    def __init__(self, kind: str, d: int, classes: int):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(d, classes)

    def forward(self, x):
        if self.kind == "mean":
            return self.fc(x.mean(dim=1))
        if self.kind == "first":
            return self.fc(x[:, 0])
        return self.fc(x)


# ---------------------------------------------------------------------------------------------- generator
class _Gen:
    def __init__(self, seed: int, idioms: bool = False):
        self.r = random.Random(seed)
        # idioms draw from their own stream: the layers, sizes and weights stay those of random_model(seed)
        self.idioms = random.Random(seed * 104729 + 17) if idioms else None
        self.parts: list[str] = []

    def idiom(self, p: float) -> bool:
        return self.idioms is not None and self.idioms.random() < p

    def act(self) -> tuple[nn.Module, str]:
        name = self.r.choice(list(ACTIVATIONS))
        return ACTIVATIONS[name](), name

    def channels(self, lo=3, hi=40) -> int:
        return self.r.randint(lo, hi)

    # image -> image: returns (module, c, h, w, text)
    def conv(self, c, h, w, *, keep_shape=False, cout=None):
        r = self.r
        k = r.choice([1, 3, 3, 5]) if not keep_shape else r.choice([1, 3])
        dil = r.choice([1, 1, 2]) if k > 1 and min(h, w) > 2 * k else 1
        stride = 1 if keep_shape or min(h, w) < 6 else r.choice([1, 1, 2])
        pad = dil * (k // 2) if keep_shape or r.random() < 0.8 else 0
        kind = r.choice(["plain", "plain", "depthwise", "grouped"])
        groups = 1
        if cout is None:
            cout = c if keep_shape else self.channels()
        if kind == "depthwise" and (not keep_shape or cout == c):
            mult = 1 if keep_shape else r.choice([1, 1, 2])
            groups, cout = c, c * mult
        elif kind == "grouped":
            gs = [g for g in (2, 3, 4) if c % g == 0 and cout % g == 0]
            if gs:
                groups = r.choice(gs)
        conv = nn.Conv2d(c, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=r.random() < 0.5)
        oh = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
        ow = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if oh < 1 or ow < 1:
            conv = nn.Conv2d(c, cout, 1, groups=groups)
            oh, ow = h, w
        norm_kind = r.choice(["bn", "bn", "gn", "none"])
        norm = None
        if norm_kind == "bn":
            norm = nn.BatchNorm2d(cout)
        elif norm_kind == "gn":
            ng = r.choice([g for g in (1, 2, 4, cout) if cout % g == 0])
            norm = nn.GroupNorm(ng, cout)
        act, aname = self.act()
        inplace = INPLACE[aname] if aname in INPLACE and self.idiom(0.5) else None
        keyword = self.idiom(0.3)
        text = (f"conv{k}x{k}({c}->{cout}" + (f",s{stride}" if stride > 1 else "") + (f",d{dil}" if dil > 1 else "")
                + (f",g{groups}" if groups > 1 else "") + (",p0" if pad == 0 and k > 1 else "") + ")"
                + ("[input=]" if keyword else "") + (f"+{norm_kind}" if norm is not None else "") + f"+{aname}"
                + ("[in-place]" if inplace else ""))
        return ConvBlock(conv, norm, act, inplace, keyword), cout, oh, ow, text

    def image_block(self, c, h, w):
        r = self.r
        choice = r.choices(["conv", "residual", "concat", "split", "pool", "se"], [4, 3, 2, 2, 1, 1])[0]
        if choice == "conv":
            return self.conv(c, h, w)
        if choice == "residual":
            n = r.choice([1, 2])
            body, texts = [], []
            for _ in range(n):
                m, _, _, _, t = self.conv(c, h, w, keep_shape=True)
                body.append(m)
                texts.append(t)
            if n == 2 and self.idiom(0.5):             # one block applied twice (the second one is not used)
                body[1], texts[1] = body[0], "(same)"
            post, pname = self.act()
            return Residual(nn.Sequential(*body), post), c, h, w, f"res[{' ; '.join(texts)}]+{pname}"
        if choice == "concat":
            a, ca, ha, wa, ta = self.conv(c, h, w, keep_shape=True, cout=self.channels(2, 24))
            b, cb, hb, wb, tb = self.conv(c, h, w, keep_shape=True, cout=self.channels(2, 24))
            return Concat(a, b), ca + cb, h, w, f"cat[{ta} | {tb}]"
        if choice == "split" and c >= 2:
            use_chunk = r.random() < 0.5 and c % 2 == 0
            first = c // 2 if use_chunk else r.randint(1, c - 1)
            sizes = [first, c - first]
            parts, texts, cout = [], [], 0
            for s in sizes:
                m, co, _, _, t = self.conv(s, h, w, keep_shape=True, cout=self.channels(2, 20))
                parts.append(m)
                texts.append(t)
                cout += co
            return (SplitProcess(sizes, parts, use_chunk), cout, h, w,
                    f"{'chunk' if use_chunk else 'split'}{sizes}[{' | '.join(texts)}]")
        if choice == "pool" and min(h, w) >= 4:
            kind = r.choice(["max", "avg"])
            pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)
            return pool, c, h // 2, w // 2, f"{kind}pool2"
        if choice == "se" and c >= 4:
            use_linear = r.random() < 0.5
            return SqueezeExcite(c, max(2, c // 4), use_linear), c, h, w, f"se({'linear' if use_linear else 'conv'})"
        return self.conv(c, h, w)

    def seq_block(self, d):
        r = self.r
        choice = r.choices(["linear", "norm", "mha", "sdpa", "mlp"], [2, 1, 2, 2, 2])[0]
        if choice == "linear":
            out = r.randint(4, 48)
            act, aname = self.act()
            return nn.Sequential(nn.Linear(d, out, bias=r.random() < 0.8), act), out, f"linear({d}->{out})+{aname}"
        if choice == "norm":
            kind = r.choice(["ln", "ln", "bn"])
            return SeqNorm(d, kind), d, kind
        if choice == "mha":
            heads = r.choice([h for h in (1, 2, 4, 8) if d % h == 0])
            pre = r.random() < 0.5
            return MHABlock(d, heads, pre), d, f"mha(d={d},h={heads}{',prenorm' if pre else ''})"
        if choice == "sdpa":
            heads, hd = r.choice([1, 2, 4]), r.choice([4, 8, 12, 16])
            causal, fused = r.random() < 0.4, r.random() < 0.5
            return (SDPABlock(d, heads, hd, causal, fused), d,
                    f"sdpa(h={heads},hd={hd}{',causal' if causal else ''}{',fused_qkv' if fused else ''})")
        act, aname = self.act()
        hidden = r.randint(8, 64)
        return MLPBlock(d, hidden, act), d, f"mlp({d}->{hidden})+{aname}"


def random_model(seed: int, *, max_blocks: int = 6, idioms: bool = False) -> RandomModel:
    """A random network and example inputs (batch 1 or 2), both determined by `seed`. With `idioms`, the same
    layers written as Python code also writes them: activations in place (`y.relu_()`, `F.silu(y,
    inplace=True)`), convs called with keywords (`self.conv(input=x)`), one residual conv block applied twice."""
    g = _Gen(seed, idioms)
    r = g.r
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    texts: list[str] = []
    batch = r.choice([1, 2])
    classes = r.randint(2, 12)
    start = r.choices(["image", "sequence"], [3, 1])[0]
    n_blocks = r.randint(2, max_blocks)
    if start == "image":
        c, h, w = r.choice([1, 3, 4]), r.randint(6, 20), r.randint(6, 20)
        x = torch.randn(batch, c, h, w)
        mode = "image"
        texts.append(f"in{(batch, c, h, w)}")
        to_seq_at = r.randint(1, n_blocks) if r.random() < 0.3 else None
    else:
        l, d = r.randint(3, 16), r.choice([8, 12, 16, 24, 32])
        x = torch.randn(batch, l, d)
        mode = "sequence"
        texts.append(f"in{(batch, l, d)}")
        to_seq_at = None
    for i in range(n_blocks):
        if mode == "image" and to_seq_at == i and h * w <= 64:
            blocks.append(ToSequence())
            texts.append("to_seq")
            mode, d = "sequence", c
            if d % 2:                                     # attention wants an even width: project first
                blocks.append(nn.Linear(d, d + 1))
                texts.append(f"linear({d}->{d + 1})")
                d += 1
        if mode == "image":
            m, c, h, w, t = g.image_block(c, h, w)
        else:
            m, d, t = g.seq_block(d)
        blocks.append(m)
        texts.append(t)
    aux = r.random() < 0.15
    if mode == "image":
        kind = r.choice(["gap", "gap", "flatten", "conv"]) if c * h * w <= 4096 else "gap"
        head = ImageHead(kind, c, h, w, classes)
    else:
        kind = r.choice(["mean", "first", "tokens"])
        head = SeqHead(kind, d, classes)
    texts.append(f"head:{kind}({classes})" + ("+aux" if aux else ""))
    model = Net(blocks, head, aux).eval()
    randomize_norms(model, seed)
    return RandomModel(seed, model, (x,), " -> ".join(texts))


def without_idioms(model: nn.Module) -> nn.Module:
    """A copy of a random_model(..., idioms=True) network written plainly: every block applied twice copied
    (same weights), activations out of place, positional calls. It computes exactly what `model` does; a pass
    must treat the two alike (a differential check of capture and of every per-layer analysis)."""
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, Residual) and isinstance(m.body, nn.Sequential):
            for i in range(1, len(m.body)):
                if any(m.body[i] is m.body[j] for j in range(i)):
                    m.body[i] = copy.deepcopy(m.body[i])
        if isinstance(m, ConvBlock):
            m.inplace, m.keyword = None, False
    return twin


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and every BN/GN/LN random affine parameters (fresh
    ones are the identity, which would hide what fold_bn and the norm lowerings get wrong)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model
