"""W4A8 Linear kernels: int4 weights x int8 activations quantized per call, integer dot products.

Lowers ``graphopt::w4a8_linear`` (graphopt.quant.w4a8, whose docstring is the spec) on LLVM CPU targets to two
hand-written TIR kernels:
  qrows  X float32 [M, KP] (K zero-padded to NG·G) -> A int8 [M, KP], SA float32 [M, NG] (s_a, NaN for a group
         holding a NaN or ±Inf: that row's outputs are NaN whatever its codes), AS float32 [M, NG] (Σ_k a,
         exact): per row and group the maximum |x| as integers (the bits of |x| order like its value; NaN and
         ±Inf lie above every finite value), then multiply / round / clamp / convert as the reference does op by
         op: the codes of finite groups equal the reference's bit for bit.
  w4a8   Y[M, NB·L] = Σ_g (float32(Σ_k u·a) - z·Σa) · (s_a · s) + bias, u = q in [0, 15] (the stored nibble,
         unsigned), a int8: the nibbles are the *unsigned* operand of the int8 dot product, the activations the
         signed one, so the AVX2 / AVX-512BW pair instruction cannot saturate (2·15·127 = 3,810 < 32,767) and no
         operand needs a shift:
           vnni      vpdpbusd (4 u8·s8 products into each int32 lane, 512-bit)
           avx512bw  vpmaddubsw (2·15·127 = 3,810 at most per int16 lane) on the 2 or 4 weight vectors of 1 or 2
                     packed loads, summed in int16 (4 x 3,810 < 32,767), then one vpmaddwd by ones into int32
                     (512-bit); avx2: the same on 256-bit vectors (one widening per 4 products: 10-20% faster
                     than one per product on one thread; 8 per widening was slower)
           sdot      NEON sdot (s8·s8; the nibbles are 0..15 either way)
           cpu       no int8 dot product (x86 without AVX2, ARM without +dotprod): widening int32 multiply-adds
                     over 16 lanes that LLVM vectorizes (pmaddwd on SSE4, smull/smlal-style on NEON)
         Weights: [NB/NT, KP/8, NT, L, 4] bytes ('cpu': [..., 4, L]), byte (kb, t, j, r) = u[n, 8kb + r] | u[n, 8kb + 4 + r] << 4 for
         column n = (nb·NT + t)·L + j: one vector load gives two weight vectors (and, shift + and); K past
         in_features and N past out_features are zero nibbles. Per group the int32 sums are converted once and
         added into float32 accumulators; register tile MT rows x NT·L columns (M = 1 on vnni / sdot: two
         accumulator sets, the low and the high nibbles, so two dot-product chains run at once; the pair paths
         already join them in int16); parallel over column tiles.
The integer sums are exact and z·Σa is an exact integer in float32 (groups <= 8,192), so the result differs from
the reference only in the float32 rounding of the group products and their sum (LLVM may contract into FMA).
A row count known only at run time (dynamic batch / sequence, graphopt.dynamic) is a variable of both kernels.
Targets that are not LLVM CPUs ('relax': CUDA) take the same arithmetic in Relax integer ops.
"""
from __future__ import annotations

import numpy as np

from ...errors import LoweringError
from .quant_lower import (_PAIR_INTRINSICS, DYNAMIC_ROWS_HINT, PARALLEL_MIN_MACS, _const, _cores, _dot4, _is_static,
                          _prod, _shape, _tir_var, broadcast4, lanes_of)
from .tir_script import prim_func
from .weight_only import _group_table, unpack_nibbles

__all__ = ["KERNEL_PATHS", "pack_w4", "w4a8_tiles", "qrows_kernel", "w4a8_kernel", "convert_w4a8"]

KERNEL_PATHS = ("vnni", "avx512bw", "avx2", "sdot", "cpu")


def pack_w4(u: np.ndarray, lanes: int, nt: int, kp: int, generic: bool = False) -> np.ndarray:
    """Nibbles u [N, K] (0..15) in the kernel's layout [NBP/NT, KP/8, NT, L, 4] (int8 storage; generic: [..., 4, L],
    the 4 inputs outer so that a lane vector is one contiguous load), N padded to a multiple of NT·L and K to kp
    (a multiple of 8) with zeros."""
    n, k = u.shape
    nbp = -(-n // (lanes * nt)) * nt
    v = np.zeros((nbp * lanes, kp), np.uint8)
    v[:n, :k] = u
    blocks = v.reshape(nbp // nt, nt, lanes, kp // 8, 2, 4)              # [NBO, NT, L, KB, lo|hi, 4]
    packed = blocks[:, :, :, :, 0, :] | (blocks[:, :, :, :, 1, :] << 4)  # [NBO, NT, L, KB, 4]
    return np.ascontiguousarray(packed.transpose(0, 3, 1, 4, 2) if generic
                                else packed.transpose(0, 3, 1, 2, 4)).view(np.int8)


def w4a8_tiles(path: str, m: int, nb: int, cores: int) -> tuple[int, int, int]:
    """(MT rows, NT column blocks, U accumulator sets) for M rows and nb column blocks of L lanes."""
    if path == "cpu":               # widening multiply-adds on 16 int32 lanes (4 NEON / SSE registers each)
        mt, nt, u = min(m, 2), 1, 1
    elif m == 1:
        mt, nt, u = 1, 4, 2
    elif path == "sdot":            # 32 q registers of 4 lanes
        mt, nt, u = min(m, 4), 4, 1
    else:
        # one column block, up to 8 rows: with two blocks LLVM keeps every row's activation broadcasts live
        # across both and spills on AVX2 (16 ymm). One thread, min of 25 runs, 8 x 1 against 4 x 2 (AVX2),
        # 6 x 2 (AVX-512): AVX2 136 vs 160 us (64x256x1024), 2424 vs 2860 us (128x768x3072); AVX-512BW 2035 vs
        # 2241 us; VNNI 1412 vs 1479 us (128x768x3072)
        mt, nt, u = min(m, 8), 1, 1
    while nt > 1 and -(-nb // nt) < 2 * cores:          # every core gets column tiles
        nt //= 2
    return mt, nt, u


def qrows_kernel(M: int, KP: int, G: int):
    """TIR: per row m and group g of G inputs (G a multiple of 8) of X [M, KP]: A = clamp(round(x · inv), -127,
    127) (int8), SA = amax / 127 (+ NaN when the group holds a non-finite value), AS = float32(Σ a).
    Q [1] holds 127.0 (a parameter: TVM's RewriteDataflowReshape inspects every one-input kernel for a
    reshape pattern, which fails on a kernel without blocks)."""
    from tvm.script import tirx as T

    V = 16 if G % 16 == 0 else 8
    NG, C = KP // G, G // V
    dynamic = not isinstance(M, int)
    # parallel over rows from 8K inputs: alone a 64 x 1024 quantizer is faster serial (15 vs 18 us), but in a
    # model its input was just written by a parallel kernel, half of it in the other core's cache: serial
    # quantizers took 3x their one-thread time there (kernel profile, small encoder, AVX2, 2 threads)
    par = T.parallel if dynamic or (M > 1 and M * KP >= 1 << 13) else T.serial

    @prim_func
    def qrows(X: T.Buffer((M, KP), "float32"), Q: T.Buffer((1,), "float32"), A: T.Buffer((M, KP), "int8"),
              SA: T.Buffer((M, NG), "float32"), AS: T.Buffer((M, NG), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for m in par(M):
            for g in range(NG):
                vm = T.decl_buffer((V,), "int32")
                vs = T.decl_buffer((V,), "int32")
                red = T.decl_buffer((2,), "float32")
                top = T.decl_buffer((1,), "int32")
                for j in T.vectorized(V):
                    vm[j] = 0
                    vs[j] = 0
                # max |x| as integers: the bits of |x| order like its value, and NaN / ±Inf (exponent all ones)
                # lie above every finite value (and cannot be folded away by fast-math flags)
                for c in range(C):
                    for j in T.vectorized(V):
                        vm[j] = T.max(vm[j], T.bitwise_and(T.reinterpret(X[m, g * G + c * V + j], dtype="int32"),
                                                           T.int32(0x7FFFFFFF)))
                top[0] = 0
                for j in range(V):
                    top[0] = T.max(top[0], vm[j])
                red[0] = T.reinterpret(top[0], dtype="float32")
                red[1] = T.if_then_else(red[0] > T.float32(0), Q[0] / red[0], T.float32(0))
                # a group holding a NaN / ±Inf: its scale is NaN, so the row's outputs are NaN whatever its codes
                SA[m, g] = T.reinterpret(T.if_then_else(top[0] >= T.int32(0x7F800000), T.int32(0x7FC00000),
                                                        T.reinterpret(red[0] / Q[0], dtype="int32")), dtype="float32")
                for c in range(C):
                    for j in T.vectorized(V):
                        A[m, g * G + c * V + j] = T.Cast("int8", T.max(T.min(T.round(
                            X[m, g * G + c * V + j] * red[1]), Q[0]), -Q[0]))
                        vs[j] = vs[j] + T.Cast("int32", T.max(T.min(T.round(
                            X[m, g * G + c * V + j] * red[1]), Q[0]), -Q[0]))
                red[0] = T.float32(0)
                for j in range(V):
                    red[0] = red[0] + T.Cast("float32", vs[j])
                AS[m, g] = red[0]
    return qrows


def _pair_sum(path: str, W, A, nbo, kb, nt, row, KS: int):
    """Pair paths: Σ over KS packed byte vectors (2·KS weight vectors) of vpmaddubsw(nibbles, activations),
    summed in int16 (each is at most 2·15·127 = 3,810 per lane, 4 of them 15,240 < 32,767), then one vpmaddwd
    by ones into int32: one widening for 2·KS dot products instead of one each."""
    from tvm.script import tirx as T

    L = lanes_of(path)
    ubsw, wd = _PAIR_INTRINSICS[path]
    total = None
    for s in range(KS):
        wv = W.vload([nbo, kb * KS + s, nt, 0, 0], f"int8x{4 * L}")
        for high in (False, True):
            a = broadcast4(A.vload([row, (kb * KS + s) * 8 + 4 * high], "int8x4"), L)
            p = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(ubsw), _nibbles(path, wv, high), a,
                                        dtype=f"int16x{2 * L}")
            total = p if total is None else total + p
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(wd), total, T.broadcast(T.int16(1), 2 * L),
                                   dtype=f"int32x{L}")


def _nibbles(path: str, wv, high: bool):
    """The low or high nibbles of 4L packed bytes, as int8 values 0..15."""
    from tvm.script import tirx as T

    L = lanes_of(path)
    w32 = T.reinterpret(wv, dtype=f"int32x{L}")
    if high:
        w32 = T.shift_right(w32, T.broadcast(T.int32(4), L))
    return T.reinterpret(T.bitwise_and(w32, T.broadcast(T.int32(0x0F0F0F0F), L)), dtype=f"int8x{4 * L}")


def w4a8_kernel(M: int, KP: int, G: int, NB: int, MT: int, NT: int, U: int, path: str):
    """TIR of the W4A8 GEMM (module docstring): A int8 [M, KP], SA / AS float32 [M, NG], W int8
    [NB/NT, KP/8, NT, L, 4], SW (s) / ZF (float32 z) float32 [NB, NG, L], Bi float32 [NB·L] -> Y [M, NB·L]."""
    from tvm.script import tirx as T

    L = lanes_of(path)
    N, NG, KB = NB * L, KP // G, KP // 8
    GB = G // 8
    NBO, MO = NB // NT, (M + MT - 1) // MT
    T_ = MT * NT * L
    pair = path in _PAIR_INTRINSICS
    generic = path == "cpu"                    # no int8 dot product: widening int32 multiply-adds LLVM vectorizes
    KS = 2 if pair and GB % 2 == 0 else 1      # packed byte vectors summed in int16 per vpmaddwd (_pair_sum)
    if pair or generic:
        U = 1
    w_shape = (NBO, KB, NT, 4, L) if generic else (NBO, KB, NT, L, 4)
    par = T.parallel if not isinstance(M, int) or M * KP * N >= PARALLEL_MIN_MACS else T.serial

    @prim_func
    def w4a8(A: T.Buffer((M, KP), "int8"), SA: T.Buffer((M, NG), "float32"), AS: T.Buffer((M, NG), "float32"),
             W: T.Buffer(w_shape, "int8"), SW: T.Buffer((NB, NG, L), "float32"),
             ZF: T.Buffer((NB, NG, L), "float32"), Bi: T.Buffer((N,), "float32"), Y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        for nbo in par(NBO):
            for mo in range(MO):
                fac = T.decl_buffer((T_,), "float32")
                acc = T.decl_buffer((U * T_,), "int32")
                for t in T.unroll(MT * NT):
                    fac[T.ramp(t * L, 1, L)] = T.broadcast(T.float32(0), L)
                for g in range(NG):
                    for t in T.unroll(U * MT * NT):
                        acc[T.ramp(t * L, 1, L)] = T.broadcast(T.int32(0), L)
                    for kb in range(GB // KS):
                        for nt in T.unroll(NT):
                            for mi in T.unroll(MT):
                                if pair:
                                    acc[T.ramp((mi * NT + nt) * L, 1, L)] = acc[T.ramp((mi * NT + nt) * L, 1, L)] + \
                                        _pair_sum(path, W, A, nbo, g * (GB // KS) + kb, nt,
                                                  T.min(mo * MT + mi, M - 1), KS)
                                elif generic:
                                    for r in T.unroll(4):
                                        for j in T.vectorized(L):
                                            acc[(mi * NT + nt) * L + j] = acc[(mi * NT + nt) * L + j] + T.bitwise_and(
                                                T.Cast("int32", W[nbo, g * GB + kb, nt, r, j]), 15) * T.Cast(
                                                "int32", A[T.min(mo * MT + mi, M - 1), (g * GB + kb) * 8 + r]) + \
                                                T.bitwise_and(T.shift_right(T.Cast("int32", W[nbo, g * GB + kb, nt, r, j]),
                                                                            4), 15) * T.Cast(
                                                "int32", A[T.min(mo * MT + mi, M - 1), (g * GB + kb) * 8 + 4 + r])
                                else:
                                    acc[T.ramp((mi * NT + nt) * L, 1, L)] = _dot4(
                                        path, acc[T.ramp((mi * NT + nt) * L, 1, L)],
                                        A.vload([T.min(mo * MT + mi, M - 1), (g * GB + kb) * 8], "int8x4"),
                                        _nibbles(path, W.vload([nbo, g * GB + kb, nt, 0, 0], f"int8x{4 * L}"), False),
                                        unsigned_weights=True)
                                    acc[T.ramp(((U - 1) * MT * NT + mi * NT + nt) * L, 1, L)] = _dot4(
                                        path, acc[T.ramp(((U - 1) * MT * NT + mi * NT + nt) * L, 1, L)],
                                        A.vload([T.min(mo * MT + mi, M - 1), (g * GB + kb) * 8 + 4], "int8x4"),
                                        _nibbles(path, W.vload([nbo, g * GB + kb, nt, 0, 0], f"int8x{4 * L}"), True),
                                        unsigned_weights=True)
                    for mi in T.unroll(MT):
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                fac[(mi * NT + nt) * L + j] = fac[(mi * NT + nt) * L + j] + (
                                    T.Cast("float32", acc[(mi * NT + nt) * L + j]
                                           + acc[((U - 1) * MT * NT + mi * NT + nt) * L + j] * (U - 1))
                                    - ZF[nbo * NT + nt, g, j] * AS[T.min(mo * MT + mi, M - 1), g]) * (
                                    SA[T.min(mo * MT + mi, M - 1), g] * SW[nbo * NT + nt, g, j])
                for mi in T.unroll(MT):
                    if mo * MT + mi < M:
                        for nt in T.unroll(NT):
                            for j in T.vectorized(L):
                                Y[mo * MT + mi, (nbo * NT + nt) * L + j] = (fac[(mi * NT + nt) * L + j]
                                                                            + Bi[(nbo * NT + nt) * L + j])
    return w4a8


def _relax_w4a8(bb, x, u, scales, zeros, bias, g: int, k: int):
    """The reference arithmetic in Relax ops (any target, dynamic rows): per-group int32 matmuls."""
    from tvm import relax

    R = relax.op
    n = u.shape[0]
    ng = scales.shape[1]
    kp = ng * g
    shape = _shape(x)
    rows = _prod(shape[:-1])
    f32 = lambda v: relax.const(v, "float32")                 # noqa: E731
    x2 = bb.emit(R.reshape(x, [rows, k]))
    if kp != k:
        x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, kp - k], pad_value=0.0))
    x3 = bb.emit(R.reshape(x2, [rows, ng, g]))
    fin = bb.emit(R.isfinite(x3))
    xc = bb.emit(R.where(fin, x3, f32(0.0)))
    amax = bb.emit(R.max(R.abs(xc), axis=[2], keepdims=True))
    inv = bb.emit(R.where(R.greater(amax, f32(0.0)), R.divide(f32(127.0), amax), f32(0.0)))
    nonfinite = bb.emit(R.greater(R.sum(R.astype(R.logical_not(fin), "float32"), axis=[2], keepdims=True), f32(0.0)))
    s_a = bb.emit(R.where(nonfinite, f32(float("nan")), R.divide(amax, f32(127.0))))
    a = bb.emit(R.astype(R.clip(R.round(R.multiply(xc, inv)), -127.0, 127.0), "int32"))     # [M, NG, G]
    q = np.zeros((n, kp), np.int32)
    q[:, :k] = u
    qz = (q.reshape(n, ng, g) - zeros.astype(np.int32)[:, :, None]).transpose(1, 2, 0)      # [NG, G, N]
    isum = bb.emit(R.matmul(R.permute_dims(a, [1, 0, 2]), _const(np.ascontiguousarray(qz)), out_dtype="int32"))
    prod = bb.emit(R.multiply(R.permute_dims(s_a, [1, 0, 2]),
                              _const(np.ascontiguousarray(scales.astype(np.float32).T[:, None, :]))))
    y = bb.emit(R.sum(R.multiply(R.astype(isum, "float32"), prod), axis=[0]))
    y = bb.emit(R.add(y, _const(bias)))
    return bb.emit(R.reshape(y, [*shape[:-1], n]))


def convert_w4a8(st, node, importer):
    """Converter of ``graphopt::w4a8_linear(x, wq, scales, zeros, bias, group_size, in_features)`` for
    graphopt.backends.tvm.quant_lower (`st`: its QuantLowering state)."""
    from tvm import relax

    from ...quant.w4a8 import group_of

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    group_size, k = int(node.args[5]), int(node.args[6])
    wq = st.need(node, 1, "the packed int4 weight").astype(np.uint8)
    scales = st.need(node, 2, "scales").astype(np.float32)
    zeros = st.need(node, 3, "zero points").astype(np.int32)
    n = wq.shape[0]
    bias = st.bias(node, 4, n)
    u = unpack_nibbles(wq, k)
    shape = _shape(x)
    if u.shape[1] != k or shape[-1] != k:
        raise LoweringError(f"w4a8_linear (node '{node.name}'): input has {shape[-1]} features, the weight "
                            f"{u.shape[1]}, in_features is {k}")
    g = group_of(group_size, k)
    ng = scales.shape[1]
    if ng != -(-k // g):
        raise LoweringError(f"w4a8_linear (node '{node.name}'): {ng} scale groups for {k} inputs in groups of {g}")
    static = _is_static(shape)
    if st.path not in KERNEL_PATHS:
        st.count("w4a8_linear:relax" + ("" if static else " (dynamic)"))
        note = (f"W4A8 has no integer kernel for this target (int8 path {st.path}: not an LLVM CPU): its Linears "
                f"run as Relax integer ops on unpacked weights; weight-only int4 "
                f"(quantize(mode=weight_only,bits=4)) reads 8x fewer weight bytes here")
        if note not in st.notes:
            st.notes.append(note)
        return _relax_w4a8(bb, x, u, scales, zeros, bias, g, k)
    R = relax.op
    m = _prod(shape[:-1])
    L = lanes_of(st.path)
    kp = ng * g
    nb = -(-n // L)
    # dynamic rows (batch x sequence known at run time): tiles as for a many-row GEMM, and the kernels take
    # their own row count variable, bound from their input's shape at each call
    mt, nt, nsets = w4a8_tiles(st.path, m if static else DYNAMIC_ROWS_HINT, nb, _cores(st.spec))
    mk = m if static else _tir_var("m")
    nbp = -(-nb // nt) * nt
    # one activation quantization per input and group size (Q, K and V projections read the same x)
    qa = next((q for v, gg, q in st.w4a8_rows if gg == g and v.same_as(x)), None)
    if qa is None:
        x2 = bb.emit(R.reshape(x, [m, k]))
        if kp != k:
            x2 = bb.emit(R.nn.pad(x2, [0, 0, 0, kp - k], pad_value=0.0))
        qv = bb.add_func(qrows_kernel(mk, kp, g).without_attr("global_symbol"), "graphopt_w4a8_qrows")
        qa = bb.emit(relax.call_tir(
            qv, [x2, _const(np.array([127.0], np.float32))],
            [relax.TensorType([m, kp], "int8"), relax.TensorType([m, ng], "float32"),
             relax.TensorType([m, ng], "float32")]))
        st.w4a8_rows.append((x, g, qa))
    gv = bb.add_func(w4a8_kernel(mk, kp, g, nbp, mt, nt, nsets, st.path).without_attr("global_symbol"),
                     "graphopt_w4a8")
    args = [bb.emit(relax.TupleGetItem(qa, i)) for i in range(3)]
    args += [_const(pack_w4(u, L, nt, kp, st.path == "cpu")), _const(_group_table(scales, L, nbp, np.float32)),
             _const(_group_table(zeros, L, nbp, np.float32)),
             _const(np.pad(bias, (0, nbp * L - n)))]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType([m, nbp * L], "float32")))
    if nbp * L != n:
        y = bb.emit(R.strided_slice(y, axes=[1], begin=[0], end=[n]))
    st.count(f"w4a8_linear:{st.path}" + ("" if static else " (dynamic rows)"))
    return bb.emit(R.reshape(y, [*shape[:-1], n]))
