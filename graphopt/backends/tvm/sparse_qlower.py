"""Lowering of ``torch.ops.graphopt.sparse_qlinear`` (sparsify, then quantize): block-sparse int8 or dense int8.

quant_lower's qlinear converter handles the op (activation codes, zero-point term, fused requantize epilogue)
and asks `layer_call` for the kernel: the block-sparse int8 kernel (sparse_int8.py) or the dense int8 kernel
(quant_lower._dense_call), chosen like the float32 sparse layers (sparse_lower.py):
  sparse   always the sparse int8 kernel where the int8 path has one (vnni, avx512bw, avx2, sdot)
  dense    the dense int8 kernel
  auto     both built for the layer's exact shape (M, K, N, block, int8 values) on the target and timed
           interleaved on this machine; sparse only when faster. Cross targets are not measured: dense.
A layer whose int8 weight is N:M with n/m = 1/2 (2:4, 4:8: sparsify's N:M patterns; nm_int8.detect_nm_int8)
gets the N:M int8 kernel (nm_int8.py) as its sparse kernel instead, on the vnni, avx512bw, avx2 and sdot (ARM)
paths. Paths without a sparse int8 kernel (the generic 'cpu' path) run dense int8, noted. All kernels
compute the exact int32 sum and the same epilogue, so the choice never changes a result bit.

Each layer's decision goes to the report with the float32 sparse layers (report.backend["sparse_layers"],
rows with "int8": True; the kernel column names the sparse int8 kernel, e.g. "sparse int8 qrow").
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .nm_int8 import NM_PATHS, QNM, detect_nm_int8, qnm_kernel, qnm_lanes, qnm_row_tile, to_qnm
from .quant_epilogue import FLOAT
from .sparse_int8 import QBSR, int8_kind, qbsr_kernel, row_tile, to_qbsr

__all__ = ["layer_call", "emit_sparse_int8", "emit_qnm", "measure_int8_layer", "decide_sparse_convs",
           "convert_sparse_qconv2d", "clear_cache"]

_CACHE: dict[tuple, tuple[float, float]] = {}
MEASURE: Callable | None = None     # tests: (m, wq, block, spec, path) -> (dense_s, sparse_s)


def _const(arr):
    import tvm
    from tvm import relax

    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(arr)))


def emit_sparse_int8(st, bb, xu8, wq: np.ndarray, comp, out_scale, bias, lead: list, exact: bool = False,
                     epi=FLOAT, flat: bool = False, q: QBSR | None = None, block=(1, 1)):
    """quant_lower._dense_call's contract on the block-sparse int8 kernel: uint8 x [..., K] -> [..., N]
    (float32, or the requantized codes of `epi`; flat=True: [M, N])."""
    from tvm import relax

    from .quant_lower import _channel_vec

    if isinstance(q, QNM):
        return emit_qnm(st, bb, xu8, wq, comp, out_scale, bias, lead, exact, epi, flat, q)
    R = relax.op
    n, k = wq.shape
    m = int(np.prod(lead)) if lead else 1
    kind = int8_kind(block, m, st.path)
    if q is None or q.kind != kind:
        q = to_qbsr(wq, block, kind)
    r, c = q.block
    nb = q.indptr.shape[0] - 1
    kp = -(-(-(-k // c) * c) // 4) * 4
    x2 = xu8
    shape = [int(s) for s in xu8.ty.shape]
    if shape != [m, k]:
        x2 = bb.emit(R.reshape(x2, [m, k]))
    if kp != k:
        x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, kp - k], pad_value=0.0))
    mt = row_tile(kind, q.block, m, st.path)
    rows = -(-m // mt) * mt if kind == "qmvec" else m
    if rows != m:
        x2 = bb.emit(R.nn.pad(x2, [0, rows - m, 0, 0], pad_value=0.0))
    if kind == "qmvec":
        if q.packed:
            x2 = bb.emit(R.permute_dims(R.reshape(x2, [rows, kp // 4, 4]), [1, 0, 2]))
        else:
            x2 = bb.emit(R.permute_dims(x2, [1, 0]))
    func = qbsr_kernel(q, rows, mt, st.path, exact, epi, n, str(xu8.ty.dtype))
    gv = bb.add_func(func.without_attr("global_symbol"), f"graphopt_qbsr_{r}x{c}_{kind}")

    args = [x2, _const(q.data), _const(q.indices), _const(q.indptr), _channel_vec(comp, nb * r, np.int32),
            _channel_vec(out_scale, nb * r, np.float32), _channel_vec(bias, nb * r, np.float32)]
    out_shape = [n, rows] if kind == "qmvec" else [m, n]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, epi.dtype)))
    if kind == "qmvec":
        y = bb.emit(R.permute_dims(y, [1, 0]))
        if rows != m:
            y = bb.emit(R.strided_slice(y, axes=[0], begin=[0], end=[m]))
    if flat or [*lead, n] == [m, n]:
        return y
    return bb.emit(R.reshape(y, [*lead, n]))


def emit_qnm(st, bb, x, wq: np.ndarray, comp, out_scale, bias, lead: list, exact: bool = False, epi=FLOAT,
             flat: bool = False, q: QNM | None = None):
    """emit_sparse_int8's contract on the N:M int8 kernel (x: uint8, int8 on sdot)."""
    from tvm import relax

    from .quant_lower import _channel_vec

    R = relax.op
    n, k = wq.shape
    m = int(np.prod(lead)) if lead else 1
    if q is None:
        q = to_qnm(wq, qnm_lanes(st.path))
    x2 = x
    if [int(s) for s in x.ty.shape] != [m, k]:
        x2 = bb.emit(R.reshape(x2, [m, k]))
    if q.k_pad != k:
        x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, q.k_pad - k], pad_value=0.0))
    func = qnm_kernel(q, m, qnm_row_tile(m, st.path), st.path, exact, epi, n, str(x.ty.dtype))
    gv = bb.add_func(func.without_attr("global_symbol"), f"graphopt_qnm_{q.nm[0]}x{q.nm[1]}")

    args = [x2, _const(q.data), _const(q.shuf), _channel_vec(comp, q.n_pad, np.int32),
            _channel_vec(out_scale, q.n_pad, np.float32), _channel_vec(bias, q.n_pad, np.float32)]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, n], epi.dtype)))
    if flat or [*lead, n] == [m, n]:
        return y
    return bb.emit(R.reshape(y, [*lead, n]))


def _module(m: int, k: int, body, dtype: str = "uint8"):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([m, k], dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def measure_int8_layer(m: int, wq: np.ndarray, block, spec, path: str, exact: bool = False,
                       rounds: int = 5, nm: bool = False) -> tuple[float, float]:
    """(dense int8 seconds, sparse int8 seconds) of one layer at M rows on `spec` (the host), interleaved;
    nm=True times the N:M int8 kernel as the sparse one."""
    from .quant_lower import QuantLowering, _dense_call, _zero_point_term, act_dtype_of
    from .sparse_lower import _time_pair

    n, k = wq.shape
    st = QuantLowering(None, spec, path)
    comp = _zero_point_term(3, wq)
    scale = np.full(n, 1e-3, np.float32)
    bias = np.zeros(n, np.float32)
    dt = act_dtype_of(path)
    dense = _module(m, k, lambda bb, x: _dense_call(st, bb, x, wq, comp, scale, bias, [m], exact), dt)
    if nm:
        sparse = _module(m, k, lambda bb, x: emit_qnm(st, bb, x, wq, comp, scale, bias, [m], exact), dt)
    else:
        sparse = _module(m, k, lambda bb, x: emit_sparse_int8(st, bb, x, wq, comp, scale, bias, [m], exact,
                                                              block=block), dt)
    return _time_pair(dense, sparse, [m, k], spec, rounds, dtype=dt)


def layer_call(st, node, wq: np.ndarray, out_scale: np.ndarray, bias: np.ndarray, lead: list, block, kernel: str,
               extra: dict | None = None) -> Callable:
    """The kernel emitter (quant_lower._dense_call's signature) for this sparse_qlinear node (or a 1x1 conv's
    [N·H·W, C] GEMM), after deciding sparse or dense; the decision goes to st.sparse_rows."""
    from .lower import _module_path
    from .quant_lower import _dense_call, _is_static, _needs_exact

    block = tuple(int(b) for b in block)
    n, k = wq.shape
    static = _is_static(lead)
    m = int(np.prod(lead)) if lead and static else 1
    nm = detect_nm_int8(wq) if block == (1, 1) and st.path in NM_PATHS else None
    kind = ("qnm" if nm else int8_kind(block, m, st.path)) if static else None
    exact = _needs_exact(st.path, wq)
    q = to_qnm(wq, qnm_lanes(st.path)) if nm else to_qbsr(wq, block, kind) if kind else None
    row = {"layer": _module_path(node.meta.get("nn_module_stack")) or node.name, "op": "linear", **(extra or {}),
           "int8": True,
           "M": m, "K": k, "N": n, "block": f"{nm[0]}:{nm[1]}" if nm else f"{block[0]}x{block[1]}",
           "density": round(float((wq != 0).mean()), 4), "dense_us": None, "sparse_us": None}
    choice, why = "dense", ""
    if not static:
        row["M"] = "dynamic"
        why = "dynamic rows: the sparse int8 kernels are built for a static row count: dense int8"
    elif kind is None:
        why = f"no sparse int8 kernel on the {st.path} path: dense int8"
    elif kernel == "sparse":
        choice, why = "sparse", "kernel=sparse"
    elif kernel == "dense":
        why = "kernel=dense"
    elif st.spec is None or not getattr(st.spec, "is_host", False):
        why = "not measured (target is not this machine): dense int8"
    else:
        spec = st.spec
        # as for float32 (sparse_lower): layers of one shape, block and density (to 1%) share a measurement
        key = (spec.tvm if isinstance(spec.tvm, str) else repr(spec.tvm), st.path, m, k, n, block, exact,
               round(float((wq != 0).mean()), 2), nm)
        try:
            if MEASURE is not None:
                times = MEASURE(m, wq, block, spec, st.path)
            else:
                if key not in _CACHE:
                    _CACHE[key] = measure_int8_layer(m, wq, block, spec, st.path, exact, nm=bool(nm))
                times = _CACHE[key]
        except Exception as e:                 # never fail a build over a measurement: stay dense
            why = f"measurement failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): dense int8"
        else:
            row["dense_us"], row["sparse_us"] = round(times[0] * 1e6, 2), round(times[1] * 1e6, 2)
            choice = "sparse" if times[1] < times[0] else "dense"
            why = f"measured: sparse/dense int8 time {times[1] / max(times[0], 1e-12):.2f}"
    stored = (q.stored_bytes if choice == "sparse" else wq.nbytes) + bias.astype(np.float32).nbytes
    label = f"qnm {nm[0]}:{nm[1]}" if nm else kind
    row.update(kernel=f"sparse int8 {label}" if choice == "sparse" else "dense int8", why=why,
               stored_bytes=int(stored), dense_bytes=int(wq.size * 4 + bias.size * 4))
    if not hasattr(st, "sparse_rows"):
        st.sparse_rows = []
    st.sparse_rows.append(row)
    if choice == "dense":
        return _dense_call

    def call(st_, bb, xu8, wq_, comp, out_scale_, bias_, lead_, exact_=False, epi=FLOAT, flat=False):
        return emit_sparse_int8(st_, bb, xu8, wq_, comp, out_scale_, bias_, lead_, exact_, epi, flat, q, block)
    return call


def _conv_call(st, node):
    """The sparse kernel emitter for a sparse_qconv2d node, or None when it runs on the dense int8 conv: only a
    1x1, stride-1, unpadded conv (groups=1) on a static shape can run as an NHWC [N·H·W, C] x [O, C] GEMM on a
    sparse int8 kernel, and then only when chosen (layer_call). Appends the layer's report row."""
    from .lower import _module_path

    stride, padding, groups = list(node.args[5]), list(node.args[6]), int(node.args[8])
    block, kernel = (int(node.args[9]), int(node.args[10])), str(node.args[11])
    wq = st.need(node, 1, "the int8 weight").astype(np.int8)
    val = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
    shape = [d if isinstance(d, int) else None for d in val.shape] if val is not None else [None] * 4
    co, ci, kh, kw = wq.shape
    if not ((kh, kw) == (1, 1) and stride == [1, 1] and padding == [0, 0] and groups == 1
            and None not in shape and st.path != "relax"):
        if not hasattr(st, "sparse_rows"):
            st.sparse_rows = []
        st.sparse_rows.append({
            "layer": _module_path(node.meta.get("nn_module_stack")) or node.name, "op": f"conv{kh}x{kw}",
            "int8": True, "M": None, "K": ci * kh * kw, "N": co, "block": f"{block[0]}x{block[1]}",
            "density": round(float((wq != 0).mean()), 4), "dense_us": None, "sparse_us": None,
            "kernel": "dense int8", "why": "sparse int8 convs: 1x1, stride 1, unpadded, groups=1, static shape",
            "stored_bytes": int(wq.size + co * 4), "dense_bytes": int(wq.size * 4 + co * 4)})
        return None
    n, c, h, w = shape
    call = layer_call(st, node, wq.reshape(co, ci), st.need(node, 2, "out_scale").astype(np.float32),
                      st.bias(node, 3, co), [n * h * w], block, kernel,
                      {"op": "conv1x1", "input": "x".join(map(str, shape))})
    return None if call.__name__ == "_dense_call" else call


def decide_sparse_convs(st, ep) -> None:
    """Before the import: decide every sparse_qconv2d once (report row, measurement) and turn the ones that run
    on the dense int8 kernel into plain qconv2d nodes (the op's first nine arguments are qconv2d's), so that
    quant_fuse plans their fused requantize epilogues and NHWC layouts like any dense int8 conv's (as
    sparse_qconv2d nodes they were lowered unfused: a pruned MobileNetV2 whose 1x1 convs all stayed dense ran
    ~13% slower than the same model quantized unpruned). The emitters of the ones that stay sparse are kept in
    st.sparse_conv_calls. `ep` is the exported program of this lowering (rewritten in place)."""
    import torch

    st.sparse_conv_calls = {}
    for node in list(ep.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "__name__", "") != "sparse_qconv2d.default":
            continue
        call = _conv_call(st, node)
        if call is None:
            node.target = torch.ops.graphopt.qconv2d.default
            node.args = tuple(node.args[:9])
        else:
            st.sparse_conv_calls[node] = call


def convert_sparse_qconv2d(st):
    """Converter of the sparse_qconv2d nodes decide_sparse_convs left sparse: NHWC [N·H·W, C] GEMM on the sparse
    int8 kernel (the others were made qconv2d nodes)."""
    from .quant_lower import _shape, _to_uint8, _zero_point_term, act_dtype_of

    def convert(node, importer):
        from tvm import relax

        R = relax.op
        bb = importer.block_builder
        call = st.sparse_conv_calls[node]
        xq = importer.env[node.args[0]]
        zp = int(node.args[4])
        wq = st.need(node, 1, "the int8 weight").astype(np.int8)
        out_scale = st.need(node, 2, "out_scale").astype(np.float32)
        co, ci = wq.shape[:2]
        bias = st.bias(node, 3, co)
        n, c, h, w = _shape(xq)
        w2 = wq.reshape(co, ci)
        exact = st.kernel("qconv2d", wq)
        xu8, zp8 = _to_uint8(bb, xq, zp, str(xq.ty.dtype), act_dtype_of(st.path))
        x2 = bb.emit(R.reshape(R.permute_dims(xu8, [0, 2, 3, 1]), [n * h * w, c]))
        y = call(st, bb, x2, w2, _zero_point_term(zp8, w2), out_scale, bias, [n * h * w], exact)
        return bb.emit(R.permute_dims(R.reshape(y, [n, h, w, co]), [0, 3, 1, 2]))
    return convert


def clear_cache() -> None:
    _CACHE.clear()
