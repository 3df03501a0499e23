"""Per-layer quantization sensitivity: how much quantizing one layer one way costs in output error.

Both methods give the same unit, the predicted squared relative L2 error of the model outputs vs float32,
mean over the batches (err² = mean_b ||y_b - ŷ_b||² / ||y_b||²), so either feeds the same error budget and
the allocation adds them up (independent per-layer errors add in squares).

output   (measured) quantize that layer alone, run the batches, measure err². Exact for the layer alone, and
         it sees everything the choice does (activation clipping, the calibrated ranges, int4 groups). Costs one
         forward pass per (layer, choice, batch).
hessian  (HAWQ-V2/V3) second-order estimate. With L = ½ Σ_b ||f(x_b; θ) - y_b||² / (||y_b||² · n_batches),
         L = 0 and ∇L = 0 at the float32 weights, so a perturbation δ of one block costs 2ΔL ≈ δᵀHδ, and with
         HAWQ's isotropic approximation δᵀHδ ≈ Tr(H_block)/n_block · ||δ||². The traces come from Hutchinson's
         estimator. L is a squared error with zero residual at the float32 weights, so its Hessian is exactly
         the Gauss-Newton matrix H = Σ_b J_bᵀJ_b / (||y_b||² · n_batches), and Tr(H_block) = E_u ||J_blockᵀ u||²
         over Rademacher probes u of the outputs: one backward pass per probe gives every block's estimate,
         never negative. (The other form, E_v[vᵀHv] with Hv by double backpropagation and v over all blocks at
         once, as PyHessian does per layer, is the same expectation but pays cross-block noise
         E[v_iᵀH_ij v_j] = 0 sample by sample: it goes negative on small blocks.) Blocks: each layer's
         weight (δ = Q(W) - W of the choice) and, for the choices that quantize activations (int8 static and
         dynamic), each input activation of each batch (δ = Q(a) - a). Costs `samples` x batches forward +
         backward passes, independent of the number of choices; cheaper than `output` when layers x
         choices is large, but an approximation (isotropic, second order, blocks independent).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from .mixed import MixedBuilder, dequantized_weight, rel_error_sq

__all__ = ["output_sensitivity", "hessian_traces", "hessian_sensitivity"]


def output_sensitivity(builder: MixedBuilder, batches: Sequence[tuple], refs: Sequence,
                       progress: bool = False) -> dict[tuple[str, str], float]:
    """{(layer, choice): measured err² of the model with only that layer quantized that way}; float32 -> 0."""
    from tqdm.auto import tqdm

    out: dict[tuple[str, str], float] = {}
    todo = [(p, c) for p in builder.layers for c in builder.choices[p]]
    for path, choice in tqdm(todo, desc="quantize(mixed): output sensitivity", disable=not progress, leave=False):
        if choice == "float32":
            out[(path, choice)] = 0.0
            continue
        gm = builder.build({path: choice})
        with torch.no_grad():
            out[(path, choice)] = sum(rel_error_sq(gm(*b), r) for b, r in zip(batches, refs)) / len(batches)
    return out


def hessian_traces(builder: MixedBuilder, batches: Sequence[tuple], refs: Sequence, samples: int = 8,
                   seed: int = 0) -> tuple[dict[str, float], dict[tuple[str, int, int], float], dict]:
    """Hutchinson estimates of the Hessian traces of L (module docstring).

    Returns (weight[path] = Tr(H_W)/n_W, act[(path, input i, batch b)] = Tr(H_a)/n_a, inputs[(path, i, b)] =
    the float input tensor seen there)."""
    gm = copy.deepcopy(builder.float_gm)
    gm.eval()
    # a layer called twice has a path per call (graph._unshare) and one module (builder.units): in this copy each
    # such path gets a module of its own, so its weight's and its inputs' traces are its own call's
    for unit in builder.units:
        for path in unit[1:]:
            gm.set_submodule(path, copy.deepcopy(gm.get_submodule(path)))
    for p in gm.parameters():
        p.requires_grad_(False)
    weights: dict[str, torch.Tensor] = {}
    for path in builder.layers:
        mod = gm.get_submodule(path)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            w.requires_grad_(True)
            weights[path] = w
    gen = torch.Generator().manual_seed(seed)
    w_acc = {p: 0.0 for p in weights}
    a_acc: dict[tuple[str, int, int], float] = {}
    inputs: dict[tuple[str, int, int], torch.Tensor] = {}
    nb = len(batches)
    from ..analysis.compare import flatten_outputs

    for b, (batch, ref) in enumerate(zip(batches, refs)):
        denom = sum(float((r.detach().double() ** 2).sum()) for r in flatten_outputs(ref)) * nb
        leaves: dict[tuple[str, int, int], torch.Tensor] = {}
        handles = []
        for path in builder.layers:
            def pre(mod, args, path=path):
                new = []
                for i, a in enumerate(args):
                    d = torch.zeros_like(a, requires_grad=True)
                    leaves[(path, i, b)] = d
                    inputs[(path, i, b)] = a.detach().clone()
                    new.append(a + d)
                return tuple(new)
            handles.append(gm.get_submodule(path).register_forward_pre_hook(pre))
        try:
            with torch.enable_grad():
                out = [o.float() for o in flatten_outputs(gm(*batch))]
        finally:
            for h in handles:
                h.remove()
        keys_w, keys_a = list(weights), list(leaves)
        params = [weights[k] for k in keys_w] + [leaves[k] for k in keys_a]
        for s in range(samples):
            us = [torch.randint(0, 2, o.shape, generator=gen).float() * 2 - 1 for o in out]
            probe = sum((o * u).sum() for o, u in zip(out, us))
            grads = torch.autograd.grad(probe, params, retain_graph=s < samples - 1, allow_unused=True)
            for i, (p, g) in enumerate(zip(params, grads)):
                val = 0.0 if g is None else float((g.double() ** 2).sum()) / (p.numel() * denom * samples)
                if i < len(keys_w):
                    w_acc[keys_w[i]] += val                  # H_W sums over the batches
                else:
                    a_acc[keys_a[i - len(keys_w)]] = a_acc.get(keys_a[i - len(keys_w)], 0.0) + val
    return w_acc, a_acc, inputs


def hessian_sensitivity(builder: MixedBuilder, batches: Sequence[tuple], refs: Sequence, samples: int = 8,
                        seed: int = 0) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """({(layer, choice): predicted err²}, {layer: Tr(H_W)/n_W}) by the Hessian-trace estimate."""
    w_tr, a_tr, inputs = hessian_traces(builder, batches, refs, samples, seed)
    out: dict[tuple[str, str], float] = {}
    for path in builder.layers:
        float_mod = builder.prepared.get_submodule(path)
        w = dequantized_weight(float_mod)
        for choice in builder.choices[path]:
            if choice == "float32":
                out[(path, choice)] = 0.0
                continue
            err = 0.0
            if w is not None and path in w_tr:
                dq = dequantized_weight(builder.module(path, choice))
                err += max(w_tr[path], 0.0) * float(((dq.double() - w.double()) ** 2).sum())
            for (p, i, b), tr in a_tr.items():
                if p != path:
                    continue
                a = inputs[(p, i, b)]
                q = builder.quantize_input(path, choice, i, a)
                if q is not None:
                    err += max(tr, 0.0) * float(((q.double() - a.double()) ** 2).sum())
            out[(path, choice)] = err
    return out, w_tr
