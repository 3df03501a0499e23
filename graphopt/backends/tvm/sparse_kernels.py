"""Block-sparse (BSR) float32 kernels for Linear layers, hand-written TIR (TVM removed its BSR operators in 2025).

    y[m, n] = sum_k x[m, k] * W[n, k] + b[n],   W [N, K] stored as BSR with R x C blocks
    (R consecutive output features x C consecutive input features; 1x1 is CSR).

Storage (`to_bsr`): W zero-padded to [NB*R, KB*C] (NB = ceil(N/R), KB = ceil(K/C)); the blocks with any
non-zero are kept: `data` float32 [nnzb, R, C] (or [nnzb, C, R] for the row-vector kernel), `indices` uint16
[nnzb] (block column; int32 past 65,536 block columns), `indptr` int32 [NB + 1]. Values + indices are what
a compiled artifact stores.

Three kernels, all parallel over block rows, with a register tile over the M dimension:
  * "rowvec" (R >= C, e.g. 16x1, 4x4, 1x1): per non-zero block and per column c, acc[m, 0:R] +=
    data[j, c, 0:R] * xt[col*C + c, m] (a broadcast FMA over R output features); x is pre-transposed
    to [KB*C, M] so an M tile is contiguous.
  * "colvec" (C > R, e.g. 1x16): acc[m, r, 0:C] += data[j, r, 0:C] * x[m, col*C : col*C + C], reduced
    horizontally once per output (C > R with few rows, e.g. a batch-1 Linear with 1x16 blocks).
  * "mvec" (C > R and M >= the vector width): acc[r, m-vector] += data[j, r, c] * xt[col*C + c, m-vector],
    vectorized over rows of x (x transposed to [K, M], M zero-padded to the tile); writes yT [N, M].
Ragged tails: N and K are padded to whole blocks (zero blocks are never stored; x is zero-padded along K by
the caller), M needs no padding (rows beyond M are clamped on load and never stored). Float32 sums run in a
different order from a dense GEMM: results agree to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tir_script import prim_func

__all__ = ["BSR", "to_bsr", "bsr_kernel", "kernel_kind", "row_tile", "reference_bsr_dense"]


@dataclass
class BSR:
    """A [N, K] float32 matrix in BSR form (see module docstring)."""

    shape: tuple[int, int]
    block: tuple[int, int]
    data: np.ndarray        # [nnzb, R, C] ('colvec') or [nnzb, C, R] ('rowvec')
    indices: np.ndarray     # uint16 [nnzb] (int32 beyond 65,536 block columns)
    indptr: np.ndarray      # int32 [NB + 1]
    kind: str

    @property
    def nnzb(self) -> int:
        return int(self.indices.shape[0])

    @property
    def stored_bytes(self) -> int:
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    def to_dense(self) -> np.ndarray:
        r, c = self.block
        n, k = self.shape
        nb = self.indptr.shape[0] - 1
        kb = -(-k // c)
        out = np.zeros((nb, r, kb, c), np.float32)
        for i in range(nb):
            for j in range(self.indptr[i], self.indptr[i + 1]):
                blk = self.data[j].T if self.kind == "rowvec" else self.data[j]
                out[i, :, self.indices[j], :] = blk
        return out.reshape(nb * r, kb * c)[:n, :k]


def kernel_kind(block: tuple[int, int], m: int = 1, lanes: int = 8) -> str:
    """rowvec when R >= C; for C > R: mvec when M fills a vector, else colvec."""
    r, c = block
    if c <= r:
        return "rowvec"
    return "mvec" if m >= lanes else "colvec"


def to_bsr(w: np.ndarray, block: tuple[int, int], kind: str | None = None) -> BSR:
    """BSR of float32 `w` [N, K] with `block` = (R, C); blocks that are all zero are not stored. `kind` (the
    kernel, default kernel_kind(block)) sets the data layout."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    r, c = block
    nb, kb = -(-n // r), -(-k // c)
    wp = np.zeros((nb * r, kb * c), np.float32)
    wp[:n, :k] = w
    blocks = wp.reshape(nb, r, kb, c).transpose(0, 2, 1, 3)           # [NB, KB, R, C]
    nz = np.any(blocks != 0, axis=(2, 3))                             # [NB, KB]
    rows, cols = np.nonzero(nz)                                       # row-major: sorted by block row
    indptr = np.zeros(nb + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=nb), out=indptr[1:])
    data = blocks[rows, cols]                                         # [nnzb, R, C]
    kind = kind or kernel_kind(block)
    if kind == "rowvec":
        data = data.transpose(0, 2, 1)                                # [nnzb, C, R]
    if data.shape[0] == 0:                                            # an all-zero matrix: one zero block
        data = np.zeros((1,) + data.shape[1:], np.float32)           # (TVM buffers cannot be empty)
        cols = np.zeros(1, np.int64)
    idx_dtype = np.uint16 if kb <= 1 << 16 else np.int32                 # 2-byte block columns when they fit
    return BSR((n, k), (r, c), np.ascontiguousarray(data, np.float32), cols.astype(idx_dtype), indptr, kind)


def reference_bsr_dense(x: np.ndarray, m: BSR, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference: x @ W.T + b (float64 accumulate), for tests."""
    y = x.astype(np.float64) @ m.to_dense().astype(np.float64).T
    return y + (0 if bias is None else bias.astype(np.float64))


def row_tile(m: int, block: tuple[int, int], lanes: int, kind: str | None = None) -> int:
    """Rows of the register tile: at most ~12 vector accumulators (16 vector registers on AVX2/NEON, 32 on
    AVX-512, leaving room for the weight vector and broadcasts). For mvec: rows per tile, a multiple of
    `lanes` (the caller pads M to a multiple of it)."""
    r, c = block
    kind = kind or kernel_kind(block)
    if kind == "mvec":
        budget = 24 if lanes >= 16 else 12
        vecs = max(1, min(-(-m // lanes), budget // r, 8))
        return vecs * lanes
    vecs = -(-r // lanes) if kind == "rowvec" else r * -(-c // lanes)
    budget = 24 if lanes >= 16 else 12
    return max(1, min(m, budget // max(1, vecs), 16))


def bsr_kernel(m: int, n_pad: int, k_pad: int, nnzb: int, block: tuple[int, int], mt: int,
               kind: str | None = None, idx_dtype: str = "uint16"):
    """TIR PrimFunc. Arguments (in order):
        rowvec: XT [k_pad, m], data [nnzb, C, R], indices [nnzb], indptr [NB+1], bias [n_pad], Y [m, n_pad]
        colvec: X [m, k_pad],  data [nnzb, R, C], indices [nnzb], indptr [NB+1], bias [n_pad], Y [m, n_pad]
        mvec:   XT [k_pad, m], data [nnzb, R, C], indices [nnzb], indptr [NB+1], bias [n_pad], YT [n_pad, m]
                (m a multiple of mt: the caller pads rows)
    """
    from tvm.script import tirx as T

    r_, c_ = block
    nb = n_pad // r_
    mo_n = -(-m // mt)
    kind = kind or kernel_kind(block)

    if kind == "mvec":
        if m % mt:
            raise ValueError(f"bsr mvec kernel: m={m} must be a multiple of the tile {mt}")

        @prim_func
        def bsr_mvec(XT: T.Buffer((k_pad, m), "float32"), D: T.Buffer((nnzb, r_, c_), "float32"),
                     IDX: T.Buffer((nnzb,), idx_dtype), PTR: T.Buffer((nb + 1,), "int32"),
                     B: T.Buffer((n_pad,), "float32"), YT: T.Buffer((n_pad, m), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for i in T.parallel(nb):
                for mo in range(mo_n):
                    acc = T.decl_buffer((r_ * mt,), "float32")
                    for rr in T.unroll(r_):
                        for mi in T.vectorized(mt):
                            acc[rr * mt + mi] = T.float32(0)
                    for j in range(PTR[i], PTR[i + 1]):
                        for cc in range(c_):
                            for rr in T.unroll(r_):
                                for mi in T.vectorized(mt):
                                    acc[rr * mt + mi] = acc[rr * mt + mi] + D[j, rr, cc] * XT[
                                        T.Cast("int32", IDX[j]) * c_ + cc, mo * mt + mi]
                    for rr in T.unroll(r_):
                        for mi in T.vectorized(mt):
                            YT[i * r_ + rr, mo * mt + mi] = acc[rr * mt + mi] + B[i * r_ + rr]
        return bsr_mvec

    if kind == "rowvec":
        @prim_func
        def bsr_rowvec(XT: T.Buffer((k_pad, m), "float32"), D: T.Buffer((nnzb, c_, r_), "float32"),
                       IDX: T.Buffer((nnzb,), idx_dtype), PTR: T.Buffer((nb + 1,), "int32"),
                       B: T.Buffer((n_pad,), "float32"), Y: T.Buffer((m, n_pad), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for i in T.parallel(nb):
                for mo in range(mo_n):
                    acc = T.decl_buffer((mt * r_,), "float32")
                    for t in T.unroll(mt):
                        for rr in T.vectorized(r_):
                            acc[t * r_ + rr] = T.float32(0)
                    for j in range(PTR[i], PTR[i + 1]):
                        for cc in range(c_):
                            for mi in T.unroll(mt):
                                for rr in T.vectorized(r_):
                                    acc[mi * r_ + rr] = acc[mi * r_ + rr] + D[j, cc, rr] * XT[
                                        T.Cast("int32", IDX[j]) * c_ + cc, T.min(mo * mt + mi, m - 1)]
                    for mi in T.unroll(mt):
                        if mo * mt + mi < m:
                            for rr in T.vectorized(r_):
                                Y[mo * mt + mi, i * r_ + rr] = acc[mi * r_ + rr] + B[i * r_ + rr]
        return bsr_rowvec

    @prim_func
    def bsr_colvec(X: T.Buffer((m, k_pad), "float32"), D: T.Buffer((nnzb, r_, c_), "float32"),
                   IDX: T.Buffer((nnzb,), idx_dtype), PTR: T.Buffer((nb + 1,), "int32"),
                   B: T.Buffer((n_pad,), "float32"), Y: T.Buffer((m, n_pad), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for i in T.parallel(nb):
            for mo in range(mo_n):
                acc = T.decl_buffer((mt * r_ * c_,), "float32")
                for t in T.unroll(mt * r_):
                    for cc in T.vectorized(c_):
                        acc[t * c_ + cc] = T.float32(0)
                for j in range(PTR[i], PTR[i + 1]):
                    for rr in T.unroll(r_):
                        for mi in T.unroll(mt):
                            for cc in T.vectorized(c_):
                                acc[(mi * r_ + rr) * c_ + cc] = acc[(mi * r_ + rr) * c_ + cc] + D[j, rr, cc] * X[
                                    T.min(mo * mt + mi, m - 1), T.Cast("int32", IDX[j]) * c_ + cc]
                for mi in T.unroll(mt):
                    if mo * mt + mi < m:
                        for rr in T.unroll(r_):
                            Y[mo * mt + mi, i * r_ + rr] = B[i * r_ + rr]
                            for cc in range(c_):
                                Y[mo * mt + mi, i * r_ + rr] = Y[mo * mt + mi, i * r_ + rr] + acc[
                                    (mi * r_ + rr) * c_ + cc]
    return bsr_colvec
