"""Smoke test of the digits accuracy demo (tiny: one epoch, 8x8 images, narrow net)."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from lowrank_kernels.demos import digits  # noqa: E402


def test_data_is_the_real_digits_set():
    x_train, y_train, x_test, y_test = digits.load_digits_tensors(size=8)
    assert len(x_train) + len(x_test) == 1797
    assert x_train.shape[1:] == (1, 8, 8) and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(y_test.tolist()) == set(range(10))


def test_demo_smoke(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        code = digits.main(
            [
                "--epochs=1",
                "--finetune-epochs=1",
                "--size=8",
                "--width=8",
                "--energies=0.95,0.5",
                "--ist-lambda=0.5",
                "--ist-energies=0.9",
                "--rounds=1",
                "--timing-batch=16",
                "--threads=1",
                "--no-progress",
                f"--json={tmp_path / 'd.json'}",
                f"--cache={tmp_path / 'models.pt'}",
            ]
        )
        # Second run: models come from the cache, only the timing runs again.
        assert digits.main([f"--cache={tmp_path / 'models.pt'}", "--rounds=1", "--threads=1", "--timing-batch=8"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out
    assert "loaded trained models" in out
    for name in ("dense", "dense-IST", "e=0.95", "e=0.5", "IST e=0.9"):
        assert name in out
    data = json.loads((tmp_path / "d.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    n_test = len(digits.load_digits_tensors(size=8)[3])
    for name, row in rows.items():  # accuracies count correct predictions on the real test set
        for key in ("acc", "acc_ft"):
            if row[key] is not None:
                assert abs(row[key] * n_test - round(row[key] * n_test)) < 1e-3, (name, key, row[key])
    assert rows["dense"]["acc"] > 0.1  # one epoch already beats chance on ten classes
    assert rows["e=0.95"]["acc_ft"] > rows["e=0.95"]["acc"]  # fine-tuning the compressed model helps
    assert rows["e=0.5"]["params"] < rows["dense"]["params"]
    assert set(data["layers"]) == {"e=0.95", "e=0.5", "IST e=0.9"}
