"""N:M structured-sparse int8 kernels (sparsify(pattern=2:4 | 4:8), then quantize), hand-written TIR.

    acc[m, o] = Σ_k x[m, k]·w[o, k]   (exact int32),  then graphopt's int8 epilogue (quant_epilogue)

w is the quantize pass's int8 weight [N, K] with at most n non-zeros in every m consecutive inputs of a row,
n/m = 1/2 (2:4, 4:8, 8:16): every window of W = 8 inputs of a row holds at most 4 non-zeros, exactly what one
4-byte dot product consumes. Masked weights quantize to 0 and a kept weight may round to 0 too, so the pattern
is "at most" (`detect_nm_int8`).

Storage (`to_qnm`): rows tiled by V (the int32 lanes of one accumulator vector: 16 AVX-512, 8 AVX2, 4 NEON),
N padded to whole tiles with zero rows, K padded to whole windows (the caller zero-pads x the same way):
    data  int8  [NT, Q, V, 4]   the (up to) 4 kept weights of row t·V + l in window q (zero-padded)
    shuf  uint8 [NT, Q, V, 4]   their positions in the window (0..7)
Q = K_pad / 8. Stored bytes: 2 per kept weight (value + position), i.e. the dense int8 weight's bytes at 2:4;
the saving is work: one dot product per 4 kept weights instead of per 4 inputs.

Kernel (per tile of V output rows; parallel over tiles from PARALLEL_MIN_MACS stored weights x rows, as the
dense int8 kernels; MT rows of x per register tile): for each window q, the 8 activation bytes
x[m, 8q : 8q + 8] are broadcast to every 64-bit half of a vector; one byte shuffle
with the tile's positions (x86 `vpshufb`: it indexes within 16-byte lanes, which all hold the window; ARM
`tbl`) gives each int32 lane its row's 4 activations in the order of its 4 weights; one dot product
(vpdpbusd / vpmaddubsw + vpmaddwd / sdot: the dense int8 kernels' instructions, `sparse_int8._dp`) adds them.
U independent accumulator sets hide the dot product's latency at few rows. Paths: vnni, avx512bw, avx2 (u8
activations; the pair paths' int16 saturation handled as the dense kernels do: weights within ±64, or the
exact split of the activations) and sdot (int8 activations, the quantize pass's shift). The int32 sums are
exact and the epilogue is the dense int8 kernel's expression, so the layer's output equals the dense int8
layer's bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tir_script import prim_func

__all__ = ["QNM", "NM_PATHS", "WINDOW", "detect_nm_int8", "to_qnm", "qnm_kernel", "qnm_lanes", "qnm_row_tile",
           "reference_qnm"]

NM_PATHS = ("vnni", "avx512bw", "avx2", "sdot")
WINDOW = 8                                       # inputs per window: 4 kept weights at n/m = 1/2
_PSHUFB = {4: "llvm.x86.ssse3.pshuf.b.128", 8: "llvm.x86.avx2.pshuf.b", 16: "llvm.x86.avx512.pshuf.b.512"}
_TBL = "llvm.aarch64.neon.tbl1.v16i8"
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"


def qnm_lanes(path: str) -> int:
    """V: int32 lanes of one accumulator vector on `path`."""
    return {"avx2": 8, "sdot": 4}.get(path, 16)


def detect_nm_int8(wq: np.ndarray, min_fill: float = 0.75) -> tuple[int, int] | None:
    """(n, m) with n/m = 1/2 when every group of m consecutive inputs of every row of the int8 [N, K] `wq` has
    at most n non-zeros, for the smaller m in (4, 8) that fits (8:16 does not bound a window of 8 inputs, the
    kernel's, to 4; where it does, the weight is 4:8), and the weight is N:M-shaped: at least
    `min_fill` of the n·groups kept slots non-zero (a sparser weight is better served by the block-sparse
    kernels; the kept weights that round to 0 in quantization stay well below a quarter). None otherwise."""
    nz = np.asarray(wq) != 0
    if nz.ndim != 2 or nz.size == 0:
        return None
    rows, k = nz.shape
    for m in (4, 8):
        if k % m:
            continue
        n = m // 2
        counts = nz.reshape(rows, k // m, m).sum(-1)
        if counts.max() <= n:
            return (n, m) if nz.sum() >= min_fill * n * counts.size else None
    return None


@dataclass
class QNM:
    """An int8 [N, K] matrix in the windowed N:M layout above."""

    shape: tuple[int, int]
    nm: tuple[int, int]
    lanes: int                  # V
    data: np.ndarray            # int8 [NT, Q, V, 4]
    shuf: np.ndarray            # uint8 [NT, Q, V, 4]

    @property
    def k_pad(self) -> int:
        return self.data.shape[1] * WINDOW

    @property
    def n_pad(self) -> int:
        return self.data.shape[0] * self.lanes

    @property
    def stored_bytes(self) -> int:
        return int(self.data.nbytes + self.shuf.nbytes)

    def to_dense(self) -> np.ndarray:
        nt, q, v, _ = self.data.shape
        out = np.zeros((nt, v, q, WINDOW), np.int64)
        t, j, l, s = np.meshgrid(np.arange(nt), np.arange(q), np.arange(v), np.arange(4), indexing="ij")
        np.add.at(out, (t, l, j, self.shuf.astype(np.int64)), self.data.astype(np.int64))
        return out.reshape(nt * v, q * WINDOW)[: self.shape[0], : self.shape[1]]


def to_qnm(wq: np.ndarray, lanes: int) -> QNM:
    """`wq` int8 [N, K] (at most 4 non-zeros in every window of 8 inputs of a row) -> QNM; ValueError otherwise."""
    wq = np.asarray(wq, np.int8)
    n, k = wq.shape
    nm = detect_nm_int8(wq, min_fill=0.0) or (4, 8)
    nt, q = -(-n // lanes), -(-k // WINDOW)
    wp = np.zeros((nt * lanes, q, WINDOW), np.int8)
    wp.reshape(nt * lanes, q * WINDOW)[:n, :k] = wq
    nz = wp != 0
    if np.any(nz.sum(-1) > 4):
        raise ValueError(f"to_qnm: the [{n}, {k}] weight has a window of {WINDOW} inputs with more than 4 "
                         "non-zeros (not N:M with n/m = 1/2)")
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :4]                   # non-zeros first, then fillers
    vals = np.take_along_axis(wp, order, -1)                                    # fillers are zeros
    data = vals.reshape(nt, lanes, q, 4).transpose(0, 2, 1, 3)
    shuf = order.astype(np.uint8).reshape(nt, lanes, q, 4).transpose(0, 2, 1, 3)
    return QNM((n, k), nm, lanes, np.ascontiguousarray(data), np.ascontiguousarray(shuf))


def reference_qnm(x: np.ndarray, q: QNM) -> np.ndarray:
    """numpy: the int32 sums Σ_k x[m, k]·w[o, k] (int64), for tests."""
    return x.astype(np.int64) @ q.to_dense().T


def _budget(path: str) -> int:
    return {"avx2": 11, "sdot": 24}.get(path, 24)


def qnm_row_tile(m: int, path: str) -> int:
    """MT: rows of x per register tile."""
    return max(1, min(m, _budget(path) // 2, 8))


def _unroll(mt: int, path: str) -> int:
    """Independent accumulator sets (dot-product latency at few rows of x), within the register budget."""
    return max(1, min(4, _budget(path) // max(1, mt)))


def qnm_kernel(q: QNM, m: int, mt: int, path: str, exact: bool, epi, n_out: int, act_dtype: str = "uint8"):
    """TIR PrimFunc: X [m, K_pad] (uint8; int8 on sdot), D, S, C [N_pad] int32 (zero-point term), SC [N_pad]
    float32 (scale), B [N_pad] float32 -> Y [m, n_out] of epi.dtype."""
    from tvm.script import tirx as T

    from .quant_lower import PARALLEL_MIN_MACS
    from .sparse_int8 import _dp

    if path not in NM_PATHS:
        raise ValueError(f"no N:M int8 kernel on the {path} path")
    V = q.lanes
    nt, nq = q.data.shape[0], q.data.shape[1]
    kp, n_pad = q.k_pad, q.n_pad
    M, NS = m, n_out
    MO = -(-M // mt)
    U = _unroll(mt, path)
    QO = nq // U
    CH = max(d for d in range(1, max(1, nt // 64) + 1) if nt % d == 0)
    NO = nt // CH
    B4 = 4 * V
    odt = epi.dtype
    dshape = tuple(q.data.shape)
    # as the dense int8 kernels: one thread below PARALLEL_MIN_MACS multiply-adds (here: stored weights x rows)
    par = T.parallel if q.data.size * M >= PARALLEL_MIN_MACS else T.serial

    def window(X, row, j):
        """The 8 bytes x[row, 8j : 8j + 8] in every 64-bit half of a 4V-byte vector."""
        w64 = T.reinterpret(X.vload([row, j * WINDOW], f"{act_dtype}x8"), dtype="int64")
        return T.reinterpret(T.broadcast(w64, B4 // 8), dtype=f"int8x{B4}")

    def pick(xb, sh):
        if path == "sdot":
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_TBL), xb, T.reinterpret(sh, dtype="int8x16"),
                                           dtype="int8x16")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_PSHUFB[V]), xb,
                                       T.reinterpret(sh, dtype=f"int8x{B4}"), dtype=f"int8x{B4}")

    def dot(acc, a, w):
        if path == "sdot":
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SDOT), acc, a, w, dtype="int32x4")
        return _dp(path, V, acc, T.reinterpret(a, dtype=f"uint8x{B4}"), w, exact)

    @prim_func
    def qnm(X: T.Buffer((M, kp), act_dtype), D: T.Buffer(dshape, "int8"), S: T.Buffer(dshape, "uint8"),
            C: T.Buffer((n_pad,), "int32"), SC: T.Buffer((n_pad,), "float32"), B: T.Buffer((n_pad,), "float32"),
            Y: T.Buffer((M, NS), odt)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for io in par(NO):
            acc = T.decl_buffer((U * mt * V,), "int32")
            for ii in range(CH):
              t = T.meta_var(io * CH + ii)
              for mo in range(MO):
                for z in T.unroll(U * mt):
                    acc[T.ramp(z * V, 1, V)] = T.broadcast(T.int32(0), V)
                for jo in range(QO):
                    for u in T.unroll(U):
                        for mi in T.unroll(mt):
                            acc[T.ramp((u * mt + mi) * V, 1, V)] = dot(
                                acc[T.ramp((u * mt + mi) * V, 1, V)],
                                pick(window(X, T.min(mo * mt + mi, M - 1), jo * U + u),
                                     S.vload([t, jo * U + u, 0, 0], f"uint8x{B4}")),
                                D.vload([t, jo * U + u, 0, 0], f"int8x{B4}"))
                for j in range(QO * U, nq):
                    for mi in T.unroll(mt):
                        acc[T.ramp(mi * V, 1, V)] = dot(
                            acc[T.ramp(mi * V, 1, V)],
                            pick(window(X, T.min(mo * mt + mi, M - 1), j), S.vload([t, j, 0, 0], f"uint8x{B4}")),
                            D.vload([t, j, 0, 0], f"int8x{B4}"))
                for u in T.unroll(1, U):
                    for z in T.unroll(mt):
                        acc[T.ramp(z * V, 1, V)] = acc[T.ramp(z * V, 1, V)] + acc[T.ramp((u * mt + z) * V, 1, V)]
                for mi in T.unroll(mt):
                    if mo * mt + mi < M:
                        for l in T.vectorized(V):
                            if t * V + l < NS:
                                Y[mo * mt + mi, t * V + l] = epi.value(acc[mi * V + l], C[t * V + l],
                                                                       SC[t * V + l], B[t * V + l])
    return qnm
