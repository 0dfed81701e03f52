"""Accuracy and speed of low-rank compression on a real data set, end to end.

    python -m lowrank_kernels.demos.digits [--epochs 6] [--energies 0.99,0.95,0.9,0.8,0.6]

Trains a small CNN on scikit-learn's handwritten digits (1797 8x8 images shipped inside
scikit-learn, no download; upsampled to --size pixels so the convolutions have spatial extent),
compresses it with `lowrank_kernels.compress` at several energies, optionally fine-tunes each
compressed model a few epochs, and reports test accuracy, parameters, MACs and inference time
(all models timed interleaved in one run, so the speedups are ratios on equal footing).
With --ist-lambda it also trains a second model with singular-value soft-thresholding
(a proximal nuclear-norm step after each optimizer step) and compresses that one, to show how
the regularizer lowers the ranks needed."""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..benchmark.harness import format_table, save_json, time_interleaved
from ..compress import compress
from ..rank_selection import soft_threshold_singular_values_


def load_digits_tensors(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a stratified 80/20 split, images scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the digits demo needs scikit-learn: pip install 'lowrank_kernels[examples]'") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_cnn(width: int = 32) -> nn.Sequential:
    """Four 3x3 conv blocks (width, 2w, 4w, 4w channels) and a two-layer classifier."""

    def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return layers + [nn.MaxPool2d(2)] if pool else layers

    w = width
    return nn.Sequential(
        *block(1, w, False),
        *block(w, 2 * w, True),
        *block(2 * w, 4 * w, True),
        *block(4 * w, 4 * w, False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, 2 * w),
        nn.ReLU(),
        nn.Linear(2 * w, 10),
    )


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    ist_lambda: float = 0.0,
    seed: int = 0,
    desc: str = "training",
    progress: bool = True,
) -> None:
    """Adam with cosine decay; with ist_lambda > 0, a singular-value soft-threshold step of
    lr * ist_lambda after every optimizer step (proximal gradient for a nuclear-norm penalty)."""
    if epochs <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if ist_lambda > 0:
                    soft_threshold_singular_values_(model, sched.get_last_lr()[0] * ist_lambda)
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def build_models(
    *,
    energies: Sequence[float] = (0.99, 0.95, 0.9, 0.8, 0.6),
    epochs: int = 6,
    finetune_epochs: int = 1,
    size: int = 16,
    width: int = 32,
    ist_lambda: float = 0.0,
    ist_energies: Sequence[float] = (0.9,),
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict[str, nn.Module], dict]:
    """Train, compress at each energy and fine-tune: (table rows, models by row name, details)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(size, seed)
    probe = x_test[:64]  # compress's probe: per-layer output errors and MACs

    trained: dict[str, nn.Module] = {}
    start = time.perf_counter()
    base = make_cnn(width)
    train(base, x_train, y_train, epochs=epochs, lr=3e-3, seed=seed, desc="training dense", progress=progress)
    trained["dense"] = base
    train_s = time.perf_counter() - start
    if ist_lambda > 0:
        torch.manual_seed(seed)
        ist = make_cnn(width)
        train(
            ist,
            x_train,
            y_train,
            epochs=epochs,
            lr=3e-3,
            ist_lambda=ist_lambda,
            seed=seed,
            desc="training IST",
            progress=progress,
        )
        trained["ist"] = ist

    rows, models, details = [], {}, {"layers": {}}

    def add(name: str, source: str, model: nn.Module, energy: float | None, report=None, acc_ft=None) -> None:
        models[name] = model
        total = report.totals() if report is not None else None
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "model": name,
                "trained": source,
                "energy": energy,
                "replaced": "-" if total is None else f"{total['replaced']}/{total['layers']}",
                "params": n_params,
                "conv_fc_MACs": "1.00x" if total is None else f"{total['macs_after'] / total['macs_before']:.2f}x",
                "acc": accuracy(model, x_test, y_test),
                "acc_ft": acc_ft,
            }
        )
        if report is not None:
            details["layers"][name] = report.to_dict()

    add("dense", "plain", base, None)
    if "ist" in trained:
        add("dense-IST", f"IST lambda={ist_lambda}", trained["ist"], None)
    settings = [("plain", "dense", e) for e in energies]
    settings += [(f"IST lambda={ist_lambda}", "ist", e) for e in ist_energies if "ist" in trained]
    for source, key, energy in tqdm(settings, desc="compressing", disable=not progress):
        compressed, report = compress(trained[key], energy=energy, example_input=probe, progress=False)
        tuned = copy.deepcopy(compressed)
        train(
            tuned,
            x_train,
            y_train,
            epochs=finetune_epochs,
            lr=3e-4,
            seed=seed + 1,
            desc="fine-tuning",
            progress=progress,
        )
        name = f"{'IST ' if key == 'ist' else ''}e={energy}"
        add(name, source, compressed, energy, report, accuracy(tuned, x_test, y_test) if finetune_epochs > 0 else None)

    details.update(
        {
            "train_seconds_dense": train_s,
            "args": {
                "energies": list(energies),
                "epochs": epochs,
                "finetune_epochs": finetune_epochs,
                "size": size,
                "width": width,
                "ist_lambda": ist_lambda,
                "seed": seed,
            },
        }
    )
    return rows, models, details


def time_models(rows: list[dict], models: dict[str, nn.Module], batch: torch.Tensor, rounds: int) -> dict:
    """Time every model's forward on `batch` in one interleaved run; fills ms/speedup in `rows`."""

    def forward(model: nn.Module):
        def call():
            with torch.inference_mode():
                model(batch)

        return call

    for m in models.values():
        m.eval()
    timings = time_interleaved({n: forward(m) for n, m in models.items()}, rounds=rounds, min_round_s=0.05)
    for r in rows:
        t = timings[r["model"]]
        r["ms"] = t.median_ms
        r["speedup"] = timings["dense"].median_ms / t.median_ms
    return timings


COLUMNS = ["model", "trained", "replaced", "params", "conv_fc_MACs", "acc", "acc_ft", "ms", "speedup"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowrank_kernels.demos.digits", description=__doc__.splitlines()[0])
    p.add_argument("--energies", default="0.99,0.95,0.9,0.8,0.6", help="comma-separated energies to compress at")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the dense model")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs per compressed model (0: none)")
    p.add_argument("--size", type=int, default=16, help="image side after upsampling the 8x8 digits")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    p.add_argument("--ist-lambda", type=float, default=0.0, help="also train with singular-value soft-thresholding")
    p.add_argument("--ist-energies", default="0.9", help="energies to compress the IST-trained model at")
    p.add_argument("--timing-batch", type=int, default=64, help="batch of test images for timing")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: no timing)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache",
        type=Path,
        help="file holding the trained/compressed models: loaded if it exists (only timing runs), else written",
    )
    p.add_argument("--json", type=Path, help="save rows and per-layer reports as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache is not None and args.cache.exists():
        # Our own file, written below; it holds modules, hence weights_only=False.
        rows, models, details = torch.load(args.cache, weights_only=False)
        print(f"loaded trained models from {args.cache} (args: {details['args']})")
    else:
        rows, models, details = build_models(
            energies=[float(e) for e in args.energies.split(",") if e],
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            size=args.size,
            width=args.width,
            ist_lambda=args.ist_lambda,
            ist_energies=[float(e) for e in args.ist_energies.split(",") if e],
            seed=args.seed,
            progress=not args.no_progress,
        )
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((rows, models, details), args.cache)
    if args.rounds > 0:
        _, _, x_test, _ = load_digits_tensors(details["args"]["size"], details["args"]["seed"])
        details["timings"] = time_models(rows, models, x_test[: args.timing_batch], args.rounds)
        details.update({"timing_batch": args.timing_batch, "rounds": args.rounds, "threads": torch.get_num_threads()})
    print(format_table(rows, COLUMNS, floatfmt=".4f"))
    if args.json:
        print(f"saved {save_json(args.json, {'rows': rows, **details})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
