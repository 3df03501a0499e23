"""N:M structured-sparse float32 kernels for Linear layers (and convs through im2col), hand-written TIR.

    y[mr, o] = sum_k x[mr, k] * W[o, k] + b[o],   W [N, K]: in every M consecutive inputs of a row at most
    `n` weights are non-zero (the sparsify pass's `pattern=n:m`, e.g. 2:4 or 4:8).

Storage (`to_nm`): the K inputs are cut into G = K / M groups (K a multiple of M: the sparsify pass leaves other
widths dense). Each output row keeps exactly n (value, in-group position) pairs per group (a group with fewer
non-zeros pads with zero values). Rows are tiled by R (one float32 vector of the target: 8 on AVX2, 16 on
AVX-512; N padded to a whole tile, padding rows zero) and stored *interleaved*, so that the R consecutive rows
of a tile have their p-th kept weight next to each other:
    values   float32 [NT, P, R]            NT = ceil(N / R), P = Gp * n kept positions per row
    indices  uint8   [NT, P / per, R]      the in-group position (0..M-1) of each kept weight, packed `bits`
                                           bits each: 2 bits for M = 4 (4 per byte), 4 bits for M <= 16
                                           (2 per byte), a byte otherwise
Gp (padded group count) rounds G up so that a packed byte never spans two steps of the kernel loop and, for
the x86 kernel, to whole windows of R inputs (the padding groups have zero values; the caller zero-pads x to
Gp·M columns). Stored bytes per kept weight: 4.25 for 2:4 (against 8 per kept weight, 2 weights per kept one,
in dense float32), 4.5 for 4:8; plus the zero padding of N to whole row tiles.

Kernels (nm_plan picks), all parallel over row tiles, register-tiled over MT rows of x:
  * "perm" (x86 with AVX2 / AVX-512, M dividing the vector width L = R = 8 / 16): the L inputs of a window
    (L/M whole groups) of one row of x are one vector; for each kept position the activations of the R output
    rows of a tile are picked from it with one vpermps (llvm.x86.avx2.permps / avx512.permvar.sf.512; the
    in-window indices are decoded from the packed positions once per kept position and shared by the MT rows
    of x), then one FMA with the R interleaved weights: no gathers, no scalar index arithmetic. With MT < 4
    rows of x, 4/MT independent accumulators per row hide the FMA latency. (A vgatherdps version of the
    gather kernel measured slower than this one by 2-6x on Zen 4, 4096x1024 at M=2, and is not kept.)
  * "gather" (other targets, M < 8, e.g. NEON): the same loop in portable TIR, the R activations loaded
    per lane: acc[mr, 0:R] += values[t, p, 0:R] * x[mr, g(p)·M + idx[t, p, 0:R]] (LLVM scalarizes the loads).
  * "mvec" (other targets, M >= 8): vectorized over rows of x (x transposed to [K, M], M zero-padded to the
    tile): acc[r, m-vector] += values[t, p, r] * xT[g(p)·M + idx[t, p, r], m-vector]; writes yT [N, M].
Float32 sums run in a different order than a dense GEMM: results agree to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tir_script import prim_func

__all__ = ["NM", "to_nm", "detect_nm", "nm_kernel", "nm_kind", "nm_plan", "nm_row_tile", "nm_m_tile", "perm_path",
           "emit_nm", "reference_nm"]


def _bits(m: int) -> int:
    return 2 if m <= 4 else 4 if m <= 16 else 8


@dataclass
class NM:
    """A [N, K] float32 matrix in interleaved N:M form (module docstring)."""

    shape: tuple[int, int]
    n: int
    m: int
    rows: int               # R, the row tile the storage is interleaved by
    groups: int             # Gp, padded group count (x is padded to groups * m columns)
    values: np.ndarray      # float32 [NT, P, R]
    indices: np.ndarray     # uint8 [NT, P / per, R]

    @property
    def bits(self) -> int:
        return _bits(self.m)

    @property
    def per(self) -> int:
        return 8 // self.bits

    @property
    def k_pad(self) -> int:
        return self.groups * self.m

    @property
    def stored_bytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes)

    def positions(self) -> np.ndarray:
        """Unpacked in-group positions, int [NT, P, R]."""
        b = self.bits
        shifts = (np.arange(self.per) * b).astype(np.uint8)
        u = (self.indices[:, :, None, :] >> shifts[None, None, :, None]) & np.uint8((1 << b) - 1)
        nt, q, _, r = u.shape
        return u.reshape(nt, q * self.per, r).astype(np.int64)

    def to_dense(self) -> np.ndarray:
        nt, p, r = self.values.shape
        pos = self.positions()
        cols = (np.arange(p) // self.n)[None, :, None] * self.m + pos             # [NT, P, R]
        out = np.zeros((nt, r, self.k_pad), np.float32)
        ti, _, ri = np.meshgrid(np.arange(nt), np.arange(p), np.arange(r), indexing="ij")
        np.add.at(out, (ti, ri, cols), self.values)
        return out.reshape(nt * r, self.k_pad)[: self.shape[0], : self.shape[1]]


def detect_nm(mask: np.ndarray, ms=(4, 8, 16)) -> tuple[int, int] | None:
    """(n, m) when every group of m consecutive inputs of every row of the [N, K] `mask` keeps exactly n
    (0 < n < m, K a multiple of m), for the smallest such m in `ms`; None otherwise. The sparsify pass's N:M
    masks keep exactly n per group, so 2:4 is found as 2:4 (not as 4:8, which it also satisfies)."""
    mask = np.asarray(mask) != 0
    if mask.ndim != 2 or mask.size == 0:
        return None
    nrows, k = mask.shape
    for m in ms:
        if k % m:
            continue
        counts = mask.reshape(nrows, k // m, m).sum(-1)
        n = int(counts.flat[0])
        if 0 < n < m and np.all(counts == n):
            return n, m
    return None


def _chunk_groups(n: int, m: int) -> int:
    """Groups per packed unit: the kernel loop steps over lcm(n, per) kept positions at a time."""
    per = 8 // _bits(m)
    return math.lcm(n, per) // n


def to_nm(w: np.ndarray, n: int, m: int, rows: int) -> NM:
    """Interleaved N:M storage of float32 `w` [N, K] (K a multiple of m, at most n non-zeros per group; a
    group with fewer keeps zeros at its lowest free positions). ValueError otherwise."""
    w = np.asarray(w, np.float32)
    nout, k = w.shape
    if k % m or not 0 < n < m:
        raise ValueError(f"to_nm: [{nout}, {k}] is not {n}:{m} (K must be a multiple of {m}, 0 < n < m)")
    g = k // m
    cg = _chunk_groups(n, m)
    if rows % m == 0:                      # whole windows of `rows` inputs too (the x86 perm kernel)
        cg = math.lcm(cg, rows // m)
    gp = -(-g // cg) * cg
    nt = -(-nout // rows)
    wp = np.zeros((nt * rows, gp, m), np.float32)
    wp[:nout, :g] = w.reshape(nout, g, m)
    nz = wp != 0
    if np.any(nz.sum(-1) > n):
        raise ValueError(f"to_nm: the [{nout}, {k}] weight has a group of {m} with more than {n} non-zeros")
    # kept positions: the non-zeros first (stable: ascending position), then zero positions as filler
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :n]                  # [Np, Gp, n]
    vals = np.take_along_axis(wp, order, -1)                                   # [Np, Gp, n]
    p = gp * n
    vals = vals.reshape(nt, rows, p).transpose(0, 2, 1)                        # [NT, P, R]
    pos = order.reshape(nt, rows, p).transpose(0, 2, 1).astype(np.uint8)      # [NT, P, R]
    b = _bits(m)
    per = 8 // b
    packed = np.zeros((nt, p // per, rows), np.uint8)
    for s in range(per):
        packed |= (pos[:, s::per, :] << np.uint8(s * b)).astype(np.uint8)
    return NM((nout, k), n, m, rows, gp, np.ascontiguousarray(vals), packed)


def nm_kind(mrows: int, lanes: int = 8) -> str:
    """'mvec' when the rows of x fill a vector of 8 (batch 8, conv pixels), else 'gather'."""
    return "mvec" if mrows >= 8 else "gather"


def nm_row_tile(lanes: int) -> int:
    """R, the output rows interleaved per tile: one float32 vector."""
    return max(4, lanes)


def nm_m_tile(mrows: int, rows: int, lanes: int, kind: str) -> int:
    """gather: rows of x per register tile (R-wide accumulators, at most ~12 (AVX2) / 24 (AVX-512) vectors);
    mvec: rows of x per vector tile, 8 or a multiple of `lanes` (the caller pads M to it)."""
    budget = 24 if lanes >= 16 else 12
    if kind == "gather":
        return max(1, min(mrows, budget // max(1, -(-rows // lanes)), 8))
    if mrows <= 8 or lanes <= 8:
        return 8
    vecs = max(1, min(-(-mrows // lanes), budget // rows))
    return vecs * lanes


_PERM = {"avx2": ("llvm.x86.avx2.permps", 8), "avx512": ("llvm.x86.avx512.permvar.sf.512", 16)}


def perm_path(spec) -> str:
    """'avx512' (16-lane vpermps) / 'avx2' (8-lane) on x86 LLVM targets with those features, else 'plain'."""
    if spec is None or getattr(spec, "kind", "") != "llvm" or getattr(spec, "arch", "") != "x86_64":
        return "plain"
    from tvm.target import codegen

    try:
        t = spec.tvm_target()
    except Exception:
        return "plain"
    for path, feature in (("avx512", "avx512f"), ("avx2", "avx2")):
        if codegen.target_has_features(feature, t):
            return path
    return "plain"


def reference_nm(x: np.ndarray, w: NM, bias: np.ndarray | None = None) -> np.ndarray:
    y = x.astype(np.float64) @ w.to_dense().astype(np.float64).T
    return y + (0 if bias is None else bias.astype(np.float64))


def nm_kernel(mrows: int, w: NM, mt: int, kind: str, gather: str = "plain"):
    """TIR PrimFunc for `w`'s shapes; `gather` (gather_path) picks the x86 gather instruction for the gather
    kernel ('plain': TIR loads per lane, which LLVM scalarizes). Arguments (in order):
        gather: X [mrows, k_pad],  values [NT, P, R], indices [NT, P/per, R], bias [NT*R], Y [mrows, NT*R]
        mvec:   XT [k_pad, mrows], values, indices, bias, YT [NT*R, mrows]  (mrows a multiple of mt)
    """
    from tvm.script import tirx as T

    nt, p, r_ = w.values.shape
    q = w.indices.shape[1]
    n_, m_, b_, per = w.n, w.m, w.bits, w.per
    mask = (1 << b_) - 1
    k_pad = w.k_pad
    n_pad = nt * r_
    chunk = math.lcm(n_, per)             # kept positions per unrolled step
    cg = chunk // n_                      # groups per step
    cb = chunk // per                     # packed bytes per step
    steps = p // chunk
    mo_n = -(-mrows // mt)

    if kind == "mvec":
        if mrows % mt:
            raise ValueError(f"nm mvec kernel: rows={mrows} must be a multiple of the tile {mt}")

        @prim_func
        def nm_mvec(XT: T.Buffer((k_pad, mrows), "float32"), V: T.Buffer((nt, p, r_), "float32"),
                    IDX: T.Buffer((nt, q, r_), "uint8"), B: T.Buffer((n_pad,), "float32"),
                    YT: T.Buffer((n_pad, mrows), "float32")):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            for t in T.parallel(nt):
                for mo in range(mo_n):
                    acc = T.decl_buffer((r_ * mt,), "float32")
                    for rr in T.unroll(r_):
                        for mi in T.vectorized(mt):
                            acc[rr * mt + mi] = T.float32(0)
                    for s in range(steps):
                        for c in T.unroll(chunk):
                            for rr in T.unroll(r_):
                                for mi in T.vectorized(mt):
                                    acc[rr * mt + mi] = acc[rr * mt + mi] + V[t, s * chunk + c, rr] * XT[
                                        (s * cg + c // n_) * m_ + T.Cast("int32", T.bitwise_and(
                                            T.shift_right(IDX[t, s * cb + c // per, rr], T.uint8((c % per) * b_)),
                                            T.uint8(mask))), mo * mt + mi]
                    for rr in T.unroll(r_):
                        for mi in T.vectorized(mt):
                            YT[t * r_ + rr, mo * mt + mi] = acc[rr * mt + mi] + B[t * r_ + rr]
        return nm_mvec

    if kind == "perm":
        return _perm_kernel(mrows, w, mt, gather)

    @prim_func
    def nm_gather(X: T.Buffer((mrows, k_pad), "float32"), V: T.Buffer((nt, p, r_), "float32"),
                  IDX: T.Buffer((nt, q, r_), "uint8"), B: T.Buffer((n_pad,), "float32"),
                  Y: T.Buffer((mrows, n_pad), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for t in T.parallel(nt):
            for mo in range(mo_n):
                acc = T.decl_buffer((mt * r_,), "float32")
                for mi in T.unroll(mt):
                    for rr in T.vectorized(r_):
                        acc[mi * r_ + rr] = T.float32(0)
                for s in range(steps):
                    for c in T.unroll(chunk):
                        for mi in T.unroll(mt):
                            for rr in T.vectorized(r_):
                                acc[mi * r_ + rr] = acc[mi * r_ + rr] + V[t, s * chunk + c, rr] * X[
                                    T.min(mo * mt + mi, mrows - 1),
                                    (s * cg + c // n_) * m_ + T.Cast("int32", T.bitwise_and(
                                        T.shift_right(IDX[t, s * cb + c // per, rr], T.uint8((c % per) * b_)),
                                        T.uint8(mask)))]
                for mi in T.unroll(mt):
                    if mo * mt + mi < mrows:
                        for rr in T.vectorized(r_):
                            Y[mo * mt + mi, t * r_ + rr] = acc[mi * r_ + rr] + B[t * r_ + rr]
    return nm_gather


def nm_plan(mrows: int, m: int, lanes: int, path: str) -> tuple[str, int, int]:
    """(kernel kind, R rows interleaved, MT rows of x per tile) for a layer with `mrows` rows of x, groups of
    `m`, on a target with `lanes` float32 lanes and permute path `path` (perm_path)."""
    if path in _PERM and _PERM[path][1] % m == 0:
        L = _PERM[path][1]
        return "perm", L, max(1, min(mrows, 8))
    rows = nm_row_tile(lanes)
    kind = nm_kind(mrows, lanes)
    return kind, rows, nm_m_tile(mrows, rows, lanes, kind)


def emit_nm(bb, x2, mrows: int, w: np.ndarray, bias: np.ndarray, nm: tuple[int, int], lanes: int,
            stored: NM | None = None, path: str = "plain"):
    """Relax: x2 [M, K] @ w.T + bias with the N:M kernel; returns (y [M, N], the NM storage)."""
    import tvm
    from tvm import relax

    def const(a):
        return relax.const(tvm.runtime.tensor(np.ascontiguousarray(a)))

    nout, k = w.shape
    kind, rows, mt = nm_plan(mrows, nm[1], lanes, path)
    if stored is None or stored.rows != rows:
        stored = to_nm(w, nm[0], nm[1], rows)
    m_pad = -(-mrows // mt) * mt if kind == "mvec" else mrows
    if stored.k_pad != k or m_pad != mrows:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, m_pad - mrows, 0, stored.k_pad - k], pad_value=0.0))
    if kind == "mvec":
        x2 = bb.emit(relax.op.permute_dims(x2, [1, 0]))
    n_pad = stored.values.shape[0] * rows
    b = np.zeros(n_pad, np.float32)
    b[:nout] = bias
    func = nm_kernel(m_pad, stored, mt, kind, path)
    gv = bb.add_func(func.without_attr("global_symbol"), f"graphopt_nm_{nm[0]}_{nm[1]}_{kind}")
    out_shape = [n_pad, m_pad] if kind == "mvec" else [mrows, n_pad]
    y = bb.emit(relax.call_tir(gv, [x2, const(stored.values), const(stored.indices), const(b)],
                               relax.TensorType(out_shape, "float32")))
    if kind == "mvec":
        if m_pad != mrows:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[mrows]))
        y = bb.emit(relax.op.permute_dims(y, [1, 0]))
    if n_pad != nout:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[nout]))
    return y, stored



def _perm_kernel(mrows: int, w: NM, mt: int, path: str):
    """The x86 kernel: per window of R = L consecutive inputs (L/M whole groups) and per row of x, the window
    is one vector; for each kept position the R activations of a tile's R output rows are picked from it
    with one vpermps (the in-window indices decoded from the packed positions, once per kept position and
    shared by the MT rows of x), then one FMA with the R interleaved weights."""
    from tvm.script import tirx as T

    name, L = _PERM[path]
    nt, p, r_ = w.values.shape
    if r_ != L or L % w.m:
        raise ValueError(f"nm perm kernel ({path}): needs storage interleaved by {L} rows and M dividing {L}, "
                         f"got {r_} rows, M={w.m}")
    q = w.indices.shape[1]
    n_, m_, b_, per = w.n, w.m, w.bits, w.per
    mask = (1 << b_) - 1
    k_pad = w.k_pad
    n_pad = nt * L
    S = math.lcm(n_, per, (L // m_) * n_)      # kept positions per unrolled step: whole bytes, whole windows
    if p % S:
        raise ValueError(f"nm perm kernel: {p} kept positions per row is not a multiple of the step {S}")
    sg = S // n_                               # groups per step
    sb = S // per                              # packed bytes per step
    steps = p // S
    mo_n = -(-mrows // mt)
    iid = T.llvm_lookup_intrinsic_id(name)

    A = max(1, min(4 // mt, S))               # independent accumulators per row of x (hide FMA latency)

    @prim_func
    def nm_perm(X: T.Buffer((mrows, k_pad), "float32"), V: T.Buffer((nt, p, r_), "float32"),
                IDX: T.Buffer((nt, q, r_), "uint8"), B: T.Buffer((n_pad,), "float32"),
                Y: T.Buffer((mrows, n_pad), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for t in T.parallel(nt):
            for mo in range(mo_n):
                acc = T.decl_buffer((mt * A * L,), "float32")
                iv = T.decl_buffer((L,), "int32")
                for u in T.unroll(mt * A):
                    acc[T.ramp(u * L, 1, L)] = T.broadcast(T.float32(0), L)
                for s in range(steps):
                    for c in T.unroll(S):
                        iv[T.ramp(0, 1, L)] = T.Cast(f"int32x{L}", T.bitwise_and(T.shift_right(
                            IDX[t, s * sb + c // per, T.ramp(0, 1, L)], T.broadcast(T.uint8((c % per) * b_), L)),
                            T.broadcast(T.uint8(mask), L))) + T.broadcast(((c // n_) * m_) % L, L)
                        for mi in T.unroll(mt):
                            acc[T.ramp((mi * A + c % A) * L, 1, L)] = acc[T.ramp((mi * A + c % A) * L, 1, L)] + V[
                                t, s * S + c, T.ramp(0, 1, L)] * T.call_llvm_pure_intrin(
                                    f"float32x{L}", iid, X[T.min(mo * mt + mi, mrows - 1),
                                                          T.ramp((s * sg + c // n_) // (L // m_) * L, 1, L)],
                                    iv[T.ramp(0, 1, L)])
                for mi in T.unroll(mt):
                    for a in T.unroll(1, A):
                        acc[T.ramp(mi * A * L, 1, L)] = acc[T.ramp(mi * A * L, 1, L)] + acc[T.ramp((mi * A + a) * L, 1, L)]
                    if mo * mt + mi < mrows:
                        Y[mo * mt + mi, T.ramp(t * L, 1, L)] = acc[T.ramp(mi * A * L, 1, L)] + B[T.ramp(t * L, 1, L)]
    return nm_perm
