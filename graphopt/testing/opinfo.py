"""Differential harness: PyTorch's OpInfo samples through graphopt's compiler, compared with eager PyTorch.

For each op (an entry of `torch.testing._internal.common_methods_invocations.op_db`), the first few float32
sample inputs are wrapped in a module and compiled (capture -> lowering -> build, `graphopt.optimize` with an
empty pipeline) for a target, plain and with special values injected into the float inputs:

  plain       the sample as OpInfo gives it
  nonfinite   NaN, +Inf, -Inf at every 4th element (different offsets per tensor)
  edge        -0.0, denormals (+-1e-40), the smallest normal, and values near float32's limits (+-3e38)

Each case is classified (`Result.kind`):

  match       every output leaf has eager's shape and dtype, the same NaN positions, the same +-Inf positions,
              and finite values within rtol 1e-4 / atol 1e-5 (atol scaled by the largest finite |reference|
              below 1e30, so near-limit inputs cannot hide errors in the ordinary values); integer and bool
              outputs exactly equal. For the ops in FLOAT64_TIEBREAK (sums of products, GELU: their float32
              overflow at the limits depends on evaluation order, which PyTorch does not fix either) an
              element also matches when it agrees with the op evaluated in float64, rounded to float32, or
              when eager is off that answer and both overflowed there (see FLOAT64_TIEBREAK)
  typed       graphopt raised a GraphoptError (LoweringError, BuildError, CaptureError, ...): a refusal that
              names what is at fault, acceptable
  wrong       the compiled module returned something else: a silent wrong answer, never acceptable
  crash       anything else was raised (a bare TVM/torch exception): a bug in graphopt's error handling

Several cases are compiled into one module (`batch`): builds dominate the run time. When a batched build or
call fails, the batch is split in halves until each failing case stands alone and gets its own
classification; a case found wrong in a batch is confirmed alone. Samples for which eager PyTorch itself raises,
and samples whose eager result changes with the random seed (dropout in training mode), are skipped.

    from graphopt.testing.opinfo import make_cases, run_cases, summarize
    results = run_cases(make_cases(["nn.functional.relu", "clamp"], samples=3))
    print(summarize(results))
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["COMMON_OPS", "VARIANTS", "Case", "Result", "op_infos", "make_cases", "inject", "compare",
           "run_cases", "remote_executor", "summarize", "lowerable_ops"]

# Ops a typical CNN / MLP / transformer uses (OpInfo names; "name.variant" picks a variant).
COMMON_OPS = (
    "nn.functional.relu", "clamp", "maximum", "minimum", "erf", "div.no_rounding_mode", "div.floor_rounding",
    "div.trunc_rounding", "add", "sub", "mul", "mm", "bmm", "addmm", "matmul", "nn.functional.linear",
    "nn.functional.conv2d", "nn.functional.avg_pool2d", "nn.functional.max_pool2d",
    "nn.functional.adaptive_avg_pool2d", "nn.functional.layer_norm", "nn.functional.batch_norm",
    "nn.functional.group_norm", "nn.functional.gelu", "nn.functional.silu", "nn.functional.hardtanh",
    "nn.functional.relu6", "nn.functional.leaky_relu", "nn.functional.hardswish", "sigmoid", "tanh", "exp",
    "log", "sqrt", "rsqrt", "abs", "neg", "softmax", "log_softmax", "sum", "mean", "amax", "max.binary",
    "min.binary", "max.reduction_no_dim", "where", "cat", "transpose", "permute", "pow",
)

VARIANTS = ("plain", "nonfinite", "edge")
_NAN, _INF = float("nan"), float("inf")
_SPECIALS = {
    "nonfinite": (_NAN, _INF, -_INF),
    "edge": (-0.0, 1e-40, -1e-40, 1.1754944e-38, 3.0e38, -3.0e38),
}
KINDS = ("match", "typed", "wrong", "crash")


@dataclass
class Case:
    """One op applied to one sample (possibly with special values injected)."""

    op: str                     # OpInfo name ("div.floor_rounding")
    sample: int                 # index among the op's float32 samples
    variant: str                # one of VARIANTS
    fn: Callable
    args: tuple
    kwargs: dict

    @property
    def id(self) -> str:
        return f"{self.op}[{self.sample}]-{self.variant}"

    def describe(self) -> str:
        def d(x):
            if isinstance(x, torch.Tensor):
                return f"tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
            return repr(x)
        args = ", ".join(d(a) for a in self.args)
        kw = ", ".join(f"{k}={d(v)}" for k, v in self.kwargs.items())
        return f"{self.op}({args}{', ' if args and kw else ''}{kw})"


@dataclass
class Result:
    case: Case
    kind: str                   # one of KINDS
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.case.id}: {self.kind}{' - ' + self.detail if self.detail else ''}"


# ------------------------------------------------------------------------------------------------ cases
def op_infos() -> dict:
    """{"name" or "name.variant": OpInfo} for every entry of OpInfo's op_db."""
    from torch.testing._internal.common_methods_invocations import op_db

    return {o.name + (f".{o.variant_test_name}" if o.variant_test_name else ""): o for o in op_db}


def inject(t: torch.Tensor, variant: str, offset: int = 0) -> torch.Tensor:
    """A copy of float tensor `t` with every 4th element (from `offset`) replaced by the variant's special
    values in turn; other tensors (and variant 'plain') are returned unchanged."""
    if variant == "plain" or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return t
    values = _SPECIALS[variant]
    out = t.detach().clone().contiguous()
    flat = out.view(-1)
    for j, i in enumerate(range(offset % min(4, flat.numel()), flat.numel(), 4)):
        flat[i] = values[j % len(values)]
    return out


def make_cases(ops: Iterable[str] = COMMON_OPS, samples: int = 3, variants: Iterable[str] = VARIANTS,
               infos: dict | None = None) -> list[Case]:
    """Cases for the first `samples` float32 samples of each op, in each variant. Unknown op names raise
    KeyError (a typo must not shrink the sweep silently)."""
    infos = op_infos() if infos is None else infos
    cases = []
    torch.manual_seed(0)
    for name in ops:
        info = infos[name]
        gen = None
        try:
            gen = info.sample_inputs("cpu", torch.float32)
            picked = []
            for s in gen:
                picked.append(s)
                if len(picked) >= samples:
                    break
        except Exception:           # OpInfo cannot make float32 samples for this op
            continue
        finally:
            _close_samples(gen)
        for k, s in enumerate(picked):
            if _random_sample(name, s):     # dropout: nothing to compare with
                continue
            args = (s.input, *s.args)
            for variant in variants:
                leaves, spec = pytree.tree_flatten((args, dict(s.kwargs)))
                tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
                if variant != "plain" and not any(leaves[i].is_floating_point() for i in tensors):
                    continue
                new = list(leaves)
                for n, i in enumerate(tensors):
                    new[i] = inject(leaves[i].detach(), variant, offset=n)
                a, kw = pytree.tree_unflatten(new, spec)
                cases.append(Case(name, k, variant, info.op, tuple(a), dict(kw)))
    return cases


def _close_samples(samples) -> None:
    """Close the generator under a half-read OpInfo sample iterator now. OpInfo wraps it in a TrackedInputIter
    that sits in a reference cycle, so it was closed whenever the garbage collector reached it, inside whatever
    ran then, and torch's no_grad generator wrapper reported its GeneratorExit there as an unraisable
    exception (pytest: PytestUnraisableExceptionWarning in an unrelated test)."""
    import gc
    import inspect

    if inspect.isgenerator(samples):            # a plain generator (no tracking wrapper)
        samples.close()
        return
    child = getattr(samples, "child_iter", None)     # TrackedInputIter: enumerate(generator)
    for inner in gc.get_referents(child) if child is not None else ():
        if inspect.isgenerator(inner):
            inner.close()


def _random_sample(name: str, sample) -> bool:
    """Whether an OpInfo sample applies dropout: a positive `dropout_p`, or an attention op in training mode
    with a dropout probability among its positional arguments (multi_head_attention_forward)."""
    if float(sample.kwargs.get("dropout_p", 0.0) or 0.0) > 0.0:
        return True
    return bool(sample.kwargs.get("training")) and "attention" in name and any(
        isinstance(a, float) and 0.0 < a < 1.0 for a in sample.args)


# ----------------------------------------------------------------------------------------- comparison
# Ops whose float32 result at the limits of float32 depends on evaluation order, which PyTorch itself does not
# fix: sums of products (FMA contraction, blocking, BLAS choice: a product that overflows unfused may not
# overflow inside an FMA), and GELU (PyTorch's scalar and vectorized kernels disagree: gelu(inf) is inf alone,
# NaN inside a 16-wide vector). For these, an element also matches when it agrees with the op evaluated in
# float64 and rounded to float32 (the exactly rounded answer), or when eager's float32 result is itself off that
# exact answer and both eager and graphopt overflowed there (+-Inf or NaN: which one depends on the order of
# the sum). Every other op must match eager float32.
FLOAT64_TIEBREAK = frozenset({
    "mm", "bmm", "addmm", "addmm.decomposed", "matmul", "nn.functional.linear", "nn.functional.conv2d",
    "nn.functional.conv1d", "nn.functional.bilinear", "baddbmm", "addbmm", "addmv", "mv", "dot", "inner",
    "einsum", "tensordot", "nn.functional.gelu",
    # variance over all elements: ATen takes the mean in float32 (its overflow depends on the summation
    # order) and the squared deviations in float64; graphopt takes both in float64
    "std", "std.unbiased", "var", "var.unbiased", "masked.std", "masked.var",
    # transposed convolutions and the softmax gradient (sum of grad * output) are sums of products too
    "_softmax_backward_data",
    "nn.functional.conv_transpose1d", "nn.functional.conv_transpose2d", "nn.functional.conv_transpose3d",
})


def compare(got: Any, ref: Any, rtol: float = 1e-4, atol: float = 1e-5, alt: Any = None) -> str | None:
    """None when `got` matches eager's `ref` (see the module docstring), else what differs. `alt` (optional,
    same structure as `ref`): a second acceptable answer per element (the float64 evaluation, for
    FLOAT64_TIEBREAK ops)."""
    g_leaves, g_spec = pytree.tree_flatten(got)
    r_leaves, r_spec = pytree.tree_flatten(ref)
    a_leaves = pytree.tree_leaves(alt) if alt is not None else [None] * len(r_leaves)
    if len(a_leaves) != len(r_leaves):
        a_leaves = [None] * len(r_leaves)
    if len(g_leaves) != len(r_leaves):
        return f"{len(g_leaves)} output leaves, eager has {len(r_leaves)}"
    for i, (g, r, a) in enumerate(zip(g_leaves, r_leaves, a_leaves)):
        where = f"output {i}: " if len(r_leaves) > 1 else ""
        if not isinstance(r, torch.Tensor):
            if isinstance(g, torch.Tensor) and g.numel() == 1:
                g = g.item()
            if g != r and not (isinstance(r, float) and math.isnan(r) and isinstance(g, float) and math.isnan(g)):
                return f"{where}{g!r} != {r!r}"
            continue
        if not isinstance(g, torch.Tensor):
            return f"{where}a {type(g).__name__}, eager a tensor"
        if g.shape != r.shape:
            return f"{where}shape {tuple(g.shape)}, eager {tuple(r.shape)}"
        if g.dtype != r.dtype:
            return f"{where}dtype {g.dtype}, eager {r.dtype}"
        if not r.is_floating_point():
            if not torch.equal(g, r):
                return f"{where}{_first_diff(g != r, g, r)}"
            continue
        g, r = g.detach().float(), r.detach().float()
        finite = torch.isfinite(r)
        ordinary = r[finite].abs()
        ordinary = ordinary[ordinary < 1e30]
        scale = max(1.0, float(ordinary.max())) if ordinary.numel() else 1.0
        ok = _agree(g, r, rtol, atol * scale)
        if isinstance(a, torch.Tensor) and a.shape == r.shape:
            a = a.detach().float()
            ok |= _agree(g, a, rtol, atol * scale)
            # an intermediate float32 overflow that eager and the compiled code both hit, where the exact
            # answer differs from eager's: which of +-Inf/NaN comes out depends on the summation order
            overflowed = ~torch.isfinite(r) & ~torch.isfinite(g) & ~_agree(r, a, rtol, atol * scale)
            ok |= overflowed
        if not bool(ok.all()):
            bad = ~ok
            for name, fn in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
                if bool((bad & (fn(g) != fn(r))).any()):
                    return f"{where}{name} pattern differs: {_first_diff(bad & (fn(g) != fn(r)), g, r)}"
            diff = (g - r).abs()[bad]
            return f"{where}values differ: {_first_diff(bad, g, r)}; max |diff| {float(diff.max()):.3g}"
    return None


def _agree(g: torch.Tensor, r: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per element: both NaN, the same infinity, or both finite and within atol + rtol * |r|."""
    both_finite = torch.isfinite(g) & torch.isfinite(r)
    close = torch.zeros_like(both_finite)
    close[both_finite] = (g[both_finite] - r[both_finite]).abs() <= atol + rtol * r[both_finite].abs()
    return close | (torch.isnan(g) & torch.isnan(r)) | (torch.isinf(g) & (g == r))


def _first_diff(mask: torch.Tensor, g: torch.Tensor, r: torch.Tensor) -> str:
    idx = tuple(int(i) for i in mask.nonzero()[0]) if mask.dim() else ()
    n = int(mask.sum())
    return f"{n} element(s), first at {idx}: got {g[idx].item()!r}, eager {r[idx].item()!r}"


# -------------------------------------------------------------------------------------------- running
class _CaseModule(nn.Module):
    """forward(*tensors) applies each case's op to its own slice of the tensors; returns a tuple."""

    def __init__(self, cases: list[Case]):
        super().__init__()
        self._plan = []
        for c in cases:
            leaves, spec = pytree.tree_flatten((c.args, c.kwargs))
            slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
            self._plan.append((c.fn, leaves, spec, slots))

    def inputs(self) -> tuple:
        return tuple(leaves[i] for _, leaves, _, slots in self._plan for i in slots)

    def forward(self, *tensors):
        outs, k = [], 0
        for fn, leaves, spec, slots in self._plan:
            new = list(leaves)
            for i in slots:
                new[i] = tensors[k]
                k += 1
            args, kwargs = pytree.tree_unflatten(new, spec)
            outs.append(fn(*args, **kwargs))
        return tuple(outs)


def _eager(case: Case):
    with torch.no_grad():
        return case.fn(*case.args, **case.kwargs)


# Attention: PyTorch's CPU flash kernel and its math kernel (the reference formula, softmax(q k^T s) v, which
# PyTorch runs where flash does not apply) disagree on non-finite inputs (a row with NaN/Inf: 0 from one, NaN
# from the other); both are PyTorch's answer, so an element also matches the math kernel's.
MATH_ATTENTION = frozenset({"nn.functional.scaled_dot_product_attention",
                            "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu"})


def _math_attention(case: Case, ref):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kw = {k: v for k, v in case.kwargs.items() if k in ("attn_mask", "dropout_p", "is_causal", "scale",
                                                       "enable_gqa")}
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            out = torch.nn.functional.scaled_dot_product_attention(*case.args[:3], **kw)
    except Exception:               # noqa: BLE001 - no math evaluation: eager is the only answer
        return None
    if isinstance(ref, tuple):      # the flash op: (output, logsumexp); the math kernel gives the output only
        return (out, *ref[1:])
    return out


def _float64(case: Case, ref=None):
    """The op evaluated with float64 inputs, rounded back to float32 (None when it cannot be); for attention,
    PyTorch's math kernel (MATH_ATTENTION)."""
    if case.op in MATH_ATTENTION:
        return _math_attention(case, ref)
    if case.op not in FLOAT64_TIEBREAK:
        return None
    up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t   # noqa: E731
    down = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t  # noqa: E731
    try:
        with torch.no_grad():
            out = case.fn(*pytree.tree_map(up, case.args), **pytree.tree_map(up, case.kwargs))
        return pytree.tree_map(down, out)
    except Exception:               # noqa: BLE001 - no float64 kernel: eager float32 is the only answer
        return None


def _run_here(opt, inputs):
    return opt(*inputs)


def _run_group(cases: list[Case], refs: list, target: str, execute: Callable = _run_here):
    """Compile `cases` as one module and compare; returns a list of Results, or the exception raised."""
    from ..api import optimize

    module = _CaseModule(cases).eval()
    inputs = module.inputs()
    try:
        opt = optimize(module, target=target, pipeline="", example_inputs=inputs)
        got = execute(opt, inputs)
    except Exception as e:          # noqa: BLE001 - classified by the caller
        return e
    return [Result(c, "match" if (d := compare(g, r, alt=_float64(c, r))) is None else "wrong", d or "")
            for c, g, r in zip(cases, got, refs)]


def _classify_error(case: Case, e: BaseException) -> Result:
    from ..errors import GraphoptError

    text = " ".join(str(e).split())[:300]
    kind = "typed" if isinstance(e, GraphoptError) else "crash"
    return Result(case, kind, f"{type(e).__name__}: {text}")


def run_cases(cases: list[Case], target: str = "x86", batch: int = 8,
              progress: Callable[[Result], None] | None = None, execute: Callable | None = None) -> list[Result]:
    """Run every case (eager first; samples eager rejects are dropped) and classify it. `batch` cases share
    one compiled module; a failing batch falls back to one module per case. `execute(opt, inputs)` runs a
    compiled module (default: here; remote_executor() runs an ARM build on an aarch64 RPC device)."""
    execute = execute or _run_here
    import warnings

    runnable, refs = [], []
    for c in cases:
        try:
            torch.manual_seed(1)
            ref = _eager(c)
            torch.manual_seed(2)
            if compare(_eager(c), ref) is not None:     # random (dropout in training mode): not comparable
                continue
            refs.append(ref)
            runnable.append(c)
        except Exception:           # eager PyTorch itself rejects the sample: nothing to compare with
            continue
    results: list[Result] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, len(runnable), max(1, batch)):
            for r in _run_split(runnable[start:start + batch], refs[start:start + batch], target, execute):
                results.append(r)
                if progress is not None:
                    progress(r)
    return results


def _run_split(group: list[Case], refs: list, target: str, execute: Callable = _run_here) -> list[Result]:
    """Results for `group` compiled as one module; when that fails, for each half in turn (so one failing
    case among n costs about 2 log2(n) builds, not n). Wrong answers in a batch are confirmed alone."""
    out = _run_group(group, refs, target, execute)
    if isinstance(out, list):
        return [r if r.kind != "wrong" or len(group) == 1 else _single(r.case, refs[i], target, execute)
                for i, r in enumerate(out)]
    if len(group) == 1:
        return [_classify_error(group[0], out)]
    mid = len(group) // 2
    return (_run_split(group[:mid], refs[:mid], target, execute)
            + _run_split(group[mid:], refs[mid:], target, execute))


def remote_executor(session) -> Callable:
    """execute(opt, inputs) for run_cases that runs each compiled module on an RPC `session` (an aarch64
    device, or qemu: graphopt.backends.tvm.rpc.DeviceServer) and returns its outputs as a tuple."""
    from ..backends.tvm import rpc

    def execute(opt, inputs):
        out = rpc.load_remote(opt, session)(*inputs)
        return out if isinstance(out, (tuple, list)) else (out,)

    return execute


def _single(case: Case, ref, target: str, execute: Callable = _run_here) -> Result:
    out = _run_group([case], [ref], target, execute)
    return out[0] if isinstance(out, list) else _classify_error(case, out)


def summarize(results: list[Result]) -> str:
    """Per-op counts (match / typed / wrong / crash) and the totals, as a table; then every non-match."""
    per_op: dict[str, Counter] = {}
    for r in results:
        per_op.setdefault(r.case.op, Counter())[r.kind] += 1
    width = max([len(op) for op in per_op] + [2])
    lines = [f"{'op':<{width}}  " + "  ".join(f"{k:>5}" for k in KINDS)]
    for op, c in per_op.items():
        lines.append(f"{op:<{width}}  " + "  ".join(f"{c[k]:>5}" for k in KINDS))
    total = Counter(r.kind for r in results)
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[k]:>5}" for k in KINDS) + f"   ({len(results)} cases)")
    for kind in ("wrong", "crash", "typed"):
        rows = [r for r in results if r.kind == kind]
        if rows:
            lines.append(f"\n{kind}:")
            lines += [f"  {r}" for r in rows]
    return "\n".join(lines)


# Ops whose values no second run can reproduce: random sampling, uninitialized memory.
_UNCOMPARABLE = ("rand", "dropout", "bernoulli", "normal", "uniform", "exponential", "multinomial", "cauchy",
                 "geometric", "empty")


def lowerable_ops(infos: dict | None = None, progress: Callable[[str], None] | None = None) -> list[str]:
    """OpInfo ops whose first float32 sample exports to ATen ops that all have a converter in graphopt's
    lowering (TVM's ExportedProgram importer table): the ops graphopt claims to lower. Random and
    uninitialized-memory ops (_UNCOMPARABLE) are left out: eager cannot be compared with them."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from ..backends.tvm.lower import _op_name

    infos = op_infos() if infos is None else infos
    table = ExportedProgramImporter().convert_map
    found = []
    for name in infos:
        if any(word in name for word in _UNCOMPARABLE):
            continue
        if progress is not None:
            progress(name)
        try:
            case = make_cases([name], samples=1, variants=("plain",), infos=infos)[0]
            _eager(case)
            module = _CaseModule([case]).eval()
            with torch.no_grad():
                ep = torch.export.export(module, module.inputs(), strict=False).run_decompositions()
        except Exception:           # noqa: BLE001 - no sample, or not exportable: not lowerable either
            continue
        ops = {_op_name(n) for n in ep.graph.nodes if n.op == "call_function"}
        if ops and all(op in table for op in ops):
            found.append(name)
    return found
