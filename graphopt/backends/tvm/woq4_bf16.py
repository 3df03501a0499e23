"""int4 weight-only GEMV with bfloat16 dot products (AVX512-BF16 CPUs, precision="high").

The float32 int4 GEMV (weight_only.direct4_kernel) spends an and, a convert and an FMA on every 16 weights.
Here `vdpbf16ps` multiplies 32 bfloat16 pairs per instruction, and an int4 value is a bfloat16 without any
conversion: with the nibble q in mantissa bits 6..3 of 0x3F80, the 16 bits read 1 + q/16 (exact). Per 32
weights: one shift and one and-or (vpternlogd) make the pairs, two vdpbf16ps multiply them by the input's two
bfloat16 parts. A register-only loop of that step ran 56-58 G weights/s on one Zen 4 core against 36-38 for
the float32 step (scratch microbenchmark); a third vdpbf16ps (an exact three-part input) ran 37-39, no gain.

Contract (precision="high", PyTorch's name for float32 matmuls computed with bfloat16 parts): weights are
exact (int4 and 1 + q/16 are exact in bfloat16); each input x is carried as hi + lo, hi its bfloat16
truncation and lo the bfloat16 nearest to x - hi, so |x - (hi + lo)| <= 2^-16·|x| (|x| >= 2^-110; smaller
inputs lose more, vdpbf16ps flushes bfloat16 subnormals to zero). Products are exact and accumulate in float32
(the instruction rounds after each product, flushing float32 subnormals). Outputs differ from float32 by about
2^-16 of Σ|x|·|w| plus float32 rounding. NaN inputs give NaN; ±Inf inputs give ±Inf or NaN (as the float32
kernels, which add the zero-point term Σx·o).

Layout: W [NB, KW, L] int32, one word per (8 inputs, column): input 8w + 2s + h is nibble s of half h (bits
16h + 4s .. 16h + 4s + 3), so step s (shifted left 3 for s = 0, right 4s - 3 otherwise, masked with
0x00780078, or-ed with 0x3F803F80) pairs inputs 8w + 2s and 8w + 2s + 1, the same pair of consecutive inputs
that one 32-bit load of the bfloat16 input rows XH / XL holds. Per group the kernel accumulates
A = Σ x_b·(1 + q/16) over x_b = hi + lo and adds 16·s·A + (o - 16·s)·Σx_b (o = -z·s) once per group.
"""
from __future__ import annotations

import numpy as np

from .tir_script import prim_func

__all__ = ["LLVM_DPBF16PS", "has_avx512bf16", "pack_bf16_words", "split_kernel", "gemv_kernel", "emit"]

# vdpbf16ps takes <32 x bfloat> operands, a type TVM's LLVM code generator has no dtype for: the kernel calls
# this function with the bits as <16 x i32> and imports it as LLVM IR (pragma_import_llvm), inlined where called.
LLVM_DPBF16PS = """
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define <16 x float> @graphopt_dpbf16ps(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}
"""
L = 16
# Rows -> column blocks per task (2·rows·blocks accumulator chains). One 4096 x 4096 layer, groups of 128, 2
# threads, 2-core Zen 4, builds timed interleaved (scratch): 1 row: 2 / 4 / 8 blocks 0.298 / 0.251 / 0.245 ms
# (the whole MLP 0.338 / 0.310 for 4 / 8); 2 rows: 0.403 / 0.372 / 0.582 (float32 int4 kernel 0.423); 4 rows:
# 0.759 / 0.989 / 1.561 against the float32 kernel's 0.787: no gain past 2 rows (two vdpbf16ps per row for 32
# weights cost what one FMA per row for 16 does), so 3-4 rows keep the float32 kernel.
COLUMN_BLOCKS = {1: 8, 2: 4}


def has_avx512bf16(spec) -> bool:
    """Whether `spec` (a TargetSpec) is an x86 LLVM target with AVX512-BF16 (Cooper Lake, Sapphire Rapids and
    later Xeons, AMD Zen 4 and later)."""
    if spec is None or getattr(spec, "kind", "") != "llvm" or getattr(spec, "arch", "") != "x86_64":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx512bf16", spec.tvm_target()))
    except Exception:
        return False


def pack_bf16_words(q: np.ndarray, nbp: int, kw: int) -> np.ndarray:
    """int4 values q [N, K] (0..15) -> int32 words [NB, KW, L] in this kernel's layout (module docstring); N
    padded to nbp·L columns and K to 8·kw inputs with zeros."""
    n, k = q.shape
    q = np.pad(q.astype(np.uint32), ((0, nbp * L - n), (0, 8 * kw - k))).reshape(nbp, L, kw, 4, 2)
    words = np.zeros((nbp, L, kw), np.uint32)
    for s in range(4):
        for h in range(2):
            words |= q[..., s, h] << np.uint32(16 * h + 4 * s)
    return np.ascontiguousarray(words.transpose(0, 2, 1)).view(np.int32)


def split_kernel(M: int, K: int, NG: int):
    """TIR: X [M, K] float32 (K = NG·G, a multiple of 16) -> XH, XL [M, K] uint16 (the bfloat16 bits of hi
    and lo) and XS [M, NG] float32 (Σ hi + lo per group). HM [1] holds the hi mask 0xFFFF0000 (a parameter:
    TVM's RewriteDataflowReshape inspects every one-input kernel for a reshape pattern, which fails on a kernel
    without blocks)."""
    from tvm.script import tirx as T

    G = K // NG

    @prim_func
    def woq4_bf16_split(X: T.Buffer((M, K), "float32"), HM: T.Buffer((1,), "uint32"), XH: T.Buffer((M, K), "uint16"),
                        XL: T.Buffer((M, K), "uint16"), XS: T.Buffer((M, NG), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        part = T.decl_buffer((L,), "float32")
        for mi in range(M):
            for g in range(NG):
                for j in T.vectorized(L):
                    part[j] = T.float32(0)
                for c in range(G // L):
                    for j in T.vectorized(L):
                        x = T.meta_var(X[mi, g * G + c * L + j])
                        # hi: the top 16 bits (a NaN: a quiet NaN's), lo: the rest rounded to nearest (0 when hi
                        # is not finite). (meta_var, not assignment: a let inside a vectorized loop took one lane)
                        hb = T.meta_var(T.Select(x != x, T.uint32(0x7FC00000),
                                                 T.bitwise_and(T.reinterpret(x, dtype="uint32"), HM[0])))
                        hi = T.meta_var(T.reinterpret(hb, dtype="float32"))
                        r = T.meta_var(T.Select(T.bitwise_and(hb, T.uint32(0x7F800000)) == T.uint32(0x7F800000),
                                                T.float32(0), x - hi))
                        rb = T.meta_var(T.reinterpret(r, dtype="uint32"))
                        lb = T.meta_var(T.bitwise_and(rb + T.uint32(0x7FFF) + T.bitwise_and(
                            T.shift_right(rb, T.uint32(16)), T.uint32(1)), T.uint32(0xFFFF0000)))
                        XH[mi, g * G + c * L + j] = T.Cast("uint16", T.shift_right(hb, T.uint32(16)))
                        XL[mi, g * G + c * L + j] = T.Cast("uint16", T.shift_right(lb, T.uint32(16)))
                        part[j] = part[j] + (hi + T.reinterpret(lb, dtype="float32"))
                XS[mi, g] = T.float32(0)
                for j in range(L):
                    XS[mi, g] = XS[mi, g] + part[j]
    return woq4_bf16_split


def gemv_kernel(M: int, KW: int, NG: int, NB: int, NT: int):
    """TIR: Y [M, NB·L] = the GEMV of this module's docstring. XH, XL [M, 8·KW] uint16, XS [M, NG], W [NB, KW, L]
    int32, S16 = 16·s and O16 = o - 16·s [NB, NG, L] float32, bias [NB·L]. Parallel over blocks of NT column
    blocks; the hi and lo products accumulate in separate registers (2·M·NT independent chains)."""
    from tvm.script import tirx as T

    GW = KW // NG
    NBO = NB // NT
    N = NB * L
    A = M * NT * L
    K = KW * 8

    @prim_func
    def woq4_bf16_gemv(XH: T.Buffer((M, K), "uint16"), XL: T.Buffer((M, K), "uint16"),
                       XS: T.Buffer((M, NG), "float32"), W: T.Buffer((NB, KW, L), "int32"),
                       S16: T.Buffer((NB, NG, L), "float32"), O16: T.Buffer((NB, NG, L), "float32"),
                       Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in T.parallel(NBO):
            with T.attr(0, "pragma_import_llvm", LLVM_DPBF16PS):
                acc = T.decl_buffer((A,), "float32")
                acch = T.decl_buffer((A,), "float32")
                accl = T.decl_buffer((A,), "float32")
                wv = T.decl_buffer((NT * L,), "int32")
                for t in T.unroll(M * NT):
                    for j in T.vectorized(L):
                        acc[t * L + j] = T.float32(0)
                for g in range(NG):
                    for t in T.unroll(M * NT):
                        for j in T.vectorized(L):
                            acch[t * L + j] = T.float32(0)
                            accl[t * L + j] = T.float32(0)
                    for w in range(GW):
                        for s in T.unroll(4):
                            for nt in T.unroll(NT):
                                for j in T.vectorized(L):
                                    wv[nt * L + j] = T.bitwise_or(T.bitwise_and(T.if_then_else(
                                        s == 0, T.shift_left(W[nbo * NT + nt, g * GW + w, j], 3),
                                        T.shift_right(W[nbo * NT + nt, g * GW + w, j], 4 * s - 3)),
                                        0x00780078), 0x3F803F80)
                            for mi in T.unroll(M):
                                for nt in T.unroll(NT):
                                    acch[T.ramp((mi * NT + nt) * L, 1, L)] = T.call_pure_extern(
                                        "float32x16", "graphopt_dpbf16ps", acch[T.ramp((mi * NT + nt) * L, 1, L)],
                                        wv[T.ramp(nt * L, 1, L)], T.broadcast(T.reinterpret(
                                            XH.vload([mi, (g * GW + w) * 8 + 2 * s], "uint16x2"), dtype="int32"), L))
                                    accl[T.ramp((mi * NT + nt) * L, 1, L)] = T.call_pure_extern(
                                        "float32x16", "graphopt_dpbf16ps", accl[T.ramp((mi * NT + nt) * L, 1, L)],
                                        wv[T.ramp(nt * L, 1, L)], T.broadcast(T.reinterpret(
                                            XL.vload([mi, (g * GW + w) * 8 + 2 * s], "uint16x2"), dtype="int32"), L))
                    for mi in T.unroll(M):
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + (
                                    acch[(mi * NT + nt) * L + j] + accl[(mi * NT + nt) * L + j]) * S16[
                                    nbo * NT + nt, g, j] + XS[mi, g] * O16[nbo * NT + nt, g, j]
                for mi in T.unroll(M):
                    for nt in T.unroll(NT):
                        for j in T.vectorized(L):
                            Y[mi, (nbo * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + Bi[(nbo * NT + nt) * L + j]
    return woq4_bf16_gemv


def emit(bb, x, shape, m: int, k: int, n: int, q, scales, offsets, bias, g: int, nbp: int, nt: int, const):
    """Relax: the split and GEMV kernels for float32 x (m rows of k inputs, `shape` its shape) and int4 values q
    [N, K] with scales / offsets o = -z·s [N, NG] in groups of g inputs (a multiple of 8; x padded with zeros
    to NG·g). Returns (float32 [..., N] expression, kernel name)."""
    from tvm import relax

    from .weight_only import _group_table

    R = relax.op
    ng = scales.shape[1]
    kpad = ng * g
    if kpad % L:                        # the split kernel works in 16-lane vectors: pad with zero inputs
        raise ValueError(f"woq4_bf16: {kpad} inputs is not a multiple of {L}")
    x2 = bb.emit(R.reshape(x, [m, k]))
    if kpad != k:
        x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, kpad - k], pad_value=0.0))
    split = bb.add_func(split_kernel(m, kpad, ng).without_attr("global_symbol"), "graphopt_woq4_bf16_split")
    hm = const(np.array([0xFFFF0000], np.uint32))
    parts = bb.emit(relax.call_tir(split, [x2, hm], [relax.TensorType([m, kpad], "uint16"),
                                                 relax.TensorType([m, kpad], "uint16"),
                                                 relax.TensorType([m, ng], "float32")]))
    s16 = scales.astype(np.float32) * np.float32(16)
    args = [relax.TupleGetItem(parts, 0), relax.TupleGetItem(parts, 1), relax.TupleGetItem(parts, 2),
            const(pack_bf16_words(q, nbp, kpad // 8)), const(_group_table(s16, L, nbp, np.float32)),
            const(_group_table(offsets.astype(np.float32) - s16, L, nbp, np.float32)),
            const(np.pad(bias.astype(np.float32), (0, nbp * L - n)))]
    gemv = bb.add_func(gemv_kernel(m, kpad // 8, ng, nbp, nt).without_attr("global_symbol"), "graphopt_woq4_bf16")
    y = bb.emit(relax.call_tir(gemv, args, relax.TensorType([m, nbp * L], "float32")))
    if nbp * L != n:
        y = bb.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return bb.emit(R.reshape(y, [*shape[:-1], n])), "int4 direct bf16x2"
