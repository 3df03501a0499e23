"""Lowering: optimized fx.GraphModule + example inputs -> Relax IRModule.

The path is `torch.export.export` -> core-ATen decomposition -> `tvm.relax.frontend.torch`'s
ExportedProgram importer, with every parameter and buffer bound into the module as a constant (not kept as a
function input), so TVM's FoldConstant can fold weight arithmetic (BN scale/shift, transposes) at build time.

Why not `from_fx`: it lowers an eval-mode BatchNorm with training semantics (wrong numbers); the export path
lowers `_native_batch_norm_legit_no_training` correctly, so an unfolded BN stays exact.

Contract:
  - The Relax `main` takes the example inputs' tensors, flattened, in order, with their exact static shapes
    and dtypes, and returns a flat tuple of the output tensors; `Lowered.out_spec` rebuilds the model's output
    structure (tensor, tuple, nested lists/dicts) from that flat tuple.
  - Before converting, every ATen op of the exported graph is checked against the importer's converter table;
    all unsupported ops are reported at once in one LoweringError naming the op, the exported node, the fx
    node of the optimized graph it came from, and its module path.
  - Any other failure of export or of the importer is a LoweringError too (never a bare TVM/torch exception).
The GraphModule passed in is not modified (node metadata used for provenance is restored afterwards).
"""
from __future__ import annotations

import contextlib

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils import _pytree as pytree

from ...errors import LoweringError

__all__ = ["TensorSpec", "Lowered", "lower_graph", "export_graph", "unsupported_ops", "index_bounds"]

_PROVENANCE_KEY = "graphopt_fx_node"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one input or output tensor (dtype as torch names it, without 'torch.').

    A dynamic dim is a string: the dim's name for an input ("batch"), an expression of dim names for an
    output ("2*seq"); its bounds live in the module's DynamicSpec."""

    shape: tuple[int | str, ...]
    dtype: str
    index_bound: int | None = None    # an integer input used as row indices: valid values are 0..bound-1
    index_of: str = ""                # what it indexes (op and module), for the error message
    name: str = ""                    # the forward() argument's name (inputs), for error messages

    @classmethod
    def of(cls, t: torch.Tensor, names: dict[str, str] | None = None, name: str = "") -> "TensorSpec":
        return cls(tuple(_dim(s, names) for s in t.shape), str(t.dtype).replace("torch.", ""), name=name)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(s, str) for s in self.shape)

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a concrete shape fits (static dims equal; dynamic dims are checked against their bounds
        elsewhere, by DynamicSpec.check)."""
        return len(shape) == len(self.shape) and all(isinstance(w, str) or int(w) == int(g)
                                                     for w, g in zip(self.shape, shape))

    def to_dict(self) -> dict:
        d = {"shape": [s if isinstance(s, str) else int(s) for s in self.shape], "dtype": self.dtype}
        if self.index_bound is not None:
            d.update(index_bound=int(self.index_bound), index_of=self.index_of)
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        bound = d.get("index_bound")
        return cls(tuple(s if isinstance(s, str) else int(s) for s in d["shape"]), str(d["dtype"]),
                   None if bound is None else int(bound), str(d.get("index_of", "")), str(d.get("name", "")))

    def __str__(self) -> str:
        shape = "(" + ", ".join(str(s) for s in self.shape) + ("," if len(self.shape) == 1 else "") + ")"
        return f"tensor{shape}:{self.dtype}"


def _dim(s: Any, names: dict[str, str] | None) -> int | str:
    """A static size as int; a torch SymInt as its expression with torch's symbols renamed to dim names."""
    if isinstance(s, torch.SymInt):
        import re

        text = str(s.node.expr)
        for sym, dim in (names or {}).items():
            text = re.sub(rf"\b{re.escape(sym)}\b", dim, text)
        return text
    return int(s)


@dataclass
class Lowered:
    """What lowering produces: the Relax module and the signature the compiled module must honour."""

    mod: Any                          # tvm.IRModule with a Relax function "main"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    out_spec: str                     # torch pytree TreeSpec of the outputs, serialized (treespec_dumps)
    const_outputs: list[int] = field(default_factory=list)   # outputs that depend on no input (see below)
    seconds: float = 0.0
    quant: str = ""                   # how graphopt's int8 ops were lowered (quant_lower.summary), if any
    sparse: str = ""                  # how sparse Linear layers were lowered (sparse_lower.summary), if any
    sparse_layers: list = field(default_factory=list)
    dynamic: Any = None               # graphopt.dynamic.DynamicSpec of the inputs' dynamic dims, or None



def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(TensorSpec.of(x))
    return type(x).__name__


def _first_line(text: str, limit: int = 400) -> str:
    text = text.strip()
    line = text.splitlines()[0] if text else text
    return line if len(line) <= limit else line[:limit] + "..."


# ------------------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _no_stack_traces():
    """While exporting / decomposing the optimized graph: no Python stack trace recorded on each ATen node
    (torch.fx.config.do_not_emit_stack_traces). The lowering reads node names and module paths, never those
    traces, and symbolizing them was ~0.2 s of a ResNet-18 build (6,700 source lines read). The dynamic-shape
    export keeps them: its errors may quote the user's line."""
    import torch.fx.config as fx_config

    old = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = old


def export_graph(gm: fx.GraphModule, example_inputs: tuple, dynamic: Any = None) -> torch.export.ExportedProgram:
    """torch.export the GraphModule and decompose it to core ATen (what the TVM importer consumes).

    `dynamic` (a DynamicSpec): those dims stay symbolic (exported on DynamicSpec.trace_examples); a graph
    that fixes one of them is a LoweringError naming the dim and the line/op.

    Every node of `gm` is tagged (temporarily) with its name in node.meta["custom"], which torch.export
    carries to the ATen nodes it produces, so errors can name the fx node an ATen op came from. get_attr nodes
    are not tagged: torch.export gives a lifted constant's placeholder the custom metadata of both its get_attr
    node and the op that read it (aten.lift_fresh_copy for a `torch.tensor(...)` inside forward, as in GPT-2's
    attention), and asserts the two agree.
    """
    saved: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        saved[node] = node.meta.get("custom", _MISSING)
        custom = dict(saved[node]) if isinstance(saved[node], dict) else {}
        custom[_PROVENANCE_KEY] = node.name
        node.meta["custom"] = custom
    try:
        with torch.no_grad():
            if dynamic:
                examples = dynamic.trace_examples(example_inputs)
                shapes = dynamic.dynamic_shapes(len(examples))
                try:
                    ep = torch.export.export(gm, tuple(examples), dynamic_shapes=shapes, strict=False)
                except Exception as e:
                    from ...dynamic import explain_export_failure

                    raise LoweringError("the optimized graph cannot keep its dynamic dims: " + explain_export_failure(
                        gm, examples, shapes, e, dynamic, "optimized graph")) from e
            else:
                with _no_stack_traces():
                    ep = torch.export.export(gm, tuple(example_inputs), strict=False)
            from .aten_semantics import run_decompositions

            with _no_stack_traces():
                return run_decompositions(ep)      # torch's table, the margin losses as ATen computes them
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(f"torch.export of the optimized graph failed, so it cannot be lowered to TVM: "
                            f"{type(e).__name__}: {_first_line(str(e))}") from e
    finally:
        for node, old in saved.items():
            if old is _MISSING:
                node.meta.pop("custom", None)
            else:
                node.meta["custom"] = old


_MISSING = object()


# ------------------------------------------------------------------------------------------ provenance
def _fx_origin(node: fx.Node, gm: fx.GraphModule | None) -> str:
    """'fx node NAME (op TARGET) in module PATH' for an exported ATen node, as far as it can be recovered."""
    parts = []
    src = None
    custom = node.meta.get("custom") or {}
    fx_name = custom.get(_PROVENANCE_KEY)
    if fx_name is None:                                   # fall back on torch's own provenance chain
        chain = node.meta.get("from_node") or []
        while chain:
            fx_name = chain[-1].name
            chain = chain[-1].from_node
    if fx_name is not None:
        desc = f"fx node '{fx_name}'"
        if gm is not None:
            src = next((n for n in gm.graph.nodes if n.name == fx_name), None)
            if src is not None:
                desc += f" ({src.op} {_target_name(src.target)})"
        parts.append(desc)
    path = _module_path(node.meta.get("nn_module_stack"))
    if not path and src is not None:            # symbolic_trace records the module a call came from
        path = _module_path(src.meta.get("nn_module_stack"))
    if path:
        parts.append(f"in module '{path}'")
    return " ".join(parts) if parts else "(origin unknown)"


def _module_path(stack: Any) -> str:
    """The innermost module path of an nn_module_stack ({key: (path, type)}), '' for the root."""
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, (tuple, list)) else str(entry)
    return path if isinstance(path, str) else ""


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if mod.startswith("torch._C._"):                     # torch._C._linalg.linalg_det -> torch.linalg.linalg_det
        return f"torch.{mod[len('torch._C._'):]}.{name}"
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _op_name(node: fx.Node) -> str:
    """The key the importer's convert_map uses for a call_function node (e.g. 'conv2d.default')."""
    return getattr(node.target, "__name__", str(node.target))


def _qualified_op(node_or_target: Any) -> str:
    """'aten.conv2d.default' for an ATen overload (or the node calling it); a dotted name otherwise."""
    target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target.__name__}"
    return _target_name(target)


def _graph_modules(ep: torch.export.ExportedProgram):
    """The exported graph and its nested subgraphs (cond/map branches)."""
    for m in ep.graph_module.modules():
        if isinstance(m, fx.GraphModule):
            yield m


def _depends_on_user_inputs(ep: torch.export.ExportedProgram) -> dict[fx.Node, bool]:
    """For every node: whether its value depends on a user input (False for weights/constants only).

    An output that depends on no input is a constant TVM folds into the executable and returns by reference
    on every call; the runtime copies such outputs so callers cannot corrupt the constant.
    """
    user_inputs = set(ep.graph_signature.user_inputs)
    dep: dict[fx.Node, bool] = {}
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            dep[n] = n.name in user_inputs
        else:
            dep[n] = any(dep.get(a, False) for a in n.all_input_nodes)
    return dep


_GATHERS = {"embedding.default": (0, 1), "index_select.default": (0, 2)}     # op: (table arg, index arg)


def index_bounds(ep: torch.export.ExportedProgram, gm: fx.GraphModule | None = None) -> dict[int, tuple[int, str]]:
    """User inputs that are used directly as row indices of a table: {input position: (rows, description)}.

    TVM lowers embedding / index_select to a `take` that does not check bounds (an out-of-range token id read
    arbitrary memory, or segfaulted the process), where torch raises IndexError; the compiled module checks
    these inputs at call time instead. Only direct uses are found (an index computed from an input is not).
    """
    user = list(ep.graph_signature.user_inputs)
    position = {name: i for i, name in enumerate(user)}
    bounds: dict[int, tuple[int, str]] = {}
    for node in ep.graph.nodes:
        arg_pos = _GATHERS.get(_op_name(node)) if node.op == "call_function" else None
        if arg_pos is None or len(node.args) <= max(arg_pos):
            continue
        if _op_name(node) == "index_select.default" and node.args[1] != 0:
            continue
        table, index = node.args[arg_pos[0]], node.args[arg_pos[1]]
        if not isinstance(index, fx.Node) or index.op != "placeholder" or index.name not in position:
            continue
        val = table.meta.get("val") if isinstance(table, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() < 1:
            continue
        rows = int(val.shape[0])
        i = position[index.name]
        if i not in bounds or rows < bounds[i][0]:
            bounds[i] = (rows, f"{_qualified_op(node)} {_fx_origin(node, gm)}")
    return bounds


def unsupported_ops(ep: torch.export.ExportedProgram, convert_map: dict,
                    gm: fx.GraphModule | None = None) -> list[dict]:
    """Every call_function node of `ep` whose op has no converter: [{op, node, origin}], in graph order."""
    missing = []
    for sub in _graph_modules(ep):
        for node in sub.graph.nodes:
            if node.op != "call_function" or _op_name(node) in convert_map:
                continue
            op = _qualified_op(node)
            if _op_name(node) == "with_effects" and len(node.args) > 1:    # an op with side effects, wrapped
                op = f"with_effects({_qualified_op(node.args[1])})"
            missing.append({"op": op, "node": node.name, "origin": _fx_origin(node, gm)})
    return missing


# ---------------------------------------------------------------------------------------------- lower
def _user_outputs(ep) -> list:
    """The exported program's user outputs (nodes or constants), in order: what the importer returns (it drops
    the outputs that carry buffer mutations)."""
    out_args = list(next(n for n in ep.graph.nodes if n.op == "output").args[0])
    kinds = [spec.kind for spec in ep.graph_signature.output_specs]
    user = torch.export.graph_signature.OutputKind.USER_OUTPUT, torch.export.graph_signature.OutputKind.LOSS_OUTPUT
    return [a for a, k in zip(out_args, kinds) if k in user] if len(kinds) == len(out_args) else out_args


def _output_path(ep, i: int) -> str:
    """Output leaf `i` as the model returns it: "1" in a tuple, "['n']" in a dict (the leaf's pytree path)."""
    import torch.utils._pytree as pytree

    try:
        spec = ep.call_spec.out_spec
        leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
        path = next(p for p, leaf in leaves if leaf == i)
        return f"{i} (at {pytree.keystr(path) or 'the top'})"
    except Exception:                            # noqa: BLE001 - a name for a message; the index will do
        return str(i)


def lower_graph(gm: fx.GraphModule, example_inputs: tuple, spec: Any = None, dynamic: Any = None,
                precision: str = "float32") -> Lowered:
    """Lower an optimized GraphModule to a Relax IRModule with weights bound as constants.

    `spec` (a TargetSpec, optional) picks the kernels for graphopt's int8 ops (see quant_lower).
    `dynamic` (a graphopt.dynamic.DynamicSpec, optional): those input dims become TIR variables with their
    bounds (tir_var_lower_bound / tir_var_upper_bound on main; memory is planned for the upper bounds), and
    the signature names them.

    Raises LoweringError: non-tensor inputs, export failure, unsupported ops (all listed), importer failure.
    """
    start = time.perf_counter()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise LoweringError(f"input {i} is a {_describe(x)}: the TVM backend takes tensor inputs only "
                                f"(one tensor per forward() argument)")
    from .aten_semantics import check_graph

    check_graph(gm)                # outputs that torch.export's decompositions compute wrongly
    ep = export_graph(gm, example_inputs, dynamic)

    if dynamic:
        from .symbolic import symbolic_importer

        importer = symbolic_importer()
    else:
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        importer = ExportedProgramImporter()
    from .quant_lower import custom_convert_map, summary as quant_summary   # graphopt's int8 ops

    custom, quant_state = custom_convert_map(ep, spec, precision)
    from .numerics import convert_map as numerics_convert_map     # PyTorch's semantics where TVM's differ

    from .sparse_lower import custom_convert_map as sparse_convert_map, summary as sparse_summary

    sparse_custom, sparse_state = sparse_convert_map(ep, spec)     # the sparsify pass's SparseLinear
    custom = {**numerics_convert_map(ep), **custom, **sparse_custom}
    missing = unsupported_ops(ep, {**importer.convert_map, **custom}, gm)
    if missing:
        lines = [f"  - {m['op']} (exported node '{m['node']}') from {m['origin']}" for m in missing]
        ops = sorted({m["op"] for m in missing})
        err = LoweringError(f"TVM cannot lower {len(missing)} node(s) of the graph; unsupported op(s) "
                            f"{', '.join(ops)}:\n" + "\n".join(lines))
        err.unsupported = missing            # type: ignore[attr-defined]
        raise err

    user_nodes = _user_outputs(ep)
    for i, n in enumerate(user_nodes):             # before the importer, whose own message names no output
        val = n.meta.get("val") if isinstance(n, fx.Node) else n
        if not isinstance(val, torch.Tensor):
            raise LoweringError(f"output {_output_path(ep, i)} is {val!r} ({type(val).__name__}), not a tensor: the "
                                f"TVM backend returns tensors only")
    try:
        mod = importer.from_exported_program(ep, False, False, False, custom or None)
    except Exception as e:
        # The importer fills `env` in graph order: the first call_function node missing from it failed.
        failed = next((n for n in ep.graph.nodes if n.op == "call_function" and n not in importer.env), None)
        where = (f" at {_qualified_op(failed)} (exported node '{failed.name}') from {_fx_origin(failed, gm)}"
                 if failed is not None else "")
        if isinstance(e, LoweringError):          # a graphopt converter refusing an argument: say where
            raise LoweringError(f"{e} ({where.strip()})") from e
        hint = ""
        half = sorted({str(t.dtype).replace("torch.", "") for t in [*gm.parameters(), *gm.buffers(), *example_inputs]
                       if t.dtype in (torch.float16, torch.bfloat16)})
        if half:       # TVM's addmm / convolution converters compute in float32 and then add a float16 bias
            hint = (f" (the model holds {'/'.join(half)} tensors: TVM's importer takes float32 models; optimize "
                    f"model.float() with precision='float16' for float16 operands with float32 accumulation)")
        raise LoweringError(f"the TVM importer failed{where}: {type(e).__name__}: {_first_line(str(e))}{hint}") from e

    names = {}
    if dynamic:
        from .symbolic import shape_names

        names = shape_names(ep, dynamic)
    arg_names = list(dynamic.input_names) if dynamic else []
    inputs = []
    for i, x in enumerate(example_inputs):
        shape = tuple((dynamic.dim_of(i, a) if dynamic else None) or int(s) for a, s in enumerate(x.shape))
        inputs.append(TensorSpec(shape, str(x.dtype).replace("torch.", ""),
                                 name=arg_names[i] if i < len(arg_names) else ""))
    for i, (rows, what) in index_bounds(ep, gm).items():
        if i < len(inputs) and not inputs[i].torch_dtype.is_floating_point:
            inputs[i] = TensorSpec(inputs[i].shape, inputs[i].dtype, rows, what, inputs[i].name)
    out_spec = ep.call_spec.out_spec
    depends = _depends_on_user_inputs(ep)
    outputs, const_outputs = [], []
    for i, n in enumerate(user_nodes):
        val = n.meta.get("val") if isinstance(n, fx.Node) else n
        if any(free_unbacked_symbols(d) for d in val.shape if not isinstance(d, int)):  # masked_select, nonzero
            op = _qualified_op(n) if isinstance(n, fx.Node) and n.op == "call_function" else "?"
            raise LoweringError(f"output {i} ({getattr(n, 'name', n)!r}, from {op}) has a data-dependent shape "
                                f"{tuple(val.shape)}: the TVM backend compiles shapes known before the call only")
        static = not any(isinstance(d, torch.SymInt) for d in val.shape)
        if static and val.numel() == 0 and not depends.get(n, False):
            raise LoweringError(f"output {i} ({getattr(n, 'name', n)!r}) is an empty constant of shape "
                                f"{tuple(val.shape)}: TVM's executable format cannot store a zero-size constant")
        outputs.append(TensorSpec.of(val, names))
        if not depends.get(n, False):
            const_outputs.append(i)
    if out_spec is None or out_spec.num_leaves != len(outputs):
        raise LoweringError(f"the exported program returns {len(outputs)} tensor(s) but its output structure "
                            f"has {getattr(out_spec, 'num_leaves', '?')} leaves (non-tensor outputs?)")
    n_params = len(mod["main"].params)
    if n_params != len(inputs):
        raise LoweringError(f"the lowered main takes {n_params} input(s), the model {len(inputs)}")
    sparse_line, sparse_rows = sparse_summary(sparse_state, getattr(quant_state, "sparse_rows", None))
    try:
        out_spec_text = pytree.treespec_dumps(out_spec)
    except Exception as e:      # e.g. torch.return_types.max (a structseq) has no serialized pytree name
        shown = " ".join(str(out_spec).split())
        raise LoweringError(f"the model's output structure ({shown}) cannot be saved with the compiled module: "
                            f"{type(e).__name__}: {_first_line(str(e))}; return tensors in a tuple, list or "
                            f"dict instead") from e
    return Lowered(mod, inputs, outputs, out_spec_text, const_outputs, time.perf_counter() - start,
                   quant_summary(quant_state), sparse=sparse_line, sparse_layers=sparse_rows, dynamic=dynamic)
