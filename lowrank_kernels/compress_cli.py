"""`lowrank compress MODEL -o OUT`: decompose a saved model's Conv2d/Linear layers into low-rank layers.

Accepted inputs:
  * a module saved with `torch.save(model, path)`. Loading it unpickles arbitrary Python
    objects (`weights_only=False`), so only load files you trust; the model's classes must be
    importable (use --import to import the module defining them).
  * an exported program saved with `torch.export.save` (.pt2): its aten.conv2d / aten.linear
    calls on constant weights are turned back into layers, compressed, and the result is
    re-exported and saved as a .pt2 (load it after `import lowrank_kernels`). Its saved example
    inputs serve as the probe unless --input-shape is given.
TorchScript archives cannot be rewritten (their code is compiled); save the nn.Module instead."""

from __future__ import annotations

import argparse
import importlib
import operator
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from .compress import compress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="torch.save'd nn.Module, or a torch.export .pt2 archive")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to save the compressed model")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=int, help="the same total rank for every layer")
    rule.add_argument("--energy", type=float, help="fraction (0, 1] of squared singular values to keep per layer")
    rule.add_argument("--reduction", type=float, help="per-layer MAC reduction target (> 1)")
    rule.add_argument("--mac-budget", type=float, help="fraction (0, 1] of the layers' dense MACs for the whole model")
    parser.add_argument(
        "--input-shape",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="probe input shape, e.g. 1,3,224,224 (random normal input): MACs, output errors, timings",
    )
    parser.add_argument(
        "--method",
        choices=("tai", "separable_basis", "cp", "tucker2", "auto"),
        default="tai",
        help="decomposition of the convs (auto: per layer the fastest meeting the accuracy proxy; needs --input-shape)",
    )
    parser.add_argument(
        "--max-rel-error", type=float, help="with --method auto: largest probe output error a layer's method may have"
    )
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME", help="layer names to leave dense")
    parser.add_argument("--measure-speed", action="store_true", help="time every replaced layer against the dense one")
    parser.add_argument(
        "--min-speedup", type=float, help="leave a layer dense unless its measured speedup reaches this (e.g. 1.0)"
    )
    parser.add_argument("--report-json", type=Path, help="also save the report as JSON here")
    parser.add_argument(
        "--import", dest="imports", nargs="*", default=[], metavar="MODULE", help="modules to import before loading"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/__torch__/" in n for n in z.namelist())


def _is_exported_program(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/archive_format") for n in z.namelist()) and any(
            n.endswith("models/model.json") or "/models/" in n for n in z.namelist()
        )


def _layers_from_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace aten.conv2d/aten.linear calls on get_attr weights by nn.Conv2d/nn.Linear call_module
    nodes sharing those parameters, so that `compress` sees ordinary layers."""

    def attr(node):
        return None if node is None else operator.attrgetter(node.target)(gm)

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (
            torch.ops.aten.conv2d.default,
            torch.ops.aten.linear.default,
        ):
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        x, w_node, b_node = args[0], args[1], node.kwargs.get("bias", args[2])
        if w_node.op != "get_attr" or (b_node is not None and b_node.op != "get_attr"):
            continue
        weight, bias = attr(w_node), attr(b_node)
        if node.target == torch.ops.aten.conv2d.default:
            stride, padding, dilation = (
                tuple(v) if v is not None else d for v, d in zip(args[3:6], ((1, 1), (0, 0), (1, 1)))
            )
            groups = args[6] if args[6] is not None else 1
            n, cg, dv, dh = weight.shape
            layer = nn.Conv2d(cg * groups, n, (dv, dh), stride, padding, dilation, groups, bias=bias is not None)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        name = f"{w_node.target.rsplit('.', 1)[0].replace('.', '_')}_layer{count}"
        count += 1
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _compress(model: nn.Module, args: argparse.Namespace, example):
    return compress(
        model,
        rank=args.rank,
        energy=args.energy,
        reduction=args.reduction,
        mac_budget=args.mac_budget,
        example_input=example,
        exclude=args.exclude,
        measure_speed=args.measure_speed,
        min_speedup=args.min_speedup,
        progress=not args.no_progress,
        method=args.method,
        max_rel_error=args.max_rel_error,
    )


def run(args: argparse.Namespace) -> int:
    for module in args.imports:
        importlib.import_module(module)
    sys.path.insert(0, str(Path.cwd()))  # so classes defined in the user's scripts unpickle
    if args.threads:
        torch.set_num_threads(args.threads)
    path: Path = args.model
    if not path.exists():
        raise SystemExit(f"lowrank compress: {path} does not exist")
    example = None if args.input_shape is None else torch.randn(args.input_shape)
    exported = None
    if _is_torchscript(path):
        raise SystemExit(
            f"lowrank compress: {path} is a TorchScript archive; its layers are compiled code and cannot be "
            "replaced. Save the nn.Module with torch.save(model, path) (or torch.export.save) instead."
        )
    if _is_exported_program(path):
        exported = torch.export.load(path)
        model = _layers_from_graph(exported.module())
        if example is None and exported.example_inputs is not None:
            example = tuple(exported.example_inputs[0])
    else:
        print(
            f"note: loading {path} with torch.load(weights_only=False): this runs pickled code, load only trusted files"
        )
        model = torch.load(path, weights_only=False, map_location="cpu")
    if not isinstance(model, nn.Module):
        raise SystemExit(
            f"lowrank compress: {path} holds a {type(model).__name__}, not an nn.Module "
            "(a state_dict has no architecture: save the module itself with torch.save(model, path))"
        )
    try:
        compressed, report = _compress(model, args, example)
    except ValueError as e:  # bad rule values etc.: a message, not a traceback
        raise SystemExit(f"lowrank compress: {e}") from e
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if exported is not None:
        inputs = example if isinstance(example, tuple) else (example,)
        torch.export.save(torch.export.export(compressed, inputs), args.output)
    else:
        torch.save(compressed, args.output)
    print(f"saved {args.output}")
    if args.report_json:
        print(f"saved {report.save_json(args.report_json)}")
    return 0
