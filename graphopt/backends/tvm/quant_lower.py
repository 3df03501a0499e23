"""Lowering of graphopt's quantized ops (``torch.ops.graphopt.*``) to integer Relax/TIR.

TVM's torch frontends have no converters for quantize/dequantize; this module supplies them, as a
``custom_convert_map`` for the ExportedProgram importer (graphopt.backends.tvm.lower calls
``custom_convert_map(ep, spec)``). Semantics are those of graphopt.quant.ops, reproduced exactly:

  quantize        R ops: round(x * float32(1/scale)) + zp, clip, astype uint8/int8 (fused by FuseOps with
                  the float ops before it, e.g. the previous layer's ReLU)
  qlinear         int8 kernel: A uint8 [M, K] x W int8 -> int32 accumulators -> epilogue
                  y = float32(acc - zp·ΣW[n]) · out_scale[n] + bias[n]  (dequantize/requantize fused into the
                  kernel; the next quantize is fused into the following elementwise op)
  qconv2d         the same kernel over an NHWC, zero-point-padded copy of the input, writing NCHW float32
  dynamic_qlinear per-call min/max -> scale, zero point in Relax; then the qlinear kernel with zp·ΣW from
                  the run-time zero point
  qmatmul         two activations (e.g. attention): the right operand is packed at run time (fused
                  reshape/transpose) and its zero-point term ΣB computed in Relax; batched int8 kernel
  woq_linear      weight-only int8 / int4 (woq_linear_packed): graphopt.backends.tvm.weight_only's kernels
                  (dequantized in the GEMM loop; float32 accumulate)
  w4a8_linear     int4 weights x int8 activations quantized per call: graphopt.backends.tvm.w4a8's kernels

Kernels are hand-written TIR, marked ``tirx.is_scheduled`` (default schedules and tuners leave them alone):
  * x86, path from the target's LLVM features (int8_path): 'vnni' (AVX512-VNNI ``vpdpbusd``, uint8 x int8
    -> int32, 64 MACs per instruction), 'avx512bw' / 'avx2' (``vpmaddubsw`` u8·s8 byte pairs -> saturating
    int16, then ``vpmaddwd`` by ones -> int32; 512- / 256-bit, as MLAS's QgemmU8S8KernelAvx2 and oneDNN do).
    Packed weight layout [N/L, K/4, L, 4] with L = 16 (512-bit) or 8 (AVX2) int32 lanes; register tile MT
    rows x NT·L columns; parallel over output tiles. vpmaddubsw's int16 pair sum saturates above 32,767
    (255·127·2 = 64,770): the quantize pass gives those paths weights in [-64, 64] (2·255·64 = 32,640),
    so the kernel equals the QDQ graph bit for bit; a weight outside that range (a graph quantized for
    another target) switches its layer to an exact split of the activations (a = 128·hi + lo), at about
    half the speed, never to a wrong result. The batched matmul's right operand is an activation in the
    full int8 range: always the exact split there.
  * aarch64 with +dotprod ('sdot': cortex-a76, neoverse-n1, ...): NEON ``sdot`` (int8 x int8, 4 products
    into each of 4 int32 lanes) on the same [N/4, K/4, 4, 4] layout; activations int8 (uint8 ones shifted
    by -128 with their zero point), exact for every int8 weight.
  * other LLVM CPU targets ('cpu': ARM without dotprod, x86 without AVX2): the same tiling with widening
    int32 multiply-adds that LLVM vectorizes; correct, but no fast int8 instruction — the notes say so.
  * depthwise conv on CPU targets: its own kernel over uint8 NHWC (products widened and summed exactly in
    float32 FMAs, vectorized over 16 channels): a depthwise conv is memory-bound, so the win is reading 1-byte
    inputs.
  * other grouped convs (and any op on CUDA): portable Relax integer ops (R.nn.conv2d / R.matmul with
    out_dtype int32), scheduled by whatever the build does for ordinary ops.
Weights are read from the ExportedProgram's constants and packed at compile time (numpy). Integer
accumulation is exact, so a TVM result differs from the PyTorch op only by float32 rounding in the
epilogue (LLVM may contract multiply+add into one FMA): within one ulp, far below one quantization step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import LoweringError
from ...quant.qparams import REDUCED_WEIGHT_QMAX
from . import quant_fuse
from .quant_epilogue import FLOAT, Epilogue
from .tir_script import prim_func

__all__ = ["custom_convert_map", "has_vnni", "int8_path", "weight_qmax_for", "describe_path", "PATHS",
           "PAIR_PATHS", "PAIR_WEIGHT_QMAX", "dense_kernel", "conv_kernel", "depthwise_kernel",
           "OP_NAMES"]

OP_NAMES = ("quantize.default", "qlinear.default", "sparse_qlinear.default", "sparse_qconv2d.default", "qconv2d.default", "qmatmul.default", "dynamic_qlinear.default",
            "woq_linear.default", "woq_linear_packed.default", "clustered_linear.default", "w4a8_linear.default")


# ------------------------------------------------------------------------------------------- targets
# int8 kernel paths, fastest first. x86 multiplies uint8 activations by int8 weights:
#   vnni      AVX512-VNNI vpdpbusd: 4 u8·s8 products summed straight into int32 (no intermediate rounding)
#   avx512bw  AVX-512BW without VNNI: vpmaddubsw (u8·s8 pairs -> saturating int16) + vpmaddwd by ones (int16
#             pairs -> int32), 512-bit
#   avx2      the same pair of instructions on 256-bit vectors (8 int32 lanes)
#   sdot      aarch64 with the dot-product extension (+dotprod): sdot, 4 s8·s8 products into each int32 lane
#             (128-bit NEON); activations int8 (uint8 ones are shifted by -128)
#   cpu       other LLVM CPUs (ARM without dotprod, x86 without AVX2): widening int32 multiply-adds LLVM
#             vectorizes
#   relax     no LLVM CPU target: portable Relax integer ops
PATHS = ("vnni", "avx512bw", "avx2", "sdot", "cpu", "relax")
PAIR_PATHS = ("avx512bw", "avx2")          # the paths whose int16 pair sums can saturate
PAIR_WEIGHT_QMAX = REDUCED_WEIGHT_QMAX      # |w| <= 64: 2·255·64 = 32,640 <= 32,767, pairs never saturate
# int8 GEMM/conv kernels with fewer multiply-adds than this run on one thread: waking the thread pool costs
# microseconds (far more on a loaded machine, where a worker may wait for a core), more than a small layer
# takes on one core. On a quiet 2-core Zen 4 (interleaved, 9 rounds, medians), the digits CNN (1.2M and 0.6M
# MAC convs) with 4M / 1M / 512K / 256K / 64K: x86:haswell 28.3 / 23.4 / 21.8 / 21.9 / 22.8 us, x86 (VNNI)
# 17.8 / 16.5 / 16.2 / 16.1 / 17.1 us; the small encoder and MobileNetV2 unchanged (within 1%). On a loaded
# machine (load 13-20) the 1.2M-MAC conv took 11.2 us in parallel, 7.3 us on one thread: 4M was chosen there.
PARALLEL_MIN_MACS = 1 << 19
# register tile of a GEMM whose row count is only known at run time (a dynamic batch x sequence): chosen as
# for a many-row GEMM, the last row tile clamps its loads and guards its stores
DYNAMIC_ROWS_HINT = 64
# requantize epilogues fused into the producing int8 kernel (quant_fuse.py); False: the unfused lowering
# (float32 out, elementwise quantize kernel), kept as the reference the fused kernels are tested against
FUSE_EPILOGUES = True
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
_PAIR_INTRINSICS = {"avx2": ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
                    "avx512bw": ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")}


def has_vnni(cpu: str) -> bool:
    """Whether an x86 LLVM CPU name has AVX512-VNNI (the 512-bit vpdpbusd we emit)."""
    import tvm
    from tvm.target import codegen

    t = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})
    return bool(codegen.target_has_features("avx512vnni", t))


def int8_path(spec) -> str:
    """The int8 kernel path for a TargetSpec, from its LLVM CPU features (see PATHS): 'vnni' (avx512vnni),
    'avx512bw' (avx512bw, no VNNI), 'avx2', 'sdot' (aarch64 +dotprod), 'cpu' (other LLVM CPUs) or 'relax'
    (not an LLVM CPU target)."""
    if spec is None or getattr(spec, "kind", "") != "llvm":
        return "relax"
    arch = getattr(spec, "arch", "")
    if arch not in ("x86_64", "aarch64"):
        return "cpu"
    from tvm.target import codegen

    try:
        t = spec.tvm_target()
    except Exception:
        return "cpu"
    if arch == "aarch64":
        return "sdot" if codegen.target_has_features("dotprod", t) else "cpu"
    for path, feature in (("vnni", "avx512vnni"), ("avx512bw", "avx512bw"), ("avx2", "avx2")):
        if codegen.target_has_features(feature, t):
            return path
    return "cpu"


def weight_qmax_for(path: str) -> int:
    """Largest |int8 weight| the path's Linear / Conv2d (groups=1) kernels take at full speed: 64 on the
    vpmaddubsw paths (PAIR_PATHS), 127 elsewhere. Larger weights still run there, with the exact kernel."""
    return PAIR_WEIGHT_QMAX if path in PAIR_PATHS else 127


def lanes_of(path: str) -> int:
    """int32 lanes of one accumulator vector (= output columns of one packed weight block)."""
    return {"avx2": 8, "sdot": 4}.get(path, 16)


def act_dtype_of(path: str) -> str:
    """The activation dtype the path's dense/conv/bmm kernels multiply: int8 for sdot, uint8 elsewhere."""
    return "int8" if path == "sdot" else "uint8"


def describe_path(path: str, target: str, arch: str = "x86_64") -> str:
    """One sentence naming the int8 kernel path for `target` and what it means for speed and weights."""
    head = f"int8 path {path} on {target}"
    if path == "vnni":
        return f"{head}: AVX512-VNNI vpdpbusd kernels (u8·s8 -> int32, 512-bit)"
    if path in PAIR_PATHS:
        bits = "512" if path == "avx512bw" else "256"
        return (f"{head}: vpmaddubsw + vpmaddwd kernels ({bits}-bit, u8·s8 pairs -> int16 -> int32); Linear and "
                f"Conv2d (groups=1) weights in [-{PAIR_WEIGHT_QMAX}, {PAIR_WEIGHT_QMAX}] so the int16 pair sums "
                f"never saturate")
    if path == "sdot":
        return f"{head}: NEON sdot kernels (s8·s8 -> int32, 128-bit; int8 activations)"
    if path == "cpu":
        missing = "no AVX2" if arch == "x86_64" else "no dot-product extension (+dotprod: sdot) on this CPU"
        return (f"{head}: {missing}, kernels use widening int32 multiply-adds (correct, but no fast int8 "
                f"instruction: expect little speedup over float32)")
    return (f"{head}: portable Relax integer ops (R.matmul / R.nn.conv2d with out_dtype=int32), no "
            f"hand-written int8 kernel for this target")


def _cores(spec) -> int:
    try:
        return max(1, int(spec.tvm.get("num-cores", 1)))
    except Exception:
        return 1


# ------------------------------------------------------------------------------------------- kernels
def broadcast4(x4, lanes: int):
    """TIR: 4 bytes (one int8x4 / uint8x4 load) repeated in every int32 lane of an int8 vector of lanes·4 bytes:
    the activation operand of the dot-product instructions."""
    from tvm.script import tirx as T

    return T.reinterpret(T.broadcast(T.reinterpret(x4, dtype="int32"), lanes), dtype=f"int8x{4 * lanes}")


def _dot4(path: str, acc, a_u8x4, w, exact: bool = False, unsigned_weights: bool = False):
    """TIR: acc + Σ_k a[k]·w[j, k] over the 4 bytes k, for every lane j of an int32 accumulator vector.

    `a_u8x4` is 4 uint8 activations (int8 on sdot; broadcast to every lane), `w` the lanes·4 int8 weights of
    one packed [lanes, 4] block. vnni: one vpdpbusd; sdot: one sdot (s8·s8, 4 lanes). avx2/avx512bw:
    vpmaddubsw sums byte pairs into int16 with saturation, vpmaddwd by ones sums int16 pairs into int32;
    exact only while |w| <= 64. exact=True
    splits the activations a = 128·hi + lo (lo <= 127, hi <= 1) so both pair sums stay in int16 for any
    int8 w (|127·128·2| < 32,768) and adds lo·w + 128·(hi·w): exact, twice the instructions.
    unsigned_weights: `w` is the unsigned operand (bytes 0..255, e.g. int4 nibbles) and the activations the
    signed one (int8), the other way round from the int8 kernels.
    """
    from tvm.script import tirx as T

    L = lanes_of(path)
    a32 = T.reinterpret(a_u8x4, dtype="int32")

    def operands(a):
        """The two multiplicands in the instruction's order: the unsigned one first."""
        return (w, broadcast4(a, L)) if unsigned_weights else (broadcast4(a, L), w)

    if path == "vnni":
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VPDPBUSD), acc, *operands(a32),
                                       dtype=f"int32x{L}")
    if path == "sdot":
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(SDOT), acc, *operands(a32), dtype=f"int32x{L}")
    ubsw, wd = _PAIR_INTRINSICS[path]

    def madd(a, mult: int):
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(ubsw), *operands(a), dtype=f"int16x{2 * L}")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(wd), pairs, T.broadcast(T.int16(mult), 2 * L),
                                       dtype=f"int32x{L}")

    if not exact:
        return acc + madd(a32, 1)
    lo = T.bitwise_and(a32, T.int32(0x7F7F7F7F))
    hi = T.bitwise_and(T.shift_right(a32, T.int32(7)), T.int32(0x01010101))
    return acc + madd(lo, 1) + madd(hi, 128)


def _tiles(rows: int, blocks: int, cores: int = 1, path: str = "vnni") -> tuple[int, int]:
    """Register tile (MT rows, NT column blocks), NT divides `blocks`: at most 16 accumulators with 32
    vector registers (AVX-512), at most 12 with 16 (AVX2: accumulators + broadcast + ones + a temporary)."""
    if path == "sdot":                              # 32 NEON registers of 4 int32 lanes: up to 24 accumulators
        mt = rows if rows <= 8 else next((m for m in (8, 6, 4) if rows % m == 0), 8)
        nt = next(n for n in (8, 4, 2, 1) if blocks % n == 0 and mt * n <= 24)
    elif path == "avx2":
        if rows == 1:
            mt, nt = 1, next(n for n in (4, 2, 1) if blocks % n == 0)
        else:
            mt = rows if rows <= 6 else next((m for m in (6, 4, 5) if rows % m == 0), 6)
            nt = next(n for n in (2, 1) if blocks % n == 0)
    else:
        nt = next(n for n in (4, 2, 1) if blocks % n == 0)
        if rows == 1:
            mt = 1
        elif rows < 8:
            mt = rows
            nt = next(n for n in (2, 1) if blocks % n == 0) if rows > 4 else nt
        else:
            mt = next((m for m in (8, 7, 6) if rows % m == 0), 8)
            nt = next(n for n in (2, 1) if blocks % n == 0)
    while nt > 1 and blocks // nt < cores:          # keep every core busy on small layers
        nt //= 2
        while blocks % nt:
            nt //= 2
    return mt, max(nt, 1)


def _conv_tiles(ow: int, blocks: int, path: str) -> tuple[int, int]:
    """Register tile of conv_kernel: MT output columns x NT channel blocks (see _tiles for the budgets)."""
    if path == "sdot":
        mt = next((m for m in (8, 7, 6, 4) if ow % m == 0), min(8, ow))
        return mt, next(n for n in (4, 2, 1) if blocks % n == 0 and mt * n <= 24)
    if path == "avx2":
        mt = next((m for m in (6, 4, 7, 5) if ow % m == 0), min(6, ow))
        nt = 2 if blocks % 2 == 0 and mt <= 6 else 1
        return mt, nt
    mt = next((m for m in (8, 7, 6) if ow % m == 0), min(8, ow))
    return mt, next(t for t in (2, 1) if blocks % t == 0)


def dense_kernel(M: int, KB: int, NB: int, MT: int, NT: int, path: str, exact: bool = False,
                 epi: Epilogue = FLOAT, n_out: int | None = None):
    """TIR: Y[M, NB·L] = float32(A·Wᵀ - C) · S + B for A uint8 [M, KB·4] and packed int8 W (L = lanes_of).

    W layout: [NB, KB, L, 4] (vnni, avx512bw, avx2: see _dot4) or [NB, KB, 4, 16] (cpu: widening
    multiply-adds); C int32, S/B float32 of length NB·L. `exact`: the exact pair split of _dot4.
    `epi` (quant_epilogue.Epilogue): what is stored, float32 or the requantized codes of the next layer;
    `n_out`: the columns Y has (default NB·L; fewer: the last vector is stored lane by lane).
    Runs in parallel only above PARALLEL_MIN_MACS (a thread-pool wake-up costs more than a small layer).
    """
    from tvm.script import tirx as T

    fast = path != "cpu"
    a_dtype = act_dtype_of(path)
    L = lanes_of(path)
    K, N = KB * 4, NB * L
    MO = (M + MT - 1) // MT
    NBO = NB // NT
    # avx2: the NT column blocks of one register tile interleaved per 4-input group, so a tile's weights are
    # one contiguous stream ([NB/NT, KB, NT, L, 4], pack_dense) rather than NT streams (_interleaves)
    inter = _interleaves(path)
    w_shape = (NBO, KB, NT, L, 4) if inter else (NB, KB, 1, L, 4) if fast else (NB, KB, 4, L)
    NS = N if n_out is None else n_out
    full = NS == N
    par = T.parallel if not isinstance(M, int) or M * K * N >= PARALLEL_MIN_MACS else T.serial
    # a GELU epilogue (two polynomials and a division per vector) runs as a loop over the register tile:
    # unrolled MT x NT times it took LLVM seconds to compile (2 s for one 40 -> 72 Linear on AVX-512); the
    # accumulators are copied out first so that they stay in registers through the K loop
    epi_loop = T.serial if any(a[0] == "gelu" for a in epi.acts) else T.unroll

    @prim_func
    def qdense(A: T.Buffer((M, K), a_dtype), W: T.Buffer(w_shape, "int8"), C: T.Buffer((N,), "int32"),
               S: T.Buffer((N,), "float32"), Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, NS), epi.dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in par(NBO):
            for mo in range(MO):
                acc = T.decl_buffer((MT * NT * L,), "int32")
                tail = T.decl_buffer((L,), epi.dtype)
                accs = T.decl_buffer((MT * NT * L,), "int32")
                for t in T.unroll(MT * NT):
                    acc[T.ramp(t * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kb in range(KB):
                    for nt in T.unroll(NT):
                        for mi in T.unroll(MT):
                            if fast:
                                acc[T.ramp((mi * NT + nt) * L, 1, L)] = _dot4(
                                    path, acc[T.ramp((mi * NT + nt) * L, 1, L)],
                                    A.vload([T.min(mo * MT + mi, M - 1), kb * 4], f"{a_dtype}x4"),
                                    W.vload([nbo, kb, nt, 0, 0] if inter else [nbo * NT + nt, kb, 0, 0, 0],
                                            f"int8x{4 * L}"), exact)
                            else:
                                for k in T.unroll(4):
                                    for j in T.vectorized(L):
                                        acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + T.Cast(
                                            "int32", A[T.min(mo * MT + mi, M - 1), kb * 4 + k]) * T.Cast(
                                            "int32", W[nbo * NT + nt, kb, k, j])
                for t in T.unroll(MT * NT):
                    accs[T.ramp(t * L, 1, L)] = acc[T.ramp(t * L, 1, L)]
                for mi in epi_loop(MT):
                    if mo * MT + mi < M:
                        for nt in epi_loop(NT):
                            if full:
                                for j in T.vectorized(L):
                                    Y[mo * MT + mi, (nbo * NT + nt) * L + j] = epi.value(
                                        accs[(mi * NT + nt) * L + j], C[(nbo * NT + nt) * L + j],
                                        S[(nbo * NT + nt) * L + j], Bi[(nbo * NT + nt) * L + j])
                            elif (nbo * NT + nt) * L + L <= NS:
                                for j in T.vectorized(L):
                                    Y[mo * MT + mi, (nbo * NT + nt) * L + j] = epi.value(
                                        accs[(mi * NT + nt) * L + j], C[(nbo * NT + nt) * L + j],
                                        S[(nbo * NT + nt) * L + j], Bi[(nbo * NT + nt) * L + j])
                            elif (nbo * NT + nt) * L < NS:
                                # the last, partial vector: the epilogue once as a vector (C/S/B are padded to
                                # N), then its valid lanes stored one by one. A scalar epilogue per lane made LLVM
                                # unroll MT x L copies of it (a GELU epilogue: seconds of compile time)
                                for j in T.vectorized(L):
                                    tail[j] = epi.value(accs[(mi * NT + nt) * L + j], C[(nbo * NT + nt) * L + j],
                                                        S[(nbo * NT + nt) * L + j], Bi[(nbo * NT + nt) * L + j])
                                for j in range(L):
                                    if (nbo * NT + nt) * L + j < NS:
                                        Y[mo * MT + mi, (nbo * NT + nt) * L + j] = tail[j]
    return qdense


def conv_kernel(N: int, Hp: int, Wp: int, CB: int, OH: int, OW: int, CO: int, COB: int, KH: int, KW: int,
                stride: tuple[int, int], dilation: tuple[int, int], MT: int, NT: int, path: str,
                exact: bool = False, epi: Epilogue = FLOAT, c_out: int | None = None,
                out_pad: tuple[int, int] = (0, 0), res_c: int = 0, float_out: bool = False,
                in_off: tuple[int, int] = (0, 0)):
    """TIR: NHWC float32 Y[N, OH, OW, COB·L] of an integer conv over an NHWC uint8 input X[N, Hp, Wp, CB·4]
    that is already padded (spatially with the zero point; channels up to a multiple of 4). Output channels
    are padded to whole L-lane blocks (L = lanes_of(path)) so every store is one vector; the caller slices
    them off and permutes to the graph's NCHW, which fuse into the consumer (the next layer's quantize +
    NHWC permute then cancel to a plain elementwise kernel).

    W layout: [COB, KH, KW, CB, L, 4] (vnni, avx512bw, avx2) or [COB, KH, KW, CB, 4, 16] (cpu); C/S/B of
    length COB·L. `exact`: the exact pair split of _dot4.

    Fused output (quant_fuse.py): `epi` stores the next layer's int8 codes instead of float32; `c_out`
    channels are stored (default COB·L); `out_pad` = (ph, pw) makes Y the next conv's input as its kernel
    reads it, [N, OH + 2ph, OW + 2pw, c_out] with the border filled with the zero point (epi.zp + epi.shift).
    Residual block (quant_fuse: add -> acts -> quantize): `res_c` > 0 adds an input R[N, OH, OW, res_c]
    (float32 NHWC, res_c >= COB·L) that the epilogue adds before the activations; `float_out` adds a second
    output Yf[N, OH, OW, COB·L], the float32 value before the quantize (the sum after the activations), for
    the ops that read it (the next residual add reads it as its R).
    `in_off` = (oy, ox): X has a wider zero-point border than this conv's padding (codes stored for several
    convs, padded for the widest): the kernel reads X from row oy, column ox.
    Runs in parallel only above PARALLEL_MIN_MACS.
    """
    from tvm.script import tirx as T

    fast = path != "cpu"
    a_dtype = act_dtype_of(path)
    L = lanes_of(path)
    Cp = CB * 4
    sh, sw = stride
    dh, dw = dilation
    oy, ox = in_off
    OWO = (OW + MT - 1) // MT
    CBO = COB // NT
    w_shape = (COB, KH, KW, CB, L, 4) if fast else (COB, KH, KW, CB, 4, L)
    NS = COB * L if c_out is None else c_out
    full = NS == COB * L
    ph, pw = out_pad
    padded = bool(ph or pw)
    OHs, OWs = OH + 2 * ph, OW + 2 * pw
    fill = epi.zp + epi.shift if epi.requantizes else 0
    par = T.parallel if N * OH * OW * CO * KH * KW * Cp >= PARALLEL_MIN_MACS else T.serial
    RC = max(res_c, 1)
    if res_c and res_c < COB * L:
        raise ValueError(f"conv_kernel: residual has {res_c} channels, the kernel computes {COB * L}")

    @prim_func
    def qconv(X: T.Buffer((N, Hp, Wp, Cp), a_dtype), W: T.Buffer(w_shape, "int8"),
              C: T.Buffer((COB * L,), "int32"), S: T.Buffer((COB * L,), "float32"),
              Bi: T.Buffer((COB * L,), "float32"), R: T.Buffer((N, OH, OW, RC), "float32"),
              Y: T.Buffer((N, OHs, OWs, NS), epi.dtype), Yf: T.Buffer((N, OH, OW, COB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        if padded:                                      # the border of the next conv's input: zero point
            for n, h, w in T.grid(N, OHs, OWs):
                if h < ph or h >= OH + ph or w < pw or w >= OW + pw:
                    for c in T.vectorized(NS):
                        Y[n, h, w, c] = T.Cast(epi.dtype, fill)
        for row in par(N * OH):
            for cbo in range(CBO):
                for owo in range(OWO):
                    acc = T.decl_buffer((MT * NT * L,), "int32")
                    tail = T.decl_buffer((L,), epi.dtype)
                    for t in T.unroll(MT * NT):
                        acc[T.ramp(t * L, 1, L)] = T.broadcast(T.int32(0), L)
                    for kh in range(KH):
                        for kw in range(KW):
                            for cb in range(CB):
                                for nt in T.unroll(NT):
                                    for mi in T.unroll(MT):
                                        if fast:
                                            acc[T.ramp((mi * NT + nt) * L, 1, L)] = _dot4(
                                                path, acc[T.ramp((mi * NT + nt) * L, 1, L)],
                                                X.vload([row // OH, (row % OH) * sh + kh * dh + oy,
                                                         T.min(owo * MT + mi, OW - 1) * sw + kw * dw + ox,
                                                         cb * 4], f"{a_dtype}x4"),
                                                W.vload([cbo * NT + nt, kh, kw, cb, 0, 0], f"int8x{4 * L}"), exact)
                                        else:
                                            for k in T.unroll(4):
                                                for j in T.vectorized(L):
                                                    acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + \
                                                        T.Cast("int32", X[row // OH, (row % OH) * sh + kh * dh + oy,
                                                                          T.min(owo * MT + mi, OW - 1) * sw
                                                                          + kw * dw + ox, cb * 4 + k]) * \
                                                        T.Cast("int32", W[cbo * NT + nt, kh, kw, cb, k, j])
                    for mi in T.unroll(MT):
                        if owo * MT + mi < OW:
                            for nt in T.unroll(NT):
                                if float_out:
                                    for j in T.vectorized(L):
                                        Yf[row // OH, row % OH, owo * MT + mi, (cbo * NT + nt) * L + j] = \
                                            epi.float_value(acc[(mi * NT + nt) * L + j], C[(cbo * NT + nt) * L + j],
                                                            S[(cbo * NT + nt) * L + j], Bi[(cbo * NT + nt) * L + j],
                                                            _residual(R, res_c, row // OH, row % OH, owo * MT + mi,
                                                                      (cbo * NT + nt) * L + j))
                                if full:
                                    for j in T.vectorized(L):
                                        Y[row // OH, row % OH + ph, owo * MT + mi + pw, (cbo * NT + nt) * L + j] = \
                                            epi.value(acc[(mi * NT + nt) * L + j], C[(cbo * NT + nt) * L + j],
                                                      S[(cbo * NT + nt) * L + j], Bi[(cbo * NT + nt) * L + j],
                                                      _residual(R, res_c, row // OH, row % OH, owo * MT + mi,
                                                                (cbo * NT + nt) * L + j))
                                elif (cbo * NT + nt) * L + L <= NS:
                                    for j in T.vectorized(L):
                                        Y[row // OH, row % OH + ph, owo * MT + mi + pw, (cbo * NT + nt) * L + j] = \
                                            epi.value(acc[(mi * NT + nt) * L + j], C[(cbo * NT + nt) * L + j],
                                                      S[(cbo * NT + nt) * L + j], Bi[(cbo * NT + nt) * L + j],
                                                      _residual(R, res_c, row // OH, row % OH, owo * MT + mi,
                                                                (cbo * NT + nt) * L + j))
                                elif (cbo * NT + nt) * L < NS and res_c == 0:
                                    # as in dense_kernel: the partial vector's epilogue once, as a vector
                                    for j in T.vectorized(L):
                                        tail[j] = epi.value(acc[(mi * NT + nt) * L + j], C[(cbo * NT + nt) * L + j],
                                                            S[(cbo * NT + nt) * L + j], Bi[(cbo * NT + nt) * L + j])
                                    for j in range(L):
                                        if (cbo * NT + nt) * L + j < NS:
                                            Y[row // OH, row % OH + ph, owo * MT + mi + pw,
                                              (cbo * NT + nt) * L + j] = tail[j]
                                elif (cbo * NT + nt) * L < NS:             # a residual has only NS channels
                                    for j in range(L):
                                        if (cbo * NT + nt) * L + j < NS:
                                            Y[row // OH, row % OH + ph, owo * MT + mi + pw,
                                              (cbo * NT + nt) * L + j] = epi.value(
                                                acc[(mi * NT + nt) * L + j], C[(cbo * NT + nt) * L + j],
                                                S[(cbo * NT + nt) * L + j], Bi[(cbo * NT + nt) * L + j],
                                                _residual(R, res_c, row // OH, row % OH, owo * MT + mi,
                                                          (cbo * NT + nt) * L + j))
    return _drop_params(qconv, ([] if res_c else [5]) + ([] if float_out else [7]))     # R, Yf


def _residual(R, res_c: int, n, h, w, c):
    """TIR: the residual element R[n, h, w, c] of a fused residual epilogue, None without one (res_c == 0)."""
    from tvm import tirx

    return tirx.BufferLoad(R, [n, h, w, c]) if res_c else None


def _drop_params(func, drop: list[int]):
    """`func` without its (unreferenced) buffer parameters at positions `drop`: one TVMScript body serves the
    kernel variants with and without the residual input / float output."""
    if not drop:
        return func
    from tvm import tirx

    keep = [p for i, p in enumerate(func.params) if i not in drop]
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)


# depthwise_kernel sums in float32 (exact, see there); False: int32 (the tests compare the two)
FLOAT_DEPTHWISE = True


def depthwise_kernel(N: int, Hp: int, Wp: int, CB: int, OH: int, OW: int, KH: int, KW: int,
                     stride: tuple[int, int], dilation: tuple[int, int], MT: int, epi: Epilogue = FLOAT,
                     c_out: int | None = None, out_pad: tuple[int, int] = (0, 0)):
    """TIR: NHWC float32 Y[N, OH, OW, CB·16] of an integer depthwise conv (one filter per channel) over an
    NHWC uint8 input X[N, Hp, Wp, CB·16] already padded (spatially with the zero point, channels to whole
    16-lane blocks). W int8 [KH, KW, CB·16]; C/S/B of length CB·16 as in conv_kernel. Each tap widens 16
    uint8 inputs and 16 int8 weights and multiply-adds them (a depthwise conv reads every input a handful of
    times: no dot-product instruction applies), in float32 FMAs, exact while the integer sums stay below 2^24
    (FLOAT_DEPTHWISE; int32 multiply-adds past that); MT output columns x 16 channels of accumulators per
    tile.

    Fused output (quant_fuse.py), as conv_kernel's: `epi` stores the next layer's codes, `c_out` channels
    (default CB·16), `out_pad` the next conv's zero-point border."""
    from tvm.script import tirx as T

    Cp = CB * 16
    sh, sw = stride
    dh, dw = dilation
    OWO = (OW + MT - 1) // MT
    NS = Cp if c_out is None else c_out
    full = NS == Cp
    ph, pw = out_pad
    padded = bool(ph or pw)
    OHs, OWs = OH + 2 * ph, OW + 2 * pw
    fill = epi.zp + epi.shift if epi.requantizes else 0
    # the products summed in float32 (FMAs on two pipes, where an int32 multiply has one on Zen 2) while every
    # partial sum is an integer below 2^24, so exactly (|x·w| <= 255·128 per tap); the epilogue then reads the
    # same value as from an int32 accumulator (quant_epilogue.dequantized)
    acc_dtype = "float32" if FLOAT_DEPTHWISE and 2 * 255 * 128 * KH * KW < 1 << 24 else "int32"
    fa = acc_dtype == "float32"

    @prim_func
    def qdwconv(X: T.Buffer((N, Hp, Wp, Cp), "uint8"), W: T.Buffer((KH, KW, Cp), "int8"),
                C: T.Buffer((Cp,), "int32"), S: T.Buffer((Cp,), "float32"), Bi: T.Buffer((Cp,), "float32"),
                Y: T.Buffer((N, OHs, OWs, NS), epi.dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        if padded:                                      # the border of the next conv's input: zero point
            for n, h, w in T.grid(N, OHs, OWs):
                if h < ph or h >= OH + ph or w < pw or w >= OW + pw:
                    for c in T.vectorized(NS):
                        Y[n, h, w, c] = T.Cast(epi.dtype, fill)
        for row in T.parallel(N * OH):
            for cb in range(CB):
                for owo in range(OWO):
                    acc = T.decl_buffer((MT * 16,), acc_dtype)
                    for t in T.unroll(MT):
                        acc[T.ramp(t * 16, 1, 16)] = T.broadcast(T.Cast(acc_dtype, 0), 16)
                    for kh in range(KH):
                        for kw in T.unroll(KW):
                            for mi in T.unroll(MT):
                                for j in T.vectorized(16):
                                    acc[mi * 16 + j] = acc[mi * 16 + j] + T.Cast(acc_dtype, T.Cast(
                                        "int32", X[row // OH, (row % OH) * sh + kh * dh,
                                                   T.min(owo * MT + mi, OW - 1) * sw + kw * dw, cb * 16 + j])) * \
                                        T.Cast(acc_dtype, W[kh, kw, cb * 16 + j])
                    for mi in T.unroll(MT):
                        if owo * MT + mi < OW:
                            if full or cb * 16 + 16 <= NS:
                                for j in T.vectorized(16):
                                    Y[row // OH, row % OH + ph, owo * MT + mi + pw, cb * 16 + j] = epi.value(
                                        acc[mi * 16 + j], C[cb * 16 + j], S[cb * 16 + j], Bi[cb * 16 + j], None, fa)
                            elif cb * 16 < NS:
                                for j in range(16):
                                    if cb * 16 + j < NS:
                                        Y[row // OH, row % OH + ph, owo * MT + mi + pw, cb * 16 + j] = epi.value(
                                            acc[mi * 16 + j], C[cb * 16 + j], S[cb * 16 + j], Bi[cb * 16 + j], None, fa)
    return qdwconv


def bmm_kernel(BT: int, M: int, KB: int, NB: int, MT: int, NT: int, path: str, scale: float):
    """TIR: Y[BT, M, NB·L] = float32(A·B - C[bt]) · scale for A uint8 [BT, M, KB·4] and B int8 packed per
    batch as [BT, NB, KB, L, 4] (vnni, avx512bw, avx2) or [BT, NB, KB, 4, 16] (cpu); C int32 [BT, NB·L]
    (zero-point term). B is an activation quantized at run time to the full int8 range, so the vpmaddubsw
    paths use the exact pair split of _dot4."""
    from tvm.script import tirx as T

    fast = path != "cpu"
    exact = path in PAIR_PATHS
    a_dtype = act_dtype_of(path)
    L = lanes_of(path)
    K, N = KB * 4, NB * L
    MO = (M + MT - 1) // MT
    NBO = NB // NT
    w_shape = (BT, NB, KB, L, 4) if fast else (BT, NB, KB, 4, L)
    s = T.float32(scale)

    @prim_func
    def qbmm(A: T.Buffer((BT, M, K), a_dtype), W: T.Buffer(w_shape, "int8"), C: T.Buffer((BT, N), "int32"),
             Y: T.Buffer((BT, M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for p in T.parallel(BT * NBO):
            for mo in range(MO):
                acc = T.decl_buffer((MT * NT * L,), "int32")
                for t in T.unroll(MT * NT):
                    acc[T.ramp(t * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kb in range(KB):
                    for nt in T.unroll(NT):
                        for mi in T.unroll(MT):
                            if fast:
                                acc[T.ramp((mi * NT + nt) * L, 1, L)] = _dot4(
                                    path, acc[T.ramp((mi * NT + nt) * L, 1, L)],
                                    A.vload([p // NBO, T.min(mo * MT + mi, M - 1), kb * 4], f"{a_dtype}x4"),
                                    W.vload([p // NBO, (p % NBO) * NT + nt, kb, 0, 0], f"int8x{4 * L}"), exact)
                            else:
                                for k in T.unroll(4):
                                    for j in T.vectorized(L):
                                        acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + T.Cast(
                                            "int32", A[p // NBO, T.min(mo * MT + mi, M - 1), kb * 4 + k]) * T.Cast(
                                            "int32", W[p // NBO, (p % NBO) * NT + nt, kb, k, j])
                for mi in T.unroll(MT):
                    if mo * MT + mi < M:
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                Y[p // NBO, mo * MT + mi, ((p % NBO) * NT + nt) * L + j] = T.Cast(
                                    "float32", acc[(mi * NT + nt) * L + j]
                                    - C[p // NBO, ((p % NBO) * NT + nt) * L + j]) * s
    return qbmm


def bmm_dynamic_kernel(MT: int, path: str, scale: float, NT: int = 1):
    """bmm_kernel for sizes known only at run time (a dynamic batch x heads, sequence): every extent is a TIR
    variable bound from the buffers. A [BT, M, KB·4] (K zero-padded), W [BT, NB, KB, L, 4]
    (cpu: [.., 4, L]) from pack_rhs_kernel with NB a multiple of NT, C int32 [BT, N]; Y [BT, M, N]: a column
    block past N is skipped, the last one stores lane by lane up to N, the last row tile clamps its loads and
    guards its stores. Register tile MT rows x NT vectors (one vector: every broadcast of A fed one
    multiply-add, and the AVX2 attention matmuls ran 1.3x their static kernels' time)."""
    from tvm import tirx
    from tvm.script import tirx as T

    fast = path != "cpu"
    exact = path in PAIR_PATHS
    a_dtype = act_dtype_of(path)
    L = lanes_of(path)
    BT, M, K4, N, NB, KB = (tirx.Var(v, "int64") for v in ("bt", "m", "k4", "n", "nb", "kb"))
    w_shape = (BT, NB, KB, L, 4) if fast else (BT, NB, KB, 4, L)
    s = T.float32(scale)

    @prim_func
    def qbmm_dyn(A: T.Buffer((BT, M, K4), a_dtype), W: T.Buffer(w_shape, "int8"), C: T.Buffer((BT, N), "int32"),
                 Y: T.Buffer((BT, M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for p in T.parallel(BT * (NB // NT)):
            b = T.meta_var(p // (NB // NT))                     # the batch x head this task computes
            for mo in range((M + MT - 1) // MT):
                acc = T.decl_buffer((MT * NT * L,), "int32")
                for t in T.unroll(MT * NT):
                    acc[T.ramp(t * L, 1, L)] = T.broadcast(T.int32(0), L)
                for kb in range(KB):
                    for nt in T.unroll(NT):
                        col = T.meta_var(p % (NB // NT) * NT + nt)     # the column block
                        for mi in T.unroll(MT):
                            tile = T.meta_var((mi * NT + nt) * L)      # its accumulators in acc
                            row = T.meta_var(T.min(mo * MT + mi, M - 1))
                            if fast:
                                acc[T.ramp(tile, 1, L)] = _dot4(
                                    path, acc[T.ramp(tile, 1, L)], A.vload([b, row, kb * 4], f"{a_dtype}x4"),
                                    W.vload([b, col, kb, 0, 0], f"int8x{4 * L}"), exact)
                            else:
                                for k in T.unroll(4):
                                    for j in T.vectorized(L):
                                        acc[tile + j] = acc[tile + j] + T.Cast("int32", A[b, row, kb * 4 + k]) * \
                                            T.Cast("int32", W[b, col, kb, k, j])
                for mi in T.unroll(MT):
                    if mo * MT + mi < M:
                        for nt in T.unroll(NT):
                            col = T.meta_var(p % (NB // NT) * NT + nt)
                            tile = T.meta_var((mi * NT + nt) * L)
                            if col * L + L <= N:
                                for j in T.vectorized(L):
                                    Y[b, mo * MT + mi, col * L + j] = T.Cast(
                                        "float32", acc[tile + j] - C[b, col * L + j]) * s
                            else:
                                for j in range(L):
                                    if col * L + j < N:
                                        Y[b, mo * MT + mi, col * L + j] = T.Cast(
                                            "float32", acc[tile + j] - C[b, col * L + j]) * s
    return qbmm_dyn


def pack_rhs_kernel(path: str):
    """Run-time packing of bmm_dynamic_kernel's right operand: int8 B [BT, K, N] -> W [BT, NB, KB, L, 4] (cpu:
    [.., 4, L]) with NB·L >= N, KB·4 >= K, zero beyond K and N (so padded products add nothing), and its
    zero-point term C[bt, n] = Z[0] · Σ_k B[bt, k, n] (Z: the left operand's zero point)."""
    from tvm import tirx
    from tvm.script import tirx as T

    fast = path != "cpu"
    L = lanes_of(path)
    BT, K, N, NB, KB = (tirx.Var(n, "int64") for n in ("bt", "k", "n", "nb", "kb"))
    w_shape = (BT, NB, KB, L, 4) if fast else (BT, NB, KB, 4, L)

    @prim_func
    def qpack_rhs(B: T.Buffer((BT, K, N), "int8"), Z: T.Buffer((1,), "int32"), W: T.Buffer(w_shape, "int8"),
                  C: T.Buffer((BT, N), "int32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for p in T.parallel(BT):
            for nb, kb in T.grid(NB, KB):
                if (nb + 1) * L <= N and (kb + 1) * 4 <= K:       # an interior block: no guards (vectorizes)
                    for j, q in T.grid(L, 4):
                        if fast:
                            W[p, nb, kb, j, q] = B[p, kb * 4 + q, nb * L + j]
                        else:
                            W[p, nb, kb, q, j] = B[p, kb * 4 + q, nb * L + j]
                else:
                    for j, q in T.grid(L, 4):
                        if fast:
                            W[p, nb, kb, j, q] = T.if_then_else(
                                kb * 4 + q < K and nb * L + j < N,
                                B[p, T.min(kb * 4 + q, K - 1), T.min(nb * L + j, N - 1)], T.int8(0))
                        else:
                            W[p, nb, kb, q, j] = T.if_then_else(
                                kb * 4 + q < K and nb * L + j < N,
                                B[p, T.min(kb * 4 + q, K - 1), T.min(nb * L + j, N - 1)], T.int8(0))
            for j in range(N):
                C[p, j] = 0
            for q, j in T.grid(K, N):
                C[p, j] = C[p, j] + T.Cast("int32", B[p, q, j])
            for j in range(N):
                C[p, j] = C[p, j] * Z[0]
    return qpack_rhs


def pad_lhs_kernel(dtype: str):
    """bmm_dynamic_kernel's left operand: A [BT, M, K] -> [BT, M, K4] (K4: K rounded up to 4), filled beyond K
    with Z[0] (the operand's zero point: any value is right there, the packed right operand is zero)."""
    from tvm import tirx
    from tvm.script import tirx as T

    BT, M, K, K4 = (tirx.Var(n, "int64") for n in ("bt", "m", "k", "k4"))

    # each row: a plain copy of its K values (LLVM vectorizes it), then the K4 - K (< 4) fill values. (One
    # guarded loop over K4 ran scalar: 1.8 ms per forward pass of the small encoder's attention at 1 x 512.)
    @prim_func
    def qpad_lhs(A: T.Buffer((BT, M, K), dtype), Z: T.Buffer((1,), "int32"), Ap: T.Buffer((BT, M, K4), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for p in T.parallel(BT):
            for i in range(M):
                for k in range(K):
                    Ap[p, i, k] = A[p, i, k]
                for t in range(K4 - K):
                    Ap[p, i, K + t] = T.Cast(dtype, Z[0])
    return qpad_lhs


# ----------------------------------------------------------------------------------- weight packing
def _interleaves(path: str) -> bool:
    """Whether dense_kernel reads a register tile's column blocks interleaved (pack_dense). On the AVX2 path one
    contiguous weight stream per tile made the MLP's batch-1 GEMVs 11-17% faster (interleaved A/B of saved
    builds, three runs); with 512-bit vectors (vnni, avx512bw) it was 3-10% slower (NT streams keep more loads
    in flight there), so those keep one stream per column block."""
    return path == "avx2"


def pack_dense(w: np.ndarray, path: str, nt: int = 1) -> np.ndarray:
    """int8 [N, K] -> [NB/nt, KB, nt, L, 4] on avx2 (dense_kernel's nt column blocks of a register tile
    interleaved per 4-input group), [NB, KB, 1, L, 4] (vnni, avx512bw, sdot) or [NB, KB, 4, 16] (cpu),
    L = lanes_of(path), zero-padded to N%L == K%4 == 0; `nt` is the kernel's NT (it divides NB)."""
    L = lanes_of(path)
    n, k = w.shape
    w = np.pad(w, ((0, -n % L), (0, -k % 4)))
    nb, kb = w.shape[0] // L, w.shape[1] // 4
    w = w.reshape(nb, L, kb, 4)
    if path == "cpu":
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    nt = nt if _interleaves(path) else 1
    return np.ascontiguousarray(w.reshape(nb // nt, nt, L, kb, 4).transpose(0, 3, 1, 2, 4))


def pack_conv(w: np.ndarray, path: str) -> np.ndarray:
    """int8 OIHW -> [COB, KH, KW, CB, L, 4] (vnni, avx512bw, avx2) or [COB, KH, KW, CB, 4, 16] (cpu),
    zero-padded."""
    L = lanes_of(path)
    co, ci, kh, kw = w.shape
    w = np.pad(w, ((0, -co % L), (0, -ci % 4), (0, 0), (0, 0)))
    cob, cb = w.shape[0] // L, w.shape[1] // 4
    w = w.reshape(cob, L, cb, 4, kh, kw)                      # o_blk, o, c_blk, c, kh, kw
    order = (0, 4, 5, 2, 3, 1) if path == "cpu" else (0, 4, 5, 2, 1, 3)
    return np.ascontiguousarray(w.transpose(order))


def _needs_exact(path: str, wq: np.ndarray) -> bool:
    """Whether int8 weights `wq` would saturate the int16 pair sums of a vpmaddubsw path (|w| > 64)."""
    return path in PAIR_PATHS and wq.size > 0 and int(np.abs(wq.astype(np.int16)).max()) > PAIR_WEIGHT_QMAX


def _pad_vec(v: np.ndarray, n: int, dtype) -> np.ndarray:
    return np.pad(v.astype(dtype), (0, n - v.shape[0]))


def _channel_vec(v, n: int, dtype):
    """A per-channel kernel argument: a numpy vector zero-padded to `n` as a constant; a Relax expression as it
    is (computed at run time)."""
    return _const(_pad_vec(v, n, dtype)) if isinstance(v, np.ndarray) else v


# ------------------------------------------------------------------------------------- converters
@dataclass
class QuantLowering:
    """State of one lowering: the exported program (for weights), the kernel path, and what happened."""

    ep: Any
    spec: Any
    path: str
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    fuse: Any = None                # quant_fuse.FuseState: fused requantize chains of this program
    w4a8_rows: list = field(default_factory=list)  # (input, group, quantized rows) shared by W4A8 Linears
    precision: str = "float32"      # precision.py's name: "high" lets int4 GEMVs use bfloat16 input parts

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def kernel(self, op: str, wq: np.ndarray, how: str = "") -> bool:
        """Count `op` on this path (`how`: e.g. " (dynamic rows)"); True when its weights need the exact pair
        split (|w| > 64 on a vpmaddubsw path: quantized for another target), with a note saying so once."""
        exact = _needs_exact(self.path, wq)
        self.count(f"{op}:{self.path}{how}" + (" (exact pair split)" if exact else ""))
        if exact and not any("exact pair split" in n for n in self.notes):
            self.notes.append(f"some int8 weights exceed ±{PAIR_WEIGHT_QMAX} (quantized for another target, "
                              f"with reduce_range=false, or by QAT): those layers use the exact pair split "
                              f"(about half the speed); quantize for this target to get ±{PAIR_WEIGHT_QMAX} "
                              f"weights")
        return exact

    # -- constants of the exported program
    def constant(self, arg) -> np.ndarray | None:
        """The value of a parameter/buffer/constant placeholder of the exported program, else None."""
        import torch

        if arg is None or not hasattr(arg, "op") or arg.op != "placeholder":
            return None
        sig = self.ep.graph_signature
        name = arg.name
        for table, store in ((sig.inputs_to_parameters, self.ep.state_dict),
                             (sig.inputs_to_buffers, self.ep.state_dict),
                             (getattr(sig, "inputs_to_lifted_tensor_constants", {}), self.ep.constants)):
            if name in table and table[name] in store:
                t = store[table[name]]
                return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else None
        return None

    def bias(self, node, i: int, n: int) -> np.ndarray:
        """The float32 bias argument `i` of `node` (zeros when it is None)."""
        if node.args[i] is None:
            return np.zeros(n, np.float32)
        return self.need(node, i, "the bias").astype(np.float32)

    def need(self, node, i: int, what: str) -> np.ndarray:
        v = self.constant(node.args[i])
        if v is None:
            raise LoweringError(f"{node.target}: {what} (argument {i} of exported node '{node.name}') is not a "
                                f"constant of the exported program; graphopt's int8 kernels need constant weights")
        return v


def _tir_var(name: str):
    from tvm import tirx

    return tirx.Var(name, "int64")


def _private(func):
    """A kernel without its TVMScript global symbol: the module names it (identical kernels are shared)."""
    return func.without_attr("global_symbol")


def _relax():
    from tvm import relax

    return relax


def _const(arr: np.ndarray):
    relax = _relax()
    import tvm

    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(arr)))


def _shape(expr) -> list:
    """The tensor's shape: ints, and TIR expressions for dynamic dims (graphopt.dynamic)."""
    out = []
    for s in expr.ty.shape:
        try:
            out.append(int(s))
        except TypeError:
            out.append(s)
    return out


def _is_static(dims) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in dims)


def _prod(dims):
    """Product of sizes (ints or TIR expressions); an int when all are static."""
    out = 1
    for d in dims:
        out = out * d
    return int(out) if isinstance(out, (int, np.integer)) else out




def _to_uint8(bb, xq, zp: int, dtype: str, want: str = "uint8"):
    """`want` (uint8 or int8) view of a quantized tensor for the int8 kernels: int8 q becomes q + 128
    (zp + 128) for the uint8 x int8 kernels, uint8 q becomes q - 128 (zp - 128) for sdot's int8 x int8."""
    relax = _relax()
    if dtype == want:
        return xq, zp
    shift = 128 if want == "uint8" else -128
    shifted = bb.emit(relax.op.add(relax.op.astype(xq, "int16"), relax.const(shift, "int16")))
    return bb.emit(relax.op.astype(shifted, want)), zp + shift


def _convert_quantize(st: QuantLowering):
    from graphopt.quant.ops import inv_scale_of

    def convert(node, importer):
        if st.fuse is not None and node in st.fuse.absorbed_values:     # requantized by a fused producer
            return st.fuse.absorbed_values[node]
        relax = _relax()
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        scale, zp, qmin, qmax = node.args[1:5]
        dtype = "uint8" if qmin >= 0 else "int8"
        y = relax.op.round(relax.op.multiply(x, relax.const(inv_scale_of(scale), "float32")))
        y = relax.op.add(y, relax.const(float(zp), "float32"))
        y = relax.op.clip(y, float(qmin), float(qmax))
        st.count("quantize")
        return bb.emit(relax.op.astype(y, dtype))
    return convert


def _epilogue_relax(bb, acc, out_scale, bias, channel_axis: int, ndim: int):
    """float32(acc) * out_scale + bias in Relax (portable path)."""
    relax = _relax()
    shape = [1] * ndim
    shape[channel_axis] = -1
    y = relax.op.multiply(relax.op.astype(acc, "float32"),
                          relax.op.reshape(out_scale, [int(out_scale.ty.shape[0]) if s == -1 else 1
                                                       for s in shape]))
    if bias is not None:
        y = relax.op.add(y, relax.op.reshape(bias, [int(bias.ty.shape[0]) if s == -1 else 1
                                                    for s in shape]))
    return bb.emit(y)


def _dense_call(st: QuantLowering, bb, xu8, wq: np.ndarray, comp, out_scale, bias, lead: list[int],
                exact: bool = False, epi: Epilogue = FLOAT, flat: bool = False):
    """Emit the qdense kernel for uint8 x [..., K]; comp/out_scale/bias are Relax float/int vectors of
    length NB·L (or numpy arrays). Returns float32 [..., N] (the kernel stores exactly N columns), or with
    a requantizing `epi` and flat=True the [M, N] codes as the kernel stored them."""
    relax = _relax()
    n, k = wq.shape
    L = lanes_of(st.path)
    m = _prod(lead) if lead else 1
    x2 = bb.emit(relax.op.reshape(xu8, [m, k])) if not isinstance(m, int) or _shape(xu8) != [m, k] else xu8
    if k % 4:
        x2 = bb.emit(relax.op.nn.pad(x2, [0, 0, 0, -k % 4], pad_value=0.0))
    kb, nb = (k + 3) // 4, (n + L - 1) // L
    static = isinstance(m, int)
    mt, nt = _tiles(m if static else DYNAMIC_ROWS_HINT, nb, _cores(st.spec), st.path)
    # dynamic rows: the kernel takes its own row count variable (bound from A's shape at each call)
    func = dense_kernel(m if static else _tir_var("m"), kb, nb, mt, nt, st.path, exact, epi, n)
    gv = bb.add_func(_private(func), "graphopt_qdense")
    args = [x2, _const(pack_dense(wq, st.path, nt))]
    for v, dt in ((comp, np.int32), (out_scale, np.float32), (bias, np.float32)):
        args.append(_channel_vec(v, nb * L, dt))
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, n], epi.dtype)))
    if flat or [*lead, n] == [m, n]:
        return y
    return bb.emit(relax.op.reshape(y, [*lead, n]))


def _convert_qlinear(st: QuantLowering, sparse: bool = False):
    """qlinear, and sparse_qlinear (a sparsify-then-quantize layer: same arguments plus block shape and kernel
    choice; sparse_qlower emits the block-sparse int8 kernel or this dense one, per layer)."""
    def convert(node, importer):
        relax = _relax()
        bb = importer.block_builder
        xq = importer.env[node.args[0]]
        zp = int(node.args[4])
        shape = _shape(xq)
        dtype = str(xq.ty.dtype)
        wq = st.need(node, 1, "the int8 weight").astype(np.int8)
        out_scale = st.need(node, 2, "out_scale").astype(np.float32)
        bias = st.bias(node, 3, wq.shape[0])
        if st.path == "relax" or not _is_static(shape[-1:]):
            st.count("qlinear:relax" + ("" if _is_static(shape) else " (dynamic)"))
            wt = _const(np.ascontiguousarray(wq.T))
            xi = bb.emit(relax.op.subtract(relax.op.astype(xq, "int32"), relax.const(zp, "int32")))
            acc = bb.emit(relax.op.matmul(xi, relax.op.astype(wt, "int32"), out_dtype="int32"))
            return _epilogue_relax(bb, acc, _const(out_scale), _const(bias), len(shape) - 1, len(shape))
        exact = st.kernel("qlinear", wq, "" if _is_static(shape) else " (dynamic rows)")
        ki = st.fuse.kernel_inputs.get(node.args[0]) if st.fuse else None
        if ki is not None and ki.dtype == act_dtype_of(st.path) and ki.layout[0] in ("plain", "flat_nhwc"):
            xu8, zp8 = ki.var, ki.zp                    # codes stored by the fused producer
            if ki.layout[0] == "flat_nhwc":
                wq = quant_fuse.permute_flat_weight(wq, ki.layout[1])
        else:
            xu8, zp8 = _to_uint8(bb, xq, zp, dtype, act_dtype_of(st.path))
        comp = _zero_point_term(zp8, wq)
        plan = st.fuse.plans.get(node) if st.fuse else None
        call = _dense_call
        if sparse:
            from .sparse_qlower import layer_call

            call = layer_call(st, node, wq, out_scale, bias, shape[:-1], (int(node.args[5]), int(node.args[6])),
                              str(node.args[7]))
        if plan is None:
            return call(st, bb, xu8, wq, comp, out_scale, bias, shape[:-1], exact)
        epi, want, zp_out = quant_fuse.requant_epilogue(plan, act_dtype_of(st.path))
        st.count("fused requantize epilogue")
        y = call(st, bb, xu8, wq, comp, out_scale, bias, shape[:-1], exact, epi, flat=True)
        out = quant_fuse.KernelInput(y, want, zp_out, ("plain",))
        return _record_fused(st, bb, plan, out, None, shape[:-1])
    return convert


def _record_fused(st: QuantLowering, bb, plan, out, shape_nchw, lead, fview=None):
    """Book-keeping of a fused producer: its codes for the consumer kernel, and the graph-layout view that
    the quantize node (and the absorbed nodes before it) stand for; with a float32 second output (`fview`,
    graph layout), the nodes up to plan.float_out stand for that instead. Returns the producer's value."""
    st.fuse.kernel_inputs[plan.quantize] = out
    view = quant_fuse.graph_view(bb, plan, out, shape_nchw, lead)
    last_float = plan.absorbed.index(plan.float_out) if fview is not None and plan.float_out in plan.absorbed \
        else -1                                         # -1: only the producer's own value is the float one
    for i, n in enumerate(plan.absorbed):
        st.fuse.absorbed_values[n] = fview if i <= last_float else view
    return fview if fview is not None else view


def _convert_dynamic_qlinear(st: QuantLowering):
    def convert(node, importer):
        relax = _relax()
        R = relax.op
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        shape = _shape(x)
        wq = st.need(node, 1, "the int8 weight").astype(np.int8)
        w_scale = st.need(node, 2, "w_scale").astype(np.float32)
        bias = st.bias(node, 3, wq.shape[0])
        n = wq.shape[0]
        L = lanes_of(st.path)
        nb = (n + L - 1) // L if st.path != "relax" else 0
        f32 = lambda v: relax.const(v, "float32")           # noqa: E731
        lo = bb.emit(R.minimum(R.min(x), f32(0.0)))
        hi = bb.emit(R.maximum(R.max(x), f32(0.0)))
        scale = bb.emit(R.divide(R.subtract(hi, lo), f32(255.0)))
        scale = bb.emit(R.where(R.greater(scale, f32(0.0)), scale, f32(1.0)))
        inv = bb.emit(R.divide(f32(1.0), scale))
        zp = bb.emit(R.clip(R.round(R.multiply(R.negative(lo), inv)), 0.0, 255.0))
        xq = bb.emit(R.clip(R.add(R.round(R.multiply(x, inv)), zp), 0.0, 255.0))
        if st.path == "relax" or not _is_static(shape[-1:]):
            st.count("dynamic_qlinear:relax" + ("" if _is_static(shape) else " (dynamic)"))
            xi = bb.emit(R.subtract(R.astype(xq, "int32"), R.astype(zp, "int32")))
            acc = bb.emit(R.matmul(xi, R.astype(_const(np.ascontiguousarray(wq.T)), "int32"), out_dtype="int32"))
            y = bb.emit(R.multiply(R.astype(acc, "float32"), R.multiply(scale, _const(w_scale))))
            return bb.emit(R.add(y, _const(bias)))
        exact = st.kernel("dynamic_qlinear", wq, "" if _is_static(shape) else " (dynamic rows)")
        xu8 = bb.emit(R.astype(xq, "uint8"))
        zpi = bb.emit(R.astype(zp, "int32"))
        if act_dtype_of(st.path) == "int8":                 # sdot: q - 128 with zero point zp - 128
            xu8 = bb.emit(R.astype(R.subtract(R.astype(xq, "int16"), relax.const(128, "int16")), "int8"))
            zpi = bb.emit(R.subtract(zpi, relax.const(128, "int32")))
        wsum = _const(_pad_vec(wq.astype(np.int64).sum(axis=1), nb * L, np.int32))
        comp = bb.emit(R.multiply(zpi, wsum))
        out_scale = bb.emit(R.multiply(scale, _const(_pad_vec(w_scale, nb * L, np.float32))))
        return _dense_call(st, bb, xu8, wq, comp, out_scale, bias, shape[:-1], exact)
    return convert


def _convert_woq_linear(st: QuantLowering):
    """int8 per-channel weight-only Linear: graphopt.backends.tvm.weight_only's kernels on LLVM CPUs."""
    def convert(node, importer):
        relax = _relax()
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        wq = st.need(node, 1, "the int8 weight").astype(np.int8)
        w_scale = st.need(node, 2, "w_scale").astype(np.float32)
        bias = st.bias(node, 3, wq.shape[0])
        n, k = wq.shape
        shape = _shape(x)
        if st.path == "relax" or not _is_static(shape):
            st.count("woq_linear:relax" + ("" if _is_static(shape) else " (dynamic)"))
            w = relax.op.multiply(relax.op.astype(_const(np.ascontiguousarray(wq.T)), "float32"),
                                  _const(w_scale.reshape(1, n)))
            return bb.emit(relax.op.add(relax.op.matmul(x, w), _const(bias)))
        from .weight_only import emit_woq

        y, kind = emit_woq(bb, x, wq, w_scale.reshape(n, 1), None, bias, 8, None, st.spec)
        st.count(f"woq_linear:{kind}")
        return y
    return convert


def _convert_woq_linear_packed(st: QuantLowering):
    """int8 / int4 weight-only Linear with group-wise scales (graphopt.quant.weight_only)."""
    def convert(node, importer):
        from .weight_only import convert_packed

        return convert_packed(st, node, importer)
    return convert


def _convert_clustered_linear(st: QuantLowering):
    """Weight-shared Linear (graphopt.quant.cluster): codebook lookups in the weight-only kernels."""
    def convert(node, importer):
        from .weight_only import convert_clustered

        return convert_clustered(st, node, importer)
    return convert


def _convert_w4a8_linear(st: QuantLowering):
    """int4 weights x int8 activations quantized per call (graphopt.quant.w4a8): integer dot products."""
    def convert(node, importer):
        from .w4a8 import convert_w4a8

        return convert_w4a8(st, node, importer)
    return convert


def _convert_qconv2d(st: QuantLowering):
    def convert(node, importer):
        relax = _relax()
        R = relax.op
        bb = importer.block_builder
        xq = importer.env[node.args[0]]
        zp = int(node.args[4])
        stride, padding, dilation, groups = (list(node.args[5]), list(node.args[6]), list(node.args[7]),
                                             int(node.args[8]))
        dtype = str(xq.ty.dtype)
        wq = st.need(node, 1, "the int8 weight").astype(np.int8)
        out_scale = st.need(node, 2, "out_scale").astype(np.float32)
        bias = st.bias(node, 3, wq.shape[0])
        n, c, h, w = _shape(xq)
        co, ci, kh, kw = wq.shape
        dynamic = not _is_static((n, c, h, w))
        if not dynamic:
            oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
            ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if not dynamic and st.path != "relax" and groups == c == co and ci == 1:
            ki = st.fuse.kernel_inputs.get(node.args[0]) if st.fuse else None
            return _depthwise_call(st, bb, xq, zp, dtype, wq, out_scale, bias, stride, padding, dilation, oh, ow,
                                   ki, node)
        if st.path == "relax" or groups != 1 or dynamic:     # dynamic batch/size: TVM's integer conv
            st.count("qconv2d:relax" + (" (grouped)" if groups != 1 else " (dynamic)" if dynamic else ""))
            xi = bb.emit(R.subtract(R.astype(xq, "int32"), relax.const(zp, "int32")))
            acc = bb.emit(R.nn.conv2d(xi, R.astype(_const(wq), "int32"), strides=stride, padding=padding,
                                      dilation=dilation, groups=groups, out_dtype="int32"))
            return _epilogue_relax(bb, acc, _const(out_scale), _const(bias), 1, 4)
        exact = st.kernel("qconv2d", wq)
        cpad = -c % 4
        ki = st.fuse.kernel_inputs.get(node.args[0]) if st.fuse else None
        nhwc, zp8, _ = _conv_input(bb, ki, xq, zp, dtype, padding, cpad, act_dtype_of(st.path), wider=True)
        hp, wp = _shape(nhwc)[1:3]                      # a fused producer may have padded for a wider conv
        in_off = ((hp - h) // 2 - padding[0], (wp - w) // 2 - padding[1])
        L = lanes_of(st.path)
        cb, cob = (c + cpad) // 4, (co + L - 1) // L
        mt, nt = _conv_tiles(ow, cob, st.path)
        comp = _zero_point_term(zp8, wq)
        args = [nhwc, _const(pack_conv(wq, st.path)), _const(_pad_vec(comp, cob * L, np.int32)),
                _const(_pad_vec(out_scale, cob * L, np.float32)), _const(_pad_vec(bias, cob * L, np.float32))]
        plan = st.fuse.plans.get(node) if st.fuse else None
        if plan is None:
            func = conv_kernel(n, hp, wp, cb, oh, ow, co, cob, kh, kw, tuple(stride), tuple(dilation), mt, nt,
                               st.path, exact, in_off=in_off)
            gv = bb.add_func(_private(func), "graphopt_qconv2d")
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType([n, oh, ow, cob * L], "float32")))
            if st.fuse:
                st.fuse.float_nhwc[node] = y            # a fused residual add reads it as it is
            return _nchw_output(bb, y, co)
        return _fused_conv(st, bb, plan, args, (n, hp, wp, cb, oh, ow, co, cob, kh, kw, tuple(stride),
                                                tuple(dilation), mt, nt), exact, importer.env, in_off)
    return convert


def _fused_conv(st: QuantLowering, bb, plan, args, geometry, exact: bool, env: dict, in_off=(0, 0)):
    """Emit a qconv2d whose epilogue requantizes for the next int8 layer (quant_fuse.py): the conv kernel
    stores the codes NHWC (padded for a conv consumer), then a max-pool on the codes if the chain has one."""
    relax = _relax()
    n, hp, wp, cb, oh, ow, co, cob, kh, kw, stride, dilation, mt, nt = geometry
    epi, want, zp_out = quant_fuse.requant_epilogue(plan, act_dtype_of(st.path))
    st.count("fused requantize epilogue")
    # a depthwise consumer reads whole 16-channel blocks: stored so when the kernel computes that many channels
    dw_next = (bool(plan.consumer) and plan.consumer[0] == "dwconv" and want == "uint8"
               and quant_fuse.round_up(co, 16) <= cob * lanes_of(st.path))
    c_out = co if plan.flatten is not None else quant_fuse.round_up(co, 16 if dw_next else 4)
    pad_next = plan.consumer[1] if plan.consumer and (plan.consumer[0] == "conv" or dw_next) else (0, 0)
    conv_pad = (0, 0) if plan.pool else pad_next
    cp = cob * lanes_of(st.path)
    if plan.pool and plan.float_out is not None:
        return _fused_conv_float_pool(st, bb, plan, args, geometry, exact, in_off, epi, want, zp_out, cp)
    res_c = 0
    if plan.residual is not None:                       # residual add in the epilogue: its NHWC float32 input
        res = _residual_nhwc(st, bb, plan.residual, cp, env)
        res_c = _shape(res)[3]
        args = [*args, res]
        st.count("fused residual add")
    func = conv_kernel(n, hp, wp, cb, oh, ow, co, cob, kh, kw, stride, dilation, mt, nt, st.path, exact, epi,
                       c_out, conv_pad, res_c, plan.float_out is not None, in_off)
    gv = bb.add_func(_private(func), "graphopt_qconv2d")
    shape = [n, oh + 2 * conv_pad[0], ow + 2 * conv_pad[1], c_out]
    yf = None
    if plan.float_out is not None:                      # the float32 sum too, for the other ops reading it
        both = bb.emit(relax.call_tir(gv, args, [relax.TensorType(shape, want),
                                                 relax.TensorType([n, oh, ow, cp], "float32")]))
        y, yf = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
        st.fuse.float_nhwc[plan.float_out] = yf
        st.count("fused float32 second output")
    else:
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, want)))
    h, w = oh, ow
    if plan.pool:
        p = plan.pool
        h = (oh + 2 * p["padding"][0] - p["dilation"][0] * (p["kernel"][0] - 1) - 1) // p["stride"][0] + 1
        w = (ow + 2 * p["padding"][1] - p["dilation"][1] * (p["kernel"][1] - 1) - 1) // p["stride"][1] + 1
        low = (-128 if want == "int8" else 0)
        lowest = np.array([max(low, epi.qmin + epi.shift)], dtype=want)
        pool = quant_fuse.pool_kernel(n, oh, ow, c_out, p, h, w, want, pad_next, zp_out)
        pv = bb.add_func(_private(pool), "graphopt_qmaxpool")
        y = bb.emit(relax.call_tir(pv, [y, _const(lowest)],
                                   relax.TensorType([n, h + 2 * pad_next[0], w + 2 * pad_next[1], c_out], want)))
        st.count("qmaxpool (on int8 codes)")
    layout = ("flat_nhwc", (co, h, w)) if plan.flatten is not None else ("nhwc", pad_next)
    out = quant_fuse.KernelInput(y, want, zp_out, layout)
    fview = _nchw_output(bb, yf, co) if yf is not None else None
    return _record_fused(st, bb, plan, out, (n, co, h, w), None, fview)


def _fused_conv_float_pool(st: QuantLowering, bb, plan, args, geometry, exact: bool, in_off, epi, want: str,
                           zp_out: int, cp: int):
    """conv -> acts -> max-pool whose float32 output other ops read too (ResNet's stem: the pool output is
    the first block's identity and, quantized, its first conv's input): the conv kernel applies the acts and
    stores float32 NHWC, the pool kernel pools it (NHWC, vectorized over channels) and stores both the pooled
    float32 (NHWC, read as it is by a fused residual add) and its quantize in the next conv's layout."""
    import dataclasses

    relax = _relax()
    n, hp, wp, cb, oh, ow, co, cob, kh, kw, stride, dilation, mt, nt = geometry
    func = conv_kernel(n, hp, wp, cb, oh, ow, co, cob, kh, kw, stride, dilation, mt, nt, st.path, exact,
                       Epilogue("float32", epi.acts), None, (0, 0), 0, False, in_off)
    gv = bb.add_func(_private(func), "graphopt_qconv2d")
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([n, oh, ow, cp], "float32")))
    p = plan.pool
    h = (oh + 2 * p["padding"][0] - p["dilation"][0] * (p["kernel"][0] - 1) - 1) // p["stride"][0] + 1
    w = (ow + 2 * p["padding"][1] - p["dilation"][1] * (p["kernel"][1] - 1) - 1) // p["stride"][1] + 1
    dw_next = bool(plan.consumer) and plan.consumer[0] == "dwconv" and want == "uint8" \
        and quant_fuse.round_up(co, 16) <= cp
    c_codes = quant_fuse.round_up(co, 16 if dw_next else 4)
    pad_next = plan.consumer[1] if plan.consumer and (plan.consumer[0] == "conv" or dw_next) else (0, 0)
    pool = quant_fuse.pool_kernel(n, oh, ow, cp, p, h, w, "float32", (0, 0), 0, dataclasses.replace(epi, acts=()),
                                  c_codes, pad_next)
    pv = bb.add_func(_private(pool), "graphopt_qmaxpool")
    both = bb.emit(relax.call_tir(pv, [y, _const(np.array([-np.inf], np.float32))],
                                  [relax.TensorType([n, h, w, cp], "float32"),
                                   relax.TensorType([n, h + 2 * pad_next[0], w + 2 * pad_next[1], c_codes], want)]))
    yf, q = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
    st.count("max-pool (float32 and int8 codes)")
    st.count("fused float32 second output")
    st.fuse.float_nhwc[plan.float_out] = yf
    out = quant_fuse.KernelInput(q, want, zp_out, ("nhwc", pad_next))
    return _record_fused(st, bb, plan, out, (n, co, h, w), None, _nchw_output(bb, yf, co))


def _residual_nhwc(st: QuantLowering, bb, node, channels: int, env: dict):
    """The residual operand `node` of a fused residual add as the conv kernel reads it: float32 NHWC with at
    least `channels` channels. The NHWC tensor an int8 kernel stored for it when there is one (an unfused
    int8 conv's raw output, a fused residual kernel's float output: no copy), else the graph-layout value
    permuted (and channel-padded) by Relax ops."""
    R = _relax().op
    stored = st.fuse.float_nhwc.get(node)
    if stored is not None and _shape(stored)[3] >= channels:
        return stored
    x = env[node]
    c = _shape(x)[1]
    st.count("residual permuted to NHWC")
    y = bb.emit(R.permute_dims(x, [0, 2, 3, 1]))
    if c < channels:
        y = bb.emit(R.nn.pad(y, [0, 0, 0, 0, 0, 0, 0, channels - c], pad_value=0.0))
    return y


def _conv_input(bb, ki, xq, zp: int, dtype: str, padding, cpad: int, want: str, wider: bool = False):
    """(NHWC `want` codes padded spatially with the zero point and with `cpad` more channels, their zero point,
    whether they are the codes a fused producer stored, `ki`) for an int8 conv kernel reading `xq`.
    `wider`: the kernel also reads codes padded more than `padding` (at an offset: conv_kernel's in_off)."""
    c = _shape(xq)[1]
    if (ki is not None and ki.dtype == want and ki.layout[0] == "nhwc" and _shape(ki.var)[3] == c + cpad
            and (tuple(ki.layout[1]) == tuple(padding)
                 or (wider and ki.layout[1][0] >= padding[0] and ki.layout[1][1] >= padding[1]))):
        return ki.var, ki.zp, True                      # already NHWC and padded by the fused producer
    xu8, zp8 = _to_uint8(bb, xq, zp, dtype, want)
    return _nhwc_input(bb, xu8, padding, cpad, zp8), zp8, False


def _nhwc_input(bb, xu8, padding, cpad: int, zp8: int):
    """The NCHW uint8 activation as the int8 conv kernels read it: NHWC, padded spatially with the zero
    point and with `cpad` more channels."""
    R = _relax().op
    nhwc = bb.emit(R.permute_dims(xu8, [0, 2, 3, 1]))
    if padding[0] or padding[1] or cpad:
        nhwc = bb.emit(R.nn.pad(nhwc, [0, 0, padding[0], padding[0], padding[1], padding[1], 0, cpad],
                                pad_value=float(zp8)))
    return nhwc


def _nchw_output(bb, y, channels: int):
    """An int8 conv kernel's NHWC float32 output (channels padded to whole vectors) as the graph's NCHW
    tensor; the slice and permute fuse into the consumer."""
    R = _relax().op
    if _shape(y)[3] != channels:
        y = bb.emit(R.strided_slice(y, axes=[3], begin=[0], end=[channels]))
    return bb.emit(R.permute_dims(y, [0, 3, 1, 2]))


def _zero_point_term(zp8: int, wq: np.ndarray) -> np.ndarray:
    """zp · Σ w per output channel (int32): what the kernels subtract to turn uint8 products into
    zero-point-corrected ones."""
    return (zp8 * wq.astype(np.int64).reshape(wq.shape[0], -1).sum(axis=1)).astype(np.int32)


def _depthwise_call(st: QuantLowering, bb, xq, zp: int, dtype: str, wq: np.ndarray, out_scale: np.ndarray,
                    bias: np.ndarray, stride, padding, dilation, oh: int, ow: int, ki=None, node=None):
    """Emit depthwise_kernel for a quantized depthwise conv (groups == channels, one filter each); returns
    float32 NCHW like the other converters (slice and permute fuse into the consumer). `ki`: the codes a fused
    producer stored for it (quant_fuse: NHWC uint8, padded spatially and to 16-channel blocks), read as they
    are instead of permuting and padding the graph-layout tensor again. `node`: the qconv2d node, whose fusion
    plan (activations -> quantize) makes the kernel store the next layer's codes instead of float32."""
    relax = _relax()
    n, c, h, w = _shape(xq)
    kh, kw = wq.shape[2:]
    cpad = -c % 16
    nhwc, zp8, fused = _conv_input(bb, ki, xq, zp, dtype, padding, cpad, "uint8")
    if fused:
        st.count("qconv2d:depthwise reads fused codes")
    cp = c + cpad
    plan = st.fuse.plans.get(node) if st.fuse and node is not None else None
    mt = next((m for m in (8, 7, 6, 4) if ow % m == 0), min(8, ow))
    func = depthwise_kernel(n, h + 2 * padding[0], w + 2 * padding[1], cp // 16, oh, ow, kh, kw, tuple(stride),
                            tuple(dilation), mt)
    gv = bb.add_func(_private(func), "graphopt_qdwconv2d")
    taps = np.ascontiguousarray(wq.reshape(c, kh, kw).transpose(1, 2, 0))          # [KH, KW, C]
    comp = _zero_point_term(zp8, wq)
    args = [nhwc, _const(np.pad(taps, ((0, 0), (0, 0), (0, cpad)))), _const(_pad_vec(comp, cp, np.int32)),
            _const(_pad_vec(out_scale, cp, np.float32)), _const(_pad_vec(bias, cp, np.float32))]
    st.count("qconv2d:depthwise")
    if plan is not None:                                # requantize epilogue: codes for the next int8 kernel
        epi, want, zp_out = quant_fuse.requant_epilogue(plan, act_dtype_of(st.path))
        st.count("fused requantize epilogue")
        dw_next = bool(plan.consumer) and plan.consumer[0] == "dwconv" and want == "uint8"
        c_out = quant_fuse.round_up(c, 16 if dw_next else 4)
        pad_next = plan.consumer[1] if plan.consumer and (plan.consumer[0] == "conv" or dw_next) else (0, 0)
        func = depthwise_kernel(n, h + 2 * padding[0], w + 2 * padding[1], cp // 16, oh, ow, kh, kw,
                                tuple(stride), tuple(dilation), mt, epi, c_out, pad_next)
        gv = bb.add_func(_private(func), "graphopt_qdwconv2d")
        shape = [n, oh + 2 * pad_next[0], ow + 2 * pad_next[1], c_out]
        y = bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, want)))
        out = quant_fuse.KernelInput(y, want, zp_out, ("nhwc", pad_next))
        return _record_fused(st, bb, plan, out, (n, c, oh, ow), None)
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([n, oh, ow, cp], "float32")))
    if st.fuse:
        st.fuse.float_nhwc[node] = y
    return _nchw_output(bb, y, c)


def _dynamic_qmatmul(st: QuantLowering, bb, aq, bq, a_zp: int, out_scale: float):
    """qmatmul of two activations whose sizes are known only at run time (attention with a dynamic batch and
    sequence): zero-pad the left operand's K to whole 4-byte groups (when K may not be one), pack the right
    one with its zero-point term (pack_rhs_kernel), then bmm_dynamic_kernel: the static kernel's integer
    products. (Both preparing kernels take the zero point as a second input: TVM's RewriteDataflowReshape
    inspects every one-input call_tir for a reshape pattern, which fails on a kernel without blocks.)"""
    relax = _relax()
    R = relax.op
    sa, sb = _shape(aq), _shape(bq)
    m, k, n = sa[-2], sa[-1], sb[-1]
    batch = sa[:-2]
    bt = _prod(batch) if batch else 1
    L = lanes_of(st.path)
    a_dtype = act_dtype_of(st.path)
    st.count(f"qmatmul:{st.path} (dynamic)" + (" (exact pair split)" if st.path in PAIR_PATHS else ""))
    au8, zp8 = _to_uint8(bb, aq, a_zp, str(aq.ty.dtype), a_dtype)
    # register tile: MT rows as for a many-row GEMM; two column blocks where that leaves under 8 accumulators
    # (AVX2's 4 rows: its attention matmuls at 1.3x their static kernels' time with one; AVX-512 VNNI's 8 x 2
    # measured 2-4% slower than 8 x 1 in the small encoder)
    mt = _tiles(DYNAMIC_ROWS_HINT, 1, 1, st.path)[0]
    nt = 2 if mt < 8 else 1
    kb, nb = (k + 3) // 4, (n + L * nt - 1) // (L * nt) * nt         # column blocks: whole register tiles
    a3 = bb.emit(R.reshape(au8, [bt, m, k]))
    zp = _const(np.array([zp8], np.int32))
    if not (isinstance(k, int) and k % 4 == 0):         # K to whole 4-byte groups (the packed B is zero there)
        gv = bb.add_func(_serial_when_small(_private(pad_lhs_kernel(a_dtype))), "graphopt_qpad_lhs")
        a3 = bb.emit(relax.call_tir(gv, [a3, zp], relax.TensorType([bt, m, kb * 4], a_dtype)))
    b3 = bb.emit(R.reshape(bq, [bt, k, n]))
    w_shape = [bt, nb, kb, L, 4] if st.path != "cpu" else [bt, nb, kb, 4, L]
    gv = bb.add_func(_serial_when_small(_private(pack_rhs_kernel(st.path))), "graphopt_qpack_rhs")
    packed = bb.emit(relax.call_tir(gv, [b3, zp],
                                    [relax.TensorType(w_shape, "int8"), relax.TensorType([bt, n], "int32")]))
    w, comp = bb.emit(relax.TupleGetItem(packed, 0)), bb.emit(relax.TupleGetItem(packed, 1))
    gv = bb.add_func(_private(bmm_dynamic_kernel(mt, st.path, out_scale, nt)), "graphopt_qbmm")
    y = bb.emit(relax.call_tir(gv, [a3, w, comp], relax.TensorType([bt, m, n], "float32")))
    return bb.emit(R.reshape(y, [*batch, m, n]))


def _serial_when_small(func):
    """`func` (a copy or packing kernel, parallel over the batch x heads of a dynamic attention) marked for
    parallel_guard: one thread where the call's work is small (4 batch x head iterations of a few KB at the
    small encoder's 1 x 16: its int8 dynamic build 1.093 -> 1.072x the static one, saved builds interleaved)."""
    from .parallel_guard import PARALLEL_MIN, SERIAL_BELOW_ATTR

    return func.with_attr(SERIAL_BELOW_ATTR, PARALLEL_MIN)


def _convert_qmatmul(st: QuantLowering):
    def convert(node, importer):
        relax = _relax()
        R = relax.op
        bb = importer.block_builder
        aq, bq = importer.env[node.args[0]], importer.env[node.args[1]]
        a_zp, out_scale = int(node.args[2]), float(node.args[3])
        sa, sb = _shape(aq), _shape(bq)
        m, k, n = sa[-2], sa[-1], sb[-1]
        dynamic = not (_is_static(sa) and _is_static(sb))
        if st.path != "relax" and dynamic and sa[:-2] == sb[:-2]:
            return _dynamic_qmatmul(st, bb, aq, bq, a_zp, out_scale)
        if st.path == "relax" or sa[:-2] != sb[:-2]:
            st.count("qmatmul:relax" + (" (dynamic)" if dynamic else " (broadcast)" if sa[:-2] != sb[:-2] else ""))
            ai = bb.emit(R.subtract(R.astype(aq, "int32"), relax.const(a_zp, "int32")))
            acc = bb.emit(R.matmul(ai, R.astype(bq, "int32"), out_dtype="int32"))
            return bb.emit(R.multiply(R.astype(acc, "float32"), relax.const(out_scale, "float32")))
        st.count(f"qmatmul:{st.path}" + (" (exact pair split)" if st.path in PAIR_PATHS else ""))
        L = lanes_of(st.path)
        au8, zp8 = _to_uint8(bb, aq, a_zp, str(aq.ty.dtype), act_dtype_of(st.path))
        batch = sa[:-2]
        bt = int(np.prod(batch)) if batch else 1
        kb, nb = (k + 3) // 4, (n + L - 1) // L
        a3 = bb.emit(R.reshape(au8, [bt, m, k]))
        if k % 4:
            a3 = bb.emit(R.nn.pad(a3, [0, 0, 0, 0, 0, kb * 4 - k], pad_value=0.0))
        b3 = bb.emit(R.reshape(bq, [bt, k, n]))
        if k % 4 or n % L:
            b3 = bb.emit(R.nn.pad(b3, [0, 0, 0, kb * 4 - k, 0, nb * L - n], pad_value=0.0))
        # run-time packing of the right operand: [BT, K, N] -> [BT, NB, KB, L, 4] (cpu: [.., 4, 16])
        b5 = R.reshape(b3, [bt, kb, 4, nb, L])
        packed = bb.emit(R.permute_dims(b5, [0, 3, 1, 2, 4] if st.path == "cpu" else [0, 3, 1, 4, 2]))
        comp = bb.emit(R.multiply(R.sum(R.astype(b3, "int32"), axis=[1]), relax.const(zp8, "int32")))
        mt, nt = _tiles(m, nb, max(1, _cores(st.spec) // bt), st.path)
        gv = bb.add_func(_private(bmm_kernel(bt, m, kb, nb, mt, nt, st.path, out_scale)), "graphopt_qbmm")
        y = bb.emit(relax.call_tir(gv, [a3, packed, comp], relax.TensorType([bt, m, nb * L], "float32")))
        if nb * L != n:
            y = bb.emit(R.strided_slice(y, axes=[2], begin=[0], end=[n]))
        return bb.emit(R.reshape(y, [*batch, m, n]))
    return convert


_CONVERTERS: dict[str, Callable[[QuantLowering], Callable]] = {
    "quantize.default": _convert_quantize,
    "qlinear.default": _convert_qlinear,
    "sparse_qlinear.default": lambda st: _convert_qlinear(st, sparse=True),
    "sparse_qconv2d.default": lambda st: __import__("graphopt.backends.tvm.sparse_qlower",
                                                    fromlist=["x"]).convert_sparse_qconv2d(st),
    "qconv2d.default": _convert_qconv2d,
    "qmatmul.default": _convert_qmatmul,
    "dynamic_qlinear.default": _convert_dynamic_qlinear,
    "woq_linear.default": _convert_woq_linear,
    "woq_linear_packed.default": _convert_woq_linear_packed,
    "clustered_linear.default": _convert_clustered_linear,
    "w4a8_linear.default": _convert_w4a8_linear,
}


def _graphopt_ops(ep) -> set[str]:
    found = set()
    for node in ep.graph.nodes:
        t = node.target
        if node.op == "call_function" and getattr(t, "namespace", None) == "graphopt":
            found.add(t.__name__)
    return found


def custom_convert_map(ep, spec=None, precision: str = "float32") -> tuple[dict[str, Callable], QuantLowering | None]:
    """Converters for the graphopt ops present in `ep` (an ExportedProgram), for target `spec` and compute
    `precision` (precision.py: "high" lets int4 weight-only GEMVs take bfloat16 parts of their inputs).

    Returns (convert_map, state); state.notes / state.counts say which kernel path each op took after the
    import has run. Empty map and None when the program has no graphopt op.
    """
    present = _graphopt_ops(ep)
    if not present:
        return {}, None
    unknown = present - set(_CONVERTERS)
    if unknown:
        raise LoweringError(f"no TVM lowering for graphopt op(s) {', '.join(sorted(unknown))}")
    st = QuantLowering(ep, spec, int8_path(spec), precision=precision)
    if "sparse_qconv2d.default" in present:
        from .sparse_qlower import decide_sparse_convs

        decide_sparse_convs(st, ep)                          # the ones that run dense become qconv2d nodes
        present = _graphopt_ops(ep)
    st.notes.append(describe_path(st.path, getattr(spec, "alias", "?"), getattr(spec, "arch", "")))
    st.fuse = quant_fuse.FuseState(quant_fuse.plan_fusions(ep, st.path) if FUSE_EPILOGUES else {})
    converters = quant_fuse.absorbed_converters(st.fuse, ep)
    converters.update({name: _CONVERTERS[name](st) for name in present})
    return converters, st


def summary(st: QuantLowering | None) -> str:
    """One line for the report: kernel path and op counts."""
    if st is None:
        return ""
    counts = ", ".join(f"{k}×{v}" for k, v in sorted(st.counts.items()))
    return f"path={st.path}: {counts}" + ("; " + "; ".join(st.notes) if st.notes else "")
