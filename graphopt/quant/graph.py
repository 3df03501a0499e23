"""The two inspectable steps of static quantization on an fx.GraphModule, plus QAT.

1. ``prepare(gm, ...)`` returns a new graph with an observer module after every tensor that feeds a
   quantizable layer (one observer per tensor, shared by all the layers reading it). Run calibration data
   through it (``calibrate``) and each observer knows its tensor's range.
2. ``Converter(prepared).build(layers)`` returns the quantized graph: each observer becomes an explicit
   ``torch.ops.graphopt.quantize`` node and each chosen layer becomes a QuantLinear / QuantConv2d that
   takes the integer tensor. Layers not chosen keep their float module and read the float tensor (an
   observer none of whose readers is quantized disappears). Building is cheap and leaves `prepared`
   untouched, so the pass can try several layer sets (skip lists, error tolerance).

QAT: ``prepare_qat`` inserts FakeQuantize modules instead of observers and swaps Linear/Conv2d for
QATLinear/QATConv2d (weight fake-quant); after fine-tuning in PyTorch, ``convert`` gives the same integer
graph as post-training quantization, with the learned ranges.

Module graphs from torch.fx.symbolic_trace and aten graphs from torch.export are both handled: functional
``linear``/``conv2d`` calls whose weights are graph constants are first turned into modules.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import operator
from dataclasses import dataclass, field
from typing import ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.mutation import eliminate_dead_code
from . import ops  # noqa: F401  (registers torch.ops.graphopt.*)
from .modules import (DynamicQuantLinear, FakeQuantize, FloatMatmul, PointwiseConvAsLinear, QATConv2d, QATLinear,
                      QuantConv2d, QuantLinear, QuantMatmul, WeightOnlyLinear, conv_padding, is_pointwise_conv,
                      linear_of_pointwise)
from .observers import Observer, make_observer
from .qparams import WEIGHT_QMAX, f32

__all__ = ["Site", "find_sites", "prepare", "calibrate", "Converter", "prepare_qat", "convert",
           "swap_linear", "UNSUPPORTED_LAYERS"]

# layers we recognise but have no integer kernel for: left float with a note
UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN,
                      nn.Bilinear)

_LINEAR_FUNCS = {F.linear, torch.ops.aten.linear.default}
_CONV_FUNCS = {F.conv2d, torch.ops.aten.conv2d.default}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default,
                 torch.ops.aten.bmm.default}


@dataclass
class Site:
    """A quantizable layer call: `node` (call_module) running module `path` of `kind`."""

    node: fx.Node
    path: str
    kind: str                      # "linear" | "conv2d" | "matmul"

    @property
    def inputs(self) -> list[fx.Node]:
        return list(self.node.args)


@dataclass
class Survey:
    sites: list[Site] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)        # (path, why)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _free_name(root: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(root, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _const(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    """The tensor a get_attr node names, else None (also for a dangling attribute path)."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj = gm
        try:
            for part in str(arg.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def modularize(gm: fx.GraphModule) -> int:
    """Turn functional linear/conv2d calls with constant (get_attr) weights into Linear/Conv2d modules, and
    matmuls against a constant weight (addmm as in transformers' Conv1D, x @ W [+ b], linear of a transposed
    constant) into Linear modules with the weight transposed once (graphopt.quant.const_matmul).

    Mutates `gm`; returns how many calls were converted. Exact (same op, same tensors) for the functional
    calls; the same product for the matmuls (float32 summation order may differ in the last bit).
    """
    from .const_matmul import linearize

    count, converted = linearize(gm), 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_FUNCS | _CONV_FUNCS:
            continue
        w = _const(gm, _arg(node, 1, "weight"))
        b_arg = _arg(node, 2, "bias")
        b = _const(gm, b_arg) if b_arg is not None else None
        if w is None or (b_arg is not None and b is None) or not w.is_floating_point():
            continue
        x = node.args[0]
        if node.target in _LINEAR_FUNCS:
            if w.dim() != 2:
                continue
            mod = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        else:
            if w.dim() != 4:
                continue
            stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
            dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
            mod = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride,
                            padding=padding, dilation=dilation, groups=groups, bias=b is not None)
        name = _add_layer(gm, mod, w, b, _arg(node, 1, "weight"), node.name)
        _call_module_in_place_of(gm, name, x, [node])
        converted += 1
    _tidy(gm, converted)                # (linearize tidied after its own rewrites)
    return count + converted


def _add_layer(gm: fx.GraphModule, mod: nn.Module, w: torch.Tensor, b: torch.Tensor | None, weight_attr: fx.Node,
               fallback: str) -> str:
    """Give `mod` copies of `w` (and `b`) as frozen parameters and add it to `gm` under a free name: the
    module path of the get_attr `weight_attr` reads (else `fallback`). Returns the name."""
    with torch.no_grad():
        mod.weight = nn.Parameter(w.detach().contiguous().clone(), requires_grad=False)
        if b is not None:
            mod.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    target = str(weight_attr.target)
    name = _free_name(gm, target.rsplit(".", 1)[0] if "." in target else fallback)
    gm.add_submodule(name, mod)
    return name


def _call_module_in_place_of(gm: fx.GraphModule, name: str, x, nodes: list) -> fx.Node:
    """Call submodule `name` on `x` where the last of `nodes` was, hand it that node's users and metadata,
    and erase `nodes` (a chain ending in that node)."""
    last = nodes[-1]
    with gm.graph.inserting_before(last):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(last.meta)
    last.replace_all_uses_with(new)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return new


def _tidy(gm: fx.GraphModule, changed: int) -> None:
    """After `changed` rewrites: drop dead nodes and the submodules nothing calls, regenerate the code."""
    if changed:
        eliminate_dead_code(gm)
        gm.delete_all_unused_submodules()
        gm.recompile()


def _float_activation(node) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return (isinstance(node, fx.Node) and node.op != "get_attr" and meta is not None
            and getattr(meta, "dtype", None) == torch.float32 and len(getattr(meta, "shape", ())) >= 2)


def _enclosing_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, (tuple, list)) else str(entry)
    return path if isinstance(path, str) else ""


def modularize_matmul(gm: fx.GraphModule) -> int:
    """Turn matmuls of two float activations (torch.matmul, @, bmm, Tensor.matmul) into FloatMatmul modules
    named '<enclosing module>.matmul<i>'. Mutates `gm`; exact. Needs propagated shapes (tensor_meta)."""
    count: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        is_mm = (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
            node.op == "call_method" and node.target in ("matmul", "bmm"))
        if not is_mm or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (_float_activation(a) and _float_activation(b)):
            continue
        scope = _enclosing_path(node)
        i = count.get(scope, 0)
        count[scope] = i + 1
        path = f"{scope}.matmul{i}" if scope else f"matmul{i}"
        while _has_path(gm, path):
            i += 1
            path = f"{scope}.matmul{i}" if scope else f"matmul{i}"
        gm.add_submodule(path, FloatMatmul())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (a, b))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if count:
        gm.recompile()
    return sum(count.values())


def _has_path(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _matches(patterns: Sequence[str], path: str, node_name: str) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(node_name, p):
            return p
    return None


def find_sites(gm: fx.GraphModule, *, kinds: Iterable[str] = ("linear", "conv2d"),
               skip: Sequence[str] = ()) -> Survey:
    """The quantizable layer calls of `gm` and, for the report, the recognised layers left float and why."""
    kinds = set(kinds)
    survey = Survey()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        path = str(node.target)
        mod = gm.get_submodule(path)
        kind = "linear" if isinstance(mod, nn.Linear) else "conv2d" if isinstance(mod, nn.Conv2d) else (
            "matmul" if isinstance(mod, FloatMatmul) else None)
        if kind is None:
            if isinstance(mod, UNSUPPORTED_LAYERS):
                survey.skipped.append((path, f"{type(mod).__name__} has no int8 kernel"))
            continue
        pat = _matches(skip, path, node.name)
        if pat is not None:
            survey.skipped.append((path, f"skip pattern {pat!r}"))
            continue
        if kind not in kinds:
            survey.skipped.append((path, f"{kind} not in ops"))
            continue
        if kind == "matmul":
            survey.sites.append(Site(node, path, kind))       # modularize_matmul checked its operands
            continue
        if not mod.weight.is_floating_point():
            survey.skipped.append((path, f"weight dtype {mod.weight.dtype}"))
            continue
        if kind == "conv2d" and conv_padding(mod) is None:
            survey.skipped.append((path, f"padding {mod.padding!r} / {mod.padding_mode} not expressible"))
            continue
        if not node.args or not isinstance(node.args[0], fx.Node) or len(node.args) != 1 or node.kwargs:
            survey.skipped.append((path, "called with extra arguments"))
            continue
        meta = node.args[0].meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if dtype is not None and dtype != torch.float32:
            survey.skipped.append((path, f"input dtype {dtype}"))
            continue
        survey.sites.append(Site(node, path, kind))
    return survey


def _copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)     # keeps torch.export's pytree in/out structure
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    return graph, env


def _module_table(gm: fx.GraphModule, graph: fx.Graph) -> dict[str, object]:
    """name -> object for every call_module / get_attr target of `graph`, looked up in `gm`."""
    table: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and str(node.target) not in table:
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            table[str(node.target)] = obj
    return table


def _set_training(gm: fx.GraphModule, training: bool) -> None:
    """Set the training flag of `gm` and of the containers GraphModule created, not of shared modules."""
    gm.training = training
    shared = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            shared.add(str(node.target))
    for name, m in gm.named_modules():
        if name and name not in shared and type(m) is nn.Module:
            m.training = training


def _new_module(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running `graph` over `gm`'s own (shared, not copied) modules and attributes."""
    work = fx.GraphModule(_module_table(gm, graph), graph, gm.__class__.__name__)
    _set_training(work, gm.training)
    return work


def _unshare(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Give each call of a module that is called several times its own module path (qparams differ)."""
    seen: set[str] = set()
    for s in sites:
        if s.path in seen:
            new = _free_name(gm, s.path + "_call")
            gm.add_submodule(new, gm.get_submodule(s.path))
            s.node.target = new
            s.path = new
        seen.add(s.path)


def prepare(gm: fx.GraphModule, *, dtype: str = "uint8", observer: str = "minmax",
            percentile: float = 99.99, averaging: float = 0.1, kinds=("linear", "conv2d"),
            skip: Sequence[str] = (), qat: bool = False) -> tuple[fx.GraphModule, Survey]:
    """A new GraphModule (sharing `gm`'s modules; `gm` is not changed) with observers inserted.

    With qat=True the observers are FakeQuantize modules and layers become QATLinear/QATConv2d
    (fresh copies: fine-tuning does not touch `gm`).
    """
    graph, _ = _copy_graph(gm)
    work = _new_module(gm, graph)
    modularize(work)
    if "matmul" in kinds:
        modularize_matmul(work)
    survey = find_sites(work, kinds=kinds, skip=skip)
    _unshare(work, survey.sites)
    observers: dict[tuple[fx.Node, str], fx.Node] = {}
    for site in survey.sites:
        # a matmul's right operand is symmetric int8 (the int8 operand of uint8 x int8 dot products)
        dtypes = [dtype, "int8"] if site.kind == "matmul" else [dtype]
        new_args = []
        for x, dt in zip(site.node.args, dtypes):
            if (x, dt) not in observers:
                suffix = "observer" if dt == dtype else f"{dt}_observer"
                name = _free_name(work, f"{x.name}_{suffix}")
                obs = make_observer(observer, dt, percentile=percentile, averaging=averaging)
                work.add_submodule(name, FakeQuantize(obs) if qat else obs)
                # right before the first layer that reads x (sites come in graph order), not right after x: an
                # in-place op capture kept between them (analysis.mutation) has changed x by then
                with work.graph.inserting_before(site.node):
                    observers[(x, dt)] = work.graph.call_module(name, (x,))
            new_args.append(observers[(x, dt)])
        site.node.args = tuple(new_args)
        if qat and site.kind != "matmul":
            mod = work.get_submodule(site.path)
            qat_mod = QATLinear.from_float(mod) if site.kind == "linear" else QATConv2d.from_float(mod)
            qat_mod.weight.requires_grad_(True)
            if qat_mod.bias is not None:
                qat_mod.bias.requires_grad_(True)
            _set_module(work, site.path, qat_mod)
    work.graph.lint()
    work.recompile()
    return work, survey


def _observers(gm: nn.Module) -> list[Observer]:
    return [m for m in gm.modules() if isinstance(m, Observer)]


def calibrate(gm: fx.GraphModule, batches: Sequence[tuple], *, progress: bool = False,
              desc: str = "quantize: calibrating", first_pass: ContextManager | None = None) -> int:
    """Run `batches` through a prepared graph so its observers see the data. Returns the number of passes.

    Histogram observers (percentile, mse, entropy) need a second pass over the same batches. `first_pass`,
    a context manager, is entered around the first pass only (graphopt.quant.gptq.collecting: the layers'
    input statistics from the same forward passes).
    """
    from tqdm.auto import tqdm

    observers = _observers(gm)
    two = any(o.needs_second_pass for o in observers)
    modes = {m: m.training for m in gm.modules()}          # restored per module: submodules are shared
    gm.eval()
    for m in modes:                     # QAT ranges are only updated in training mode
        if isinstance(m, FakeQuantize):
            m.train()
    try:
        passes = (0, 1) if two else (0,)
        with torch.no_grad():
            for phase in passes:
                for o in observers:
                    o.phase = phase
                label = desc if not two else f"{desc} ({'range' if phase == 0 else 'histogram'} pass)"
                with first_pass if first_pass is not None and phase == 0 else contextlib.nullcontext():
                    for batch in tqdm(batches, desc=label, disable=not progress, leave=False, unit="batch"):
                        gm(*batch)
    finally:
        for o in observers:
            o.phase = 0
        for m, t in modes.items():
            m.training = t
    return len(passes)


def _is_observer_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                   (Observer, FakeQuantize))


class Converter:
    """Builds quantized graphs from a calibrated prepared graph, for any subset of its layers.

    Quantized modules are made once per layer and cached, so trying many subsets is cheap.
    `weight_qmax` bounds the int8 weights of Linear and Conv2d (groups=1) layers (64 for the x86 AVX2 /
    AVX-512BW kernels, see graphopt.quant.qparams); grouped and depthwise convs keep 127.
    """

    def __init__(self, prepared: fx.GraphModule, weight_qmax: int = WEIGHT_QMAX):
        self.prepared = prepared
        self.weight_qmax = weight_qmax
        # layer path -> (int8 weight, per-channel scale) chosen elsewhere (graphopt.quant.gptq); others round
        # to nearest. Set before the first build.
        self.rounded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache: dict[str, nn.Module] = {}
        self.layer_paths: list[str] = []
        for node in prepared.graph.nodes:
            if _is_observer_node(prepared, node):
                for u in node.users:
                    if str(u.target) not in self.layer_paths:
                        self.layer_paths.append(str(u.target))
        # each layer's first call site (a layer called twice has one integer module: the first site's qparams)
        self._calls: dict[str, fx.Node] = {}
        for node in prepared.graph.nodes:
            if node.op == "call_module" and str(node.target) in self.layer_paths:
                self._calls.setdefault(str(node.target), node)

    def qparams(self, observer_path: str):
        obs = self.prepared.get_submodule(observer_path)
        if isinstance(obs, Observer) and not obs.calibrated():
            raise RuntimeError(f"observer '{observer_path}' saw no data: run calibrate() first")
        return obs.qparams()

    def quant_module(self, path: str, qps: list) -> nn.Module:
        """The integer module for layer `path` given its inputs' qparams (cached per path)."""
        if path not in self._cache:
            mod = self.prepared.get_submodule(path)
            from ..passes._sparse import SparseConv2d, SparseLinear
            from .sparse import SparseQuantConv2d, SparseQuantLinear

            if isinstance(mod, SparseLinear):                 # sparsify's layers: keep their block pattern
                self._cache[path] = SparseQuantLinear(mod, qps[0], weight_qmax=self.weight_qmax)
            elif isinstance(mod, SparseConv2d) and mod.groups == 1 and not isinstance(mod.padding, str):
                self._cache[path] = SparseQuantConv2d(mod, qps[0], weight_qmax=self.weight_qmax)
            elif isinstance(mod, nn.Linear):
                w, scale = self._weight(path, mod)
                self._cache[path] = QuantLinear(w, mod.bias, qps[0], w_scale=scale, weight_qmax=self.weight_qmax)
            elif isinstance(mod, nn.Conv2d):
                qmax = self.weight_qmax if mod.groups == 1 else WEIGHT_QMAX
                w, scale = self._weight(path, mod)
                self._cache[path] = QuantConv2d(mod, qps[0], w_scale=scale, weight=w, weight_qmax=qmax)
            elif isinstance(mod, FloatMatmul):
                self._cache[path] = QuantMatmul(qps[0], qps[1])
            else:  # pragma: no cover - prepare only observes the inputs of these layers
                raise TypeError(f"cannot quantize {type(mod).__name__} at '{path}'")
        return self._cache[path]

    def input_qparams(self, path: str) -> list:
        """The calibrated qparams of layer `path`'s inputs (one per argument)."""
        if path not in self._calls:
            raise KeyError(f"not prepared for quantization: {path}")
        return [self.qparams(str(a.target)) for a in self._calls[path].args]

    def module_for(self, path: str) -> nn.Module:
        """The integer module of layer `path` with its calibrated input qparams (quant_module's, cached)."""
        return self.quant_module(path, self.input_qparams(path))

    def _weight(self, path: str, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float weight, scale or None) to quantize layer `path` from: its own weight (scales chosen by the
        module), or the integers of `rounded` times their scales (which round back to exactly those integers)."""
        if path not in self.rounded:
            return mod.weight, None
        q, scale = self.rounded[path]
        return q.float() * scale.reshape(-1, *([1] * (q.dim() - 1))), scale

    def build(self, layers: Iterable[str] | None = None) -> fx.GraphModule:
        """The quantized graph with `layers` (module paths; default all) integer, the rest float."""
        chosen = set(self.layer_paths if layers is None else layers)
        unknown = chosen - set(self.layer_paths)
        if unknown:
            raise KeyError(f"not prepared for quantization: {', '.join(sorted(unknown))}")
        graph, env = _copy_graph(self.prepared)
        table = _module_table(self.prepared, graph)

        def is_obs(n) -> bool:
            return isinstance(n, fx.Node) and n.op == "call_module" and isinstance(
                table[str(n.target)], (Observer, FakeQuantize))

        # 1. integer modules for the chosen layers (all of a layer's inputs are observed)
        for node in graph.nodes:
            if node.op == "call_module" and str(node.target) in chosen:
                qps = [self.qparams(str(a.target)) for a in node.args if is_obs(a)]
                if len(qps) != len(node.args):
                    raise RuntimeError(f"layer '{node.target}' has an input without an observer")
                table[str(node.target)] = self.quant_module(str(node.target), qps)
        # 2. each observer becomes a quantize node for its chosen readers; other readers get the float input
        for node in list(graph.nodes):
            if not is_obs(node):
                continue
            x = node.args[0]
            quant_users = [u for u in node.users if str(u.target) in chosen]
            for u in list(node.users):
                if u not in quant_users:
                    u.replace_input_with(node, x)
            if quant_users:
                qp = self.qparams(str(node.target))
                with graph.inserting_before(node):
                    q = graph.create_node("call_function", torch.ops.graphopt.quantize.default,
                                          (x, qp.scale, qp.zero_point, qp.qmin, qp.qmax),
                                          name=f"{x.name}_{qp.dtype}")
                for u in quant_users:
                    u.replace_input_with(node, q)
            graph.erase_node(node)
            del table[str(node.target)]
        _fold_output_scalars(graph, table)
        gm = fx.GraphModule(table, graph, self.prepared.__class__.__name__)
        _set_training(gm, self.prepared.training)
        gm.graph.lint()
        gm.recompile()
        return gm


def _fold_output_scalars(graph: fx.Graph, table: dict) -> int:
    """A quantized matmul whose only reader multiplies (or divides) it by a Python number, as attention scales
    its scores by 1 / sqrt(head_dim), takes that number into its output scale: `acc * (s * c)` in place of
    `(acc * s) * c`, one rounding instead of two, exactly the same values when c is a power of two (1/8 for
    64-wide heads). The compiled kernels apply the output scale in their epilogue, so the scaling costs no pass
    over the (batch, heads, n, n) scores (with dynamic dims it was a kernel of its own: 0.4 of 9.7 ms per
    forward pass of the small encoder at 1 x 512). Returns the number folded."""
    folded = 0
    for node in list(graph.nodes):
        mod = table.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, QuantMatmul) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_function" or user.kwargs or len(user.args) != 2:
            continue
        a, b = user.args
        if user.target in (operator.mul, torch.mul) and a is node and isinstance(b, (int, float)):
            c = float(b)
        elif user.target in (operator.mul, torch.mul) and b is node and isinstance(a, (int, float)):
            c = float(a)
        elif user.target in (operator.truediv, torch.div) and a is node and isinstance(b, (int, float)) and b != 0:
            c = 1.0 / float(b)
        else:
            continue
        scale = f32(mod.out_scale * c)
        if not (scale == scale and abs(scale) not in (0.0, float("inf"))):
            continue
        new = copy.copy(mod)
        new.out_scale = scale
        table[str(node.target)] = new
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        folded += 1
    return folded


def convert(prepared: fx.GraphModule, layers: Iterable[str] | None = None) -> fx.GraphModule:
    """The quantized graph of a calibrated (or QAT-trained) prepared graph; see Converter.build."""
    return Converter(prepared).build(layers)


def prepare_qat(gm: fx.GraphModule, *, dtype: str = "uint8", kinds=("linear", "conv2d"),
                skip: Sequence[str] = (), calibration: Sequence[tuple] | None = None,
                averaging: float = 0.1) -> fx.GraphModule:
    """A fake-quantized copy of `gm` to fine-tune in PyTorch (train mode updates the activation ranges).

    `calibration` (optional, a list of input tuples) initialises the ranges before training.
    Works on a deep copy: training the result never touches `gm`.
    Convert the result with ``convert(qat_gm)`` or run it through the "quantize" pass.
    """
    work, _ = prepare(copy.deepcopy(gm), dtype=dtype, observer="moving_average", averaging=averaging, kinds=kinds,
                      skip=skip, qat=True)
    if calibration:
        calibrate(work, calibration)
    return work


def swap_linear(gm: fx.GraphModule, mode: str, *, skip: Sequence[str] = (),
                weight_qmax: int = WEIGHT_QMAX, make=None,
                pointwise_convs: bool = False) -> tuple[fx.GraphModule, Survey]:
    """A new GraphModule with every Linear replaced by DynamicQuantLinear ("dynamic", weights in
    [-weight_qmax, weight_qmax]) or WeightOnlyLinear ("weight_only", [-127, 127]: float32 compute), or by
    `make(linear)` when given (e.g. graphopt.quant.weight_only.PackedWeightOnlyLinear). With
    `pointwise_convs`, 1x1 Conv2d layers (groups 1, no padding) get the same module over channels
    (PointwiseConvAsLinear); other convs and everything else stay float. `gm` is not changed."""
    cls = {"dynamic": DynamicQuantLinear, "weight_only": WeightOnlyLinear}[mode]
    graph, _ = _copy_graph(gm)
    work = _new_module(gm, graph)
    modularize(work)
    survey = find_sites(work, kinds=("linear", "conv2d"), skip=skip)
    _unshare(work, survey.sites)
    swapped = []
    for site in survey.sites:
        mod = work.get_submodule(site.path)
        if site.kind != "linear" and not (pointwise_convs and is_pointwise_conv(mod)):
            what = "pointwise (1x1, groups 1, unpadded) convs only; " if pointwise_convs else ""
            survey.skipped.append((site.path, f"conv2d has no {mode} mode ({what}use static)"))
            continue
        lin = mod if site.kind == "linear" else linear_of_pointwise(mod)
        extra = {"weight_qmax": weight_qmax} if mode == "dynamic" else {}
        new = make(lin) if make is not None else cls(lin.weight, lin.bias, **extra)
        _set_module(work, site.path, new if site.kind == "linear" else PointwiseConvAsLinear(new, mod.stride))
        swapped.append(site)
    survey.sites = swapped
    work.recompile()
    return work, survey

