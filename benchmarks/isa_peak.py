"""The int8 ceiling of this CPU: how fast its multiply-accumulate instructions run, int8 against float32.

    python benchmarks/isa_peak.py

An int8 build can only beat float32 on a compute-bound layer (a 3x3 conv, a large GEMM) by as much as the CPU's
integer multiply-add rate exceeds its float32 FMA rate. That ratio is a property of the core, not of the
compiler, and it varies: on AVX2 without VNNI the u8·s8 sequence is `vpmaddubsw` (pairs -> int16) +
`vpmaddwd` (-> int32) + `vpaddd`, whose two multiplies share the integer-multiply pipes, while the float32
side has two FMA pipes. This script times each sequence in a register-resident loop (no memory traffic; six
to ten independent accumulators, enough to cover every latency), one thread, with the system C compiler, and
prints giga multiply-accumulates per second per core and the int8 / float32 ratio per int8 path graphopt has
(avx2, avx512bw, vnni), and the rate of the int4 weight-only GEMV's step (mask a nibble, convert it, one FMA:
weights per second per core, the bound of a batch-1 int4 layer whose weights are in cache; an int8 weight's
step is the same length, so int4 gains over int8 weight-only only where int8's weights come from memory at a
lower rate; and with AVX512-BF16 the step of the precision="high" int4 kernel, two vdpbf16ps per 32 weights).
Paths whose instructions this CPU lacks are skipped. Memory-bound layers (batch-1
Linear, depthwise convs) are not bounded by this: int8 moves a quarter of float32's bytes there.

Needs a C compiler (`cc`, gcc or clang, with x86 intrinsics); on other machines it prints why it cannot run.
`measure()` returns the figures for other benchmarks (bench_quantize prints them in its header).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile

_SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static volatile long sink;
#ifndef ITERS
#define ITERS 40000000L
#endif
/* Each loop keeps its inputs in registers; the empty asm makes the compiler treat them as changed every
   iteration, so nothing is hoisted or folded. MAC counts: products per instruction sequence. */

__attribute__((target("avx2,fma"))) static double fp32_ymm(void) {
    __m256 f[10]; __m256 x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
    _Pragma("GCC unroll 10")
    for (int i = 0; i < 10; i++) f[i] = _mm256_set1_ps(i * 1e-3f);
    double t = now();
    for (long n = 0; n < ITERS; n++) {
        _Pragma("GCC unroll 10")
        for (int i = 0; i < 10; i++) f[i] = _mm256_fmadd_ps(f[i], x, y);
        __asm__ volatile("" : "+x"(x), "+x"(y));
    }
    t = now() - t; float s = 0; for (int i = 0; i < 10; i++) s += f[i][0]; sink = (long)s;
    return (double)ITERS * 10 * 8 / t / 1e9;
}

__attribute__((target("avx2"))) static double u8s8_ymm(void) {
    __m256i acc[6], u[6]; __m256i w = _mm256_set1_epi8(2), ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 6; i++) { acc[i] = _mm256_set1_epi32(i); u[i] = _mm256_set1_epi8(i + 1); }
    double t = now();
    for (long n = 0; n < ITERS; n++) {
        _Pragma("GCC unroll 6")
        for (int i = 0; i < 6; i++)
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u[i], w), ones));
        __asm__ volatile("" : "+x"(u[0]), "+x"(u[1]), "+x"(u[2]), "+x"(u[3]), "+x"(u[4]), "+x"(u[5]));
    }
    t = now() - t; long s = 0; for (int i = 0; i < 6; i++) s += _mm256_extract_epi32(acc[i], 0); sink = s;
    return (double)ITERS * 6 * 32 / t / 1e9;
}

__attribute__((target("avx512f"))) static double fp32_zmm(void) {
    __m512 f[12]; __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
    _Pragma("GCC unroll 12")
    for (int i = 0; i < 12; i++) f[i] = _mm512_set1_ps(i * 1e-3f);
    double t = now();
    for (long n = 0; n < ITERS; n++) {
        _Pragma("GCC unroll 12")
        for (int i = 0; i < 12; i++) f[i] = _mm512_fmadd_ps(f[i], x, y);
        __asm__ volatile("" : "+v"(x), "+v"(y));
    }
    t = now() - t; float s = 0; for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(f[i]); sink = (long)s;
    return (double)ITERS * 12 * 16 / t / 1e9;
}

__attribute__((target("avx512bw"))) static double u8s8_zmm(void) {
    __m512i acc[8], u[8]; __m512i w = _mm512_set1_epi8(2), ones = _mm512_set1_epi16(1);
    for (int i = 0; i < 8; i++) { acc[i] = _mm512_set1_epi32(i); u[i] = _mm512_set1_epi8(i + 1); }
    double t = now();
    for (long n = 0; n < ITERS; n++) {
        _Pragma("GCC unroll 8")
        for (int i = 0; i < 8; i++)
            acc[i] = _mm512_add_epi32(acc[i], _mm512_madd_epi16(_mm512_maddubs_epi16(u[i], w), ones));
        __asm__ volatile("" : "+v"(u[0]), "+v"(u[1]), "+v"(u[2]), "+v"(u[3]), "+v"(u[4]), "+v"(u[5]),
                         "+v"(u[6]), "+v"(u[7]));
    }
    t = now() - t; long s = 0; for (int i = 0; i < 8; i++) s += _mm512_reduce_add_epi32(acc[i]); sink = s;
    return (double)ITERS * 8 * 64 / t / 1e9;
}

__attribute__((target("avx512vnni,avx512f"))) static double vnni_zmm(void) {
    __m512i acc[10]; __m512i u = _mm512_set1_epi8(3), w = _mm512_set1_epi8(2);
    _Pragma("GCC unroll 10")
    for (int i = 0; i < 10; i++) acc[i] = _mm512_set1_epi32(i);
    double t = now();
    for (long n = 0; n < ITERS; n++) {
        _Pragma("GCC unroll 10")
        for (int i = 0; i < 10; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], u, w);
        __asm__ volatile("" : "+v"(u), "+v"(w));
    }
    t = now() - t; long s = 0; for (int i = 0; i < 10; i++) s += _mm512_reduce_add_epi32(acc[i]); sink = s;
    return (double)ITERS * 10 * 64 / t / 1e9;
}

/* int4 weight-only dequantization (graphopt's direct4_kernel): per SIMD vector of 8 (16) weights, one vpand
   isolating a nibble of a word vector in a register (the kernel loads each word once for its 8 nibbles), one
   vcvtdq2ps, one FMA into one of five independent accumulators (the AVX2 kernel's column blocks; on Zen 2 six
   to eight chains ran this loop 30% slower, four leave the FMA latency exposed). Written in asm (with
   intrinsics GCC spilled the accumulators). MAC count: weights. */
#define I4(op, v, w, t, a) op " %%" v "0, %%" v w ", %%" v t "\n\t" \
    "vcvtdq2ps %%" v t ", %%" v t "\n\tvfmadd231ps %%" v t ", %%" v "1, %%" v a "\n\t"
#define I4X5(op, v) I4(op, v, "2", "6", "8") I4(op, v, "3", "7", "9") I4(op, v, "4", "6", "10") \
    I4(op, v, "5", "7", "11") I4(op, v, "2", "6", "12")
#define I4_SETUP(v, mov) "vcvtdq2ps %%" v "0, %%" v "1\n\tvxorps %%" v "8, %%" v "8, %%" v "8\n\t" \
    "vmovaps %%" v "8, %%" v "9\n\tvmovaps %%" v "8, %%" v "10\n\tvmovaps %%" v "8, %%" v "11\n\t" \
    "vmovaps %%" v "8, %%" v "12\n\tvmovaps %%" v "8, %%" v "13\n\tvmovaps %%" v "8, %%" v "14\n\t" \
    "vmovaps %%" v "8, %%" v "15\n\t" mov " (%[w]), %%" v "2\n\t" mov " (%[w]), %%" v "3\n\t" \
    mov " (%[w]), %%" v "4\n\t" mov " (%[w]), %%" v "5\n\t"
#define I4_CLOBBER "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
    "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

/* one int4 kernel per vector width: NAME, target, vector type, its set1, register prefix, its load, its and */
#define INT4_KERNEL(NAME, TARGET, VEC, SET1, V, MOV, AND, LANES)                                              \
__attribute__((target(TARGET))) static double NAME(void) {                                                    \
    VEC w = SET1(0x12345678), m = SET1(15);                                                                    \
    float out[LANES];                                                                                          \
    long n = ITERS;                                                                                            \
    double t = now();                                                                                          \
    __asm__ volatile(MOV " (%[m]), %%" V "0\n\t" I4_SETUP(V, MOV) "1:\n\t" I4X5(AND, V) "decq %[n]\n\tjnz 1b\n\t" \
                     "vaddps %%" V "8, %%" V "12, %%" V "8\n\tvmovups %%" V "8, (%[out])"                     \
                     : [n] "+r"(n) : [w] "r"(&w), [m] "r"(&m), [out] "r"(out) : I4_CLOBBER);                 \
    t = now() - t; sink = (long)out[0];                                                                        \
    return (double)ITERS * 5 * LANES / t / 1e9;                                                                \
}
INT4_KERNEL(int4_ymm, "avx2,fma", __m256i, _mm256_set1_epi32, "ymm", "vmovdqu", "vpand", 8)
INT4_KERNEL(int4_zmm, "avx512f", __m512i, _mm512_set1_epi32, "zmm", "vmovdqu32", "vpandd", 16)

/* int4 weight-only with bfloat16 dot products (graphopt's woq4_bf16, precision="high"): per 32 weights, one vpsrld
   moving a nibble of each 16-bit half to bits 6..3, one vpternlogd ((w & mask) | 0x3F80: the bfloat16 1 + q/16),
   two vdpbf16ps (the input's hi and lo bfloat16 parts) into separate accumulators (ten chains). MAC count:
   weights. */
#define B4(w, t, a, b) "vpsrld $1, %%zmm" w ", %%zmm" t "\n\tvpternlogd $0xEA, %%zmm0, %%zmm13, %%zmm" t "\n\t" \
    "vdpbf16ps %%zmm" t ", %%zmm1, %%zmm" a "\n\tvdpbf16ps %%zmm" t ", %%zmm15, %%zmm" b "\n\t"
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static double int4bf16_zmm(void) {
    __m512i w = _mm512_set1_epi32(0x12345678), m = _mm512_set1_epi32(0x00780078), g = _mm512_set1_epi32(0x3F803F80);
    float out[16];
    long n = ITERS;
    double t = now();
    __asm__ volatile("vmovdqu32 (%[m]), %%zmm0\n\tvmovdqu32 (%[g]), %%zmm13\n\tvmovdqu32 (%[g]), %%zmm1\n\t"
                     "vmovdqu32 (%[g]), %%zmm15\n\tvxorps %%zmm8, %%zmm8, %%zmm8\n\t"
                     "vmovaps %%zmm8, %%zmm9\n\tvmovaps %%zmm8, %%zmm10\n\tvmovaps %%zmm8, %%zmm11\n\t"
                     "vmovaps %%zmm8, %%zmm12\n\tvmovaps %%zmm8, %%zmm16\n\tvmovaps %%zmm8, %%zmm17\n\t"
                     "vmovaps %%zmm8, %%zmm18\n\tvmovaps %%zmm8, %%zmm19\n\tvmovaps %%zmm8, %%zmm20\n\t"
                     "vmovdqu32 (%[w]), %%zmm2\n\tvmovdqu32 (%[w]), %%zmm3\n\tvmovdqu32 (%[w]), %%zmm4\n\t"
                     "vmovdqu32 (%[w]), %%zmm5\n\t"
                     "1:\n\t" B4("2", "6", "8", "16") B4("3", "7", "9", "17") B4("4", "6", "10", "18")
                     B4("5", "7", "11", "19") B4("2", "14", "12", "20")
                     "decq %[n]\n\tjnz 1b\n\tvaddps %%zmm8, %%zmm20, %%zmm8\n\tvmovups %%zmm8, (%[out])"
                     : [n] "+r"(n) : [w] "r"(&w), [m] "r"(&m), [g] "r"(&g), [out] "r"(out)
                     : I4_CLOBBER, "xmm16", "xmm17", "xmm18", "xmm19", "xmm20");
    t = now() - t; sink = (long)out[0];
    return (double)ITERS * 5 * 32 / t / 1e9;
}

int main(int argc, char **argv) {
    __builtin_cpu_init();
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a]; double g = -1;
        if (!strcmp(k, "fp32_ymm") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2")) g = fp32_ymm();
        else if (!strcmp(k, "u8s8_ymm") && __builtin_cpu_supports("avx2")) g = u8s8_ymm();
        else if (!strcmp(k, "fp32_zmm") && __builtin_cpu_supports("avx512f")) g = fp32_zmm();
        else if (!strcmp(k, "u8s8_zmm") && __builtin_cpu_supports("avx512bw")) g = u8s8_zmm();
        else if (!strcmp(k, "vnni_zmm") && __builtin_cpu_supports("avx512vnni")) g = vnni_zmm();
        else if (!strcmp(k, "int4_ymm") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2")) g = int4_ymm();
        else if (!strcmp(k, "int4_zmm") && __builtin_cpu_supports("avx512f")) g = int4_zmm();
        else if (!strcmp(k, "int4bf16_zmm") && __builtin_cpu_supports("avx512bf16")) g = int4bf16_zmm();
        printf("%s %.3f\n", k, g);
        fflush(stdout);
    }
    return 0;
}
"""

# graphopt's x86 int8 paths: (path, int8 sequence, the float32 FMA it competes with, what they are).
PATHS = [("avx2", "u8s8_ymm", "fp32_ymm", "vpmaddubsw + vpmaddwd + vpaddd, 256-bit, vs vfmadd231ps ymm"),
         ("avx512bw", "u8s8_zmm", "fp32_zmm", "vpmaddubsw + vpmaddwd + vpaddd, 512-bit, vs vfmadd231ps zmm"),
         ("vnni", "vnni_zmm", "fp32_zmm", "vpdpbusd zmm vs vfmadd231ps zmm")]
# graphopt's int4 weight-only GEMV (batch 1) per path: (path, kernel, what one step is).
WEIGHT_ONLY = [("avx2", "int4_ymm", "vpand + vcvtdq2ps + vfmadd231ps per 8 weights"),
               ("avx512", "int4_zmm", "vpandd + vcvtdq2ps + vfmadd231ps per 16 weights"),
               ("avx512bf16", "int4bf16_zmm", 'vpsrld + vpternlogd + 2 vdpbf16ps per 32 weights, precision="high"')]


def measure(rounds: int = 3, iters: int = 40_000_000, int4_only: bool = False) -> dict:
    """{"kernels": {name: GMAC/s per core, best of `rounds`}, "paths": [{path, int8, fp32, ratio, what}],
    "int4": [{path, weights (G/s per core), what}]} for the kernels this CPU runs; {"error": why} where it
    cannot be measured (no C compiler, not x86). `iters`: loop trips per kernel (40M: about a second each).
    `int4_only`: time only the int4 weight-only kernels ("paths" then empty)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"error": f"x86 only (this machine is {platform.machine()})"}
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return {"error": "no C compiler (cc / gcc / clang) on PATH"}
    if not shutil.which(cc):
        return {"error": f"the C compiler {cc!r} ($CC) is not there"}
    names = sorted(({k for _, a, b, _ in PATHS for k in (a, b)} if not int4_only else set())
                   | {k for _, k, _ in WEIGHT_ONLY})
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "isa_peak.c"), os.path.join(tmp, "isa_peak")
        with open(src, "w") as f:
            f.write(_SOURCE)
        build = subprocess.run([cc, "-O2", f"-DITERS={int(iters)}L", src, "-o", exe], capture_output=True, text=True)
        if build.returncode:
            return {"error": f"{cc} could not build the kernels: {build.stderr.strip()[-400:]}"}
        best: dict[str, float] = {}
        for _ in range(rounds):
            out = subprocess.run([exe, *names], capture_output=True, text=True, check=True).stdout
            for line in out.split("\n"):
                if line.strip():
                    k, g = line.split()
                    if float(g) > 0:
                        best[k] = max(best.get(k, 0.0), float(g))
    paths = [{"path": p, "int8": best[a], "fp32": best[b], "ratio": best[a] / best[b], "what": what}
             for p, a, b, what in PATHS if a in best and b in best]
    int4 = [{"path": p, "weights": best[k], "what": what} for p, k, what in WEIGHT_ONLY if k in best]
    return {"kernels": best, "paths": paths, "int4": int4}


def summary(m: dict) -> str:
    """One line per int8 path for a benchmark's header."""
    if "error" in m:
        return f"int8 ceiling not measured: {m['error']}"
    return "\n".join(f"int8 ceiling, path {p['path']}: {p['int8']:.1f} G int8 MAC/s vs {p['fp32']:.1f} G float32 "
                     f"MAC/s per core = {p['ratio']:.2f}x ({p['what']})" for p in m["paths"])


def summary_int4(m: dict) -> str:
    """One line per int4 weight-only path: dequantized weights per second per core, the compute bound of a
    batch-1 int4 GEMV whose weights are in cache (at batch 1 each weight is converted once, for one FMA)."""
    if "error" in m:
        return f"int4 ceiling not measured: {m['error']}"
    return "\n".join(f"int4 weight-only ceiling, path {p['path']}: {p['weights']:.1f} G weights/s per core "
                     f"({p['what']})" for p in m["int4"])


def main() -> int:
    m = measure()
    if "error" in m:
        print(summary(m))
        return 1
    from graphopt.backends.targets import host_cpu

    print(f"CPU: LLVM '{host_cpu()}', one thread, register-resident loops (best of 3)")
    print(summary(m))
    print(summary_int4(m))
    print("A compute-bound int8 layer can run at most that ratio faster than the same layer in float32 at the same "
          "fraction of peak; memory-bound layers are not bounded by it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
