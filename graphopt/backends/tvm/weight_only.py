"""Weight-only quantized Linear kernels (int8 and int4 weights, float32 activations and accumulation).

Lowers ``graphopt::woq_linear`` (int8, per output channel) and ``graphopt::woq_linear_packed`` (int8 or int4,
group-wise scales and zero points; graphopt.quant.weight_only) to hand-written TIR that reads the quantized
bytes and dequantizes them inside the GEMM loop, so a layer reads 1 (int8) or 1/2 (int4) byte per weight
instead of 4. Vectors are the target's float32 SIMD width (16 lanes AVX-512, 8 AVX2, 4 NEON).

Weight layouts (packed at compile time, numpy): columns in blocks of L lanes,
  int8 / pairs   [NB, 2·KP, L] int8, or [NB, KP, L] uint8 for 4-bit (low nibble: input 2·kp, high: 2·kp + 1)
  int4 words     [NB, K/8, L] int32, 8 nibbles per word (the int4 GEMV kernel, groups of 8k inputs)
scales float32 and zero points [NB, NG, L] (NG groups along K), bias float32 [NB·L]; codebooks (weight
sharing, graphopt.quant.cluster) float32 [16] or [256].

Kernels, picked by the number of rows M (tokens × batch) at compile time:
  direct (M <= 4: batch-1 GEMV, memory-bound): per group, x·float32(q) and Σx are accumulated (even and odd
      inputs in separate accumulators: independent FMA chains) and s·Σxq + o·Σx (o = -z·s) is added at the
      group's end: no per-weight subtract or multiply. int4 with groups of 8k inputs uses direct4_kernel
      (words of 8 nibbles masked in place against pre-scaled inputs: and + convert + FMA per vector, as
      cheap as an int8 weight; with precision="high" on AVX512-BF16 CPUs, 1-2 rows in groups of 16k take
      woq4_bf16's vdpbf16ps kernel instead: inputs as two bfloat16, 2^-16 relative). Codebooks: the integer
      indexes the codebook (one vpermd of the codebook register for 4-bit indices on AVX-512; on AVX2 byte
      shuffles of the entries' byte planes, lut16_shuffle_kernel; a gather elsewhere: on AVX2, codebooks
      only a gather could look up run as float32, codebook_as_float32). AVX2 uses 16-lane blocks (two ymm),
      and for int4 words the blocks and accumulator sets of INT4_GEMV_AVX2 by row count.
  panel  (M > 4: compute-bound): per block of NT·L output columns and chunk of inputs the weights are
      dequantized once into a float32 panel (<= 64 KiB, stays in L1/L2) and an MT x NT·L register-tiled
      float32 micro-kernel runs over all rows; partial sums go through the output between chunks.
      Dequantization is paid once per weight, not once per row, and overlaps with FMAs: the first row tile
      converts each weight vector in registers, feeds it to its own FMAs and stores it to the panel; the
      other row tiles (whole MT tiles, then one tail tile of M mod MT rows: no rows computed twice) read the
      panel. int4 in groups of 8k inputs dequantizes the GEMV's words there too (and + convert + FMA).
      Tiles: 6 x 2·8 on AVX2 (the float32 GEMM's, schedules.PackedGemm; a first tile of 5 rows where
      scale / zero-point vectors take registers), 8 x 2·16 on AVX-512, 6 x 4·4 on NEON.
Both are parallel over column blocks. Results equal x @ dequantized(W).T + bias up to float32 rounding
(summation order, FMA contraction, the zero-point term subtracted once per group).
Input tails: an odd K: the direct kernel reads its last pair's missing input at index K-1 against weight
q = z (zero), the panel kernel loops over the K inputs that exist; a last
group shorter than group_size loops over what exists (the word kernel pads x with zeros instead); N is padded
to whole NT·L blocks and sliced off.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...errors import LoweringError
from . import woq4_bf16
from .tir_script import prim_func

__all__ = ["lanes_for", "pack_weights", "unpack_nibbles", "direct_kernel", "panel_kernel", "tiles", "emit_woq",
           "DIRECT_MAX_ROWS"]

DIRECT_MAX_ROWS = 4
_PANEL_BYTES = 64 * 1024
# AVX2 int4 GEMV (direct4_kernel) by row count: (lanes per column block, column blocks per task, accumulator
# sets); FMA chains = rows x blocks x sets x lanes / 8. Each weight vector's step is vpand + vcvtdq2ps, then one
# FMA per row. Measured on a 2-core AVX2 EPYC (znver2, 3.3 GHz), one 4096x4096 layer, groups of 128, 2 threads,
# median ms: 1 row 0.397 (16 x 2 x 1, the previous choice) -> 0.352 (8 x 5 x 1; 8 x 4 x 1 0.397, 8 x 6 x 1
# 0.480: in a register-only asm loop of the step, five chains ran 0.96-0.98 vectors per cycle and six to eight
# 0.69, conversions and FMAs contending past five while four leave the 5-cycle FMA latency exposed); 3 rows 0.80
# (16 x 1 x 2) -> 0.63 (8 x 3 x 1; 8 x 2 x 2 0.78, 8 x 4 x 1 1.12); 2 and 4 rows keep 16 x 1 x 2 (0.49; 8 x 2 x 2
# 0.49-0.50) and 16 x 1 x 1 (0.91; 8 x 2 x 1 0.90, 8 x 3 x 1 1.36).
INT4_GEMV_AVX2 = {1: (8, 5, 1), 2: (16, 1, 2), 3: (8, 3, 1), 4: (16, 1, 1)}


def lanes_for(spec) -> tuple[int, int]:
    """(float32 lanes of one SIMD vector, SIMD registers) of an LLVM CPU target spec."""
    from .schedules import cpu_vector

    v = cpu_vector(spec.tvm_target())
    return v.lanes("float32"), v.registers


def tiles(m: int, nb: int, lanes: int, registers: int, cores: int) -> tuple[str, int, int]:
    """(kernel, MT rows, NT column blocks) for an M x (nb·lanes) output."""
    if m <= DIRECT_MAX_ROWS:
        # accumulators: M x NT, and 2 (even/odd inputs) x M x NT of the group; the NT dequantized pairs
        nt = 4 if registers >= 32 else 2
        nt = max(1, min(nt, (registers - 4) // (3 * m + 2)))
        while nt > 1 and math.ceil(nb / nt) < 2 * cores:        # keep every core busy on small layers
            nt //= 2
        return "direct", m, nt
    # (rows need not divide M: the panel kernel ends with a tail tile)
    if registers >= 32:
        nt = 4 if lanes == 4 else 2                            # NEON: 6 x 4·4, AVX-512: 8 x 2·16
        mt = 6 if lanes == 4 else 8
    else:
        nt, mt = 2, 6                                          # AVX2: 6 x 2·8 = 12 accumulators of 16
    while nt > 1 and math.ceil(nb / nt) < cores:
        nt //= 2
    return "panel", mt, nt


def pack_weights(q: np.ndarray, bits: int, lanes: int, nbp: int) -> np.ndarray:
    """Integer weights q [N, K] (int8 values, or int4 values 0..15) in the kernels' layout, N padded to nbp·L
    columns and K to an even count with zeros (int4 pads with 0: the zero point of a padded column is 0)."""
    n, k = q.shape
    kp = (k + 1) // 2
    q = np.pad(q.astype(np.int16), ((0, nbp * lanes - n), (0, 2 * kp - k)))
    blocks = q.reshape(nbp, lanes, 2 * kp).transpose(0, 2, 1)             # [NB, 2KP, L]
    if bits == 8:
        return np.ascontiguousarray(blocks.astype(np.int8))
    lo, hi = blocks[:, 0::2, :], blocks[:, 1::2, :]
    return np.ascontiguousarray((lo | (hi << 4)).astype(np.uint8))


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 [N, k] of two-per-byte values (graphopt.quant.weight_only.pack_int4's layout: low nibble first)."""
    u = packed.astype(np.uint8)
    return np.stack([u & 15, u >> 4], axis=2).reshape(u.shape[0], -1)[:, :k]


def _group_table(v: np.ndarray, lanes: int, nbp: int, dtype) -> np.ndarray:
    """[N, NG] per-group values -> [NB, NG, L] (padded columns 0)."""
    n, ng = v.shape
    v = np.pad(v.astype(dtype), ((0, nbp * lanes - n), (0, 0)))
    return np.ascontiguousarray(v.reshape(nbp, lanes, ng).transpose(0, 2, 1))


def _dequant_k(T, W, S, Z, bits, sym, scaled, nb, g, k, j, CB=None, C: int = 1):
    """float32 value of the weight of input k (an expression; the high nibble of byte k // 2 when k is odd for
    4-bit), vectorized over lane j by the caller's loop: (q - z)·s, or a codebook entry when C > 1."""
    if C > 1:
        if bits == 8:
            return CB[T.bitwise_and(T.Cast("int32", W[nb, k, j]), 255)]
        return CB[T.bitwise_and(T.shift_right(T.Cast("int32", W[nb, k // 2, j]), (k % 2) * 4), 15)]
    if bits == 8:
        q = T.Cast("int32", W[nb, k, j])
    else:
        q = T.bitwise_and(T.shift_right(T.Cast("int32", W[nb, k // 2, j]), (k % 2) * 4), 15)
    if not sym:
        q = q - Z[nb, g, j]
    w = T.Cast("float32", q)
    return w * S[nb, g, j] if scaled else w


def _odd_input(T, X, mi, k, K: int, odd: bool, C: int):
    """X[mi, k], the odd input of a pair. An odd K's last pair has none: integer weights read X[mi, K - 1] there
    against a padded weight that contributes nothing (q = z, zero after the zero-point term); a codebook's padded
    index 0 picks CB[0], which need not be 0, so the missing input reads as 0 instead."""
    if not odd:
        return X[mi, k]
    if C > 1:
        return T.if_then_else(k < K, X[mi, T.min(k, K - 1)], T.float32(0))
    return X[mi, T.min(k, K - 1)]


def _extent(T, full, rest, ragged: bool):
    """min(full, rest) when the last block is ragged, else `full` (a constant extent LLVM can see)."""
    return T.min(full, rest) if ragged else full


def _channel_scale(T, S, nb, j, per_channel: bool):
    return S[nb, 0, j] if per_channel else T.float32(1)


def _group_of(kp, GP: int, per_channel: bool):
    return 0 if per_channel else kp // GP


def direct_kernel(M: int, K: int, NB: int, L: int, NT: int, bits: int, G: int, sym: bool, C: int = 1,
                  permute: bool = False, avx512: bool = True):
    """TIR for M <= 4 rows: Y[M, NB·L] = X · dequant(W)ᵀ + B, G the group size (even; G >= K: one group per
    channel). Per group g the kernel sums x·float32(q) (the raw integers: no per-weight subtract or scale)
    and Σx, then adds s·Σx·q + o·Σx with o = -z·s (O [NB, NG, L]; absent when symmetric): the same value
    as Σ x·(q - z)·s up to float32 rounding (the zero-point term is subtracted once per group).
    C > 1: the integers are indices into the codebook CB [C] (weight sharing): w = CB[q] (· S).
    permute (x86, C = 16, 4-bit): the lookup is one vpermps of the codebook register (`avx512`, L = 16), or two
    and a blend per 8 lanes (AVX2; a gather per lane there ran 10x slower than the int4 kernel: _permute16; the
    AVX2 GEMV of one 16-column block per task takes lut16_shuffle_kernel instead)."""
    from tvm.script import tirx as T

    KP = (K + 1) // 2
    per_channel = G >= 2 * KP
    NG = 1 if per_channel else (K + G - 1) // G
    GP = KP if per_channel else G // 2          # pairs per group
    ragged = KP % GP != 0
    odd = K % 2 == 1
    NBO = NB // NT
    N = NB * L
    w_shape = (NB, 2 * KP, L) if bits == 8 else (NB, KP, L)
    w_dtype = "int8" if bits == 8 else "uint8"
    A = M * NT * L

    @prim_func
    def woq_direct(X: T.Buffer((M, K), "float32"), W: T.Buffer(w_shape, w_dtype),
                   S: T.Buffer((NB, NG, L), "float32"), O: T.Buffer((NB, NG, L), "float32"),
                   CB: T.Buffer((C,), "float32"), Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in T.parallel(NBO):
            acc = T.decl_buffer((A,), "float32")          # [row, nt, lane]
            accg = T.decl_buffer((2 * A,), "float32")     # [parity, row, nt, lane] of a group
            xs = T.decl_buffer((2 * M,), "float32")       # Σx of a group [parity, row]
            wf = T.decl_buffer((2 * NT * L,), "float32")
            for t in T.unroll(M * NT):
                for j in T.vectorized(L):
                    acc[t * L + j] = T.float32(0)
            for g in range(NG):
                for t in T.unroll(2 * M * NT):
                    for j in T.vectorized(L):
                        accg[t * L + j] = T.float32(0)
                for t in T.unroll(2 * M):
                    xs[t] = T.float32(0)
                for kp in range(_extent(T, GP, KP - g * GP, ragged)):
                    for nt in T.unroll(NT):
                        if permute:
                            wf[T.ramp(nt * L, 1, L)] = _permute16(T, CB, W, [nbo * NT + nt, g * GP + kp, 0], False,
                                                                  L, avx512)
                            wf[T.ramp((NT + nt) * L, 1, L)] = _permute16(T, CB, W, [nbo * NT + nt, g * GP + kp, 0],
                                                                         True, L, avx512)
                        else:
                            for j in T.vectorized(L):
                                wf[nt * L + j] = _raw(T, W, bits, nbo * NT + nt, g * GP + kp, j, False, CB, C)
                            for j in T.vectorized(L):
                                wf[(NT + nt) * L + j] = _raw(T, W, bits, nbo * NT + nt, g * GP + kp, j, True, CB,
                                                             C)
                    for mi in T.unroll(M):
                        xs[mi] = xs[mi] + X[mi, (g * GP + kp) * 2]
                        xs[M + mi] = xs[M + mi] + _odd_input(T, X, mi, (g * GP + kp) * 2 + 1, K, odd, C)
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                accg[(mi * NT + nt) * L + j] = accg[(mi * NT + nt) * L + j] + X[
                                    mi, (g * GP + kp) * 2] * wf[nt * L + j]
                            for j in T.vectorized(L):
                                accg[((M + mi) * NT + nt) * L + j] = accg[((M + mi) * NT + nt) * L + j] + \
                                    _odd_input(T, X, mi, (g * GP + kp) * 2 + 1, K, odd, C) * wf[(NT + nt) * L + j]
                for mi in T.unroll(M):
                    for nt in T.unroll(NT):
                        for j in T.vectorized(L):
                            acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + _group_term(
                                T, accg[(mi * NT + nt) * L + j] + accg[((M + mi) * NT + nt) * L + j],
                                xs[mi] + xs[M + mi], S[nbo * NT + nt, g, j], O[nbo * NT + nt, g, j], sym)
            for mi in T.unroll(M):
                for nt in T.unroll(NT):
                    for j in T.vectorized(L):
                        Y[mi, (nbo * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + Bi[(nbo * NT + nt) * L + j]
    return woq_direct


def lut16_shuffle_kernel(M: int, K: int, NB: int, bits: int = 4, groups: int = 1):
    """TIR for M <= 4 rows and a 16-entry codebook on AVX2: Y[M, NB·16] = X · CB[idx]ᵀ · S + B, W [NB, KP, 16]
    uint8 (direct_kernel's 4-bit layout: low nibble input 2kp, high nibble input 2kp + 1; per-channel S).

    The lookup is byte shuffles: TB [4, 32] holds byte b of each codebook entry (both 128-bit lanes), one
    `vpshufb` per byte plane picks it for the 32 indices of a pair (16 columns x 2 inputs), and in-lane unpacks
    (bytes, then 16-bit halves) assemble four float32 vectors F0-F3, each [columns 4q..4q+3 of input 2kp,
    the same columns of input 2kp + 1]; they multiply [x_even x 4, x_odd x 4] into four accumulators, whose
    halves are summed per column at the end. Two pairs per step (one 32-byte load: their low nibbles, then their
    high nibbles): 12 in-lane shuffles per 32 weights, where the vpermps form (_permute16) took two lane-crossing
    permutes and a blend per 8; an odd pair count ends with one pair alone.
    bits = 8 (W [NB, 2KP, 16] one index per byte, a codebook of up to 16·groups entries, groups 1, 2 or 4):
    two inputs per 32-byte load; each byte plane is looked up in every group of 16 entries (TB [groups, 4,
    32]) and the group picked by the index's bits 4-5 (vpblendvb), so k = 32 takes 8 shuffles and 4 blends
    per 32 weights where it took a gather per lane."""
    from tvm.script import tirx as T

    KP = (K + 1) // 2
    N = NB * 16
    w_shape, w_dtype = ((NB, KP, 16), "uint8") if bits == 4 else ((NB, 2 * KP, 16), "int8")
    if bits == 8 and groups not in (1, 2, 4):
        raise ValueError(f"lut16_shuffle_kernel: 8-bit indices take 1, 2 or 4 groups of 16 entries, not {groups}")

    @T.macro(hygienic=False)
    def step(p, ka, kb):
        """F0-F3 of the byte planes p (the same pure expressions in the four statements: LLVM computes them
        once), times [x[ka] x4, x[kb] x4] into each row's accumulators."""
        wf[T.ramp(0, 1, 8)] = _lut_floats(T, p, 0)
        wf[T.ramp(8, 1, 8)] = _lut_floats(T, p, 1)
        wf[T.ramp(16, 1, 8)] = _lut_floats(T, p, 2)
        wf[T.ramp(24, 1, 8)] = _lut_floats(T, p, 3)
        for m in T.unroll(M):
            for q in T.unroll(4):
                acc[T.ramp((m * 4 + q) * 8, 1, 8)] = acc[T.ramp((m * 4 + q) * 8, 1, 8)] + \
                    wf[T.ramp(q * 8, 1, 8)] * _pair_inputs(T, X, m, ka, kb, K, K % 2 == 1)

    @prim_func
    def lut16_shuffle(X: T.Buffer((M, K), "float32"), W: T.Buffer(w_shape, w_dtype),
                      S: T.Buffer((NB, 1, 16), "float32"), TB: T.Buffer((128 * groups,), "uint8"),
                      Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nb in T.parallel(NB):
            acc = T.decl_buffer((M * 32,), "float32")        # [row, q, 8]
            wf = T.decl_buffer((32,), "float32")             # F0-F3 of one pair
            for t in T.unroll(M * 4):
                acc[T.ramp(t * 8, 1, 8)] = T.broadcast(T.float32(0), 8)
            if bits == 8:
                for kp in range(KP):                         # inputs 2kp and 2kp + 1: one byte each
                    step(_lut_planes(T, T.reinterpret(W.vload([nb, kp * 2, 0], "int8x32"), dtype="uint8x32"),
                                     False, TB, groups), kp * 2, kp * 2 + 1)
            else:
                for kp2 in range(KP // 2):
                    # two pairs per step, one 32-byte load: low nibbles = inputs 4kp2 and 4kp2 + 2, high
                    # nibbles = 4kp2 + 1 and 4kp2 + 3
                    step(_lut_planes(T, W.vload([nb, kp2 * 2, 0], "uint8x32"), False, TB), kp2 * 4, kp2 * 4 + 2)
                    step(_lut_planes(T, W.vload([nb, kp2 * 2, 0], "uint8x32"), True, TB), kp2 * 4 + 1, kp2 * 4 + 3)
                if KP % 2 == 1:                              # the last pair alone
                    step(_lut_planes(T, W.vload([nb, KP - 1, 0], "uint8x16"), None, TB), KP * 2 - 2, KP * 2 - 1)
            for m in T.unroll(M):
                for j in T.vectorized(16):
                    Y[m, nb * 16 + j] = (acc[(m * 4 + j // 4) * 8 + j % 4] + acc[(m * 4 + j // 4) * 8 + 4 + j % 4]) \
                        * S[nb, 0, j] + Bi[nb * 16 + j]
    return lut16_shuffle


def _unpack_lanes(a, b, n: int, high: bool):
    """_mm256_unpack{lo,hi}_epi{8,16} of n-element vectors: per 128-bit lane, the low or high half of a's and b's
    elements interleaved."""
    from tvm import tirx

    per_lane = n // 2
    base = per_lane // 2 if high else 0
    idx = []
    for lane in range(2):
        for i in range(per_lane // 2):
            idx += [lane * per_lane + base + i, n + lane * per_lane + base + i]
    return tirx.Shuffle([a, b], idx)


def _lut_planes(T, w_bytes, high, TB, groups: int = 1):
    """Byte b of the codebook entries the 32 indices pick, b = 0..3 (vpshufb of TB's plane b). w_bytes: 32 bytes
    of two 4-bit pairs (high: their high nibbles, else their low ones), or 16 bytes of one pair (high None: its
    low nibbles, then its high ones); with `groups` > 1, 32 one-byte indices (high False) into groups of 16
    entries, TB [groups, 4, 32]: each group looked up, the group picked by index bits 4 and 5 (vpblendvb reads
    each byte's bit 7: the index shifted left by 3, then 2, as 16-bit lanes, whose carries land below bit 7)."""
    from tvm import tirx

    def u8(v, n):
        return T.broadcast(T.uint8(v), n)

    if high is None:
        idx = tirx.Shuffle([T.bitwise_and(w_bytes, u8(15, 16)), T.shift_right(w_bytes, u8(4, 16))], list(range(32)))
    else:
        idx = T.shift_right(w_bytes, u8(4, 32)) if high else T.bitwise_and(w_bytes, u8(15, 32))
    idx = T.reinterpret(idx, dtype="int8x32")
    shuf = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pshuf.b")
    blend = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pblendvb")

    def select_bit(shift: int):
        w16 = T.reinterpret(w_bytes, dtype="int16x16")
        return T.reinterpret(T.shift_left(w16, T.broadcast(T.int16(shift), 16)), dtype="int8x32")

    planes = []
    for b in range(4):
        looked = [T.call_llvm_pure_intrin(shuf, T.reinterpret(TB.vload([(g * 4 + b) * 32], "uint8x32"),
                                                              dtype="int8x32"), idx, dtype="int8x32")
                  for g in range(groups)]
        for shift in (3, 2)[:groups.bit_length() - 1]:              # bit 4, then bit 5 of the index
            looked = [T.call_llvm_pure_intrin(blend, looked[i], looked[i + 1], select_bit(shift), dtype="int8x32")
                      for i in range(0, len(looked), 2)]
        planes.append(looked[0])
    return planes


def _lut_floats(T, p, q: int):
    """F_q of the byte planes p: the float32 entries of indices 4q..4q+3 and 16+4q..16+4q+3 (bytes interleaved,
    then 16-bit halves)."""
    u01 = T.reinterpret(_unpack_lanes(p[0], p[1], 32, q >= 2), dtype="int16x16")
    u23 = T.reinterpret(_unpack_lanes(p[2], p[3], 32, q >= 2), dtype="int16x16")
    return T.reinterpret(_unpack_lanes(u01, u23, 16, q % 2 == 1), dtype="float32x8")


def _pair_inputs(T, X, m, ka, kb, K: int, odd: bool):
    """[x[m, ka] x4, x[m, kb] x4]; kb may be an odd K's missing input (0)."""
    from tvm import tirx

    return tirx.Shuffle([T.broadcast(X[m, ka], 4), T.broadcast(_odd_input(T, X, m, kb, K, odd, 16), 4)],
                        list(range(8)))


def codebook_byte_planes(codebook: np.ndarray, groups: int = 1) -> np.ndarray:
    """TB of lut16_shuffle_kernel: [groups, 4, 32] uint8, row (g, b) = byte b (little-endian) of entries
    16g..16g+15, twice (both 128-bit lanes)."""
    entries = np.zeros(16 * groups, np.float32)
    n = min(codebook.size, 16 * groups)
    entries[:n] = codebook.astype(np.float32).reshape(-1)[:n]
    b = entries.view(np.uint8).reshape(groups, 16, 4).transpose(0, 2, 1)         # [g, plane, entry]
    return np.ascontiguousarray(np.concatenate([b, b], axis=2)).reshape(-1)


def direct4_kernel(M: int, KW: int, NG: int, NB: int, L: int, NT: int, P: int):
    """TIR for int4 with M <= 4 rows, weights as 32-bit words of 8 nibbles: W [NB, KW, L] int32, nibble i
    of word w in lane j = q[column j, input 8·w + i]. Nibble i < 7 is masked in place (q·16^i: exact in
    float32) and multiplies an input pre-scaled by 2^-4i (XP, exact), nibble 7 is shifted down and masked
    (scale 1): one and + one convert + one FMA per SIMD vector of weights, about as few instructions as an int8 weight
    (sign-extending load + convert + FMA) for half the bytes. XS [M, NG]: Σx per group (unscaled), for the
    zero-point term o = -z·s (O), and XS7 [M, NG]: Σx over inputs 8w + 7, which add back the 8 nibble 7 lost
    (8·s·XS7). P accumulator sets (nibble i -> set i % P) keep P·M·NT FMA chains in
    flight. Groups are KW·8 / NG inputs, a multiple of 8 (inputs padded with zeros to NG groups)."""
    from tvm.script import tirx as T

    GW = KW // NG
    NBO = NB // NT
    N = NB * L
    A = M * NT * L

    @prim_func
    def woq4_words(XP: T.Buffer((M, KW * 8), "float32"), XS: T.Buffer((M, NG), "float32"),
                   XS7: T.Buffer((M, NG), "float32"),
                   W: T.Buffer((NB, KW, L), "int32"), S: T.Buffer((NB, NG, L), "float32"),
                   O: T.Buffer((NB, NG, L), "float32"), Bi: T.Buffer((N,), "float32"),
                   Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in T.parallel(NBO):
            acc = T.decl_buffer((A,), "float32")
            accg = T.decl_buffer((P * A,), "float32")      # [set, row, nt, lane]
            wf = T.decl_buffer((NT * L,), "float32")
            for t in T.unroll(M * NT):
                for j in T.vectorized(L):
                    acc[t * L + j] = T.float32(0)
            for g in range(NG):
                for t in T.unroll(P * M * NT):
                    for j in T.vectorized(L):
                        accg[t * L + j] = T.float32(0)
                for w in range(GW):
                    for i in T.unroll(8):
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                wf[nt * L + j] = _nibble(T, W[nbo * NT + nt, g * GW + w, j], i)
                        for mi in T.unroll(M):
                            for nt in T.unroll(NT):
                                for j in T.vectorized(L):
                                    accg[(((i % P) * M + mi) * NT + nt) * L + j] = accg[
                                        (((i % P) * M + mi) * NT + nt) * L + j] + XP[
                                        mi, (g * GW + w) * 8 + i] * wf[nt * L + j]
                for mi in T.unroll(M):
                    for nt in T.unroll(NT):
                        for j in T.vectorized(L):
                            acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + _sum_sets(
                                T, accg, P, (mi * NT + nt) * L + j, A) * S[nbo * NT + nt, g, j] + XS[mi, g] * O[
                                nbo * NT + nt, g, j] + XS7[mi, g] * (S[nbo * NT + nt, g, j] * T.float32(8))
            for mi in T.unroll(M):
                for nt in T.unroll(NT):
                    for j in T.vectorized(L):
                        Y[mi, (nbo * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + Bi[(nbo * NT + nt) * L + j]
    return woq4_words


def _nibble(T, word, i):
    """float32 of nibble i (a TIR loop variable, unrolled) of a 32-bit word: masked in place (q·16^i) for
    i < 7; nibble 7 (stored as q + 8 mod 16) shifted down arithmetically: q - 8."""
    return T.if_then_else(i == 7, T.Cast("float32", T.shift_right(word, 28)),
                          T.Cast("float32", T.bitwise_and(word, T.shift_left(15, 4 * T.min(i, 6)))))


def _sum_sets(T, accg, P: int, idx, A: int):
    total = accg[idx]
    for p in range(1, P):
        total = total + accg[p * A + idx]
    return total


def nibble_scales() -> np.ndarray:
    """The factor each input is pre-scaled by for direct4_kernel, by input index mod 8."""
    return np.array([2.0 ** (-4 * i) for i in range(7)] + [1.0], np.float32)


def pack_int4_words(q: np.ndarray, lanes: int, nbp: int, kw: int) -> np.ndarray:
    """int4 values q [N, K] (0..15) -> int32 words [NB, KW, L]: nibble i of word w in lane j is q[nb·L + j, 8w + i]
    for i < 7 and (q + 8) mod 16 for i = 7 (read back as q - 8 by an arithmetic shift); N padded to nbp·L
    columns, K to 8·kw inputs, with zeros."""
    n, k = q.shape
    q = np.pad(q.astype(np.uint32), ((0, nbp * lanes - n), (0, 8 * kw - k)))
    q = q.reshape(nbp, lanes, kw, 8)
    words = np.zeros((nbp, lanes, kw), np.uint32)
    for i in range(8):
        words |= ((q[..., i] + (8 if i == 7 else 0)) % 16) << np.uint32(4 * i)
    return np.ascontiguousarray(words.transpose(0, 2, 1)).view(np.int32)


def _permute16(T, CB, W, at: list, high, L: int, avx512: bool):
    """L codebook entries (of 16) picked by the low or high nibbles (`high`: a bool, or a TIR expression 0 / 1)
    of the L bytes of W at `at`. AVX-512: one
    vpermps of the codebook register (permvar.sf.512). AVX2: vpermps picks from 8 entries (an index's low 3 bits),
    so both halves of the codebook are permuted and blended by the index's bit 3 (vblendvps reads the sign bit:
    the index shifted left by 28), per 8 lanes (a 16-lane block: two, concatenated)."""
    def nibbles(byte_vec, n):
        b = T.Cast(f"int32x{n}", byte_vec)
        fifteen = T.broadcast(T.int32(15), n)
        if isinstance(high, bool):
            return T.shift_right(b, T.broadcast(T.int32(4), n)) if high else T.bitwise_and(b, fifteen)
        return T.bitwise_and(T.shift_right(b, T.broadcast(T.Cast("int32", high) * 4, n)), fifteen)

    if avx512:
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.sf.512"),
                                       CB.vload([0], "float32x16"), nibbles(W.vload(at, "uint8x16"), 16),
                                       dtype="float32x16")
    perm = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.permps")

    def eight(offset):
        idx = nibbles(W.vload(at[:-1] + [at[-1] + offset], "uint8x8"), 8)
        lo = T.call_llvm_pure_intrin(perm, CB.vload([0], "float32x8"), idx, dtype="float32x8")
        hi = T.call_llvm_pure_intrin(perm, CB.vload([8], "float32x8"), idx, dtype="float32x8")
        upper = T.reinterpret(T.shift_left(idx, T.broadcast(T.int32(28), 8)), dtype="float32x8")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx.blendv.ps.256"), lo, hi, upper,
                                       dtype="float32x8")

    if L == 8:
        return eight(0)
    from tvm import tirx

    return tirx.Shuffle([eight(0), eight(8)], list(range(16)))


def _raw(T, W, bits, nb, kp, j, high: bool, CB=None, C: int = 1):
    """float32 of the stored integer (no zero point, no scale), or its codebook entry when C > 1."""
    if bits == 8:
        v = T.Cast("int32", W[nb, kp * 2 + (1 if high else 0), j])
        if C > 1:
            return CB[T.bitwise_and(v, 255)]
        return T.Cast("float32", v)
    byte = T.Cast("int32", W[nb, kp, j])
    q = T.shift_right(byte, 4) if high else T.bitwise_and(byte, 15)
    return CB[q] if C > 1 else T.Cast("float32", q)


def _group_term(T, sum_xq, sum_x, s, o, sym: bool):
    return sum_xq * s if sym else sum_xq * s + sum_x * o


def panel_kernel(M: int, K: int, NB: int, L: int, MT: int, NT: int, bits: int, G: int, sym: bool, C: int = 1,
                 first_rows: Optional[int] = None, permute: bool = False, avx512: bool = True, words: bool = False):
    """TIR for M > 4 rows: per NT·L column block and chunk of KC inputs (pairs of KCP), an MT x NT·L
    register-tiled float32 GEMM over all rows on a float32 panel of the chunk's dequantized weights.
    The first row tile dequantizes the panel as it goes (each weight vector is converted in registers, used
    by that tile's FMAs and stored to the panel), the other tiles read the panel: the conversions overlap
    with FMAs instead of running as a separate pass. Row tiles: the first min(MT, M) rows, then whole MT
    tiles, then one tail tile of M mod MT rows (no redundant rows). G, C, permute, avx512 as in direct_kernel.
    `words` (int4, G a multiple of 8): W is direct4_kernel's words [NB, KW, L] (pack_int4_words, KW·8 = NG·G
    inputs) and Z float32 offsets o = -z·s: each weight vector is one and (nibble i in place, q·16^i), one
    conversion and one FMA with s·16^-i and o (nibble 7, stored q + 8, shifted down: s and o + 8s), where the
    byte form took a load-widen, a shift, an and, a subtract, a conversion and a multiply."""
    from tvm.script import tirx as T

    KP = (K + 1) // 2
    per_channel = G >= 2 * KP and not words
    NG = 1 if per_channel else (K + G - 1) // G
    GP = KP if per_channel else G // 2
    # chunk of pairs (words): a whole number of groups (or any size per-channel), panel <= _PANEL_BYTES
    cap = max(1, _PANEL_BYTES // (2 * NT * L * 4))
    # (both forms' sizes are defined either way: TVMScript resolves the names of both branches)
    GW = max(1, G // 8)                 # words: words per group, KW words, KCW per chunk
    KW = NG * GW
    KCW = GW * max(1, min(cap // (4 * GW), NG))
    padded = KW * 8 > K                 # words past the last input (their weights pad the last group)
    if per_channel:                     # pairs: KCP per chunk
        KCP = min(KP, cap)
    else:
        KCP = GP * max(1, min(cap // GP, (KP + GP - 1) // GP))
    if words:
        NC, CK, ragged = (KW + KCW - 1) // KCW, 8 * KCW, KW % KCW != 0
    else:
        NC, CK, ragged = (KP + KCP - 1) // KCP, 2 * KCP, KP % KCP != 0
    odd = K % 2 == 1
    NBO = NB // NT
    N = NB * L
    W_ = NT * L
    MT0 = min(first_rows or MT, MT, M)  # the first tile (dequantizes)
    NF = (M - MT0) // MT                # then NF whole tiles
    MTT = (M - MT0) % MT                # and a tail tile
    if words:
        w_shape, w_dtype, z_dtype = (NB, KW, L), "int32", "float32"
    else:
        w_shape = (NB, 2 * KP, L) if bits == 8 else (NB, KP, L)
        w_dtype, z_dtype = ("int8" if bits == 8 else "uint8"), "int32"

    @T.macro(hygienic=False)
    def load_acc(r0, rows):
        for mi in T.unroll(rows):
            for nt in T.unroll(NT):
                for j in T.vectorized(L):
                    acc[(mi * NT + nt) * L + j] = T.if_then_else(
                        c == 0, T.float32(0), Y[r0 + mi, (nbo * NT + nt) * L + j])

    @T.macro(hygienic=False)
    def store_acc(r0, rows):
        for mi in T.unroll(rows):
            for nt in T.unroll(NT):
                for j in T.vectorized(L):
                    Y[r0 + mi, (nbo * NT + nt) * L + j] = T.if_then_else(
                        c == NC - 1,
                        acc[(mi * NT + nt) * L + j] * _channel_scale(T, S, nbo * NT + nt, j, per_channel)
                        + Bi[(nbo * NT + nt) * L + j],
                        acc[(mi * NT + nt) * L + j])

    @T.macro(hygienic=False)
    def panel_tile(r0, rows):
        load_acc(r0, rows)
        for k in range(T.min(CK, K - c * CK)):
            for mi in T.unroll(rows):
                for nt in T.unroll(NT):
                    for j in T.vectorized(L):
                        acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + X[
                            r0 + mi, c * CK + k] * P[k * W_ + nt * L + j]
        store_acc(r0, rows)

    @T.macro(hygienic=False)
    def first_tile_words(KCW, KW, GW, padded):
        # nibble i of word w is input c·CK + 8w + i: masked in place, converted, one FMA with its group's scale
        # (times 16^-i) and offset (nibble 7: shifted down arithmetically, q - 8, so + 8s). Per group, nibble i
        # of every word in turn: the scale and offset of (group, i) stay in registers over the group's words
        for gg in range(_extent(T, KCW // GW, (KW - c * KCW) // GW, ragged)):
            for i in T.unroll(8):
                for w in range(GW):
                    if not padded or c * CK + 8 * (gg * GW + w) + i < K:
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                P[(8 * (gg * GW + w) + i) * W_ + nt * L + j] = _nibble(
                                    T, W[nbo * NT + nt, c * KCW + gg * GW + w, j], i) * (
                                    S[nbo * NT + nt, c * KCW // GW + gg, j] * T.if_then_else(
                                        i == 7, T.float32(1), T.reinterpret(
                                            T.int32(127 << 23) - 4 * T.min(i, 6) * T.int32(1 << 23), dtype="float32"))
                                ) + Z[nbo * NT + nt, c * KCW // GW + gg, j] + T.if_then_else(
                                    i == 7, S[nbo * NT + nt, c * KCW // GW + gg, j] * T.float32(8), T.float32(0))
                        for mi in T.unroll(MT0):
                            for nt in T.unroll(NT):
                                for j in T.vectorized(L):
                                    acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + X[
                                        mi, c * CK + 8 * (gg * GW + w) + i] * P[
                                        (8 * (gg * GW + w) + i) * W_ + nt * L + j]

    @prim_func
    def woq_panel(X: T.Buffer((M, K), "float32"), W: T.Buffer(w_shape, w_dtype),
                  S: T.Buffer((NB, NG, L), "float32"), Z: T.Buffer((NB, NG, L), z_dtype),
                  CB: T.Buffer((C,), "float32"), Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in T.parallel(NBO):
            P = T.decl_buffer((CK * W_,), "float32", scope="global")
            acc = T.decl_buffer((MT * NT * L,), "float32")
            for c in range(NC):
                # first tile: dequantize each weight vector, store it to the panel, use it (the two inputs of
                # a pair in turn: only NT weight vectors live next to the MT x NT accumulators)
                load_acc(0, MT0)
                if words:
                    first_tile_words(KCW, KW, GW, padded)
                else:
                    for kp in range(_extent(T, KCP, KP - c * KCP, ragged)):
                        for h in T.unroll(2):
                            if not odd or c * CK + 2 * kp + h < K:
                                for nt in T.unroll(NT):
                                    if permute:
                                        P[T.ramp((2 * kp + h) * W_ + nt * L, 1, L)] = _permute16(
                                            T, CB, W, [nbo * NT + nt, c * KCP + kp, 0], h, L, avx512)
                                    else:
                                        for j in T.vectorized(L):
                                            P[(2 * kp + h) * W_ + nt * L + j] = _dequant_k(
                                                T, W, S, Z, bits, sym, not per_channel, nbo * NT + nt,
                                                _group_of(c * KCP + kp, GP, per_channel), c * CK + 2 * kp + h, j,
                                                CB, C)
                                for mi in T.unroll(MT0):
                                    for nt in T.unroll(NT):
                                        for j in T.vectorized(L):
                                            acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + X[
                                                mi, c * CK + 2 * kp + h] * P[(2 * kp + h) * W_ + nt * L + j]
                store_acc(0, MT0)
                for mo in range(NF):
                    panel_tile(MT0 + mo * MT, MT)
                if MTT > 0:
                    panel_tile(MT0 + NF * MT, MTT)
    return woq_panel


def _codebook_groups(q: np.ndarray, bits: int, codebook: np.ndarray) -> int:
    """Groups of 16 entries the byte-shuffle lookup needs for indices q: 1 for 4-bit; 1, 2 or 4 for 8-bit indices
    below 64; 0 (no shuffle kernel) above."""
    if bits == 4:
        return 1 if codebook.size == 16 else 0
    top = int(q.max()) + 1 if q.size else 1
    return next((g for g in (1, 2, 4) if top <= 16 * g), 0)


def codebook_as_float32(spec, m: int, bits: int, q: np.ndarray, codebook: np.ndarray) -> bool:
    """Whether a clustered layer of m rows runs faster as the float32 matmul of its dequantized weights than
    through emit_woq's lookup on a 16-register x86 target (AVX2), measured on a 2-core AVX2 EPYC (znver2),
    interleaved: the GEMV (m <= DIRECT_MAX_ROWS) with 8-bit indices into more than 64 entries (no byte-shuffle
    lookup, a gather per lane: MLP 1024-4096-4096-1000 cluster(k=128) / (k=256) 5.87 / 5.93 ms against float32
    3.92), and the panel kernel (m > 4) with any 8-bit codebook (its first row tile gathers: small encoder, 64
    rows, cluster(k=32) / (k=256) 3.68 / 3.69 ms against float32 3.18; 4-bit codebooks, two permutes and a blend,
    3.31). AVX-512 (32 registers) keeps its kernels (not timed)."""
    if spec.arch != "x86_64" or lanes_for(spec)[1] >= 32 or bits != 8:
        return False
    return m > DIRECT_MAX_ROWS or _codebook_groups(q, bits, codebook) == 0


def _has_avx2(spec) -> bool:
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx2", spec.tvm_target()))


def _cores(spec) -> int:
    try:
        return max(1, int(spec.tvm.get("num-cores", 1)))
    except Exception:
        return 1


def emit_woq(bb, x, q: np.ndarray, scales: np.ndarray, zeros: Optional[np.ndarray], bias: np.ndarray,
             bits: int, group_size: Optional[int], spec, codebook: Optional[np.ndarray] = None,
             high: bool = False) -> tuple:
    """Emit the weight-only kernel for float32 x [..., K] and integer weights q [N, K] (int8 values or int4
    values 0..15), scales float32 [N, NG], zeros [N, NG] (None: symmetric), bias float32 [N]. Returns
    (float32 [..., N] Relax expression, kernel name). `codebook` (float32 [16] for 4-bit, [256] for 8-bit
    indices q): weight sharing, w = codebook[q] (scales ones, no zero points). `high` (precision="high"): int4
    GEMVs on AVX512-BF16 targets take woq4_bf16's kernel (inputs as two bfloat16)."""
    import tvm
    from tvm import relax

    def const(a):
        return relax.const(tvm.runtime.tensor(np.ascontiguousarray(a)))

    shape = [int(s) for s in x.ty.shape]
    n, k = q.shape
    if shape[-1] != k:
        raise LoweringError(f"weight-only linear: input has {shape[-1]} features, the weight {k}")
    m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    lanes, regs = lanes_for(spec)
    nb = (n + lanes - 1) // lanes
    kind, mt, nt = tiles(m, nb, lanes, regs, _cores(spec))
    kp = (k + 1) // 2
    per_channel = group_size is None or group_size >= k
    g = 2 * kp if per_channel else int(group_size)
    int4_words = kind == "direct" and bits == 4 and (per_channel or g % 8 == 0) and codebook is None
    bf16 = (high and int4_words and m in woq4_bf16.COLUMN_BLOCKS and lanes == 16 and regs >= 32
            and (per_channel or g % 16 == 0) and woq4_bf16.has_avx512bf16(spec))
    if int4_words and regs < 32 and lanes == 8:
        lanes, nt, _ = INT4_GEMV_AVX2[m]            # AVX2 int4 GEMV: blocks and chains by row count
        nb = (n + lanes - 1) // lanes
        while nt > 1 and nb / nt < 2 * _cores(spec):
            nt -= 1
    elif kind == "direct" and regs < 32 and lanes == 8:
        # AVX2 GEMV: 16-lane vectors (two ymm registers each), one column block per task: measured faster
        # than 8-lane blocks (benchmarks/bench_weight_only.py, x86:haswell)
        lanes = 16
        nb = (n + lanes - 1) // lanes
        nt = 1
    nbp = (nb + nt - 1) // nt * nt
    if bits == 4 and per_channel and kind == "direct":
        g = (k + 7) // 8 * 8                    # the word kernel's one group: K rounded up to whole words
    sym = zeros is None or not np.any(zeros)
    ng = scales.shape[1]
    # o = -z·s per group (the direct kernels add o·Σx once per group; the words panel adds o per weight)
    offsets = np.zeros_like(scales, np.float32) if zeros is None else -(zeros.astype(np.float32) *
                                                                         scales.astype(np.float32))
    if k % 2 and not sym:       # the odd K's missing input meets weight z - z = 0 (the direct kernel reads it)
        q = np.concatenate([q, zeros[:, -1:].astype(q.dtype)], axis=1)
    if bf16:
        g = (k + 15) // 16 * 16 if per_channel else g
        nt = woq4_bf16.COLUMN_BLOCKS[m]
        while nt > 1 and math.ceil(nb / nt) < 2 * _cores(spec):
            nt -= 1
        nbp = (nb + nt - 1) // nt * nt
        return woq4_bf16.emit(bb, x, shape, m, k, n, q, scales, offsets, bias, g, nbp, nt, const)
    if kind == "direct" and bits == 4 and g % 8 == 0 and codebook is None:
        return _emit_words(bb, x, shape, m, k, n, q, scales, offsets, bias, g, lanes, regs, nbp, nt, const)
    scale_t = const(_group_table(scales, lanes, nbp, np.float32))
    bias_t = const(np.pad(bias.astype(np.float32), (0, nbp * lanes - n)))
    cb = np.zeros(1, np.float32) if codebook is None else codebook.astype(np.float32)
    # a 16-entry codebook on x86: vpermps lookups (_permute16) or byte shuffles, not a gather per lane
    avx512 = lanes == 16 and regs >= 32
    permute = (codebook is not None and bits == 4 and cb.size == 16 and spec.arch == "x86_64"
               and (avx512 or (lanes in (8, 16) and _has_avx2(spec))))
    groups = _codebook_groups(q, bits, codebook) if codebook is not None else 0
    words = kind == "panel" and bits == 4 and codebook is None and (per_channel or g % 8 == 0)
    if words:
        # int4 panels dequantize words (and, convert, FMA) like the GEMV. 2-core AVX2 EPYC (znver2), builds timed
        # interleaved: small encoder (64 rows) woq4-g128 3.319 -> 3.171 ms (woq8 3.121); two 64 x 1024 x 1024
        # Linears 1.454 -> 1.398 ms (woq8 1.363, separate runs)
        g = (k + 7) // 8 * 8 if per_channel else g
        args = [const(pack_int4_words(q, lanes, nbp, ng * g // 8)), scale_t,
                const(_group_table(offsets, lanes, nbp, np.float32)), const(cb), bias_t]
    elif (kind == "direct" and not avx512 and lanes == 16 and nt == 1 and ng == 1 and groups
            and (permute or (bits == 8 and _has_avx2(spec)))):
        # AVX2 GEMV over a codebook of up to 16 (4-bit) or 64 (8-bit) entries: byte-shuffle lookups
        args = [const(pack_weights(q, bits, lanes, nbp)), scale_t, const(codebook_byte_planes(cb, groups)), bias_t]
        func = lut16_shuffle_kernel(m, k, nbp, bits, groups)
    elif kind == "direct":
        args = [const(pack_weights(q, bits, lanes, nbp)), scale_t,
                const(_group_table(offsets, lanes, nbp, np.float32)), const(cb), bias_t]
        func = direct_kernel(m, k, nbp, lanes, nt, bits, g, sym, cb.size, permute, avx512)
    else:
        zt = np.zeros((nbp, ng, lanes), np.int32) if sym else _group_table(zeros, lanes, nbp, np.int32)
        args = [const(pack_weights(q, bits, lanes, nbp)), scale_t, const(zt), const(cb), bias_t]
    if kind == "panel":
        # 16 registers: a scaled (group-wise, or int4 words) or zero-pointed dequantization keeps scale /
        # zero-point vectors live in the first tile, so it takes one row less (6 rows spill two accumulators); so
        # does a codebook lookup (its two halves: the small encoder's cluster(k=16) 3.71 -> 3.38 ms, AVX2 EPYC,
        # interleaved)
        first = mt - 1 if regs < 32 and (not sym or not per_channel or permute or words) else mt
        func = panel_kernel(m, k, nbp, lanes, mt, nt, bits, g, sym, cb.size, first, permute, avx512, words=words)
    name = f"graphopt_{'lut' if codebook is not None else 'woq'}{bits}_{kind}"
    gv = bb.add_func(func.without_attr("global_symbol"), name)
    x2 = bb.emit(relax.op.reshape(x, [m, k]))
    y = bb.emit(relax.call_tir(gv, [x2, *args], relax.TensorType([m, nbp * lanes], "float32")))
    if nbp * lanes != n:
        y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
    what = f"codebook{bits}" if codebook is not None else f"int{bits}"
    return bb.emit(relax.op.reshape(y, [*shape[:-1], n])), f"{what} {kind}"


def _float_linear(bb, x, w: np.ndarray, bias: np.ndarray):
    """x @ w + bias with the dequantized weight w [K, N] as a float32 constant (the layers no kernel here takes)."""
    from tvm import relax

    return bb.emit(relax.op.add(relax.op.matmul(x, relax.const(np.ascontiguousarray(w))), relax.const(bias)))


def convert_packed(st, node, importer):
    """Converter of ``graphopt::woq_linear_packed(x, wq, scales, zeros, bias, bits, group_size, in_features)``
    for graphopt.backends.tvm.quant_lower (`st`: its QuantLowering state: weights, path, counts)."""
    from .quant_lower import _is_static, _shape

    from ...quant.weight_only import BITS

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    bits, group_size, k = int(node.args[5]), int(node.args[6]), int(node.args[7])
    if bits not in BITS:
        raise LoweringError(f"woq_linear_packed: bits={bits} (node '{node.name}'): only 8 and 4 have kernels")
    wq = st.need(node, 1, "the packed weight")
    scales = st.need(node, 2, "scales").astype(np.float32)
    zeros = st.need(node, 3, "zero points").astype(np.int32)
    n = wq.shape[0]
    bias = st.bias(node, 4, n)
    if bits == 4:
        q = unpack_nibbles(wq, k).astype(np.int16)
    else:
        q = wq.astype(np.int16)
    if q.shape[1] != k:
        raise LoweringError(f"woq_linear_packed (node '{node.name}'): weight holds {q.shape[1]} inputs, "
                            f"in_features is {k}")
    gs = group_size or None
    static = _is_static(_shape(x))
    if st.path == "relax" or not static:
        # no LLVM CPU target (CUDA), or rows known only at run time (graphopt.dynamic: the kernels are built
        # for a static row count): dequantize once, float matmul
        st.count(f"woq_linear_packed:int{bits}:relax" + ("" if static else " (dynamic)"))
        g = k if gs is None else gs
        idx = np.arange(k) // g
        return _float_linear(bb, x, ((q.astype(np.int32) - zeros[:, idx]).astype(np.float32) * scales[:, idx]).T,
                             bias)
    y, kind = emit_woq(bb, x, q, scales, None if bits == 8 else zeros, bias, bits, gs, st.spec,
                       high=st.precision == "high")
    st.count(f"woq_linear_packed:{kind}")
    return y


def _accumulator_sets(m: int, regs: int) -> int:
    """P of direct4_kernel: accumulator sets (nibble i accumulates into set i % P). 32 registers: 2. 16 (AVX2):
    INT4_GEMV_AVX2 by row count (more sets multiplied the rows x blocks accumulators and LLVM spilled them, with
    the 7 nibble masks, inside the FMA chains: 4 sets took 0.84 / 1.18 / 1.68 / 3.56 ms for 1-4 rows where
    the choices then took 0.65 / 0.79 / 1.27 / 1.44, int4 MLP 1024-4096-4096-1000, saved builds interleaved)."""
    if regs >= 32:
        return 2
    return INT4_GEMV_AVX2[m][2]


def _emit_words(bb, x, shape, m, k, n, q, scales, offsets, bias, g, lanes, regs, nbp, nt, const):
    """int4 GEMV through direct4_kernel: pad x to NG·g inputs, pre-scale it per nibble, sum it per group."""
    from tvm import relax

    R = relax.op
    ng = scales.shape[1]
    kpad = ng * g
    kw = kpad // 8
    sets = _accumulator_sets(m, regs)
    x2 = bb.emit(R.reshape(x, [m, k]))
    if kpad != k:
        x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, kpad - k], pad_value=0.0))
    xs = bb.emit(R.sum(R.reshape(x2, [m, ng, g]), axis=[2]))
    xs7 = bb.emit(R.sum(R.strided_slice(R.reshape(x2, [m, ng, g // 8, 8]), axes=[3], begin=[7], end=[8]),
                        axis=[2, 3]))
    xp = bb.emit(R.multiply(x2, const(np.tile(nibble_scales(), kw))))
    args = [xp, xs, xs7, const(pack_int4_words(q, lanes, nbp, kw)), const(_group_table(scales, lanes, nbp, np.float32)),
            const(_group_table(offsets, lanes, nbp, np.float32)),
            const(np.pad(bias.astype(np.float32), (0, nbp * lanes - n)))]
    func = direct4_kernel(m, kw, ng, nbp, lanes, nt, sets)
    gv = bb.add_func(func.without_attr("global_symbol"), "graphopt_woq4_words")
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, nbp * lanes], "float32")))
    if nbp * lanes != n:
        y = bb.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    return bb.emit(R.reshape(y, [*shape[:-1], n])), "int4 direct"


def convert_clustered(st, node, importer):
    """Converter of ``graphopt::clustered_linear(x, idx, codebook, bias, bits, in_features)`` (weight sharing,
    graphopt.quant.cluster): the weight-only kernels with a codebook lookup in place of int -> float."""
    from .quant_lower import _is_static, _shape

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    bits, k = int(node.args[4]), int(node.args[5])
    idx = st.need(node, 1, "the cluster indices").astype(np.uint8)
    codebook = st.need(node, 2, "the codebook").astype(np.float32)
    n = idx.shape[0]
    bias = st.bias(node, 3, n)
    q = (unpack_nibbles(idx, k) if bits == 4 else idx).astype(np.int16)
    shape = _shape(x)
    m = (int(np.prod(shape[:-1])) if len(shape) > 1 else 1) if _is_static(shape) else None
    if st.path == "relax" or m is None or codebook_as_float32(st.spec, m, bits, q, codebook):
        # no LLVM CPU target (CUDA), rows known only at run time (graphopt.dynamic: the kernels are built for a
        # static row count), or no lookup faster than float32 here: the weights dequantized once (w =
        # codebook[q], exactly), a float32 matmul
        st.count(f"clustered_linear:{bits}-bit:relax" if st.path == "relax"
                 else f"clustered_linear:codebook{bits} as float32" + (" (dynamic)" if m is None else ""))
        return _float_linear(bb, x, codebook[q].T, bias)
    ones = np.ones((n, 1), np.float32)
    y, kind = emit_woq(bb, x, q, ones, None, bias, bits, None, st.spec, codebook=codebook)
    st.count(f"clustered_linear:{kind}")
    return y
