"""Hugging Face transformers and timm models through graphopt on x86: fp32 and int8, against eager.

    python benchmarks/ecosystem_coverage.py                              # every model in MODELS, fp32 + int8
    python benchmarks/ecosystem_coverage.py --models bert,resnet50 --runs fp32 --jsonl eco.jsonl
    python benchmarks/ecosystem_coverage.py --merge eco.jsonl            # the README table from --jsonl rows
    python benchmarks/ecosystem_coverage.py --tiny --models bert        # 2-layer, 64-wide configs (smoke test)

Needs the `zoo` extra (`pip install graphopt[zoo]`: transformers, timm). Nothing is downloaded: every model is
built from its configuration class (transformers: `XModel(XConfig(...))`; timm: `create_model(name,
pretrained=False)`) with random weights, then made less trivial than a fresh init (BatchNorm statistics and
every norm's affine parameters random, all-zero Linear/Conv weights and ConvNeXt-style 1e-6 layer scales
redrawn, so no block vanishes from the comparison), eval mode, batch 1.

Hugging Face models return a ModelOutput (a dict): each is wrapped (`MainOutput`) to take its inputs
positionally and return the main tensor, `last_hidden_state` (the encoders, GPT-2's decoder stack) - the table's
"output" column says which. Text models get `input_ids` and an `attention_mask` of shape (1, --seq) (default
64) whose last quarter is padding, so the mask matters; the comparison input has different tokens and a
different padding length (a graph that baked in the example's mask would disagree). GPT-2 gets `input_ids`
only (its causal mask is built inside the model).

Per model two runs, each in its own process (a crash, a memory blow-up or --timeout cannot take the table down):

  fp32  graphopt.optimize(model, "x86", "fold_bn,cleanup") (the default pipeline), default schedules;
        rel|Δ| = max|Δ| / max|eager| on a fresh input; `ok` up to --rtol (1e-3), `DIFF` beyond, unless the model
        is so ill-conditioned that eager itself moves that far (eager float32 vs float64, and eager's output when
        the input moves by one float32 rounding step): then `ok` (marked *) when the build is within
        max(rtol, 2x the larger of those) of eager float64
  int8  "fold_bn,cleanup,quantize" (static int8: Linear/Conv2d/activation matmuls on integer kernels), calibrated
        on --calib (32: quantize's calib_batches) random inputs; cosine(compiled, eager) on a fresh input; `ok`
        from --min-cos (0.99), `LOW` below, `NOT QUANTIZED` when the build holds no integer kernel (quantize
        found no op it handles)

A failure shows the error's class and, for graphopt's typed errors, the pass (PassError) or the op/node named
in the message. Compile seconds are graphopt.optimize's wall time (capture, passes, lowering, build).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import append_jsonl, first_line, peak_rss_gb, physical_cores, run_child, set_threads  # noqa: E402

PIPELINES = {"fp32": "fold_bn,cleanup", "int8": "fold_bn,cleanup,quantize(progress=false)"}
CALIB_BATCHES = 32              # quantize's own calib_batches default (4 left MobileNetV3-L's ranges short)


@dataclass
class Spec:
    """One model: where it comes from, how to build it (full size and --tiny), its inputs."""
    source: str                   # "transformers" | "timm"
    build: Callable               # (tiny: bool) -> (nn.Module, config note)
    inputs: str                   # "text+mask" | "text" | "image" | "audio"
    output: str = ""              # the HF output field returned by the wrapper
    note: str = ""                # what config was used, in words
    extra: dict = field(default_factory=dict)
    # "data": BatchNorm running statistics from random inputs (what training leaves them at) instead of random
    # ones, for an architecture that random statistics make ill-conditioned (_norm_stats_from_data)
    norm_stats: str = "random"


# ---------------------------------------------------------------------------------------------- transformers
TINY_BERTLIKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _hf(model_cls: str, config_cls: str, depth: str, full: dict | None = None, tiny: dict | None = None,
        part=None):
    """A builder: transformers.<model_cls>(<config_cls>(**kwargs)), attention ATTN; `part` picks a submodule;
    `depth` is the config key of the (encoder) layer count, which --layers overrides."""
    def build(is_tiny: bool, layers: int | None = None):
        import transformers

        kwargs = dict(tiny if is_tiny else (full or {}))
        if layers and not is_tiny:
            kwargs[depth] = layers
            if "encoder_layers" in kwargs:                    # an encoder taken out of a seq2seq model
                kwargs["decoder_layers"] = 1
        config = getattr(transformers, config_cls)(**kwargs)
        config._attn_implementation = ATTN
        model = getattr(transformers, model_cls)(config)
        standard = getattr(getattr(transformers, config_cls)(**(full or {})), depth)
        return (part(model) if part else model), (getattr(config, depth), standard)
    return build


ATTN = "sdpa"     # what from_pretrained picks by default; --attn eager for the explicit softmax(QK^T) path


def _timm(name: str, **kwargs):
    def build(is_tiny: bool, layers: int | None = None):
        import timm

        return timm.create_model(name, pretrained=False, **kwargs), None
    return build


MODELS: dict[str, Spec] = {
    "bert": Spec("transformers", _hf("BertModel", "BertConfig", "num_hidden_layers", tiny=TINY_BERTLIKE), "text+mask",
                 "last_hidden_state", "BertConfig() = bert-base (12 layers, 768 wide)"),
    "distilbert": Spec("transformers", _hf("DistilBertModel", "DistilBertConfig", "n_layers",
                                           tiny={"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128}),
                       "text+mask", "last_hidden_state", "DistilBertConfig() = distilbert-base (6 layers, 768)"),
    "roberta": Spec("transformers", _hf("RobertaModel", "RobertaConfig", "num_hidden_layers", tiny=TINY_BERTLIKE), "text+mask",
                    "last_hidden_state", "RobertaConfig() = roberta-base layout (12 layers, 768)"),
    # AlbertConfig() is albert-xxlarge (4096 wide); albert-base-v2's sizes are the family's base model
    "albert": Spec("transformers", _hf("AlbertModel", "AlbertConfig", "num_hidden_layers",
                                       full={"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
                                       tiny={**TINY_BERTLIKE, "embedding_size": 32}),
                   "text+mask", "last_hidden_state", "albert-base-v2 sizes (12 shared layers, 768; embedding 128)"),
    "electra": Spec("transformers", _hf("ElectraModel", "ElectraConfig", "num_hidden_layers",
                                        tiny={**TINY_BERTLIKE, "embedding_size": 32}),
                    "text+mask", "last_hidden_state", "ElectraConfig() = electra-small discriminator (12 x 256)"),
    "gpt2": Spec("transformers", _hf("GPT2Model", "GPT2Config", "n_layer", tiny={"n_embd": 64, "n_layer": 2, "n_head": 4}),
                 "text", "last_hidden_state", "GPT2Config() = gpt2 (124M: 12 layers, 768), causal mask"),
    "vit": Spec("transformers", _hf("ViTModel", "ViTConfig", "num_hidden_layers",
                                    tiny={**TINY_BERTLIKE, "image_size": 32, "patch_size": 8}),
                "image", "last_hidden_state", "ViTConfig() = vit-base-patch16-224"),
    "t5-encoder": Spec("transformers", _hf("T5EncoderModel", "T5Config", "num_layers",
                                           tiny={"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2,
                                                 "num_heads": 4}),
                       "text+mask", "last_hidden_state", "T5Config() = t5-small encoder (6 layers, 512)"),
    "bart-encoder": Spec("transformers", _hf("BartModel", "BartConfig", "encoder_layers",
                                             tiny={"d_model": 64, "encoder_layers": 2, "decoder_layers": 1,
                                                   "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                                   "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
                                             part=lambda m: m.get_encoder()),
                         "text+mask", "last_hidden_state", "BartConfig() = bart-large encoder (12 layers, 1024)"),
    "whisper-encoder": Spec("transformers", _hf("WhisperModel", "WhisperConfig", "encoder_layers",
                                                tiny={"d_model": 64, "encoder_layers": 2, "decoder_layers": 1,
                                                      "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                                      "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                                                      "max_source_positions": 64},
                                                part=lambda m: m.get_encoder()),
                            "audio", "last_hidden_state",
                            "WhisperConfig() = whisper-tiny encoder (4 layers, 384; 80 mel x 3000 frames)"),
    "resnet50": Spec("timm", _timm("resnet50"), "image", note="timm resnet50"),
    "efficientnet_b0": Spec("timm", _timm("efficientnet_b0"), "image", note="timm efficientnet_b0"),
    "convnext_tiny": Spec("timm", _timm("convnext_tiny"), "image", note="timm convnext_tiny"),
    "vit_small_patch16_224": Spec("timm", _timm("vit_small_patch16_224"), "image", note="timm ViT-S/16"),
    "deit_tiny_patch16_224": Spec("timm", _timm("deit_tiny_patch16_224"), "image", note="timm DeiT-Ti/16"),
    "mobilenetv3_large_100": Spec("timm", _timm("mobilenetv3_large_100"), "image", note="timm MobileNetV3-L"),
    "regnety_016": Spec("timm", _timm("regnety_016"), "image", note="timm RegNetY-1.6GF (BN statistics from data)",
                        norm_stats="data"),
}


# ------------------------------------------------------------------------------------------------- building
def _main_output_wrapper():
    import torch

    class MainOutput(torch.nn.Module):
        """Calls a Hugging Face model with its inputs by name and returns one field of its ModelOutput."""

        def __init__(self, model, names: tuple, output: str):
            super().__init__()
            self.model, self.names, self.output = model, names, output

        def forward(self, first, second=None):       # named parameters, not *args: torch.export's dynamic_shapes
            args = (first,) if second is None else (first, second)      # are given per parameter
            out = self.model(**dict(zip(self.names, args)))
            return out[self.output]

    return MainOutput


def _randomize(model, seed: int = 0) -> None:
    """Make a fresh init less trivial: random norms (BN statistics, every norm's weight/bias, RMSNorms too),
    all-zero Linear/Conv weights redrawn, tiny layer scales (ConvNeXt's 1e-6) set to [0.5, 1)."""
    import torch

    from graphopt.testing.random_models import randomize_norms

    randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if ("Norm" in type(m).__name__ and isinstance(w, torch.nn.Parameter) and w.dim() == 1
                    and not isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
                                           torch.nn.LayerNorm))):
                w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                b = getattr(m, "bias", None)
                if isinstance(b, torch.nn.Parameter):
                    b.copy_(torch.rand(b.shape, generator=g) - 0.5)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
        for _, p in model.named_parameters():
            if p.dim() == 1 and p.numel() > 1 and 0 < p.abs().max() < 1e-4:      # layer scale initialised at 1e-6
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)


def _norm_stats_from_data(model, size: int, batches: int = 8, seed: int = 1000) -> None:
    """Set every BatchNorm's running statistics to their averages over `batches` batches of 4 random images
    (train mode, cumulative averaging), as training leaves them: activations stay normalized. Random statistics
    (_randomize) leave timm's RegNetY-1.6GF ill-conditioned: its activations reach 1e4 by stage 3, eager float32
    is 18% from float64 and moves 17% when the input moves by one rounding step, so no rounding of any kind can
    be checked against it; with statistics from data: 1.5e-5 and 1.8e-5 (one fresh input)."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + i)))
    model.eval()
    for m in bns:
        m.momentum = 0.1


def build(name: str, tiny: bool = False, seq: int = 64, layers: int | None = None):
    """(model, make_inputs(seed) -> tuple of tensors, info dict). The model is in eval mode, random weights.
    `layers` (transformers only): that many layers instead of the standard count, every shape unchanged."""
    import torch

    spec = MODELS[name]
    torch.manual_seed(0)
    raw, depth = spec.build(tiny, layers)
    raw = raw.eval()
    _randomize(raw)
    info = {"source": spec.source, "config": spec.note + (" [--tiny: 2 layers, 64 wide]" if tiny and
                                                            spec.source == "transformers" else ""),
            "output": spec.output or "logits"}
    if depth is not None:
        info["layers"] = f"{depth[0]}" if depth[0] == depth[1] or tiny else f"{depth[0]} of {depth[1]}"
    if spec.source == "timm":
        size = raw.default_cfg.get("input_size", (3, 224, 224))[-1]         # --tiny leaves timm models as they are
        info["input"] = f"image 3x{size}x{size}"
        if spec.norm_stats == "data":
            _norm_stats_from_data(raw, size)

        def make(seed):
            return (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)),)
        return raw, make, info

    cfg = raw.config
    MainOutput = _main_output_wrapper()
    if spec.inputs in ("text+mask", "text"):
        vocab = cfg.vocab_size

        def make(seed):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, vocab, (1, seq), generator=g)      # clear of pad/bos/eos ids
            if spec.inputs == "text":
                return (ids,)
            pad = seq // 4 + (seed % 3) * (seq // 16)                 # a different padding length per seed
            mask = torch.ones(1, seq, dtype=torch.long)
            mask[:, seq - pad:] = 0
            return ids, mask
        names = ("input_ids", "attention_mask") if spec.inputs == "text+mask" else ("input_ids",)
        info["input"] = f"input_ids 1x{seq}" + (" + attention_mask" if spec.inputs == "text+mask" else "")
    elif spec.inputs == "image":
        size = cfg.image_size
        names = ("pixel_values",)
        info["input"] = f"pixel_values 3x{size}x{size}"

        def make(seed):
            return (torch.randn(1, cfg.num_channels, size, size, generator=torch.Generator().manual_seed(seed)),)
    else:                                                             # whisper: log-mel features
        frames = 2 * cfg.max_source_positions
        names = ("input_features",)
        info["input"] = f"input_features {cfg.num_mel_bins}x{frames}"

        def make(seed):
            return (torch.randn(1, cfg.num_mel_bins, frames, generator=torch.Generator().manual_seed(seed)),)
    info["attn"] = cfg._attn_implementation
    return MainOutput(raw, names, spec.output).eval(), make, info


# ---------------------------------------------------------------------------------------------- one model
def _float64_errors(model, inputs, ref, got) -> tuple[float, float]:
    """(rel|eager float32 - eager float64|, rel|build - eager float64|), rel = max|Δ| / max|float64|."""
    import copy

    import torch

    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(*[t.double() if t.is_floating_point() else t for t in inputs])
    ref64 = ref64.double()
    scale = ref64.abs().max().clamp_min(1e-30)
    rel = lambda t: float((t.detach().double() - ref64).abs().max() / scale)
    return rel(ref), rel(got)


def _rounding_spread(model, inputs, ref, trials: int = 3) -> float:
    """How far eager's own output moves (rel, as rel|Δ|) when every float input is perturbed by one rounding
    step (relative 2^-24, float32's unit roundoff): the model's conditioning at this input."""
    import torch

    g = torch.Generator().manual_seed(1234)
    worst = 0.0
    with torch.no_grad():
        for _ in range(trials):
            moved = [t * (1 + 2.0 ** -24 * torch.randn(t.shape, generator=g).sign()) if t.is_floating_point()
                     else t for t in inputs]
            out = model(*moved)
            worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def _failure(e: BaseException) -> dict:
    """The error's class, the pass it names (PassError) and its first line."""
    out = {"kind": type(e).__name__, "error": first_line(e)}
    if getattr(e, "pass_name", None):
        out["pass"] = e.pass_name
    return out


def run_one(name: str, which: str, tiny: bool = False, seq: int = 64, rtol: float = 1e-3,
            min_cos: float = 0.99, layers: int | None = None, n_calib: int = CALIB_BATCHES) -> dict:
    """One model, one run ("fp32" or "int8"), in this process. Returns a JSON-able row."""
    import torch

    import graphopt
    from graphopt.analysis.compare import compare_outputs

    row: dict = {"model": name, "run": which, "tiny": tiny}
    try:
        model, make, info = build(name, tiny, seq, layers)
    except Exception as e:                                        # noqa: BLE001 - the table reports it
        return {**row, "status": "fail", "stage": "build", **_failure(e)}
    row.update(info)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    example, fresh = make(0), make(1)
    if which == "int8":
        row["calib"] = n_calib
    calib = [make(10 + i) for i in range(n_calib)] if which == "int8" else None
    start = time.perf_counter()
    try:
        opt = graphopt.optimize(model, "x86", PIPELINES[which], example_inputs=example, calibration=calib)
        row["compile_s"] = round(time.perf_counter() - start, 1)
        row["capture"] = opt.report.backend.get("capture", "")
        if which == "int8":
            row["int8_path"] = str(opt.report.backend.get("int8", ""))[:200]
        got = opt(*fresh)
        with torch.no_grad():
            ref = model(*fresh)
    except Exception as e:                                        # noqa: BLE001 - the table reports it
        return {**row, "status": "fail", "seconds": round(time.perf_counter() - start, 1), **_failure(e)}
    diff = compare_outputs(got, ref)
    row["rel"] = diff.max_rel
    a, b = got.detach().double().flatten(), ref.detach().double().flatten()
    row["cos"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    if diff.structure_error:
        row.update(status="DIFF", error=diff.structure_error)
    elif which == "fp32":
        row["status"] = "ok" if diff.max_rel <= rtol else "DIFF"
        if row["status"] == "DIFF":
            # is the model itself that sensitive? eager float32 against eager float64 on the same input: a
            # build no farther from float64 than eager float32 is computes as exactly as PyTorch does
            e32, ours = _float64_errors(model, fresh, ref, got)
            spread = _rounding_spread(model, fresh, ref)
            row["eager_rel64"], row["rel64"], row["eager_spread"] = e32, ours, spread
            if ours <= max(rtol, 2 * max(e32, spread)):
                row["status"] = "ok"
                row["ill_conditioned"] = True
    elif not row.get("int8_path"):
        row["status"] = "NOT QUANTIZED"        # quantize found no Linear/Conv2d/matmul it handles: still fp32
    else:
        row["status"] = "ok" if row["cos"] >= min_cos else "LOW"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(name: str, which: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--run", which, "--seq", str(args.seq),
           "--rtol", str(args.rtol), "--min-cos", str(args.min_cos), "--threads", str(args.threads),
           "--attn", args.attn, "--calib", str(args.calib)] + (["--tiny"] if args.tiny else []) + (
               ["--layers", str(args.layers)] if args.layers else [])
    return run_child(cmd, name, which, args.timeout)


# ---------------------------------------------------------------------------------------------- the table
def _cell(r: dict | None, which: str) -> list[str]:
    if r is None:
        return ["-", "", ""]
    if which == "int8" and r["status"] == "ok" and not r.get("int8_path"):      # rows written before the check
        r = {**r, "status": "NOT QUANTIZED"}
    if r["status"] == "fail":
        what = r.get("kind", "")
        if r.get("pass"):
            what += f" in {r['pass']}"
        return [f"FAIL {what}", "", ""]
    metric = f"{r['rel']:.1e}" if which == "fp32" else f"{r['cos']:.4f}"
    if which == "fp32" and r.get("ill_conditioned"):
        metric += "*"
    return [r["status"], metric, str(r.get("compile_s", ""))]


def table(results: dict[str, dict[str, dict]]) -> str:
    """The markdown table (README) of {model: {run: row}}, models in MODELS order, then failure details."""
    order = {n: i for i, n in enumerate(MODELS)}
    runs = [w for w in PIPELINES if any(w in rs for rs in results.values())]
    header = ["model", "source", "layers", "params M", "input", "output", "capture"]
    for w in runs:
        header += [f"{w}", "rel\\|Δ\\|" if w == "fp32" else "cosine", "compile s"]
    header.append("peak GiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for n in sorted(results, key=lambda n: order.get(n, len(order))):
        rs = results[n]
        first = next((r for r in rs.values() if "params_m" in r), next(iter(rs.values())))
        capture = next((r["capture"] for r in rs.values() if r.get("capture")), "")
        layers = first.get("layers") or ("standard" if first.get("source") == "transformers" else "")
        row = [n + (" (tiny)" if first.get("tiny") else ""), first.get("source", ""), layers,
               f"{first.get('params_m', 0):.1f}", first.get("input", ""), first.get("output", ""), capture]
        for w in runs:
            row += _cell(rs.get(w), w)
        peaks = [r["peak_rss_gb"] for r in rs.values() if isinstance(r.get("peak_rss_gb"), (int, float))]
        row.append(f"{max(peaks):.1f}" if peaks else "")
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for w in runs:
        ok = sum(rs.get(w, {}).get("status") == "ok" and (w != "int8" or bool(rs[w].get("int8_path")))
                 for rs in results.values())
        notes.append(f"{w}: {ok}/{len(results)} ok")
    lines.append("")
    calibs: dict[int, list[str]] = {}
    for n, rs in results.items():
        if "int8" in rs:
            calibs.setdefault(rs["int8"].get("calib", 4), []).append(n)       # rows before the field: 4 inputs
    if calibs:
        common = max(calibs, key=lambda k: len(calibs[k]))
        others = "; ".join(f"{c}: {', '.join(ns)}" for c, ns in sorted(calibs.items()) if c != common)
        notes.append(f"int8 calibrated on {common} random inputs" + (f" ({others})" if others else ""))
    lines.append(", ".join(notes))
    for n, rs in results.items():
        for w, r in rs.items():
            if r.get("ill_conditioned"):
                lines.append(f"- {n} [{w}]: * ill-conditioned as built (random norms): eager float32 is "
                             f"{r['eager_rel64']:.1e} from eager float64 and moves {r.get('eager_spread', 0):.1e} "
                             f"when the input moves by one rounding step; the build is {r['rel64']:.1e} from "
                             f"float64")
            if w == "int8" and r["status"] == "ok" and not r.get("int8_path"):
                lines.append(f"- {n} [int8]: NOT QUANTIZED: no integer kernel in the build (quantize found no op it "
                             f"handles), so the int8 build is the fp32 one")
            elif r["status"] in ("DIFF", "LOW") and not r.get("error"):
                lines.append(f"- {n} [{w}]: {r['status']}: rel|Δ| {r['rel']:.2e}, cosine {r['cos']:.4f} vs eager")
            elif r["status"] != "ok":
                where = f" (pass {r['pass']})" if r.get("pass") else ""
                lines.append(f"- {n} [{w}]: {r['status']} {r.get('kind', '')}{where}: {r.get('error', '')}")
    return "\n".join(lines)


def _load(paths: list[str]) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    results.setdefault(r["model"], {})[r["run"]] = r     # a later row replaces an earlier one
    return results


def main(argv=None) -> int:
    global ATTN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help=f"comma-separated, from: {','.join(MODELS)} (default: all)")
    ap.add_argument("--runs", default="fp32,int8")
    ap.add_argument("--tiny", action="store_true", help="2-layer, 64-wide transformers configs (timm unchanged)")
    ap.add_argument("--layers", type=int, default=0, help="transformers: this many layers instead of the "
                                                          "standard count (same shapes, shorter build)")
    ap.add_argument("--seq", type=int, default=64, help="sequence length of the text models")
    ap.add_argument("--attn", default=ATTN, choices=["sdpa", "eager"], help="transformers attention implementation")
    ap.add_argument("--calib", type=int, default=CALIB_BATCHES, help="int8: calibration inputs")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--min-cos", type=float, default=0.99)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model and run")
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--jsonl", default="", help="append each row to this file as soon as it is done")
    ap.add_argument("--merge", default="", help="comma-separated --jsonl files: print their table, run nothing")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--run", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ATTN = args.attn
    if args.merge:
        print(table(_load([p for p in args.merge.split(",") if p])))
        return 0
    set_threads(args.threads)
    if args.one:
        row = run_one(args.one, args.run, args.tiny, args.seq, args.rtol, args.min_cos, args.layers or None,
                      args.calib)
        row["peak_rss_gb"] = peak_rss_gb()
        print(json.dumps(row), flush=True)
        return 0
    names = [n for n in args.models.split(",") if n] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    results: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for n in names:
        results[n] = {}
        for which in [w for w in args.runs.split(",") if w]:
            r = _child(n, which, args)
            results[n][which] = r
            append_jsonl(args.jsonl, r)
            extra = f" {r.get('kind', '')}: {r.get('error', '')}" if r["status"] != "ok" else ""
            print(f"{n} [{which}] {r['status']} rel={r.get('rel', float('nan')):.1e} cos={r.get('cos', float('nan')):.4f} "
                  f"compile_s={r.get('compile_s', '')} capture={r.get('capture', '')}{extra}", flush=True)
    print()
    print(table(results))
    print(f"{len(results)} models in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
