"""The model suite: whole networks, dense against compressed, in PyTorch and in ONNX Runtime.

Per network (VGG-16, ResNet-18; defined here, random weights from a fixed seed), every 3 x 3
convolution is compressed by each method of `--method` (default: tai):

    tai              Tai et al.'s closed form (`SepConv2d.from_conv`) at the network's default
                     ranks (VGG-16: Tai et al.'s, the sep_conv suite's table; ResNet-18: half the
                     output channels) or at `--energy`;
    separable_basis  Jaderberg et al.'s scheme 1, cp (CP-ALS), tucker2 (Tucker-2): per layer the
                     largest rank whose MACs stay within the tai layer's at the default ranks (so
                     the methods compare at about equal MACs), or the method's rank for `--energy`
                     (`lowrank_kernels.methods`).

Per dtype and batch size ONE interleaved run (`harness.time_interleaved`, inference mode,
channels_last) times the dense network once and, per method:

    unfused    the compressed network as chains of plain convolutions (tai: each SepConv2d as its
               two convolutions; cp and separable_basis: their depthwise pairs as two depthwise
               convolutions, `schemes.set_fused(model, False)`; tucker2: its chain, which has no
               fused form, so it has no separate "sep" candidate)
    sep        the compressed network as lowrank_kernels runs it (tai: sep_conv; cp and
               separable_basis: the depthwise pairs on sep_conv)
    ort_sep    the compressed network in ONNX Runtime (float32 only; lk.to_onnx of the plain
               chain, which for tai and cp is what lk.to_onnx makes of sep_conv: two Conv nodes)

plus ort_dense, the original network in ONNX Runtime (float32 only). Each method is one row; its
dense and ort_dense timings are the run's shared ones. ONNX Runtime gets as many intra-op threads
as PyTorch. The error columns are the relative
Frobenius error of each output against the float32 dense network's on the same input (for the
compressed networks this includes the compression error itself). The JSON records the CPU, the
ISA PyTorch and oneDNN chose, and the level of the project's own SIMD kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._reference import sep_conv_reference
from ..batched_svd import cpu_capability
from ..layers import LowRankLinear, SepConv2d
from ..methods import METHODS, build_layer, method_spectrum
from ..rank_selection import macs as layer_macs
from ..schemes import CPConv2d, SeparableBasisConv2d, Tucker2Conv2d, set_fused
from . import harness, results
from .sep_conv import NETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("vgg16", "resnet18")
DEFAULT_ROUNDS = 7
QUICK_ROUNDS = 3
TORCH_CANDIDATES = ("dense", "unfused", "sep")
ORT_CANDIDATES = ("ort_dense", "ort_sep")

# `lowrank bench model --report`: whole-network times and the ratios users ask about.
REPORTS = {
    "model": results.ReportSpec(
        candidates=(*TORCH_CANDIDATES, *ORT_CANDIDATES),
        ratios=(
            results.Ratio("sep vs dense", ("dense",), "sep"),
            results.Ratio("sep vs unfused", ("unfused",), "sep"),
            results.Ratio("unfused vs dense", ("dense",), "unfused"),
            results.Ratio("sep vs ORT sep", ("ort_sep",), "sep"),
            results.Ratio("ORT sep vs ORT dense", ("ort_dense",), "ort_sep"),
        ),
        legend="case = network at its image size, /method when not tai; dense = the original network, "
        "unfused = the compressed network as plain convolutions (tai: two per layer; cp, separable_basis: "
        "the depthwise pairs as two depthwise convolutions; tucker2: its three-conv chain), sep = the "
        "compressed network with its separable stages on sep_conv (none for tucker2), ort_* = the networks "
        "exported with lk.to_onnx in ONNX Runtime (float32 only); ratio > 1: the candidate is faster.",
    )
}


def case_name(model: str, image: int, method: str = "tai") -> str:
    """The data file's case of one row: tai (the suite's original method) keeps the bare name."""
    return f"{model}@{image}" + ("" if method == "tai" else f"/{method}")


def measurements(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' timings as data-file measurements (one per candidate)."""
    return [
        {
            "case": case_name(r["model"], r["image"], r.get("method", "tai")),
            "candidate": name,
            "threads": r["threads"],
            "batch": r["batch"],
            "timing": timing,
        }
        for r in rows
        for name, timing in r["timings"].items()
    ]


# ---- The networks (torchvision's layouts, written out here). ----


def _vgg16(num_classes: int = 1000) -> nn.Module:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(1),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.downsample(x))


def _resnet18(num_classes: int = 1000) -> nn.Module:
    stages, c = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(_BasicBlock(c, cout, stride), _BasicBlock(cout, cout, 1)))
        c = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(512, num_classes),
    )


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The named network in eval mode with random weights: He-normal convolutions (activations
    keep their scale through the depth), BatchNorm with random affine terms and statistics."""
    if name not in MODELS:
        raise ValueError(f"model suite: unknown model {name!r}; available: {', '.join(MODELS)}")
    g = torch.Generator().manual_seed(seed)
    model = _vgg16() if name == "vgg16" else _resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def default_ranks(name: str, model: nn.Module) -> dict[str, int]:
    """Per 3 x 3 conv (by module name): VGG-16's layers after the first get Tai et al.'s ranks
    (conv1_1, 3 input channels, stays dense); ResNet-18's 3 x 3 convs get half their outputs."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    if name == "vgg16":
        tai = [layer.rank for layer in NETS["vgg16"]]  # conv1_2 ... conv5_3
        return {n: r for (n, _), r in zip(convs[1:], tai)}
    return {n: m.out_channels // 2 for n, m in convs}


def compress_model(model: nn.Module, ranks: dict[str, int] | None = None, energy: float | None = None) -> nn.Module:
    """A copy of `model` with the chosen 3 x 3 convolutions replaced by SepConv2d.from_conv
    (rank per module name, or the same energy for every 3 x 3 conv); the other parameters are shared."""
    out = _copy_sharing(model, _unreplaced(model))
    targets = (
        ranks
        if energy is None
        else {n: None for n, m in out.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    )
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        conv = getattr(parent, attr)
        if energy is None:
            layer = SepConv2d.from_conv(conv, rank=min(targets[name], conv.out_channels * 3, conv.in_channels * 3))
        else:
            layer = SepConv2d.from_conv(conv, energy=energy)
        setattr(parent, attr, layer)
    return out


class UnfusedPair(nn.Module):
    """A SepConv2d run as its two plain convolutions (the reference pair, same weights)."""

    def __init__(self, layer: SepConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        if m._explicit_pad is not None:
            x = F.pad(x, m._explicit_pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        return sep_conv_reference(x, m.weight_v, m.weight_h, m.bias, m.stride, m._op_padding, m.dilation, m.groups)


def unfused_model(compressed: nn.Module) -> nn.Module:
    """The compressed network as plain convolutions: every SepConv2d running the two-conv reference,
    every CP / scheme-1 layer its depthwise pair as two depthwise convolutions. The copy shares the
    parameters (only the modules are new)."""
    out = _copy_sharing(compressed, list(compressed.parameters()) + list(compressed.buffers()))
    set_fused(out, False)
    for name, m in list(out.named_modules()):
        if isinstance(m, SepConv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, attr, UnfusedPair(m))
    return out


def _copy_sharing(model: nn.Module, shared: list[torch.Tensor]) -> nn.Module:
    """A deep copy of `model` whose `shared` tensors are the original ones (VGG-16's classifier
    alone is 0.5 GB in float32; the suite holds several versions of each network)."""
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def _unreplaced(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of everything but the 3 x 3 convolutions (which compression replaces)."""
    replaced = {
        id(t)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        for t in m.parameters(recurse=False)
    }
    return [t for t in (*model.parameters(), *model.buffers()) if id(t) not in replaced]


def input_shapes(model: nn.Module, image: int) -> dict[str, tuple[int, ...]]:
    """Per module name, the input shape it sees on a (1, 3, image, image) input."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module, args) -> None:  # returns None: the input is left as it is
            shapes.setdefault(name, tuple(args[0].shape))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image, image))
    finally:
        for h in handles:
            h.remove()
    return shapes


_COUNTED = (nn.Conv2d, nn.Linear, SepConv2d, LowRankLinear, CPConv2d, SeparableBasisConv2d, Tucker2Conv2d)


def model_cost(model: nn.Module, image: int) -> dict[str, int]:
    """Parameters, and multiply-accumulates per sample of the convolutions and linear layers
    (`rank_selection.macs`) on a (1, 3, image, image) input."""
    shapes = input_shapes(model, image)
    total = sum(layer_macs(m, shapes[n]) for n, m in model.named_modules() if isinstance(m, _COUNTED) and n in shapes)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": int(total)}


def compress_method(
    model: nn.Module,
    method: str,
    ranks: dict[str, int] | None,
    energy: float | None,
    image: int,
    *,
    label: str = "",
) -> nn.Module:
    """A copy of `model` (sharing the untouched parameters) with its 3 x 3 convolutions compressed by
    `method`: at the tai layer's MACs for `ranks` (tai: those ranks, see `compress_model`), or at
    `energy` (every 3 x 3 conv). Layers a method cannot make cheaper stay dense. Progress per layer
    goes to stderr."""
    if method not in METHODS:
        raise ValueError(f"compress_method: unknown method {method!r}; available: {', '.join(METHODS)}")
    if method == "tai":
        return compress_model(model, ranks, energy)
    if energy is not None:
        from ..compress import compress

        out, _ = compress(
            model,
            energy=energy,
            method=method,
            include=lambda _n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3),
            progress=True,
        )
        return out
    out = _copy_sharing(model, _unreplaced(model))
    shapes = input_shapes(out, image)
    from tqdm.auto import tqdm

    for name in tqdm(list(ranks), desc=f"{label} {method}".strip(), file=sys.stderr):
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        conv = getattr(parent, attr)
        shape = shapes[name]
        k_tai = min(ranks[name], conv.out_channels * 3, conv.in_channels * 3)
        tai = SepConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, k_tai, conv.stride, conv.padding, groups=conv.groups
        )
        sp = method_spectrum(method, name, conv, shape, need_energies=False)
        k = min(sp.largest_rank_within(layer_macs(tai, shape)), sp.full_rank) // sp.groups * sp.groups
        if k >= sp.groups and sp.worthwhile(k):
            setattr(parent, attr, build_layer(method, conv, k))
    return out


# ---- Where it ran: CPU, ISA. ----


@contextlib.contextmanager
def _capture_fd1(path: Path):
    """Redirect file descriptor 1 (where oneDNN's verbose lines go) to `path`."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def onednn_info(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """What PyTorch's convolution does with a VGG-sized channels_last 3 x 3 conv in `dtype`: the
    backend PyTorch selects, and from oneDNN's verbose log the ISA oneDNN reports (printed by the
    first oneDNN primitive of the process, so possibly None for later calls) and the
    implementation it ran (e.g. brg_conv_fwd:avx512_core)."""
    info: dict[str, Any] = {"backend": None, "isa": None, "conv_impl": None}
    x = torch.randn(1, 128, 56, 56, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    with contextlib.suppress(Exception):  # a private API: informative only
        info["backend"] = str(torch._C._select_conv_backend(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None))
    if not torch.backends.mkldnn.is_available():
        return info
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "verbose.txt"
        try:
            with _capture_fd1(log), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                F.conv2d(x, w, padding=1)
        except (RuntimeError, OSError):
            return info
        text = log.read_text(errors="replace")
    m = re.search(r"isa:([^\n]+)", text)
    info["isa"] = m.group(1).strip() if m else None
    for line in text.splitlines():
        fields = line.split(",")
        if "exec" in fields and "convolution" in fields:
            i = fields.index("convolution")
            info["conv_impl"] = fields[i + 1] if i + 1 < len(fields) else None
            break
    return info


def environment() -> dict[str, Any]:
    """CPU model and the ISA each layer of the stack uses."""
    return {
        **harness.machine_info(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "lowrank_cpu_capability": cpu_capability(),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "onednn_float32": onednn_info(torch.float32),
        "onednn_bfloat16": onednn_info(torch.bfloat16),
    }


# ---- ONNX Runtime. ----


def ort_session(model: nn.Module, example: torch.Tensor, path: Path, threads: int) -> Callable[[torch.Tensor], Any]:
    """Export `model` with lk.to_onnx and return x -> ORT output (float32 numpy in and out)."""
    import onnxruntime as ort

    from ..export import to_onnx

    to_onnx(model, (example,), path, dynamic_batch=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # ORT's workers otherwise spin for a while after each run, taking the cores from whichever
    # candidate the interleaved rounds time next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor):
        return sess.run(None, {name: x.contiguous().numpy()})[0]

    return run


def _have_onnx_runtime() -> bool:
    """ONNX Runtime and the exporter are the `export` extra; without them the suite runs the
    PyTorch candidates only."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"model suite: {', '.join(missing)} not installed (pip install lowrank_kernels[export]); skipping ORT")
    return not missing


# ---- Measurement. ----


def rel_error(y: Any, ref: torch.Tensor) -> float:
    y = torch.as_tensor(y).double()  # torch output of any dtype, or ORT's numpy array
    ref = ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _candidates(method: str) -> tuple[str, ...]:
    """A method's PyTorch candidates: tucker2 has no fused form, so only its plain chain."""
    return ("unfused",) if method == "tucker2" else ("unfused", "sep")


def measure(
    name: str,
    dense32: nn.Module,
    refs32: dict[str, nn.Module],
    typed: dict[str, nn.Module],
    ort_runs: dict[str, Callable[[torch.Tensor], Any]],
    dtype: torch.dtype,
    batch: int,
    image: int,
    rounds: int,
    warmup: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One interleaved run of every candidate on one input -> one row per method. dense32: the float32
    dense network (the error reference); refs32: per method, its float32 compressed network as plain
    convolutions (the reference of the err_c columns); typed: the networks in `dtype`, channels_last,
    keyed "dense" and "METHOD:CANDIDATE"; ort_runs: "ort_dense" and "METHOD:ort_sep"."""
    g = torch.Generator().manual_seed(seed + batch)
    x32 = torch.randn(batch, 3, image, image, generator=g)
    with torch.inference_mode():
        reference = dense32(x32.to(memory_format=torch.channels_last))
        compressed_refs = {m: ref(x32.to(memory_format=torch.channels_last)) for m, ref in refs32.items()}
    x = x32.to(dtype).to(memory_format=torch.channels_last)

    def torch_call(model: nn.Module) -> Callable[[], Any]:
        def call():
            with torch.inference_mode():
                return model(x)

        return call

    fns: dict[str, Callable[[], Any]] = {k: torch_call(m) for k, m in typed.items()}
    if dtype == torch.float32:
        fns.update({k: (lambda r=run: r(x32)) for k, run in ort_runs.items()})
    outputs = {k: fn() for k, fn in fns.items()}
    errors = {k: rel_error(y, reference) for k, y in outputs.items()}
    errors_c = {
        k: rel_error(y, compressed_refs[k.split(":")[0]]) for k, y in outputs.items() if k.split(":")[0] in refs32
    }
    del outputs
    timings = harness.time_interleaved(fns, rounds=rounds, warmup=warmup, seed=seed)
    rows = []
    for method in refs32:
        keys = {"dense": "dense", **{c: f"{method}:{c}" for c in (*_candidates(method), "ort_sep")}}
        if "ort_dense" in timings:
            keys["ort_dense"] = "ort_dense"
        keys = {short: full for short, full in keys.items() if full in timings}
        ms = {short: timings[full].median_ms for short, full in keys.items()}
        lowrank = "sep" if "sep" in ms else "unfused"
        row: dict[str, Any] = {
            "model": name,
            "method": method,
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "image": image,
            **{f"{k}_ms": ms.get(k) for k in (*TORCH_CANDIDATES, *ORT_CANDIDATES)},
            "lowrank_ms": ms[lowrank],
            "lowrank_vs_dense": ms["dense"] / ms[lowrank],
            "sep_vs_dense": ms["dense"] / ms["sep"] if "sep" in ms else None,
            "sep_vs_unfused": ms["unfused"] / ms["sep"] if "sep" in ms else None,
            "unfused_vs_dense": ms["dense"] / ms["unfused"],
            **{f"err:{short}": errors[full] for short, full in keys.items()},
            **{f"err_c:{short}": errors_c[full] for short, full in keys.items() if full in errors_c},
            "err:lowrank": errors[keys[lowrank]],
            "timings": {short: timings[full] for short, full in keys.items()},
        }
        if "ort_sep" in ms:
            row["ort_sep_vs_ort_dense"] = ms["ort_dense"] / ms["ort_sep"]
            row["sep_vs_ort_sep"] = ms["ort_sep"] / ms["sep"] if "sep" in ms else None
        rows.append(row)
    return rows


TABLE_COLUMNS = [
    "model",
    "method",
    "dtype",
    "batch",
    "dense_ms",
    "unfused_ms",
    "sep_ms",
    "ort_dense_ms",
    "ort_sep_ms",
    "sep_vs_dense",
    "sep_vs_unfused",
    "unfused_vs_dense",
    "sep_vs_ort_sep",
    "ort_sep_vs_ort_dense",
]
ERROR_COLUMNS = [
    "model",
    "method",
    "dtype",
    "batch",
    "err:dense",
    "err:unfused",
    "err:sep",
    "err:ort_dense",
    "err:ort_sep",
    "err_c:unfused",
    "err_c:sep",
    "err_c:ort_sep",
]
METHOD_COLUMNS = [
    "model",
    "method",
    "dtype",
    "batch",
    "GMACs",
    "MACs_vs_dense",
    "Mparams",
    "lowrank_ms",
    "lowrank_vs_dense",
    "sep_vs_unfused",
    "err:lowrank",
    "compress_s",
]
LEGEND = """\
  *_ms: median ms per forward over interleaved rounds (channels_last; ORT: NCHW float32)
  sep_vs_dense = dense_ms / sep_ms, sep_vs_unfused = unfused_ms / sep_ms (> 1: sep_conv faster),
  unfused_vs_dense = dense_ms / unfused_ms,
  sep_vs_ort_sep = ort_sep_ms / sep_ms, ort_sep_vs_ort_dense = ort_dense_ms / ort_sep_ms
  err:*: ||y - y_dense_float32|| / ||y_dense_float32|| on the same input (compressed models
  include the compression error); err_c:*: the same against the float32 compressed network
  run as plain convolutions (the kernels' own error)"""
METHOD_LEGEND = """\
  GMACs: multiply-accumulates per image of the convolutions and linear layers (dense row: the
  original network's), MACs_vs_dense = dense / compressed; Mparams: parameters in millions;
  lowrank_ms: the method as lowrank_kernels runs it (sep for tai, cp, separable_basis; the plain
  chain for tucker2), lowrank_vs_dense = dense_ms / lowrank_ms; err:lowrank: its output error
  against the float32 dense network; compress_s: seconds to compress the network"""


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the model suite."""
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument(
        "--method",
        default="tai",
        help=f"compression methods, comma-separated: {', '.join(METHODS)} (default: tai); every method is "
        "timed in the same interleaved run against the same dense network",
    )
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default: 1,8)")
    parser.add_argument(
        "--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16 (default: both)"
    )
    parser.add_argument("--image", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument(
        "--energy",
        type=float,
        default=None,
        help="compress every 3x3 conv to this energy in (0, 1] instead of the default ranks",
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default: 1)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime candidates")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and round order")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds: a fast, noisier look")


def _parse(args: argparse.Namespace) -> tuple[list[str], list[str], list[int], list[torch.dtype], int]:
    models = _csv(args.models)
    bad = [m for m in models if m not in MODELS]
    if not models or bad:
        raise SystemExit(f"lowrank bench model: --models must name some of {', '.join(MODELS)}, got {args.models!r}")
    methods = list(dict.fromkeys(_csv(getattr(args, "method", "tai"))))
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(
            f"lowrank bench model: --method must name some of {', '.join(METHODS)} (comma-separated), "
            f"got {args.method!r}"
        )
    try:
        batches = [int(b) for b in _csv(args.batch)]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise SystemExit(f"lowrank bench model: --batch must be positive integers, got {args.batch!r}")
    names = _csv(args.dtype)
    if not names or any(d not in DTYPES for d in names):
        raise SystemExit(f"lowrank bench model: --dtype must name some of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.image < 32:
        raise SystemExit(f"lowrank bench model: --image must be >= 32 (five 2x poolings), got {args.image}")
    if args.energy is not None and not 0 < args.energy <= 1:
        raise SystemExit(f"lowrank bench model: --energy must be in (0, 1], got {args.energy}")
    rounds = args.rounds if args.rounds is not None else (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if rounds < 1 or args.warmup < 0:
        raise SystemExit("lowrank bench model: --rounds must be >= 1 and --warmup >= 0")
    return models, methods, batches, [DTYPES[d] for d in names], rounds


def _typed(models: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, nn.Module]:
    """The networks in `dtype`; parameters shared between them stay shared (one memo for all copies)."""
    if dtype == torch.float32:
        return models
    memo: dict[int, Any] = {}
    return {k: copy.deepcopy(m, memo).to(dtype) for k, m in models.items()}


def run(args: argparse.Namespace) -> int:
    """Run the suite; print the tables; save the JSON when args.json is set."""
    model_names, methods, batches, dtypes, rounds = _parse(args)
    threads = max(getattr(args, "threads", None) or [torch.get_num_threads()])
    torch.set_num_threads(threads)
    env = environment()
    rows: list[dict[str, Any]] = []
    for name in model_names:
        dense = build_model(name, args.seed)
        ranks = default_ranks(name, dense) if args.energy is None else None
        compressed: dict[str, nn.Module] = {}
        compress_s: dict[str, float] = {}
        for method in methods:
            start = time.perf_counter()
            compressed[method] = compress_method(dense, method, ranks, args.energy, args.image, label=name)
            compress_s[method] = time.perf_counter() - start
        dense_cost = model_cost(dense, args.image)
        costs = {m: model_cost(c, args.image) for m, c in compressed.items()}
        models: dict[str, nn.Module] = {"dense": dense}
        refs32: dict[str, nn.Module] = {}
        for method in methods:
            refs32[method] = models[f"{method}:unfused"] = unfused_model(compressed[method])
            if "sep" in _candidates(method):
                models[f"{method}:sep"] = compressed[method]
        for m in models.values():
            m.to(memory_format=torch.channels_last)
        ort_runs: dict[str, Callable[[torch.Tensor], Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            if not args.no_onnx and torch.float32 in dtypes and _have_onnx_runtime():
                example = torch.randn(1, 3, args.image, args.image)
                with contextlib.redirect_stdout(None):
                    ort_runs["ort_dense"] = ort_session(dense, example, Path(tmp) / "dense.onnx", threads)
                    for method in methods:
                        path = Path(tmp) / f"{method}.onnx"
                        ort_runs[f"{method}:ort_sep"] = ort_session(refs32[method], example, path, threads)
            for dtype in dtypes:
                typed = _typed(models, dtype)
                for batch in batches:
                    new = measure(
                        name,
                        dense,
                        refs32,
                        typed,
                        ort_runs,
                        dtype,
                        batch,
                        args.image,
                        rounds,
                        args.warmup,
                        args.seed,
                    )
                    for row in new:
                        cost = costs[row["method"]]
                        row.update(
                            threads=threads,
                            params=cost["params"],
                            macs=cost["macs"],
                            dense_params=dense_cost["params"],
                            dense_macs=dense_cost["macs"],
                            GMACs=cost["macs"] / 1e9,
                            MACs_vs_dense=dense_cost["macs"] / cost["macs"],
                            Mparams=cost["params"] / 1e6,
                            compress_s=compress_s[row["method"]],
                        )
                        rows.append(row)
                        print(
                            f"{name} {row['method']} {row['dtype']} b{batch}: dense {row['dense_ms']:.1f} ms, "
                            f"unfused {row['unfused_ms']:.1f} ms"
                            + (f", sep {row['sep_ms']:.1f} ms" if row.get("sep_ms") else "")
                            + (f", ORT sep {row['ort_sep_ms']:.1f} ms" if row.get("ort_sep_ms") else ""),
                            flush=True,
                        )
    print({k: env[k] for k in ("cpu", "cores", "threads", "torch_cpu_capability", "lowrank_cpu_capability")})
    print(f"oneDNN: float32 {env['onednn_float32']}, bfloat16 {env['onednn_bfloat16']}")
    print(f"\nWhole networks at {args.image}x{args.image}, {threads} thread(s), {rounds} rounds:")
    print(harness.format_table(rows, TABLE_COLUMNS))
    print(LEGEND)
    print("\nOutput error against the float32 dense network (err) and the float32 compressed one (err_c):")
    print(harness.format_table(rows, ERROR_COLUMNS, floatfmt=".1e"))
    print("\nPer method: cost, speed and error (ranks at the tai layers' MACs; see the module docstring):")
    print(harness.format_table(rows, METHOD_COLUMNS))
    print(METHOD_LEGEND)
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        results.record(
            args, results.make_records("model", measurements([r for r in rows if r["dtype"] == name]), dtype=name)
        )
    if getattr(args, "json", None):
        path = harness.save_json(
            args.json,
            {
                "suite": "model",
                "environment": env,
                "args": {k: v if isinstance(v, int | float | list | None) else str(v) for k, v in vars(args).items()},
                "rounds": rounds,
                "ranks": "energy" if args.energy is not None else "default",
                "methods": methods,
                "rows": rows,
            },
        )
        print(f"\nsaved {path}")
    return 0
