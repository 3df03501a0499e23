"""Fused requantize epilogues: int8 layer -> int8 layer with no float32 tensor in memory between them.

A statically quantized graph reaches the lowering as
    qconv2d / qlinear (int32 -> float32) -> [ReLU | ReLU6 | clamp | GELU]* -> [max-pool] -> [flatten] -> quantize
    -> the next qconv2d / qlinear.
Unfused, that is an int8 kernel writing float32, an elementwise kernel (activation, quantize, then the next
conv's NHWC permute and zero-point padding), and a float pooling kernel: three launches and two tensors
through memory per layer (at batch 1 on the digits CNN, 13 kernels for 5 layers; the launches, not the
arithmetic, were most of the time). This module finds those chains in the exported ATen graph (plan) and
lowers each to ONE kernel whose epilogue (quant_epilogue.Epilogue) applies the activation and the quantize
to the int32 accumulators in registers and stores the codes exactly as the next int8 kernel reads them:

  next op a Conv2d (groups=1)   NHWC, already padded with the zero point by that conv's padding, channels to
                                a multiple of 4: the consumer's permute/pad kernel disappears
  max-pool in between           the pool runs on the uint8/int8 codes (pool_kernel: NHWC, 1-byte reads,
                                writing the next conv's padded input); exact, because quantize and the
                                activations are monotone non-decreasing: quantize(max(x)) = max(quantize(x))
                                (not after a GELU, which is not: such a chain is not fused)
  flatten then a Linear         NHWC codes; the Linear's weight columns are permuted to (h, w, c) order at
                                build time, so the flatten is free
  next op a Linear              [M, N] codes
  anything else                 NHWC / [M, N] codes and a Relax view in the graph's layout for the other
                                consumers (slice/permute; dead code, so removed, when nothing reads it)
Residual blocks (conv producers with groups=1) extend the chain:
    qconv2d -> add(·, residual) -> acts -> quantize          ResNet: add(conv2, identity) -> ReLU
with the residual a float32 tensor computed earlier (the other operand; of two int8 convs, e.g. conv2 and a
downsample, the later one absorbs the add). The kernel reads the residual NHWC (the raw output of an unfused
int8 conv, or the float output of a previous fused residual kernel, as they are: no permute kernel; any other
tensor is permuted by Relax) and adds it to the dequantized accumulator before the activations. When the
float32 value before the quantize (the producer's output, or the sum after its activations) has other users
(the next block's residual add; MobileNetV2's project conv read by the next expand conv and the next add),
the kernel also stores it, float32 NHWC with whole-vector channels (FuseState.float_nhwc), and the graph
sees an NCHW view of it (dead code when only int8 kernels read it).
A max-pool whose float32 output other ops read too (ResNet's stem: conv -> ReLU -> max-pool, the pool output
being the first block's identity and, quantized, its first conv's input): the conv stores float32 NHWC with
the activations applied, the pool kernel (pool_kernel with `codes`) pools it and stores the pooled float32
NHWC and its codes in the next conv's layout.
Depthwise convs (quant_lower's depthwise kernel) fuse acts -> quantize the same way (MobileNetV2's
depthwise -> ReLU6 -> quantize -> project conv).
The sdot path multiplies int8 activations: its kernels store codes shifted by -128 (Epilogue.shift), the x86
kernels shift int8 codes by +128 the same way, so no conversion kernel runs between layers either.

Contract: exact. Every stored code equals what the unfused kernels compute (same float32 operations in the
same order: dequantize epilogue, the residual add, each activation's max/min, round(x * float32(1/scale)) + zp, clamp; see
quant_epilogue); tests/quant/test_fused_epilogue.py compares fused and unfused builds bit for bit. A chain
that does not have this shape (a tensor with several users, another op in between, a float consumer) is
left to the unfused lowering, which stays correct.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .quant_epilogue import Epilogue
from .tir_script import prim_func

__all__ = ["FusePlan", "KernelInput", "plan_fusions", "absorbed_converters", "pool_kernel"]

_ACT_OPS = ("relu.default", "relu_.default", "relu6.default", "relu6_.default", "hardtanh.default",
            "hardtanh_.default", "clamp.default")
_POOL_OPS = ("max_pool2d_with_indices.default", "max_pool2d.default")
_FLATTEN_OPS = ("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints")


def _op(node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else ""


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _act_bounds(node) -> tuple | None:
    """(lo, hi) of a ReLU / ReLU6 / hardtanh / clamp node with constant bounds (None: unbounded), else None."""
    name, args, kw = _op(node), node.args, node.kwargs
    if name.startswith("relu6"):
        return (0.0, 6.0)
    if name.startswith("relu"):
        return (0.0, None)
    if name.startswith("hardtanh"):
        lo = args[1] if len(args) > 1 else kw.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kw.get("max_val", 1.0)
        return (_num(lo), _num(hi)) if _num(lo) is not None and _num(hi) is not None else None
    if name == "clamp.default":
        lo = args[1] if len(args) > 1 else kw.get("min")
        hi = args[2] if len(args) > 2 else kw.get("max")
        if (lo is not None and _num(lo) is None) or (hi is not None and _num(hi) is None) or lo is hi is None:
            return None
        return (_num(lo), _num(hi))
    return None


def _shape_of(node) -> tuple | None:
    """The node's static shape; None when unknown or symbolic (a dynamic dim). Never int() a torch SymInt:
    that specializes it in the export's ShapeEnv, and the importer then builds a static model input."""
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if val is None or not hasattr(val, "shape") or not all(isinstance(s, int) for s in val.shape):
        return None
    return tuple(val.shape)


@dataclass
class FusePlan:
    """One fused chain: producer (qconv2d / qlinear) -> acts -> [pool] -> [flatten] -> quantize."""

    producer: Any
    quantize: Any
    acts: tuple
    absorbed: list                  # every node after the producer, up to and including the quantize
    pool: dict | None = None        # kernel, stride, padding, dilation of a max-pool on the codes
    flatten: tuple | None = None    # (C, H, W) of an NCHW -> [N, C·H·W] flatten
    consumer: tuple | None = None   # ("conv", (ph, pw)) | ("linear",) | None
    residual: Any = None            # the other operand of a residual add(producer, residual), a float32 node
    float_out: Any = None           # the node (producer, add or last act) whose float32 value other ops read


@dataclass
class KernelInput:
    """Codes written by a fused producer in the layout an int8 kernel reads (see the module docstring)."""

    var: Any                        # Relax var
    dtype: str                      # uint8 | int8 (already shifted for the consumer's kernel)
    zp: int                         # zero point of these codes (shift included)
    layout: tuple                   # ("nhwc", (ph, pw)) | ("flat_nhwc", (C, H, W)) | ("plain",)


LINEAR_OPS = ("qlinear.default", "sparse_qlinear.default")   # same arguments 0-4; sparse: graphopt.quant.sparse


def plan_fusions(ep, path: str) -> dict:
    """{producer node: FusePlan} for the exported program `ep` on int8 path `path` (no plan on 'relax')."""
    if path == "relax":
        return {}
    plans = {}
    order = {node: i for i, node in enumerate(ep.graph.nodes)}
    for node in ep.graph.nodes:
        name = _op(node)
        if name == "qconv2d.default" and _depthwise(node):
            plan = _plan_chain(node, is_conv=False)         # acts -> quantize into the depthwise kernel
            if plan is not None:
                plans[node] = plan
        elif name in LINEAR_OPS or (name == "qconv2d.default" and _conv_fusable(node)):
            plan = _plan_chain(node, is_conv=name == "qconv2d.default", order=order)
            if plan is not None:
                plans[node] = plan
    return plans


def _depthwise(node) -> bool:
    """A qconv2d that quant_lower runs on its depthwise kernel: groups == in == out channels, one input channel
    per filter, static shapes."""
    groups = int(node.args[8])
    x, w, y = _shape_of(node.args[0]), _shape_of(node.args[1]), _shape_of(node)
    return (groups > 1 and x is not None and w is not None and y is not None and len(x) == 4 and len(w) == 4
            and x[1] == groups == w[0] == y[1] and w[1] == 1)


def _conv_fusable(node) -> bool:
    """Producers conv_kernel handles: groups == 1 (depthwise and grouped convs keep their own kernels)."""
    return int(node.args[8]) == 1


def _plan_chain(producer, is_conv: bool, order: dict | None = None) -> FusePlan | None:
    acts, absorbed = [], []
    pool = flatten = residual = None
    cur = producer
    while True:
        if len(cur.users) != 1:
            # the float32 value is read by other ops too (a residual add): a conv producer stores it as a second
            # output when one of the users is the quantize that ends the chain
            # (after a max-pool: the pooled float32, e.g. ResNet's stem, whose pool output is also the first
            # block's identity)
            q = _float_out_quantize(cur) if is_conv and flatten is None and (pool is None or acts_at_pool == len(acts)) \
                else None
            if q is None:
                return None
            absorbed.append(q)
            return FusePlan(producer, q, tuple(acts), absorbed, pool, None, _consumer(q, None), residual, cur)
        user = next(iter(cur.users))
        if _op(user) == "add.Tensor" and is_conv and residual is None and not acts and pool is None \
                and flatten is None:
            residual = _residual_operand(user, cur, producer, order or {})
            if residual is None:
                return None
            absorbed.append(user)
            cur = user
            continue
        if not user.args or user.args[0] is not cur:
            return None
        name = _op(user)
        if residual is not None and (name in _POOL_OPS or name in _FLATTEN_OPS):
            return None
        if name in _ACT_OPS:
            bounds = _act_bounds(user)
            if bounds is None:
                return None
            acts.append(bounds)
        elif name == "gelu.default" and pool is None and flatten is None:
            approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
            if approximate not in ("none", "tanh"):
                return None
            acts.append(("gelu", approximate))      # a transformer's FFN: Linear -> GELU -> quantize
        elif name in _POOL_OPS and is_conv and pool is None and flatten is None \
                and not any(a[0] == "gelu" for a in acts):     # pooling codes needs monotone acts
            pool = _pool_args(user)
            acts_at_pool = len(acts)                    # a float output after the pool: no act after it
            if pool is None:
                return None
            if name == "max_pool2d_with_indices.default":     # the values (getitem 0) only, never the indices
                if len(user.users) != 1:
                    return None
                getter = next(iter(user.users))
                if _op(getter) != "getitem" and getattr(getter.target, "__name__", "") != "getitem":
                    return None
                if getter.args[1] != 0:
                    return None
                absorbed.append(user)
                user = getter
        elif name in _FLATTEN_OPS and is_conv and flatten is None:
            src, dst = _shape_of(cur), _shape_of(user)
            if src is None or dst is None or len(src) != 4 or dst != (src[0], src[1] * src[2] * src[3]):
                return None
            flatten = src[1:]
        elif name == "quantize.default":
            absorbed.append(user)
            return FusePlan(producer, user, tuple(acts), absorbed, pool, flatten, _consumer(user, flatten),
                            residual)
        else:
            return None
        absorbed.append(user)
        cur = user


def _float_out_quantize(node):
    """The quantize among `node`'s users when its other users read the float32 value (every user takes it as
    an argument; one quantize of it), else None."""
    qs = [u for u in node.users if _op(u) == "quantize.default" and u.args and u.args[0] is node]
    if len(qs) != 1 or _float32_shape(node) is None:
        return None
    return qs[0]


def _float32_shape(node) -> tuple | None:
    """The shape of a 4-d float32 node (from its export metadata), else None."""
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if val is None or not hasattr(val, "dtype") or str(val.dtype) != "torch.float32":
        return None
    shape = _shape_of(node)
    return shape if shape is not None and len(shape) == 4 else None


def _residual_operand(add, cur, producer, order: dict):
    """The other operand of add.Tensor(cur, other) (either order; alpha 1) when the producer's kernel can read
    it as its residual input: a float32 tensor of the same 4-d shape, computed before the producer in graph
    order (the lowering converts nodes in that order, so it exists when the fused kernel is emitted)."""
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    other = b if a is cur else a if b is cur else None
    if other is None or other is cur or not hasattr(other, "op"):
        return None
    shape = _float32_shape(cur)
    if shape is None or _float32_shape(other) != shape or _float32_shape(add) != shape:
        return None
    if other not in order or producer not in order or order[other] >= order[producer]:
        return None
    return other


def _pool_args(node) -> dict | None:
    """kernel/stride/padding/dilation of a max_pool2d node (ceil_mode False), else None."""
    args = list(node.args) + [None] * 6

    def pair(v, default):
        v = default if v is None or (isinstance(v, (list, tuple)) and len(v) == 0) else v
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return (int(v[0]), int(v[-1]))

    kw = node.kwargs
    kernel = pair(args[1], None)
    stride = pair(args[2] if args[2] is not None else kw.get("stride"), kernel)
    padding = pair(args[3] if args[3] is not None else kw.get("padding"), 0)
    dilation = pair(args[4] if args[4] is not None else kw.get("dilation"), 1)
    ceil = args[5] if args[5] is not None else kw.get("ceil_mode", False)
    if ceil:
        return None
    return dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)


def _consumer(q, flatten) -> tuple | None:
    """How the quantize's int8 consumer reads it, or None (a float op, several users of different kinds).
    Several int8 convs (groups=1; ResNet's downsampling block: its 3x3 conv and its 1x1 downsample) read
    codes padded for the widest (each reads at its own offset)."""
    if len(q.users) > 1 and flatten is None and all(
            _op(u) == "qconv2d.default" and u.args and u.args[0] is q and int(u.args[8]) == 1 for u in q.users):
        pads = [(int(u.args[6][0]), int(u.args[6][-1])) for u in q.users]
        return ("conv", (max(p[0] for p in pads), max(p[1] for p in pads)))
    if len(q.users) != 1:
        return None
    user = next(iter(q.users))
    if not user.args or user.args[0] is not q:
        return None
    if _op(user) == "qconv2d.default" and flatten is None and int(user.args[8]) == 1:
        return ("conv", (int(user.args[6][0]), int(user.args[6][-1])))
    shape = _shape_of(q)
    if (_op(user) == "qconv2d.default" and flatten is None and shape is not None and len(shape) == 4
            and int(user.args[8]) == shape[1] and int(user.args[8]) > 1):
        # a depthwise conv (one filter per channel; quant_lower's depthwise kernel reads NHWC uint8 codes
        # padded spatially with the zero point and to whole 16-channel blocks)
        return ("dwconv", (int(user.args[6][0]), int(user.args[6][-1])))
    if _op(user) in LINEAR_OPS:
        return ("linear",)
    return None


# --------------------------------------------------------------------------------------- emission
def requant_epilogue(plan: FusePlan, want: str) -> tuple[Epilogue, str, int]:
    """(epilogue, stored dtype, stored zero point) of a plan whose consumer kernel reads `want` codes."""
    from graphopt.quant.ops import inv_scale_of

    scale, zp, qmin, qmax = plan.quantize.args[1:5]
    qdtype = "uint8" if qmin >= 0 else "int8"
    shift = 0 if qdtype == want else (128 if want == "uint8" else -128)
    epi = Epilogue(want, plan.acts, inv_scale_of(scale), int(zp), int(qmin), int(qmax), shift)
    return epi, want, int(zp) + shift


def graph_view(bb, plan: FusePlan, ki: KernelInput, shape_nchw: tuple | None, lead: list | None = None):
    """The quantize node's value in the graph's own layout and dtype, from the fused codes (Relax ops that
    dead-code elimination removes when only the fused consumer reads the codes)."""
    from tvm import relax

    R = relax.op
    y = ki.var
    if ki.layout[0] == "plain":
        n = int(y.ty.shape[-1])
        y = R.reshape(y, [*lead, n])
    else:
        n_, h_, w_, _ = [int(s) for s in y.ty.shape]
        c, h, w = shape_nchw[1:]
        ph = (h_ - h) // 2 if ki.layout[0] == "nhwc" else 0
        pw = (w_ - w) // 2 if ki.layout[0] == "nhwc" else 0
        y = R.strided_slice(y, axes=[1, 2, 3], begin=[ph, pw, 0], end=[ph + h, pw + w, c])
        y = R.permute_dims(y, [0, 3, 1, 2])
        if plan.flatten is not None:
            y = R.reshape(y, [n_, c * h * w])
    qmin = plan.quantize.args[3]
    qdtype = "uint8" if qmin >= 0 else "int8"
    if ki.dtype != qdtype:
        shift = ki.zp - int(plan.quantize.args[2])
        y = R.astype(R.subtract(R.astype(y, "int16"), relax.const(shift, "int16")), qdtype)
    return bb.emit(y)


def pool_kernel(N: int, H: int, W: int, C: int, pool: dict, OH: int, OW: int, dtype: str,
                out_pad: tuple[int, int], fill: int, codes: Epilogue | None = None, c_codes: int = 0,
                codes_pad: tuple[int, int] = (0, 0)):
    """TIR: max-pool of NHWC int8/uint8 codes X[N, H, W, C] into Y[N, OH + 2ph, OW + 2pw, C] (out_pad = the
    next conv's padding, its border = `fill`). Lo[0] (an input, a one-element tensor) is where each max
    starts: the lowest code, so pool padding never wins over a real element, as PyTorch's -inf padding.

    Float pool with codes (`codes`, a quantize-only Epilogue; dtype float32, Lo = -inf): the pooled float32
    values go to Y (read by other ops: ResNet's stem pool is the first block's identity) and their quantize to
    a second output Q[N, OH + 2qh, OW + 2qw, c_codes] (codes_pad: the next conv's padding, border = its zero
    point), as the next int8 conv reads it."""
    from tvm.script import tirx as T

    (kh, kw), (sh, sw) = pool["kernel"], pool["stride"]
    (pph, ppw), (dh, dw) = pool["padding"], pool["dilation"]
    ph, pw = out_pad
    OHs, OWs = OH + 2 * ph, OW + 2 * pw
    padded = bool(ph or pw)
    guarded = bool(pph or ppw)
    with_codes = codes is not None
    qh, qw = codes_pad
    NQ = max(c_codes, 1)
    QH, QW = OH + 2 * qh, OW + 2 * qw
    q_padded = with_codes and bool(qh or qw)
    q_dtype = codes.dtype if with_codes else "uint8"
    q_fill = codes.zp + codes.shift if with_codes else 0
    V = 1
    while V < 64 and C % (V * 2) == 0 and (not with_codes or c_codes % (V * 2) == 0):
        V *= 2
    CV = C // V
    par = T.parallel if N * OH * OW * C * kh * kw >= (1 << 18) else T.serial

    @prim_func
    def qpool(X: T.Buffer((N, H, W, C), dtype), Lo: T.Buffer((1,), dtype), Y: T.Buffer((N, OHs, OWs, C), dtype),
              Q: T.Buffer((N, QH, QW, NQ), q_dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        if padded:
            for n, h, w in T.grid(N, OHs, OWs):
                if h < ph or h >= OH + ph or w < pw or w >= OW + pw:
                    for c in range(C):
                        Y[n, h, w, c] = T.Cast(dtype, fill)
        if q_padded:
            for n, h, w in T.grid(N, QH, QW):
                if h < qh or h >= OH + qh or w < qw or w >= OW + qw:
                    for c in range(NQ):
                        Q[n, h, w, c] = T.Cast(q_dtype, q_fill)
        for row in par(N * OH):
            for ow in range(OW):
                for cv in range(CV):
                    acc = T.decl_buffer((V,), dtype)
                    for c in T.vectorized(V):
                        acc[c] = Lo[0]
                    for i in T.unroll(kh):
                        for j in T.unroll(kw):
                            if guarded:
                                if 0 <= (row % OH) * sh - pph + i * dh < H and 0 <= ow * sw - ppw + j * dw < W:
                                    for c in T.vectorized(V):
                                        acc[c] = T.max(acc[c], X[row // OH, (row % OH) * sh - pph + i * dh,
                                                                 ow * sw - ppw + j * dw, cv * V + c])
                            else:
                                for c in T.vectorized(V):
                                    acc[c] = T.max(acc[c], X[row // OH, (row % OH) * sh + i * dh, ow * sw + j * dw,
                                                             cv * V + c])
                    for c in T.vectorized(V):
                        Y[row // OH, row % OH + ph, ow + pw, cv * V + c] = acc[c]
                    if with_codes:
                        if cv * V < NQ:
                            for c in T.vectorized(V):
                                Q[row // OH, row % OH + qh, ow + qw, cv * V + c] = codes.codes(acc[c])
    if with_codes:
        return qpool
    from tvm import tirx

    return tirx.PrimFunc(list(qpool.params)[:3], qpool.body, qpool.ret_type, qpool.attrs)


# --------------------------------------------------------------------------------- absorbed nodes
def absorbed_converters(st, ep) -> dict:
    """Converters for the ATen ops of absorbed nodes (activations, pools, getitem, flatten): an absorbed node
    returns the value its fused producer recorded; any other node of the same op converts as usual."""
    names = {_op(n) if _op(n) else getattr(n.target, "__name__", "") for plan in st.plans.values()
             for n in plan.absorbed}
    names.discard("quantize.default")          # quant_lower's own converter handles it
    out = {}
    for name in names:
        out[name] = _passthrough(st, name)
    return out


def _passthrough(st, name: str):
    def convert(node, importer):
        if node in st.absorbed_values:
            return st.absorbed_values[node]
        return _default_converter(importer, name)(node)
    return convert


def _default_converter(importer, name: str):
    cache = importer.__dict__.setdefault("_graphopt_default_converters", {})
    if not cache:
        cache.update(type(importer).create_convert_map(importer))
    return cache[name]


@dataclass
class FuseState:
    plans: dict = field(default_factory=dict)
    kernel_inputs: dict = field(default_factory=dict)       # quantize node -> KernelInput
    absorbed_values: dict = field(default_factory=dict)     # absorbed node -> its Relax value
    float_nhwc: dict = field(default_factory=dict)          # node -> its float32 value as a kernel stored it:
                                                            # NHWC [N, H, W, C'] (C' >= C, whole vectors)


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def permute_flat_weight(wq: np.ndarray, chw: tuple) -> np.ndarray:
    """Linear weight [N, C·H·W] (NCHW flatten order) -> [N, H·W·C] (NHWC order)."""
    c, h, w = chw
    return np.ascontiguousarray(wq.reshape(wq.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(wq.shape[0], -1))
