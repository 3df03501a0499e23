"""Block-sparse int8 kernels (static int8: uint8 activations x int8 weights -> int32 -> graphopt's epilogue).

What `sparsify,quantize` lowers a sparse Linear to when its sparse kernel is chosen: the weight is the
quantize pass's per-channel int8 weight (masked weights are exactly 0), stored block-sparse; the kernels
accumulate the exact int32 sum Σ_k xq[m, k]·wq[n, k] with the dot-product instructions graphopt's dense
int8 kernels use (quant_lower.py), then run the same epilogue (quant_epilogue.Epilogue: zero-point term,
per-channel scale, bias, and, when fused, the next layer's requantize). The integer sum is exact, and the
epilogue is the same TIR expression as the dense kernel's, so a sparse int8 layer's output equals the dense
int8 layer's bit for bit.

Instructions (path from quant_lower.int8_path): 'vnni' vpdpbusd (4 u8·s8 products into an int32 lane);
'sdot' (aarch64 +dotprod) NEON sdot (4 s8·s8 products: the int8 activations of that path, 4 lanes);
'avx512bw' / 'avx2' vpmaddubsw (u8·s8 pairs -> saturating int16) + vpmaddwd by ones (-> int32), exact for
|w| <= 64 (the quantize pass's reduce_range weights on those paths); larger weights switch the layer to the
exact split of the activations (a = 128·hi + lo), as the dense kernels do. Vectors of V int32 lanes: 4, 8
or 16 (128/256/512-bit; 16 needs AVX-512; NEON: 4). Other paths (no AVX2, ARM without the dot-product
extension) have no sparse int8 kernel: those layers stay on the dense int8 kernel (noted).

A "quad" is 4 weights of one output row that one 4-byte dot product consumes. Three kernels:
  * qrow  (R % 4 == 0, e.g. 16x1, 4x4, 8x1): lanes over the R output rows of a block row; a quad is 4
          (block, column) entries of that block row (4 blocks of 16x1, one block row of a 4x4 block; rows
          with a count that is not a multiple of 4 are padded with zero weights). Data [nq, R, 4], k indices
          [nq, 4] (or [nq] quad numbers when C % 4 == 0: 4 consecutive aligned inputs); per row m the
          4 activation bytes are gathered and broadcast. For few rows M.
  * qcol  (C % 4 == 0, C/4 in {4, 8, 16}, e.g. 1x16): lanes over the C/4 quads of one block; per block,
          row r and row m one dot product of C activation bytes with C weights, summed across lanes at
          the end. For few rows M (a batch-1 Linear with 1x16 blocks).
  * qmvec (M >= V): lanes over V rows of x; per quad and output row, one dot product of V·4 activation
          bytes with the quad's 4 weights broadcast. Activations packed [K/4, M, 4] when C % 4 == 0 (one
          vector load per quad), else [K, M] with the quad's 4 inputs gathered (4 loads, zero-extended and
          or-ed into bytes) once per quad and reused by all R rows. Writes Yᵀ [N, M].
Storage (what an artifact keeps): int8 data + uint16 indices (int32 past 65,535) + int32 row pointers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tir_script import prim_func

__all__ = ["QBSR", "SUPPORTED_PATHS", "int8_kind", "to_qbsr", "qbsr_kernel", "vector_lanes", "reference"]

SUPPORTED_PATHS = ("vnni", "avx512bw", "avx2", "sdot")
_VNNI = {4: "llvm.x86.avx512.vpdpbusd.128", 8: "llvm.x86.avx512.vpdpbusd.256", 16: "llvm.x86.avx512.vpdpbusd.512"}
_UBSW = {4: "llvm.x86.ssse3.pmadd.ub.sw.128", 8: "llvm.x86.avx2.pmadd.ub.sw", 16: "llvm.x86.avx512.pmaddubs.w.512"}
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
_WD = {4: "llvm.x86.sse2.pmadd.wd", 8: "llvm.x86.avx2.pmadd.wd", 16: "llvm.x86.avx512.pmaddw.d.512"}


def vector_lanes(path: str) -> int:
    """Widest int32 vector of the path: 4 lanes (NEON), 8 (AVX2), 16 (AVX-512)."""
    return {"avx2": 8, "sdot": 4}.get(path, 16)


def int8_kind(block: tuple[int, int], m: int, path: str) -> str | None:
    """The sparse int8 kernel for `block` at M rows on `path`, or None (no sparse int8 kernel: dense)."""
    if path not in SUPPORTED_PATHS:
        return None
    r, c = block
    lmax = vector_lanes(path)
    if m >= lmax:
        return "qmvec"
    if r % 4 == 0 and (r % lmax == 0 or r <= lmax):
        return "qrow"
    if c % 4 == 0 and c // 4 in (4, 8, 16) and c // 4 <= lmax:
        return "qcol"
    return "qmvec"


def _qrow_lanes(r: int, path: str) -> int:
    lmax = vector_lanes(path)
    return lmax if r % lmax == 0 else r


@dataclass
class QBSR:
    """An int8 [N, K] matrix in one of the layouts above."""

    shape: tuple[int, int]
    block: tuple[int, int]
    kind: str                     # qrow | qcol | qmvec
    packed: bool                  # quads are 4 aligned consecutive inputs (C % 4 == 0)
    data: np.ndarray              # int8: qrow/qmvec-gathered [nq, R, 4]; qcol/qmvec-packed [nnzb, R, C]
    indices: np.ndarray           # uint16/int32: gathered [nq, 4] k; qrow-packed [nq] quad numbers;
                                  # qcol/qmvec-packed [nnzb] block columns
    indptr: np.ndarray            # int32 [NB + 1] into data's first axis

    @property
    def nnz_units(self) -> int:
        return int(self.data.shape[0])

    @property
    def stored_bytes(self) -> int:
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def to_dense(self) -> np.ndarray:
        r, c = self.block
        n, k = self.shape
        nb = self.indptr.shape[0] - 1
        kp = -(-k // c) * c + 4
        out = np.zeros((nb * r, kp), np.int64)
        for i in range(nb):
            for j in range(self.indptr[i], self.indptr[i + 1]):
                if self.kind == "qcol" or (self.kind == "qmvec" and self.packed):
                    col = int(self.indices[j]) * c
                    out[i * r:(i + 1) * r, col:col + c] += self.data[j]
                else:
                    ks = [int(self.indices[j]) * 4 + t for t in range(4)] if self.packed \
                        else [int(v) for v in self.indices[j]]
                    for t, kk in enumerate(ks):
                        out[i * r:(i + 1) * r, kk] += self.data[j, :, t]
        return out[:n, :k]


def _idx_dtype(limit: int):
    return np.uint16 if limit < 1 << 16 else np.int32


def to_qbsr(wq: np.ndarray, block: tuple[int, int], kind: str) -> QBSR:
    """`wq` int8 [N, K] -> QBSR for kernel `kind`; all-zero blocks are not stored."""
    wq = np.asarray(wq, np.int8)
    n, k = wq.shape
    r, c = block
    nb, kb = -(-n // r), -(-k // c)
    wp = np.zeros((nb * r, kb * c), np.int8)
    wp[:n, :k] = wq
    blocks = wp.reshape(nb, r, kb, c).transpose(0, 2, 1, 3)                   # [NB, KB, R, C]
    nz = np.any(blocks != 0, axis=(2, 3))
    packed = c % 4 == 0
    if kind == "qcol" or (kind == "qmvec" and packed):
        rows, cols = np.nonzero(nz)
        indptr = np.zeros(nb + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=nb), out=indptr[1:])
        data = blocks[rows, cols]
        if data.shape[0] == 0:
            data, cols = np.zeros((1, r, c), np.int8), np.zeros(1, np.int64)
        return QBSR((n, k), (r, c), kind, True, np.ascontiguousarray(data), cols.astype(_idx_dtype(kb)), indptr)
    # quads: per block row, the (block, column) entries in order, 4 at a time (zero-padded)
    datas, idxs, counts = [], [], []
    for i in range(nb):
        cols = np.nonzero(nz[i])[0]
        if packed:                                   # C % 4 == 0: each block is C/4 aligned quads
            q = (cols[:, None] * (c // 4) + np.arange(c // 4)[None, :]).reshape(-1)
            d = blocks[i, cols].reshape(len(cols), r, c // 4, 4).transpose(0, 2, 1, 3).reshape(-1, r, 4)
            datas.append(d)
            idxs.append(q)
            counts.append(len(q))
            continue
        ks = (cols[:, None] * c + np.arange(c)[None, :]).reshape(-1)          # entries (block, column)
        vals = blocks[i, cols].transpose(0, 2, 1).reshape(-1, r)              # [entries, R]
        keep = (ks < k) & np.any(vals != 0, axis=1)                           # drop all-zero columns
        ks, vals = ks[keep], vals[keep]
        pad = -len(ks) % 4
        ks = np.concatenate([ks, np.zeros(pad, ks.dtype)])
        vals = np.concatenate([vals, np.zeros((pad, r), np.int8)])
        datas.append(vals.reshape(-1, 4, r).transpose(0, 2, 1))              # [nq, R, 4]
        idxs.append(ks.reshape(-1, 4))
        counts.append(len(ks) // 4)
    indptr = np.zeros(nb + 1, np.int32)
    np.cumsum(counts, out=indptr[1:])
    shape_d = (0, r, 4)
    data = np.concatenate(datas) if datas else np.zeros(shape_d, np.int8)
    idx = np.concatenate(idxs) if idxs else np.zeros((0,) if packed else (0, 4), np.int64)
    if data.shape[0] == 0:
        data = np.zeros((1, r, 4), np.int8)
        idx = np.zeros((1,) if packed else (1, 4), np.int64)
    limit = kb * c // 4 if packed else kb * c
    return QBSR((n, k), (r, c), kind, packed, np.ascontiguousarray(data, np.int8),
                np.ascontiguousarray(idx.astype(_idx_dtype(limit))), indptr)


def reference(xu8: np.ndarray, m: QBSR) -> np.ndarray:
    """numpy: the int32 sums Σ_k x[m, k]·w[n, k] (int64), for tests."""
    return xu8.astype(np.int64) @ m.to_dense().T


# ------------------------------------------------------------------------------------------ TIR
def _dp(path: str, V: int, acc, u8, s8, exact: bool):
    """TIR: acc (int32xV) + per lane Σ of 4 products u8[4l+t]·s8[4l+t] (u8: uint8/int8 x4V bit pattern of
    unsigned bytes, s8: int8x4V). Pair paths: vpmaddubsw + vpmaddwd by ones; exact=True splits u8 into
    128·hi + lo so no int16 pair sum can saturate."""
    from tvm.script import tirx as T

    b = 4 * V
    s8v = s8                                                       # callers pass int8x(4V)
    if path == "sdot":                                             # activations are int8 codes here
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SDOT), acc, T.reinterpret(u8, dtype="int8x16"),
                                       s8v, dtype="int32x4")
    if path == "vnni":
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_VNNI[V]), acc,
                                       T.reinterpret(u8, dtype=f"int8x{b}"), s8v, dtype=f"int32x{V}")

    def madd(a32, mult: int):
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_UBSW[V]), T.reinterpret(a32, dtype=f"int8x{b}"),
                                        s8v, dtype=f"int16x{2 * V}")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_WD[V]), pairs, T.broadcast(T.int16(mult), 2 * V),
                                       dtype=f"int32x{V}")

    a32 = T.reinterpret(u8, dtype=f"int32x{V}")
    if not exact:
        return acc + madd(a32, 1)
    lo = T.bitwise_and(a32, T.broadcast(T.int32(0x7F7F7F7F), V))
    hi = T.bitwise_and(T.shift_right(a32, T.broadcast(T.int32(7), V)), T.broadcast(T.int32(0x01010101), V))
    return acc + madd(lo, 1) + madd(hi, 128)


def _unroll(accs: int, path: str) -> int:
    """Independent accumulator sets for a kernel with `accs` accumulator vectors per set: a dot-product
    instruction has a latency of several cycles, so a single chain of them (one row of x, one vector of
    output rows) would wait on itself; 4 interleaved chains hide it while the registers last."""
    budget = 24 if vector_lanes(path) == 16 else 11
    return max(1, min(4, budget // max(1, accs)))


def row_tile(kind: str, block: tuple[int, int], m: int, path: str) -> int:
    """Rows of x per register tile (qmvec: a multiple of the vector lanes; the caller pads M to it)."""
    r, c = block
    budget = 24 if vector_lanes(path) == 16 else 11
    if kind == "qmvec":
        V = vector_lanes(path)
        vecs = max(1, min(-(-m // V), budget // min(r, budget), 4))
        return vecs * V
    if kind == "qrow":
        return max(1, min(m, budget // max(1, r // _qrow_lanes(r, path)), 16))
    return max(1, min(m, budget // r, 8))


def qbsr_kernel(m: QBSR, rows: int, mt: int, path: str, exact: bool, epi, n_out: int, act_dtype: str = "uint8"):
    """TIR PrimFunc for `m` at `rows` rows of x (qmvec: a multiple of mt). Arguments:
        qrow:  X [rows, Kp] uint8, data, indices, indptr, C, S, B [Np], Y [rows, n_out]
        qcol:  X [rows, Kp] uint8, ...                                   Y [rows, n_out]
        qmvec: packed XQ [Kp/4, rows, 4] / gathered XT [Kp, rows] uint8, ...   YT [n_out, rows]
    Kp = K padded to whole blocks (and to 4), Np = N padded to whole blocks; C = zp·Σw, S, B per channel.
    X is int8 on the sdot path (`act_dtype`); the kernels move its bytes as uint8."""
    from tvm.script import tirx as T

    from .quant_lower import PARALLEL_MIN_MACS

    adt = act_dtype

    def u8(v, lanes: int):
        return v if adt == "uint8" else T.reinterpret(v, dtype="uint8" if lanes == 1 else f"uint8x{lanes}")

    r_, c_ = m.block
    n, k = m.shape
    nb = m.indptr.shape[0] - 1
    n_pad = nb * r_
    kp = -(-(-(-k // c_) * c_) // 4) * 4
    nu = m.nnz_units
    idt = str(m.indices.dtype)
    M = rows
    MO = -(-M // mt)
    NS = n_out
    # one thread below PARALLEL_MIN_MACS stored weights x rows, as the dense int8 kernels: waking the thread
    # pool costs more than such a layer takes on one core
    par = T.parallel if m.data.size * M >= PARALLEL_MIN_MACS else T.serial
    # block rows per parallel iteration: thousands of tiny iterations (a 4096-row Linear with 1x16 blocks)
    # would spend more time in the parallel loop's bookkeeping than computing (their accumulators are stack
    # buffers, and the block-row index a meta_var: a TIR let would be a heap workspace per iteration)
    CH = max(d for d in range(1, max(1, nb // 64) + 1) if nb % d == 0)
    NO = nb // CH
    ishape = m.indices.shape
    dshape = m.data.shape
    odt = epi.dtype

    if m.kind == "qrow":
        V = _qrow_lanes(r_, path)
        G = r_ // V
        U = _unroll(mt * G, path)

        def gather(X, I, q, row):
            if m.packed:
                return u8(X.vload([row, T.Cast("int32", I[q]) * 4], f"{adt}x4"), 4)
            v = T.Cast("int32", u8(X[row, T.Cast("int32", I[q, 0])], 1))
            for t in range(1, 4):
                v = T.bitwise_or(v, T.shift_left(T.Cast("int32", u8(X[row, T.Cast("int32", I[q, t])], 1)),
                                                 T.int32(8 * t)))
            return T.reinterpret(v, dtype="uint8x4")

        @prim_func
        def qbsr_row(X: T.Buffer((M, kp), adt), D: T.Buffer(dshape, "int8"), I: T.Buffer(ishape, idt),
                     P: T.Buffer((nb + 1,), "int32"), C: T.Buffer((n_pad,), "int32"),
                     S: T.Buffer((n_pad,), "float32"), B: T.Buffer((n_pad,), "float32"),
                     Y: T.Buffer((M, NS), odt)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for io in par(NO):
                acc = T.decl_buffer((U * mt * r_,), "int32")
                for ii in range(CH):
                  i = T.meta_var(io * CH + ii)
                  for mo in range(MO):
                    for t in T.unroll(U * mt * G):
                        acc[T.ramp(t * V, 1, V)] = T.broadcast(T.int32(0), V)
                    for qo in range((P[i + 1] - P[i]) // U):
                        for u in T.unroll(U):
                            for mi in T.unroll(mt):
                                for g in T.unroll(G):
                                    acc[T.ramp(((u * mt + mi) * G + g) * V, 1, V)] = _dp(
                                        path, V, acc[T.ramp(((u * mt + mi) * G + g) * V, 1, V)],
                                        T.reinterpret(T.broadcast(T.reinterpret(
                                            gather(X, I, P[i] + qo * U + u, T.min(mo * mt + mi, M - 1)),
                                            dtype="int32"), V), dtype=f"uint8x{4 * V}"),
                                        D.vload([P[i] + qo * U + u, g * V, 0], f"int8x{4 * V}"), exact)
                    for q in range(P[i] + (P[i + 1] - P[i]) // U * U, P[i + 1]):
                        for mi in T.unroll(mt):
                            for g in T.unroll(G):
                                acc[T.ramp((mi * G + g) * V, 1, V)] = _dp(
                                    path, V, acc[T.ramp((mi * G + g) * V, 1, V)],
                                    T.reinterpret(T.broadcast(T.reinterpret(
                                        gather(X, I, q, T.min(mo * mt + mi, M - 1)), dtype="int32"), V),
                                        dtype=f"uint8x{4 * V}"),
                                    D.vload([q, g * V, 0], f"int8x{4 * V}"), exact)
                    for u in T.unroll(1, U):
                        for t in T.unroll(mt * G):
                            acc[T.ramp(t * V, 1, V)] = acc[T.ramp(t * V, 1, V)] + acc[T.ramp((u * mt * G + t) * V, 1, V)]
                    for mi in T.unroll(mt):
                        if mo * mt + mi < M:
                            for rr in T.vectorized(r_):
                                if i * r_ + rr < NS:
                                    Y[mo * mt + mi, i * r_ + rr] = epi.value(
                                        acc[mi * r_ + rr], C[i * r_ + rr], S[i * r_ + rr], B[i * r_ + rr])
        return qbsr_row

    if m.kind == "qcol":
        V = c_ // 4
        U = _unroll(mt * r_, path)

        @prim_func
        def qbsr_col(X: T.Buffer((M, kp), adt), D: T.Buffer(dshape, "int8"), I: T.Buffer(ishape, idt),
                     P: T.Buffer((nb + 1,), "int32"), C: T.Buffer((n_pad,), "int32"),
                     S: T.Buffer((n_pad,), "float32"), B: T.Buffer((n_pad,), "float32"),
                     Y: T.Buffer((M, NS), odt)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for io in par(NO):
                acc = T.decl_buffer((U * mt * r_ * V,), "int32")
                tot = T.decl_buffer((1,), "int32")
                for ii in range(CH):
                  i = T.meta_var(io * CH + ii)
                  for mo in range(MO):
                    for t in T.unroll(U * mt * r_):
                        acc[T.ramp(t * V, 1, V)] = T.broadcast(T.int32(0), V)
                    for jo in range((P[i + 1] - P[i]) // U):
                        for u in T.unroll(U):
                            for rr in T.unroll(r_):
                                for mi in T.unroll(mt):
                                    acc[T.ramp(((u * mt + mi) * r_ + rr) * V, 1, V)] = _dp(
                                        path, V, acc[T.ramp(((u * mt + mi) * r_ + rr) * V, 1, V)],
                                        u8(X.vload([T.min(mo * mt + mi, M - 1),
                                                    T.Cast("int32", I[P[i] + jo * U + u]) * c_], f"{adt}x{c_}"), c_),
                                        D.vload([P[i] + jo * U + u, rr, 0], f"int8x{c_}"), exact)
                    for u in T.unroll(1, U):
                        for t in T.unroll(mt * r_):
                            acc[T.ramp(t * V, 1, V)] = acc[T.ramp(t * V, 1, V)] + acc[T.ramp((u * mt * r_ + t) * V, 1, V)]
                    for j in range(P[i] + (P[i + 1] - P[i]) // U * U, P[i + 1]):
                        for rr in T.unroll(r_):
                            for mi in T.unroll(mt):
                                acc[T.ramp((mi * r_ + rr) * V, 1, V)] = _dp(
                                    path, V, acc[T.ramp((mi * r_ + rr) * V, 1, V)],
                                    u8(X.vload([T.min(mo * mt + mi, M - 1), T.Cast("int32", I[j]) * c_],
                                               f"{adt}x{c_}"), c_),
                                    D.vload([j, rr, 0], f"int8x{c_}"), exact)
                    for mi in T.unroll(mt):
                        if mo * mt + mi < M:
                            for rr in T.unroll(r_):
                                if i * r_ + rr < NS:
                                    tot[0] = 0
                                    for v in range(V):
                                        tot[0] = tot[0] + acc[(mi * r_ + rr) * V + v]
                                    Y[mo * mt + mi, i * r_ + rr] = epi.value(
                                        tot[0], C[i * r_ + rr], S[i * r_ + rr], B[i * r_ + rr])
        return qbsr_col

    # qmvec: lanes over rows of x
    V = vector_lanes(path)
    if M % mt or mt % V:
        raise ValueError(f"qmvec kernel: rows {M} must be a multiple of the tile {mt} (of {V} lanes)")
    MV = mt // V
    RT = max(1, min(r_, (24 if V == 16 else 11) // MV))
    while r_ % RT:
        RT -= 1
    RO = r_ // RT
    xshape = (kp // 4, M, 4) if m.packed else (kp, M)
    QN = c_ // 4 if m.packed else 1

    def xvec(X, I, j, qq, m0):
        if m.packed:
            return u8(X.vload([T.Cast("int32", I[j]) * QN + qq, m0, 0], f"{adt}x{4 * V}"), 4 * V)
        v = T.Cast(f"int32x{V}", u8(X.vload([T.Cast("int32", I[j, 0]), m0], f"{adt}x{V}"), V))
        for t in range(1, 4):
            v = T.bitwise_or(v, T.shift_left(T.Cast(f"int32x{V}", u8(X.vload([T.Cast("int32", I[j, t]), m0],
                                                                           f"{adt}x{V}"), V)),
                                             T.broadcast(T.int32(8 * t), V)))
        return T.reinterpret(v, dtype=f"uint8x{4 * V}")

    def wbcast(D, j, rr, qq):
        if m.packed:
            w4 = D.vload([j, rr, qq * 4], "int8x4")
        else:
            w4 = D.vload([j, rr, 0], "int8x4")
        return T.reinterpret(T.broadcast(T.reinterpret(w4, dtype="int32"), V), dtype=f"int8x{4 * V}")

    @prim_func
    def qbsr_mvec(X: T.Buffer(xshape, adt), D: T.Buffer(dshape, "int8"), I: T.Buffer(ishape, idt),
                  P: T.Buffer((nb + 1,), "int32"), C: T.Buffer((n_pad,), "int32"),
                  S: T.Buffer((n_pad,), "float32"), B: T.Buffer((n_pad,), "float32"),
                  YT: T.Buffer((NS, M), odt)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for io in par(NO):
            acc = T.decl_buffer((RT * mt,), "int32")
            xv = T.decl_buffer((4 * V,), "uint8")
            for ii in range(CH):
              i = T.meta_var(io * CH + ii)
              for ro in range(RO):
                for mo in range(MO):
                    for t in T.unroll(RT * MV):
                        acc[T.ramp(t * V, 1, V)] = T.broadcast(T.int32(0), V)
                    for j in range(P[i], P[i + 1]):
                        for qq in range(QN):
                            for mv in T.unroll(MV):
                                xv[T.ramp(0, 1, 4 * V)] = xvec(X, I, j, qq, mo * mt + mv * V)
                                for rr in T.unroll(RT):
                                    acc[T.ramp((rr * MV + mv) * V, 1, V)] = _dp(
                                        path, V, acc[T.ramp((rr * MV + mv) * V, 1, V)], xv[T.ramp(0, 1, 4 * V)],
                                        wbcast(D, j, ro * RT + rr, qq), exact)
                    for rr in T.unroll(RT):
                        if i * r_ + ro * RT + rr < NS:
                            for mv in T.unroll(MV):
                                for l in T.vectorized(V):
                                    YT[i * r_ + ro * RT + rr, mo * mt + mv * V + l] = epi.value(
                                        acc[(rr * MV + mv) * V + l], C[i * r_ + ro * RT + rr],
                                        S[i * r_ + ro * RT + rr], B[i * r_ + ro * RT + rr])
    return qbsr_mvec
