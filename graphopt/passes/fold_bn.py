"""fold_bn: fold eval-mode BatchNorm into the preceding Conv / ConvTranspose / Linear."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..analysis.shapes import node_shape
from ..pipeline import Context, Pass, PassResult, register_pass

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _bn_scale_shift(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval BN, in float64: y = x * scale + shift."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer computing bn(layer(x)) (eval BN statistics); `layer` and `bn` are left untouched."""
    scale, shift = _bn_scale_shift(bn)
    new = copy.deepcopy(layer)
    w = layer.weight.detach().double()
    if isinstance(layer, _CONV_T):
        # weight (Cin, Cout/g, *k); output channel o = g * (Cout/g) + j
        g = layer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        w = w.reshape(g, cin // g, cout_g, *w.shape[2:])
        s = scale.reshape(g, 1, cout_g, *([1] * (w.dim() - 3)))
        w = (w * s).reshape(cin, cout_g, *w.shape[3:])
    else:  # conv (Cout, Cin/g, *k) and linear (out, in): output channel is dim 0
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    dtype = layer.weight.dtype
    new.weight = nn.Parameter(w.to(dtype), requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter((bias * scale + shift).to(dtype))
    return new


def _why_not(gm: fx.GraphModule, bn_node: fx.Node) -> tuple[str, fx.Node | None]:
    """'' when `bn_node` can be folded into its producer (returned), else the reason."""
    bn = gm.get_submodule(str(bn_node.target))
    if bn.training:
        return "BN is in training mode", None
    if not bn.track_running_stats or bn.running_mean is None:
        return "BN has no running statistics (normalizes with batch statistics)", None
    src = bn_node.args[0] if bn_node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = getattr(src, "target", src)
        return f"its input is not a Conv/Linear module (it is {getattr(what, '__name__', what)})", None
    layer = gm.get_submodule(str(src.target))
    if not isinstance(layer, _CONV + _CONV_T + (nn.Linear,)):
        return f"its input comes from {type(layer).__name__}, not Conv/ConvTranspose/Linear", None
    if len(src.users) != 1:
        return f"the output of '{src.target}' is also used elsewhere (by {len(src.users)} nodes)", None
    if isinstance(layer, nn.Linear):
        shape = node_shape(src)
        if shape is None or len(shape) != 2:
            return f"Linear output has shape {shape}: BN1d normalizes dim 1, not the features", None
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != channels:
        return f"BN has {bn.num_features} features, '{src.target}' produces {channels}", None
    return "", src


@register_pass("fold_bn")
@dataclass
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm1d/2d/3d into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear before it.

    Changes: each foldable `layer -> BN` pair becomes one layer with W' = W·γ/√(σ²+ε) per output channel and
    b' = (b − μ)·γ/√(σ²+ε) + β; the BN node and module are removed. Exact: same outputs up to float rounding
    (folding is computed in float64). BN that cannot be folded (no running stats, input from another op,
    producer output used elsewhere, functional batch_norm) is left in place and named in the report.
    A module called from several places is never modified in place: each fold makes a new module.
    """

    exact = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        notes, details = [], []
        modules = dict(gm.named_modules())
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", str(node.target)):
                notes.append(f"left functional batch_norm node '{node.name}' (no module to fold into)")
            if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _BN):
                continue
            reason, src = _why_not(gm, node)
            if reason:
                notes.append(f"left BN '{node.target}': {reason}")
                continue
            layer_path = str(src.target)
            folded = fold_into(gm.get_submodule(layer_path), gm.get_submodule(str(node.target)))
            if calls.get(layer_path, 0) > 1:          # shared module: give this call its own copy
                new_path = _free_name(gm, layer_path.replace(".", "_") + "_bnfold")
                gm.add_submodule(new_path, folded)
                calls[layer_path] -= 1
                src.target = new_path
                layer_path = new_path
            else:
                _set_submodule(gm, layer_path, folded)
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            details.append({"layer": layer_path, "bn": str(node.target), "kind": type(folded).__name__})
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, changed=bool(details), notes=notes, details=details)


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _free_name(gm: nn.Module, base: str) -> str:
    names = dict(gm.named_modules())
    name, i = base, 1
    while name in names or hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
