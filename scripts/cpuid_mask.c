/* cpuid_mask.c: run a program as if on an x86-64 CPU without AVX-512, AVX-VNNI or AMX (an AVX2 + FMA machine).
 *
 * Built and preloaded by scripts/as-avx2 (LD_PRELOAD). Everything that asks the CPU what it has through the
 * CPUID instruction (PyTorch's cpuinfo and oneDNN, ONNX Runtime's MLAS, LLVM's host detection, hence
 * graphopt's target "x86") then picks its AVX2 code, as on an AMD EPYC before Zen 4 or an Intel Xeon before
 * Skylake-SP. How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, CPUs with the `cpuid_fault` flag) turns
 * every CPUID into a SIGSEGV; the handler here runs the real CPUID with faulting briefly off, clears the
 * feature bits, and resumes after the instruction. The family / model are those of an AVX2 part of the same
 * vendor (AMD: Zen 1 "Naples", LLVM znver1; Intel: Haswell-EP), so LLVM's CPU name matches the features.
 *
 * The program's own SIGSEGV handlers (Python's faulthandler, ...) keep working: sigaction / signal are
 * interposed, the program's handler is recorded, and every fault that is not a CPUID is passed on to it.
 * The setting is per thread, inherited by threads and forks, and reset by execve: LD_PRELOAD brings it back
 * in exec'd children (pytest-xdist workers, subprocesses). What it does not change: the instructions the
 * CPU executes and their speed (an AVX-512 machine still runs AVX2 code at its own clock), and glibc's own
 * string functions, which read CPUID before any preloaded library (scripts/as-avx2 sets GLIBC_TUNABLES for
 * those).
 *
 * Environment: GRAPHOPT_CPUID_MASK_LOG=1 prints one line per masked CPUID leaf to stderr (for tests).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

static struct sigaction app_action;   /* the SIGSEGV action the program asked for (default: SIG_DFL) */
static int active;                    /* CPUID faulting is on and our handler installed */
static int log_leaves;
static int host_is_intel;            /* read once, before faulting is on */
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d, int intel) {
    if (leaf == 1) {
        /* an AVX2 part of the same vendor: AMD family 17h model 01h (znver1), Intel family 6 model 3Fh */
        *a = intel ? 0x000306F2u : 0x00800F12u;
    } else if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                (1u << 31));
        /* ECX: AVX512_VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512_FP16 23, AMX-TILE 24, AMX-INT8 25 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5, AMX-FP16 21, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5,
           AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19 */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        *d &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0x24) {
        *a = *b = *c = *d = 0;      /* AVX10 */
    } else {
        return;
    }
    if (log_leaves) {
        char line[96];
        int n = leaf == 7 ? snprintf(line, sizeof line, "cpuid_mask: leaf 0x7.%u masked\n", sub)
                         : snprintf(line, sizeof line, "cpuid_mask: leaf %#x masked\n", leaf);
        if (n > 0) (void)!write(2, line, (size_t)n);
    }
}

static int vendor_is_intel(void) {
    uint32_t a, b, c, d;
    __cpuid(0, a, b, c, d);
    return b == 0x756e6547u;        /* "Genu" */
}

static void forward(int sig, siginfo_t *info, void *ctx) {
    struct sigaction app = app_action;
    if (app.sa_flags & SA_SIGINFO) {
        if (app.sa_sigaction) app.sa_sigaction(sig, info, ctx);
        return;
    }
    if (app.sa_handler == SIG_IGN) return;
    if (app.sa_handler == SIG_DFL) {  /* what the program would get without us: the default action */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(sig, &dfl, NULL);
        return;                       /* the faulting instruction runs again and takes the default action */
    }
    app.sa_handler(sig);
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    /* a faulting CPUID: a general-protection SIGSEGV (SI_KERNEL) at the bytes 0F A2 */
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
        set_cpuid(1);
        __cpuid_count(leaf, sub, a, b, c, d);
        set_cpuid(0);
        mask(leaf, sub, &a, &b, &c, &d, host_is_intel);
        r[REG_RAX] = a;               /* CPUID zero-extends into the 64-bit registers */
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    forward(sig, info, ctx);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !active) return real_sigaction(sig, act, old);
    if (old) *old = app_action;
    if (act) app_action = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void cpuid_mask_init(void) {
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    log_leaves = getenv("GRAPHOPT_CPUID_MASK_LOG") != NULL;
    host_is_intel = vendor_is_intel();
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    if (real_sigaction(SIGSEGV, &ours, &app_action) != 0) {
        fprintf(stderr, "cpuid_mask: cannot install the SIGSEGV handler; CPUID is not masked\n");
        return;
    }
    if (set_cpuid(0) != 0) {
        real_sigaction(SIGSEGV, &app_action, NULL);
        fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting (no 'cpuid_fault' in "
                        "/proc/cpuinfo); CPUID is not masked\n");
        return;
    }
    active = 1;
}
