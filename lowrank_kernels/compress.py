"""`compress(model, ...)`: replace a trained model's Conv2d/Linear layers by low-rank layers.

The input model is deep-copied and never modified. Each eligible layer (exactly `nn.Conv2d`
or `nn.Linear`; subclasses may use their weight outside `forward`, e.g. MultiheadAttention's
out_proj, so they are left alone) is decomposed in closed form (`SepConv2d.from_conv`,
`LowRankLinear.from_linear`) at the rank a rule picks (see rank_selection.py); layers where low
rank would not cut MACs, or (optionally) would not run faster here, stay dense."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .benchmark.harness import format_table, save_json
from .layers import _layer_matrices, _svd64
from .methods import METHODS, build_layer, cp_rank_for_energy, effective_method, kept_energy_of, method_spectrum
from .rank_selection import (
    _check_rule_args,
    macs,
    measure_speedup,
    params,
    rank_for_energy,
    rank_for_explicit,
    rank_for_reduction,
    ranks_for_budget,
)

__all__ = ["compress", "CompressionReport", "LayerReport"]


@dataclass
class LayerReport:
    """One eligible layer: what it was, what it became and what that cost."""

    name: str
    kind: str
    shape: str
    full_rank: int
    rank: int | None  # None: left dense
    decision: str
    params_before: int
    params_after: int
    macs_before: int | None  # per sample; None without a probe input reaching the layer
    macs_after: int | None
    energy: float  # fraction of squared singular values kept (1.0 when dense)
    rel_error: float | None  # ||y_lowrank - y_dense|| / ||y_dense|| on the probe input
    speedup: float | None  # dense time / low-rank time, measured when asked
    method: str = "tai"  # the decomposition used (lowrank_kernels.methods); "dense" when left dense


@dataclass
class CompressionReport:
    """Per-layer results of `compress`; `str(report)` is a table, `save_json` writes it."""

    layers: list[LayerReport]
    settings: dict[str, Any] = field(default_factory=dict)
    model_rel_error: float | None = None  # relative error of the whole model's output on the probe

    def totals(self) -> dict[str, Any]:
        def total(attr: str) -> int | None:
            vals = [getattr(r, attr) for r in self.layers]
            return None if any(v is None for v in vals) else sum(vals)

        return {
            "params_before": total("params_before"),
            "params_after": total("params_after"),
            "macs_before": total("macs_before"),
            "macs_after": total("macs_after"),
            "replaced": sum(r.rank is not None for r in self.layers),
            "layers": len(self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "model_rel_error": self.model_rel_error,
            "totals": self.totals(),
            "layers": [asdict(r) for r in self.layers],
        }

    def save_json(self, path: str | Path) -> Path:
        """Write the report (plus machine info) as JSON."""
        return save_json(path, self.to_dict())

    def table(self) -> str:
        def mega(v: int | None) -> str | None:
            return None if v is None else f"{v / 1e6:.3f}"

        def opt(v: float | None, fmt: str) -> str | None:
            return None if v is None else format(v, fmt)

        rows = [
            {
                "layer": r.name,
                "shape": r.shape,
                "rank": "dense" if r.rank is None else f"{r.rank}/{r.full_rank}",
                "method": r.method,
                "params": f"{r.params_before}->{r.params_after}",
                "MMACs": None if r.macs_before is None else f"{mega(r.macs_before)}->{mega(r.macs_after)}",
                "energy": f"{r.energy:.4f}",
                "rel_err": opt(r.rel_error, ".2e"),
                "speedup": opt(r.speedup, ".2f"),
                "decision": r.decision,
            }
            for r in self.layers
        ]
        t = self.totals()
        rows.append(
            {
                "layer": "TOTAL",
                "rank": f"{t['replaced']}/{t['layers']} replaced",
                "params": f"{t['params_before']}->{t['params_after']}",
                "MMACs": None if t["macs_before"] is None else f"{mega(t['macs_before'])}->{mega(t['macs_after'])}",
                "rel_err": opt(self.model_rel_error, ".2e"),
            }
        )
        cols = ["layer", "shape", "method", "rank", "params", "MMACs", "energy", "rel_err", "speedup", "decision"]
        return format_table(rows, cols)

    def __str__(self) -> str:
        return self.table()


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        s = f"conv {layer.in_channels}->{layer.out_channels} {layer.kernel_size[0]}x{layer.kernel_size[1]}"
        if layer.stride != (1, 1):
            s += f" s{layer.stride[0]},{layer.stride[1]}"
        if layer.dilation != (1, 1):
            s += f" d{layer.dilation[0]},{layer.dilation[1]}"
        if layer.groups != 1:
            s += f" g{layer.groups}"
        return s
    return f"linear {layer.in_features}->{layer.out_features}"


def _rel_error(new: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.detach().to(torch.float64)
    denom = ref64.norm().item()
    diff = (new.detach().to(torch.float64) - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def _probe(model: nn.Module, example_input: Any, layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], Any]:
    """Run `model` once in eval mode, recording the first input of each layer; restores modes."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():

        def hook(_mod, args, name=name):
            if name not in captured and args and isinstance(args[0], torch.Tensor):
                captured[name] = args[0].detach().clone()

        handles.append(layer.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return captured, out


def _call(model: nn.Module, example_input: Any) -> Any:
    return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # By identity over every parent, so a layer registered under several names is replaced everywhere.
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def compress(
    model: nn.Module,
    *,
    rank: int | None = None,
    energy: float | None = None,
    reduction: float | None = None,
    mac_budget: float | None = None,
    example_input: torch.Tensor | tuple | None = None,
    include: Callable[[str, nn.Module], bool] | None = None,
    exclude: Iterable[str] = (),
    measure_speed: bool = False,
    min_speedup: float | None = None,
    speed_rounds: int = 10,
    progress: bool = True,
    method: str = "tai",
    max_rel_error: float | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Return a low-rank copy of `model` and a report; `model` itself is not modified.

    Give exactly one rank rule:
        rank: the same total rank K for every layer (clamped to each layer's full rank and
            rounded down to a multiple of its groups);
        energy: in (0, 1], per layer the smallest rank keeping that fraction of the squared
            singular values;
        reduction: > 1, per layer the largest rank with MACs <= dense MACs / reduction;
        mac_budget: in (0, 1], ranks maximising the product of kept-energy fractions with the
            replaced layers' total MACs <= mac_budget x their dense MACs.
    Layers whose low-rank form would not cut MACs stay dense.

    example_input: a probe batch (a tensor, or a tuple of positional arguments). With it, MACs are
        per sample at the probe's spatial size, and the report gives each layer's relative output
        error and the whole model's. Without it, costs are per output position (parameter counts).
    include: predicate (name, layer) -> bool choosing eligible layers (default: all exact
        nn.Conv2d / nn.Linear layers); exclude: layer names to leave dense.
    measure_speed: time each replaced layer against its dense original on the probe input
        (`lowrank_kernels.benchmark.harness.time_interleaved`) and report the speedup.
    min_speedup: leave a layer dense unless its measured speedup reaches this (implies measuring);
        with mac_budget, layers made dense this way can push the total over the budget.
    method: the decomposition of the convolutions (linear layers and 1x1 convs always get a truncated
        SVD, reported as "tai"): "tai" (`SepConv2d`, Tai et al.), "separable_basis"
        (`SeparableBasisConv2d`, Jaderberg et al.'s scheme 1; a total rank K is M = K / C basis filters
        per input channel), "cp" (`CPConv2d`, CP-ALS; needs TensorLy), "tucker2" (`Tucker2Conv2d`; K per
        group gives R1 = min(K, C), R2 = min(K, N)), or "auto": per layer, every method at the rule's
        rank, timed on the probe input (needs example_input), the fastest kept among those meeting the
        accuracy proxy. The proxy is the rule's energy for the energy rule (each method's rank keeps
        it); otherwise the probe output error, at most `max_rel_error` if given, else at most that of
        "tai" at the same rule (any error where "tai" would keep the layer dense). With mac_budget,
        "auto" splits the budget as "tai" would and gives each method its layer's share.
        See lowrank_kernels/methods.py for each method's energies and MACs.
    max_rel_error: with method="auto", the largest probe output error a method may have on a layer.
    """
    rule = _check_rule_args(rank, energy, reduction, mac_budget)
    if not isinstance(model, nn.Module):
        raise ValueError(f"compress expects an nn.Module, got {type(model).__name__}")
    if min_speedup is not None and (isinstance(min_speedup, bool) or not min_speedup > 0):
        raise ValueError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if method not in (*METHODS, "auto"):
        raise ValueError(f"method must be one of {(*METHODS, 'auto')}, got {method!r}")
    if max_rel_error is not None and (isinstance(max_rel_error, bool) or not max_rel_error >= 0):
        raise ValueError(f"max_rel_error must be a non-negative number, got {max_rel_error!r}")
    if method == "auto" and example_input is None:
        raise ValueError("method='auto' needs example_input (each layer's candidates are timed on its shapes)")
    timing = measure_speed or min_speedup is not None or method == "auto"
    if timing and example_input is None:
        raise ValueError("measure_speed/min_speedup need example_input (the layers are timed on its shapes)")
    excluded = set(exclude)

    work = copy.deepcopy(model)
    layers: dict[str, nn.Module] = {}
    for name, layer in work.named_modules():
        if type(layer) not in (nn.Conv2d, nn.Linear) or name in excluded:
            continue
        if include is not None and not include(name, layer):
            continue
        layers[name] = layer

    inputs, ref_out = _probe(work, example_input, layers) if example_input is not None else ({}, None)

    names = list(layers)
    candidates = {
        name: (
            list(dict.fromkeys(effective_method(m, layers[name]) for m in METHODS))
            if method == "auto"
            else [effective_method(method, layers[name])]
        )
        for name in names
    }
    svds, spectra = {}, {}
    for name in tqdm(names, desc="decomposing", disable=not progress):
        layer = layers[name]
        shape = tuple(inputs[name].shape) if name in inputs else None
        svds[name] = _svd64(_layer_matrices(layer))
        for m in candidates[name]:
            # Only the single-method budget's dynamic program reads the energies ("auto" splits the budget
            # by tai's spectrum); for CP they are ALS fits at many ranks, minutes on a 512-channel layer.
            need = rule == "mac_budget" and (method != "auto" or m == "tai")
            spectra[name, m] = method_spectrum(
                m, name, layer, shape, svds[name] if m == "tai" else None, need_energies=need
            )

    def pick(name: str, m: str, budget_share: float | None) -> int | None:
        sp = spectra[name, m]
        if budget_share is not None:  # auto with mac_budget: this layer's share of the budget
            k = sp.largest_rank_within(budget_share) // sp.groups * sp.groups
            k = min(k, sp.full_rank)
            return k if k >= sp.groups and sp.worthwhile(k) else None
        if rule == "rank":
            return rank_for_explicit(sp, rank)
        if rule == "energy":
            return cp_rank_for_energy(sp, energy) if m == "cp" else rank_for_energy(sp, energy)
        return rank_for_reduction(sp, reduction)

    chosen: dict[tuple[str, str], int | None] = {}
    if rule == "mac_budget":
        if method == "auto":
            tai_ranks = ranks_for_budget([spectra[n, "tai"] for n in names], mac_budget)
            for n, k in zip(names, tai_ranks):
                share = None if k is None else spectra[n, "tai"].lowrank_macs(k)
                for m in candidates[n]:
                    chosen[n, m] = k if m == "tai" else (None if share is None else pick(n, m, share))
        else:
            # One budget over all layers: the DP runs on every layer's spectrum at once.
            all_ranks = ranks_for_budget([spectra[n, candidates[n][0]] for n in names], mac_budget)
            for n, k in zip(names, all_ranks):
                chosen[n, candidates[n][0]] = k
    else:
        for n in names:
            for m in candidates[n]:
                chosen[n, m] = pick(n, m, None)

    reports, replacements = [], {}
    for name in tqdm(names, desc="replacing", disable=not progress):
        layer = layers[name]
        shape = tuple(inputs[name].shape) if name in inputs else None
        per_sample = None if shape is None else (1, *shape[1:])
        dense_macs = None if shape is None else macs(layer, per_sample)
        built = []  # (method, k, new layer, probe error, speedup)
        for m in candidates[name]:
            k = chosen[name, m]
            if k is None:
                continue
            new = build_layer(m, layer, k, svds[name] if m == "tai" else None)
            new.train(layer.training)
            err = speed = None
            if name in inputs:
                with torch.no_grad():
                    err = _rel_error(new(inputs[name]), layer(inputs[name]))
                if timing:
                    speed = measure_speedup(layer, new, inputs[name], rounds=speed_rounds)
            built.append((m, k, new, err, speed))
        svds.pop(name)  # U and V of big layers are large
        if method == "auto" and built:
            if rule == "energy":
                ok = built
            else:
                limit = max_rel_error
                if limit is None:
                    tai = [b for b in built if b[0] == "tai"]
                    limit = tai[0][3] if tai else None
                ok = [b for b in built if limit is None or b[3] <= limit * (1 + 1e-9)]
                ok = ok or [b for b in built if b[0] == "tai"]
            built = [max(ok, key=lambda b: -1.0 if b[4] is None else b[4])] if ok else []
        sp_tai = spectra.get((name, candidates[name][0]))
        if built:
            m, k, new, err, speed = built[0]
            sp = spectra[name, m]
            decision = "low rank"
        else:
            m, k, new, err, speed = candidates[name][0], None, None, None, None
            sp = sp_tai
            decision = "dense: low rank would not cut MACs"
        if new is not None and name not in inputs and min_speedup is not None:
            decision, new, err = "dense: the probe input does not reach it, so it cannot be timed", None, None
        elif new is not None and min_speedup is not None and speed is not None and speed < min_speedup:
            decision = f"dense: measured speedup {speed:.2f} < {min_speedup}"
            new, err = None, None
        if new is not None:
            replacements[id(layer)] = new
            kept = sp.kept_energy(k) if m == "tai" else kept_energy_of(layer, new)
        else:
            kept = 1.0
        reports.append(
            LayerReport(
                name=name,
                kind=type(layer).__name__,
                shape=_describe(layer),
                full_rank=sp.full_rank,
                rank=None if new is None else k,
                decision=decision,
                params_before=params(layer),
                params_after=params(layer if new is None else new),
                macs_before=dense_macs,
                macs_after=None if shape is None else (dense_macs if new is None else macs(new, per_sample)),
                energy=kept,
                rel_error=err,
                speedup=speed,
                method=m if new is not None else "dense",
            )
        )
    _replace(work, replacements)

    model_err = None
    if example_input is not None and isinstance(ref_out, torch.Tensor):
        _, out = _probe(work, example_input, {})
        model_err = _rel_error(out, ref_out)
    settings = {
        "rule": rule,
        "value": {"rank": rank, "energy": energy, "reduction": reduction, "mac_budget": mac_budget}[rule],
        "probe_shape": None if example_input is None else _shape_of(example_input),
        "min_speedup": min_speedup,
        "measured_speed": timing,
        "method": method,
        "threads": torch.get_num_threads(),
    }
    return work, CompressionReport(reports, settings, model_err)


def _shape_of(example_input: Any) -> Any:
    if isinstance(example_input, torch.Tensor):
        return list(example_input.shape)
    if isinstance(example_input, tuple):
        return [_shape_of(x) for x in example_input]
    return type(example_input).__name__
