"""Per decomposition method: accuracy, MACs and speed of the digits CNN compressed to the same MAC
reduction, before and after one fine-tuning epoch, measured in one run.

    python bench/digits_methods.py [--reduction 2.0] [--threads 2] [--methods tai,cp]

Trains the demo's CNN (lowrank_kernels.demos.digits) once, then for every method of
`compress(method=...)` compresses a copy with `reduction=` (per layer, MACs <= dense / reduction),
reports test accuracy before and after one epoch of fine-tuning, the model's MACs per sample, and
the whole model's forward time on the test set against the dense model (interleaved timing)."""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from lowrank_kernels import compress
from lowrank_kernels.benchmark.harness import format_table
from lowrank_kernels.demos.digits import accuracy, load_digits_tensors, make_cnn, train
from lowrank_kernels.rank_selection import measure_speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduction", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--methods", default="tai,separable_basis,cp,tucker2", help="comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_tensors(16)
    dense = make_cnn()
    train(dense, x_train, y_train, epochs=args.epochs, lr=3e-3, progress=False)
    probe = x_test[:64]
    rows = [{"method": "dense", "accuracy": f"{accuracy(dense, x_test, y_test):.4f}"}]
    for method in args.methods.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model, report = compress(
                dense, reduction=args.reduction, example_input=probe, method=method, progress=False
            )
        totals = report.totals()
        before = accuracy(model, x_test, y_test)
        tuned = copy.deepcopy(model)
        train(tuned, x_train, y_train, epochs=1, lr=1e-3, progress=False)
        speed = measure_speedup(dense.eval(), tuned.eval(), x_test, rounds=7)
        rows.append(
            {
                "method": method,
                "replaced": f"{totals['replaced']}/{totals['layers']}",
                "MMACs": f"{totals['macs_before'] / 1e6:.2f}->{totals['macs_after'] / 1e6:.2f}",
                "accuracy": f"{before:.4f}",
                "after 1 epoch": f"{accuracy(tuned, x_test, y_test):.4f}",
                "speedup": f"{speed:.2f}",
            }
        )
    cols = ["method", "replaced", "MMACs", "accuracy", "after 1 epoch", "speedup"]
    print(format_table(rows, cols, markdown=True))


if __name__ == "__main__":
    main()
