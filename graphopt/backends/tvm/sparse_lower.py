"""Lowering of ``torch.ops.graphopt_sparse.sparse_linear`` (the sparsify pass's SparseLinear) to TVM.

Per layer, one of two implementations, chosen by the layer's `kernel` argument:
  sparse   the block-sparse kernel (sparse_kernels.py): weight stored as BSR values + int32 block indices
  dense    R.matmul with the masked weight as a dense constant (what an nn.Linear lowers to; the build's
           default schedules apply)
  auto     measured: both are built for this layer's exact shape (M rows, K, N, block, density) on the target
           and timed interleaved on this machine (TVM time_evaluator, median of rounds); the sparse kernel is
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
from .sparse_kernels import BSR, bsr_kernel, row_tile, to_bsr

__all__ = ["custom_convert_map", "summary", "SparseLowering", "measure_layer", "OP_NAME"]

OP_NAME = "sparse_linear.default"
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
    bsr = bsr if bsr is not None else to_bsr(w, block)
    n_pad, k_pad = -(-n // r) * r, -(-k // c) * c
    if k_pad != k:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, k_pad - k], pad_value=0.0))
    if bsr.kind == "rowvec" and m > 1:
        x2 = bb.emit(relax.op.permute_dims(x2, [1, 0]))
    elif bsr.kind == "rowvec":
        x2 = bb.emit(relax.op.reshape(x2, [k_pad, 1]))
    func = bsr_kernel(m, n_pad, k_pad, bsr.nnzb, block, row_tile(m, block, lanes))
    gv = bb.add_func(func.without_attr("global_symbol"), f"graphopt_bsr_{r}x{c}")
    b = np.zeros(n_pad, np.float32)
    b[:n] = bias
    y = bb.emit(relax.call_tir(gv, [x2, _const(bsr.data), _const(bsr.indices), _const(bsr.indptr), _const(b)],
                               relax.TensorType([m, n_pad], "float32")))
    if n_pad != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return y, bsr


def _tiny_module(m: int, k: int, body):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([m, k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = body(bb, x)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def measure_layer(m: int, w: np.ndarray, bias: np.ndarray, block: tuple[int, int], spec,
                  rounds: int = 5, min_ms: int = 20) -> tuple[float, float]:
    """(dense seconds, sparse seconds) per call of this layer on `spec` (must be the host), interleaved."""
    import tvm
    from tvm import relax

    from .build import build_module

    n, k = w.shape
    lanes = _lanes(spec)
    dense = _tiny_module(m, k, lambda bb, x: emit_dense(bb, x, w, bias))
    sparse = _tiny_module(m, k, lambda bb, x: emit_sparse(bb, x, m, w, bias, block, lanes)[0])
    dev = tvm.cpu(0)
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32))
    timers = []
    for mod in (dense, sparse):
        vm = relax.VirtualMachine(build_module(mod, spec), dev)
        vm["main"](x)                                     # warm up
        timers.append(vm.time_evaluator("main", dev, number=1, repeat=3, min_repeat_ms=int(min_ms)))
    dense_t, sparse_t = [], []
    for _ in range(rounds):
        dense_t.append(float(np.median(timers[0](x).results)))
        sparse_t.append(float(np.median(timers[1](x).results)))
    return float(np.median(dense_t)), float(np.median(sparse_t))


def _convert(st: SparseLowering):
    def convert(node, importer):
        from tvm import relax

        from .lower import _module_path

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, mask = st.constant(node.args[1]), st.constant(node.args[2])
        if w is None or mask is None:
            raise LoweringError(f"graphopt_sparse.sparse_linear (exported node '{node.name}'): the weight and "
                                f"mask must be constants of the exported program")
        w = (w.astype(np.float32) * mask.astype(np.float32)).astype(np.float32)
        bias = np.zeros(w.shape[0], np.float32) if node.args[3] is None else st.constant(node.args[3])
        if bias is None:
            raise LoweringError(f"graphopt_sparse.sparse_linear (exported node '{node.name}'): bias is not a constant")
        block = (int(node.args[4]), int(node.args[5]))
        kernel = str(node.args[6])
        if str(x.ty.dtype) != "float32":
            raise LoweringError(f"graphopt_sparse.sparse_linear (exported node '{node.name}'): the sparse path "
                                f"takes float32 inputs, got {x.ty.dtype}")
        shape = [int(s) for s in x.ty.shape]
        n, k = w.shape
        m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        layer = _module_path(node.meta.get("nn_module_stack")) or node.name
        bsr = to_bsr(w, block)
        density = bsr.nnzb * block[0] * block[1] / max(1, n * k)
        row = {"layer": layer, "M": m, "K": k, "N": n, "block": f"{block[0]}x{block[1]}",
               "density": round(float((w != 0).mean()), 4), "dense_us": None, "sparse_us": None}
        choice, why = "dense", ""
        if kernel == "sparse":
            choice, why = "sparse", "kernel=sparse"
        elif kernel == "auto":
            if st.spec is None or not getattr(st.spec, "is_host", False):
                why = "not measured (target is not this machine): dense"
            else:
                key = (st.spec.tvm if isinstance(st.spec.tvm, str) else repr(st.spec.tvm), m, k, n, block,
                       round(density, 2))
                try:
                    if st.measure is not None:
                        times = st.measure(m, w, bias, block, st.spec)
                    else:
                        if key not in _CACHE:
                            _CACHE[key] = measure_layer(m, w, bias, block, st.spec)
                        times = _CACHE[key]
                except Exception as e:            # never fail a build over a measurement: stay dense
                    why = f"measurement failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): dense"
                else:
                    row["dense_us"], row["sparse_us"] = round(times[0] * 1e6, 2), round(times[1] * 1e6, 2)
                    choice = "sparse" if times[1] < times[0] else "dense"
                    why = f"measured: sparse/dense time {times[1] / max(times[0], 1e-12):.2f}"
        else:
            why = "kernel=dense"
        x2 = bb.emit(relax.op.reshape(x, [m, k]))
        if choice == "sparse":
            y, bsr = emit_sparse(bb, x2, m, w, bias, block, _lanes(st.spec), bsr)
            stored = bsr.stored_bytes + bias.nbytes
        else:
            y = emit_dense(bb, x2, w, bias)
            stored = w.nbytes + bias.nbytes
        row.update(kernel=choice, why=why, stored_bytes=int(stored), dense_bytes=int(w.nbytes + bias.nbytes))
        st.layers.append(row)
        return bb.emit(relax.op.reshape(y, [*shape[:-1], n]))
    return convert


def custom_convert_map(ep, spec=None, measure: Callable | None = None):
    """({op name: converter}, state) for the sparse ops in `ep`; ({}, None) when there are none."""
    present = any(n.op == "call_function" and getattr(n.target, "namespace", None) == "graphopt_sparse"
                  for n in ep.graph.nodes)
    if not present:
        return {}, None
    st = SparseLowering(ep, spec, measure)
    return {OP_NAME: _convert(st)}, st


def summary(st: SparseLowering | None) -> tuple[str, list[dict]]:
    """(one line for the report, per-layer rows)."""
    if st is None or not st.layers:
        return "", []
    n_sparse = sum(r["kernel"] == "sparse" for r in st.layers)
    stored = sum(r["stored_bytes"] for r in st.layers)
    dense = sum(r["dense_bytes"] for r in st.layers)
    line = (f"{len(st.layers)} sparse Linear layers: {n_sparse} on the block-sparse kernel, "
            f"{len(st.layers) - n_sparse} dense; their weights stored {stored / 1e3:.1f} kB "
            f"(dense float32 {dense / 1e3:.1f} kB, {dense / max(stored, 1):.2f}x smaller)")
    return line, list(st.layers)


def clear_cache() -> None:
    _CACHE.clear()

