"""Lowering of ``torch.ops.graphopt_sparse.sparse_linear`` / ``sparse_conv2d`` (the sparsify pass's SparseLinear
and SparseConv2d) to TVM.

Per layer, one of two implementations, chosen by the layer's `kernel` argument:
  sparse   the block-sparse kernel (sparse_kernels.py): weight stored as BSR values + uint16 block indices;
           or, when the layer's mask is N:M (exactly n kept in every m consecutive inputs of every row,
           the sparsify pass's pattern=2:4 / 4:8; found from the mask, m in 4, 8, 16), the N:M kernel
           (nm_kernels.py): values [N, K·n/m] interleaved by output-row tiles + 2- or 4-bit in-group
           positions, on x86 one vpermps per kept position. A conv (groups=1) runs as im2col in Relax
           ([N·OH·OW, C·KH·KW] patches; a 1x1 stride-1 conv is just an NHWC view) followed by the kernel,
           then back to NCHW
  dense    R.matmul / R.nn.conv2d with the masked weight as a dense constant (what nn.Linear / nn.Conv2d lower
           to; the build's default schedules apply). Grouped convs always run dense.
  auto     measured: both are built for this layer's exact shape (M rows, K, N, block, density) on the target
           and timed interleaved on this machine (TVM time_evaluator; the fastest of `rounds` x 10 single calls,
           since on a shared machine other load only ever adds time); the sparse kernel is
           used only when it is faster. Targets that cannot run here (cross builds) stay dense, noted.
Measurements are cached per process by (target, M, K, N, block, density to 1%).

The decision per layer, the timings, and the stored weight bytes against dense float32 go to the report
(`report.backend["sparse"]` and `["sparse_layers"]`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import LoweringError
from .nm_kernels import detect_nm, emit_nm, nm_plan, perm_path, to_nm
from .sparse_kernels import BSR, bsr_kernel, kernel_kind, row_tile, to_bsr

__all__ = ["custom_convert_map", "summary", "SparseLowering", "measure_layer", "measure_nm_layer", "OP_NAME"]

OP_NAME = "sparse_linear.default"
CONV_OP_NAME = "sparse_conv2d.default"
_CACHE: dict[tuple, tuple[float, float]] = {}


@dataclass
class SparseLowering:
    ep: Any
    spec: Any
    measure: Callable | None = None          # (m, w, bias, block, spec) -> (dense_s, sparse_s); tests inject
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def constant(self, arg) -> np.ndarray | None:
        import torch

        if arg is None or not hasattr(arg, "op") or arg.op != "placeholder":
            return None
        sig = self.ep.graph_signature
        for table, store in ((sig.inputs_to_parameters, self.ep.state_dict),
                             (sig.inputs_to_buffers, self.ep.state_dict),
                             (getattr(sig, "inputs_to_lifted_tensor_constants", {}), self.ep.constants)):
            if arg.name in table and table[arg.name] in store:
                t = store[table[arg.name]]
                return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else None
        return None


def _lanes(spec) -> int:
    try:
        from ..targets import vector_channels

        return vector_channels(spec.alias if spec is not None else "x86")
    except Exception:
        return 8


def _const(arr: np.ndarray):
    import tvm
    from tvm import relax

    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(arr)))


def emit_dense(bb, x2, w: np.ndarray, bias: np.ndarray):
    """x2 [M, K] @ w.T + bias, as the importer lowers nn.Linear (transposed weight folded at build time)."""
    from tvm import relax

    wt = bb.emit(relax.op.permute_dims(_const(w.astype(np.float32)), axes=[1, 0]))
    y = bb.emit(relax.op.matmul(x2, wt, out_dtype="float32"))
    return bb.emit(relax.op.add(_const(bias.astype(np.float32)), y))


def emit_sparse(bb, x2, m: int, w: np.ndarray, bias: np.ndarray, block: tuple[int, int], lanes: int,
                bsr: BSR | None = None):
    """x2 [M, K] @ w.T + bias with the BSR kernel; returns (y [M, N], the BSR stored)."""
    from tvm import relax

    n, k = w.shape
    r, c = block
    kind = kernel_kind(block, m, lanes)
    if bsr is None or bsr.kind != kind:
        bsr = to_bsr(w, block, kind)
    n_pad, k_pad = -(-n // r) * r, -(-k // c) * c
    if k_pad != k:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, k_pad - k], pad_value=0.0))
    mt = row_tile(m, block, lanes, kind)
    m_pad = -(-m // mt) * mt if kind == "mvec" else m
    if m_pad != m:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, m_pad - m, 0, 0], pad_value=0.0))
    if kind in ("rowvec", "mvec") and m_pad > 1:
        x2 = bb.emit(relax.op.permute_dims(x2, [1, 0]))
    elif kind == "rowvec":
        x2 = bb.emit(relax.op.reshape(x2, [k_pad, 1]))
    func = bsr_kernel(m_pad, n_pad, k_pad, bsr.nnzb, block, mt, kind, str(bsr.indices.dtype))
    gv = bb.add_func(func.without_attr("global_symbol"), f"graphopt_bsr_{r}x{c}_{kind}")
    b = np.zeros(n_pad, np.float32)
    b[:n] = bias
    out_shape = [n_pad, m_pad] if kind == "mvec" else [m, n_pad]
    y = bb.emit(relax.call_tir(gv, [x2, _const(bsr.data), _const(bsr.indices), _const(bsr.indptr), _const(b)],
                               relax.TensorType(out_shape, "float32")))
    if kind == "mvec":
        if m_pad != m:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[m]))
        y = bb.emit(relax.op.permute_dims(y, [1, 0]))
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return y, bsr


def _tiny_module(m, k, body):
    """main(x) = body(x) with x float32 [m, k] (or of shape `m` when k is None)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(m) if k is None else [m, k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = body(bb, x)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def measure_layer(m: int, w: np.ndarray, bias: np.ndarray, block: tuple[int, int], spec,
                  rounds: int = 5) -> tuple[float, float]:
    """(dense seconds, sparse seconds) per call of this layer on `spec` (must be the host), interleaved."""
    n, k = w.shape
    lanes = _lanes(spec)
    dense = _tiny_module(m, k, lambda bb, x: emit_dense(bb, x, w, bias))
    sparse = _tiny_module(m, k, lambda bb, x: emit_sparse(bb, x, m, w, bias, block, lanes)[0])
    return _time_pair(dense, sparse, [m, k], spec, rounds)


def measure_nm_layer(m: int, w: np.ndarray, bias: np.ndarray, nm: tuple[int, int], spec,
                     rounds: int = 5) -> tuple[float, float]:
    """(dense seconds, N:M kernel seconds) per call of this layer on `spec` (the host), interleaved."""
    n, k = w.shape
    lanes, path = _lanes(spec), perm_path(spec)
    dense = _tiny_module(m, k, lambda bb, x: emit_dense(bb, x, w, bias))
    sparse = _tiny_module(m, k, lambda bb, x: emit_nm(bb, x, m, w, bias, nm, lanes, path=path)[0])
    return _time_pair(dense, sparse, [m, k], spec, rounds)


def _nm_of(st: SparseLowering, node, block, n_out: int) -> tuple[int, int] | None:
    """(n, m) when the node's mask (its [N, K] GEMM view) is N:M (detect_nm); only for 1x1 "blocks" (the
    sparsify pass gives N:M and unstructured layers block 1x1)."""
    if tuple(block) != (1, 1):
        return None
    mask = st.constant(node.args[2])
    return None if mask is None else detect_nm(mask.reshape(n_out, -1))


def _time_pair(dense, sparse, xshape, spec, rounds: int, dtype: str = "float32") -> tuple[float, float]:
    """Build both modules and time one call of each: `rounds` rounds, each 10 single calls of one then the
    other; the fastest call of each. Single calls and the minimum, because on a shared machine other load
    only ever adds time, and a short call is the likeliest to run undisturbed (with 15 runnable processes on
    2 cores, the medians of 5-call repeats of one unchanged kernel varied 10x)."""
    import tvm
    from tvm import relax

    from .build import build_module

    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.integers(0, 256, xshape).astype(np.uint8) if dtype == "uint8"
                           else rng.integers(-128, 128, xshape).astype(np.int8) if dtype == "int8"
                           else rng.standard_normal(xshape).astype(np.float32))
    timers = []
    for mod in (dense, sparse):
        vm = relax.VirtualMachine(build_module(mod, spec), dev)
        vm["main"](x)                                     # warm up
        timers.append(vm.time_evaluator("main", dev, number=1, repeat=10, min_repeat_ms=0))
    dense_t, sparse_t = [], []
    for _ in range(rounds):
        dense_t.extend(timers[0](x).results)
        sparse_t.extend(timers[1](x).results)
    return float(min(dense_t)), float(min(sparse_t))


def _weights(st: SparseLowering, node, what: str, x) -> tuple[np.ndarray, np.ndarray]:
    """(masked float32 weight, float32 bias) of a sparse op node; LoweringError naming the node otherwise."""
    w, mask = st.constant(node.args[1]), st.constant(node.args[2])
    if w is None or mask is None:
        raise LoweringError(f"graphopt_sparse.{what} (exported node '{node.name}'): the weight and mask must be "
                            f"constants of the exported program")
    w = (w.astype(np.float32) * mask.astype(np.float32)).astype(np.float32)
    bias = np.zeros(w.shape[0], np.float32) if node.args[3] is None else st.constant(node.args[3])
    if bias is None:
        raise LoweringError(f"graphopt_sparse.{what} (exported node '{node.name}'): the bias is not a constant")
    if str(x.ty.dtype) != "float32":
        raise LoweringError(f"graphopt_sparse.{what} (exported node '{node.name}'): the sparse path takes float32 "
                            f"inputs, got {x.ty.dtype}")
    return w, bias.astype(np.float32)


def _decide(st: SparseLowering, node, kernel: str, m: int, w2: np.ndarray, bias: np.ndarray, block,
            measure: Callable, extra: dict, nm: tuple[int, int] | None = None) -> tuple[str, dict]:
    """('sparse' | 'dense', report row) for one layer; w2 is the [N, K] GEMM view of its weight; `nm`: the
    layer's N:M pattern (then its sparse kernel is the N:M one, row["sparse_kernel"] names it)."""
    from .lower import _module_path

    n, k = w2.shape
    layer = _module_path(node.meta.get("nn_module_stack")) or node.name
    lanes = _lanes(st.spec)
    if nm is not None:
        path = perm_path(st.spec)
        nm_kind_, rows, _ = nm_plan(m, nm[1], lanes, path)
        packed = to_nm(w2, nm[0], nm[1], rows)
        density, stored_sparse = nm[0] / nm[1], packed.stored_bytes
        label = f"N:M {nm[0]}:{nm[1]} ({nm_kind_}" + (f", {path} vpermps" if nm_kind_ == "perm" else "") + ")"
    else:
        packed = to_bsr(w2, block, kernel_kind(block, m, lanes))
        density, stored_sparse = packed.nnzb * block[0] * block[1] / max(1, n * k), packed.stored_bytes
        label = f"BSR {block[0]}x{block[1]} ({packed.kind})"
    row = {"layer": layer, **extra, "M": m, "K": k, "N": n,
           "block": f"{nm[0]}:{nm[1]}" if nm is not None else f"{block[0]}x{block[1]}",
           "density": round(float((w2 != 0).mean()), 4), "dense_us": None, "sparse_us": None,
           "sparse_kernel": label}
    choice, why = "dense", ""
    if kernel == "sparse":
        choice, why = "sparse", "kernel=sparse"
    elif kernel == "auto":
        if st.spec is None or not getattr(st.spec, "is_host", False):
            why = "not measured (target is not this machine): dense"
        else:
            key = (st.spec.tvm if isinstance(st.spec.tvm, str) else repr(st.spec.tvm), extra.get("op"),
                   repr(extra), m, k, n, block, nm, round(density, 2))
            try:
                if st.measure is not None:
                    times = st.measure(m, w2, bias, block, st.spec)
                else:
                    if key not in _CACHE:
                        _CACHE[key] = measure()
                    times = _CACHE[key]
            except Exception as e:            # never fail a build over a measurement: stay dense
                why = f"measurement failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): dense"
            else:
                row["dense_us"], row["sparse_us"] = round(times[0] * 1e6, 2), round(times[1] * 1e6, 2)
                choice = "sparse" if times[1] < times[0] else "dense"
                why = f"measured: sparse/dense time {times[1] / max(times[0], 1e-12):.2f}"
    else:
        why = "kernel=dense"
    if choice == "sparse" and nm is not None:
        why = f"{why}: {label}"
    stored = (stored_sparse if choice == "sparse" else w2.nbytes) + bias.nbytes
    row.update(kernel=choice, why=why, stored_bytes=int(stored), dense_bytes=int(w2.nbytes + bias.nbytes))
    st.layers.append(row)
    row["_bsr"] = packed
    return choice, row


def _static_dims(x) -> list[int] | None:
    """The tensor's shape as ints, or None when a dim is symbolic (graphopt.dynamic)."""
    from .quant_lower import _is_static, _shape

    shape = _shape(x)
    return shape if _is_static(shape) else None


def _dynamic_row(st: SparseLowering, node, w2: np.ndarray, bias: np.ndarray, extra: dict) -> None:
    """The report row of a sparse layer lowered dense because its row count is only known at run time."""
    from .lower import _module_path

    n, k = w2.shape
    st.layers.append({"layer": _module_path(node.meta.get("nn_module_stack")) or node.name, **extra, "M": "dynamic",
                      "K": k, "N": n, "block": "-", "density": round(float((w2 != 0).mean()), 4),
                      "dense_us": None, "sparse_us": None, "sparse_kernel": "-", "kernel": "dense",
                      "why": "dynamic rows: the sparse kernels are built for a static row count: dense",
                      "stored_bytes": int(w2.nbytes + bias.nbytes), "dense_bytes": int(w2.nbytes + bias.nbytes)})


def _convert_linear(st: SparseLowering):
    def convert(node, importer):
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, bias = _weights(st, node, "sparse_linear", x)
        block, kernel = (int(node.args[4]), int(node.args[5])), str(node.args[6])
        shape = _static_dims(x)
        n, k = w.shape
        if shape is None:                                # dynamic rows: the sparse kernels are built per row count
            _dynamic_row(st, node, w, bias, {"op": "linear"})
            return emit_dense(bb, x, w, bias)
        m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nm = _nm_of(st, node, block, n)
        choice, row = _decide(st, node, kernel, m, w, bias, block,
                              (lambda: measure_nm_layer(m, w, bias, nm, st.spec)) if nm is not None else
                              (lambda: measure_layer(m, w, bias, block, st.spec)), {"op": "linear"}, nm)
        bsr = row.pop("_bsr")
        x2 = bb.emit(relax.op.reshape(x, [m, k]))
        if choice == "sparse" and nm is not None:
            y, _ = emit_nm(bb, x2, m, w, bias, nm, _lanes(st.spec), bsr, perm_path(st.spec))
        elif choice == "sparse":
            y, _ = emit_sparse(bb, x2, m, w, bias, block, _lanes(st.spec), bsr)
        else:
            y = emit_dense(bb, x2, w, bias)
        return bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
    return convert


def _conv_geometry(xshape, w, stride, padding, dilation):
    n, c, h, wd = xshape
    kh, kw = w.shape[2], w.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, c, kh, kw, oh, ow


def emit_conv_dense(bb, x, w: np.ndarray, bias: np.ndarray, stride, padding, dilation, groups: int):
    """conv2d as the importer lowers nn.Conv2d: R.nn.conv2d (NCHW, OIHW) + bias [1, O, 1, 1]."""
    from tvm import relax

    y = bb.emit(relax.op.nn.conv2d(x, _const(w), strides=stride, padding=padding, dilation=dilation,
                                   groups=groups, out_dtype="float32"))
    return bb.emit(relax.op.add(y, _const(bias.reshape(1, -1, 1, 1))))


def emit_im2col(bb, x, xshape, w, stride, padding, dilation):
    """NCHW x -> [N·OH·OW, C·KH·KW] patches, columns ordered (c, kh, kw) as an OIHW weight flattens."""
    from tvm import relax

    R = relax.op
    n, c, kh, kw, oh, ow = _conv_geometry(xshape, w, stride, padding, dilation)
    if padding[0] or padding[1]:
        x = bb.emit(R.nn.pad(x, [0, 0, 0, 0, padding[0], padding[0], padding[1], padding[1]], pad_value=0.0))
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1):
        cols = bb.emit(R.permute_dims(x, [0, 2, 3, 1]))                       # [N, H, W, C]
        return bb.emit(R.reshape(cols, [n * oh * ow, c]))
    taps = []
    for i in range(kh):
        for j in range(kw):
            b0, b1 = i * dilation[0], j * dilation[1]
            t = R.strided_slice(x, axes=[2, 3], begin=[b0, b1],
                                end=[b0 + (oh - 1) * stride[0] + 1, b1 + (ow - 1) * stride[1] + 1],
                                strides=[stride[0], stride[1]])
            taps.append(bb.emit(R.expand_dims(t, [2])))                       # [N, C, 1, OH, OW]
    cols = bb.emit(R.concat(taps, axis=2)) if len(taps) > 1 else taps[0]    # [N, C, KH·KW, OH, OW]
    cols = bb.emit(R.permute_dims(cols, [0, 3, 4, 1, 2]))                    # [N, OH, OW, C, KH·KW]
    return bb.emit(R.reshape(cols, [n * oh * ow, c * kh * kw]))


def emit_conv_sparse(bb, x, xshape, w, bias, stride, padding, dilation, block, lanes, bsr=None, nm=None,
                     path: str = "plain"):
    """conv2d (groups=1) as im2col + the BSR kernel, or the N:M kernel when `nm` = (n, m) is given."""
    from tvm import relax

    n, c, kh, kw, oh, ow = _conv_geometry(xshape, w, stride, padding, dilation)
    o = w.shape[0]
    m = n * oh * ow
    cols = emit_im2col(bb, x, xshape, w, stride, padding, dilation)
    if nm is not None:
        y, _ = emit_nm(bb, cols, m, w.reshape(o, -1), bias, nm, lanes, bsr, path)
    else:
        y, _ = emit_sparse(bb, cols, m, w.reshape(o, -1), bias, block, lanes, bsr)
    y = bb.emit(relax.op.reshape(y, [n, oh, ow, o]))
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def measure_conv(xshape, w, bias, stride, padding, dilation, block, spec,
                 rounds: int = 5, nm: tuple[int, int] | None = None) -> tuple[float, float]:
    """(dense seconds, sparse seconds) of one conv layer on `spec` (the host), interleaved; `nm`: time the
    N:M kernel instead of the BSR one."""
    lanes = _lanes(spec)
    dense = _tiny_module(list(xshape), None,
                         lambda bb, x: emit_conv_dense(bb, x, w, bias, stride, padding, dilation, 1))
    sparse = _tiny_module(list(xshape), None,
                          lambda bb, x: emit_conv_sparse(bb, x, xshape, w, bias, stride, padding, dilation,
                                                         block, lanes, nm=nm, path=perm_path(spec)))
    return _time_pair(dense, sparse, list(xshape), spec, rounds)


def _convert_conv(st: SparseLowering):
    def convert(node, importer):
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, bias = _weights(st, node, "sparse_conv2d", x)
        stride, padding, dilation = (list(map(int, node.args[i])) for i in (4, 5, 6))
        groups, block, kernel = int(node.args[7]), (int(node.args[8]), int(node.args[9])), str(node.args[10])
        xshape = _static_dims(x)
        if xshape is None:
            _dynamic_row(st, node, w.reshape(w.shape[0], -1), bias, {"op": f"conv{w.shape[2]}x{w.shape[3]}"})
            return emit_conv_dense(bb, x, w, bias, stride, padding, dilation, groups)
        if groups != 1:
            kernel = "dense"
        n, c, kh, kw, oh, ow = _conv_geometry(xshape, w, stride, padding, dilation)
        w2 = w.reshape(w.shape[0], -1)
        nm = _nm_of(st, node, block, w.shape[0]) if groups == 1 else None
        choice, row = _decide(st, node, kernel, n * oh * ow, w2, bias, block,
                              lambda: measure_conv(xshape, w, bias, stride, padding, dilation, block, st.spec,
                                                   nm=nm),
                              {"op": f"conv{kh}x{kw}" + (f"/g{groups}" if groups != 1 else ""),
                               "input": "x".join(map(str, xshape)), "stride": stride[0]}, nm)
        bsr = row.pop("_bsr")
        if groups != 1:
            row["why"] = "grouped conv: dense"
        if choice == "sparse":
            return emit_conv_sparse(bb, x, xshape, w, bias, stride, padding, dilation, block, _lanes(st.spec), bsr,
                                    nm, perm_path(st.spec))
        return emit_conv_dense(bb, x, w, bias, stride, padding, dilation, groups)
    return convert


def custom_convert_map(ep, spec=None, measure: Callable | None = None):
    """({op name: converter}, state) for the sparse ops in `ep`; ({}, None) when there are none."""
    present = any(n.op == "call_function" and getattr(n.target, "namespace", None) == "graphopt_sparse"
                  for n in ep.graph.nodes)
    if not present:
        return {}, None
    st = SparseLowering(ep, spec, measure)
    return {OP_NAME: _convert_linear(st), CONV_OP_NAME: _convert_conv(st)}, st


def summary(st: SparseLowering | None, int8_rows: list[dict] | None = None) -> tuple[str, list[dict]]:
    """(one line for the report, per-layer rows); `int8_rows`: the sparse int8 layers (sparse_qlower)."""
    rows = (list(st.layers) if st is not None else []) + list(int8_rows or [])
    if not rows:
        return "", []
    n_sparse = sum(str(r["kernel"]).startswith("sparse") for r in rows)
    n_conv = sum(r.get("op", "linear") != "linear" for r in rows)
    n_int8 = sum(bool(r.get("int8")) for r in rows)
    n_nm = sum(str(r["kernel"]).startswith("sparse") and ":" in str(r.get("block")) for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    line = (f"{len(rows)} sparse layers ({len(rows) - n_conv} Linear, {n_conv} conv"
            + (f"; {n_int8} int8" if n_int8 else "") + f"): {n_sparse} on the block-sparse kernel"
            + (f" ({n_nm} N:M)" if n_nm else "") + ", "
            f"{len(rows) - n_sparse} dense; their weights stored {stored / 1e3:.1f} kB "
            f"(dense float32 {dense / 1e3:.1f} kB, {dense / max(stored, 1):.2f}x smaller)")
    return line, rows


def clear_cache() -> None:
    _CACHE.clear()

