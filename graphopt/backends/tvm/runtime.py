"""CompiledModule: a TVM Relax VM executable, callable like the original model with torch tensors.

Contract:
  - Inputs are checked against the compiled signature (count, dtype, shape, device) BEFORE TVM is called;
    a mismatch raises InputError naming the argument index, what was expected and what was given.
  - Tensors cross to and from TVM through DLPack, without copies, except where TVM requires one: an input
    that is not contiguous or not 64-byte aligned is copied to a fresh contiguous tensor first.
  - Outputs are fresh tensors owned by the caller (TVM allocates them per call), returned in the model's
    output structure (tensor, tuple, nested lists/dicts). Outputs that depend on no input are constants
    inside the executable, which TVM returns by reference: those (`const_outputs`) are copied per call so a
    caller cannot corrupt them. An output that is an input itself aliases that input, as in eager PyTorch.
  - Device: CPU targets take and return CPU tensors; CUDA targets take and return tensors on cuda:0.
"""
from __future__ import annotations

import platform
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from ...errors import GraphoptError, InputError
from ..targets import TargetSpec
from .lower import TensorSpec

__all__ = ["CompiledModule"]

_ALIGNMENT = 64                # TVM's FromDLPack refuses data not aligned to this many bytes


class CompiledModule:
    """A compiled model on its target. Call it like the model: `y = compiled(x1, x2)`.

    executable:    a relax VMExecutable (fresh build) or a loaded runtime Module (from an artifact)
    spec:          the TargetSpec it was built for
    inputs/outputs: TensorSpec per flat input / output tensor
    out_spec:      serialized torch pytree spec of the output structure
    const_outputs: indices of flat outputs that depend on no input (copied on every call)
    library_bytes: the shared library it was loaded from, if any (saving again copies it, no re-export)
    dynamic:       DynamicSpec of the dims that may vary per call (named in inputs' shapes), or None
    """

    def __init__(self, executable: Any, spec: TargetSpec, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], out_spec: str, const_outputs: Sequence[int] = (), *,
                 library_bytes: bytes | None = None, dynamic: Any = None):
        self.executable = executable
        self.spec = spec
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.out_spec = out_spec
        self._tree = pytree.treespec_loads(out_spec)
        self.const_outputs = sorted(int(i) for i in const_outputs)
        self.library_bytes = library_bytes
        self.dynamic = dynamic          # graphopt.dynamic.DynamicSpec: dims that may vary, with bounds (or None)
        self._vm = None
        self._main = None
        # per input (torch dtype, shape, dynamic dims) for the per-call check's fast path (a mismatch takes the
        # full check, which names what is wrong)
        self._fast = [self._fast_spec(s) for s in self.inputs]
        self._single = self._tree.is_leaf() and not self.const_outputs     # the model returns one tensor
        if spec.is_host:
            self._ensure_vm()          # fail now, not at the first call, if the code cannot be loaded

    # ---------------------------------------------------------------------------------------- device
    @property
    def target(self) -> TargetSpec:
        return self.spec

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", 0) if self.spec.kind == "cuda" else torch.device("cpu")

    def _tvm_device(self):
        import tvm

        return tvm.cuda(0) if self.spec.kind == "cuda" else tvm.cpu(0)

    def _ensure_vm(self):
        if self._main is not None:
            return self._main
        if not self.spec.is_host:
            where = self.spec.unavailable_reason() or f"this is {platform.machine()}"
            raise GraphoptError(f"this module was compiled for '{self.spec.alias}' and cannot run here "
                                f"({where}); save() it and graphopt.load() it on a machine of that target")
        from tvm import relax

        self._vm = relax.VirtualMachine(self.executable, self._tvm_device())
        self._main = self._vm["main"]
        return self._main

    # ----------------------------------------------------------------------------------------- inputs
    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise InputError unless `args` match the compiled signature (count, type, dtype, shape, device)."""
        want = len(self.inputs)
        if len(args) != want:
            sig = ", ".join(str(s) for s in self.inputs)
            raise InputError(f"expected {want} input(s) ({sig}), got {len(args)}")
        dev = self.torch_device
        for i, (x, s) in enumerate(zip(args, self.inputs)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected {s}, got {type(x).__name__}")
            got = TensorSpec.of(x)
            if got.dtype != s.dtype:
                raise InputError(f"input {i}: expected dtype {s.dtype} ({s}), got {got.dtype} ({got})")
            if not s.matches(got.shape):
                raise InputError(f"input {i}: expected shape {s.shape} ({s}), got {got.shape} ({got})"
                                 + (f" for argument '{s.name}'" if s.name else ""))
            if x.device.type != dev.type or (dev.index is not None and x.device.index not in (None, dev.index)):
                raise InputError(f"input {i}: expected a tensor on {dev} (target '{self.spec.alias}'), "
                                 f"got one on {x.device}")
            if s.index_bound is not None and x.numel():
                _check_index_range(i, x, s)
        if self.dynamic:
            self.dynamic.check(args, [s.name for s in self.inputs])

    def _fast_spec(self, s: TensorSpec):
        """(torch dtype, shape, dynamic, index bound) of input `s` for _matches: shape holds an int per static
        dim and (name, min, max) per dynamic one, `dynamic` says whether any dim is, the index bound is None
        or the row count an index input must stay below; None (always the full check) for a dim this module
        has no bounds for."""
        dims = []
        for d in s.shape:
            if isinstance(d, str):
                b = self.dynamic.dims.get(d) if self.dynamic is not None else None
                if b is None:
                    return None
                dims.append((d, int(b.min), int(b.max)))
            else:
                dims.append(int(d))
        return s.torch_dtype, tuple(dims), any(isinstance(d, tuple) for d in dims), s.index_bound

    def _matches(self, args: Sequence[Any]) -> bool:
        """The per-call fast path of check_inputs: True when every input is a CPU tensor of the compiled dtype
        and shape, each dynamic dim inside its bounds and equal wherever inputs share it, and an index input's
        values in range; False means "run the full check" (which names what is wrong). The full check cost a
        dynamic module 14 us per call."""
        if len(args) != len(self._fast) or self.spec.kind != "llvm":
            return False
        seen: dict[str, int] = {}
        for x, fast in zip(args, self._fast):
            if fast is None or not isinstance(x, torch.Tensor) or x.dtype is not fast[0] or not x.is_cpu:
                return False
            if not fast[2]:
                if x.shape != fast[1]:
                    return False
            elif x.dim() != len(fast[1]):
                return False
            else:
                for got, want in zip(x.shape, fast[1]):
                    if type(want) is int:
                        if got != want:
                            return False
                    elif not want[1] <= got <= want[2] or seen.setdefault(want[0], got) != got:
                        return False
            if fast[3] is not None and x.numel():
                lo, hi = torch.aminmax(x)           # 5 us on 16 ids; the full check's three ops took 14
                if int(lo) < 0 or int(hi) >= fast[3]:
                    return False
        return True

    @staticmethod
    def _to_tvm(x: torch.Tensor):
        from_dlpack = _tvm_from_dlpack()
        if x.requires_grad:
            x = x.detach()
        if not x.numel():             # torch gives empty tensors strides TVM calls non-compact ((5, 0): (1, 1))
            strides = [1] * x.dim()
            for i in range(x.dim() - 2, -1, -1):
                strides[i] = strides[i + 1] * x.shape[i + 1]
            return from_dlpack(torch.empty_strided(tuple(x.shape), strides, dtype=x.dtype))
        if not x.is_contiguous() or x.data_ptr() % _ALIGNMENT:
            x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        try:
            return from_dlpack(x)
        except Exception:             # e.g. size-1 dims with strides TVM calls non-contiguous
            return from_dlpack(x.clone(memory_format=torch.contiguous_format))

    # ------------------------------------------------------------------------------------------- call
    def __call__(self, *args, **kwargs):
        if kwargs:
            raise InputError(f"keyword arguments ({', '.join(kwargs)}) are not supported by a compiled module: "
                             f"pass the {len(self.inputs)} input(s) positionally")
        main = self._ensure_vm()        # first: "cannot run here" says more than an input-device mismatch
        if not self._matches(args):
            self.check_inputs(args)     # raises InputError naming what does not match
        result = main(*[self._to_tvm(x) for x in args])
        flat = [result] if isinstance(result, _tvm_tensor_type()) else _items(result, len(self.outputs))
        if self._single and self.spec.kind != "cuda":
            return _from_capsule(flat[0].__dlpack__())
        if self.spec.kind == "cuda":
            leaves = [torch.from_dlpack(t) for t in flat]
        else:                           # CPU: from the capsule (2-3 us less per output than the protocol)
            leaves = [_from_capsule(t.__dlpack__()) for t in flat]
        for i in self.const_outputs:
            leaves[i] = leaves[i].clone()
        return pytree.tree_unflatten(leaves, self._tree)

    def signature(self) -> dict:
        sig = {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
               "out_spec": self.out_spec, "const_outputs": list(self.const_outputs)}
        if self.dynamic:
            sig["dynamic"] = self.dynamic.to_dict()
        return sig

    def export_library(self, path: str) -> str:
        """Write the shared library to `path` (a copy of the loaded bytes for a module loaded from a file)."""
        if self.library_bytes is not None:
            with open(path, "wb") as f:
                f.write(self.library_bytes)
            return str(path)
        from .build import export_library

        return export_library(self.executable, path, self.spec)

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        return f"CompiledModule(target={self.spec.alias!r}, inputs=[{ins}], outputs={len(self.outputs)})"


def _check_index_range(i: int, x: torch.Tensor, s: TensorSpec) -> None:
    """InputError unless every value of the index input `x` is in 0..s.index_bound-1 (what torch checks)."""
    bad = (x < 0) | (x >= s.index_bound)
    if bool(bad.any()):
        pos = tuple(int(p) for p in bad.nonzero()[0])
        raise InputError(f"input {i}: index {int(x[pos])} at position {pos} is out of range for "
                         f"{s.index_of} ({s.index_bound} rows: valid indices are 0..{s.index_bound - 1})")


_TENSOR_TYPE = None
_GET_ITEM = None
_FROM_DLPACK = None
# a DLPack capsule to a torch tensor: torch.utils.dlpack.from_dlpack's own last step, without its checks for the
# protocol and keyword arguments that a capsule does not take (0.3 us of a 5 us call)
_from_capsule = getattr(torch._C, "_from_dlpack", None) or torch.utils.dlpack.from_dlpack


def _tvm_from_dlpack():
    """tvm.runtime.from_dlpack, looked up once (an `import tvm` per call was a fifth of _to_tvm's time)."""
    global _FROM_DLPACK
    if _FROM_DLPACK is None:
        import tvm

        _FROM_DLPACK = tvm.runtime.from_dlpack
    return _FROM_DLPACK


def _tvm_tensor_type() -> type:
    global _TENSOR_TYPE
    if _TENSOR_TYPE is None:
        import tvm

        _TENSOR_TYPE = tvm.runtime.Tensor
    return _TENSOR_TYPE


def _items(result: Any, count: int) -> list:
    """The `count` tensors of the VM's output tuple. Python iteration over a TVM FFI Array asks its size and
    bounds-checks every index through a generator (~4 us for one output, a fifth of a small model's call);
    the compiled signature already says how many there are."""
    global _GET_ITEM
    if _GET_ITEM is None:
        try:
            from tvm_ffi.container import _ffi_api

            _GET_ITEM = _ffi_api.ArrayGetItem
        except (ImportError, AttributeError):     # another tvm_ffi: its public iteration
            _GET_ITEM = False
    if not _GET_ITEM:
        return list(result)
    return [_GET_ITEM(result, i) for i in range(count)]
