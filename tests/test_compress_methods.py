"""compress(method=...): every rank rule with every decomposition, "auto", the report's per-layer method,
and `lowrank compress --method`."""

import warnings

import pytest
import torch
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.cli import main as cli_main
from lowrank_kernels.rank_selection import macs

pytest.importorskip("tensorly")
torch.manual_seed(0)

X = torch.randn(2, 3, 16, 16)
CLASSES = {
    "tai": lk.SepConv2d,
    "separable_basis": lk.SeparableBasisConv2d,
    "cp": lk.CPConv2d,
    "tucker2": lk.Tucker2Conv2d,
}
RULES = [dict(rank=8), dict(energy=0.9), dict(reduction=2.0), dict(mac_budget=0.5)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, (3, 5), padding=(1, 2), groups=2),
            nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(24, 24, 1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 8 * 8, 10))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def net():
    return Net().eval()


def _run(net, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CP-ALS convergence on random weights
        return lk.compress(net, example_input=X, progress=False, **kw)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: next(iter(r)))
@pytest.mark.parametrize("method", ["separable_basis", "cp", "tucker2"])
def test_every_rule_with_every_method(net, method, rule):
    compressed, report = _run(net, method=method, **rule)
    modules, originals = dict(compressed.named_modules()), dict(net.named_modules())
    inputs = {}
    hooks = [
        originals[r.name].register_forward_pre_hook(lambda _m, a, n=r.name: inputs.setdefault(n, a[0]))
        for r in report.layers
    ]
    with torch.no_grad():
        net(X)
    for h in hooks:
        h.remove()
    for r in report.layers:
        new, old = modules[r.name], originals[r.name]
        if r.rank is None:
            assert r.method == "dense" and type(new) is type(old)
            continue
        single = isinstance(old, nn.Linear) or old.kernel_size == (1, 1)
        assert r.method == ("tai" if single else method)
        assert isinstance(new, lk.LowRankLinear if isinstance(old, nn.Linear) else CLASSES[r.method])
        assert r.macs_after == macs(new, (1, *inputs[r.name].shape[1:])) < r.macs_before
        with torch.no_grad():
            ref = old(inputs[r.name])
            want = ((new(inputs[r.name]) - ref).norm() / ref.norm()).item()
        assert r.rel_error == pytest.approx(want, rel=1e-3)
        if not single:
            w = old.weight.detach().double()
            kept = 1 - ((new.dense_weight().detach().double() - w) ** 2).sum() / (w**2).sum()
            assert r.energy == pytest.approx(kept.item(), rel=1e-6, abs=1e-9)
            if "energy" in rule:
                assert r.energy >= rule["energy"] - 1e-6
        if "reduction" in rule:
            assert r.macs_after <= r.macs_before / rule["reduction"]
    totals = report.totals()
    if "mac_budget" in rule:
        assert totals["macs_after"] <= rule["mac_budget"] * totals["macs_before"]
    assert totals["replaced"] > 0
    assert report.settings["method"] == method
    if any(r.method == method for r in report.layers):
        assert method in str(report)


def test_auto_picks_a_method_per_layer_within_the_accuracy_proxy(net):
    _, tai = _run(net, rank=8)
    _, auto = _run(net, rank=8, method="auto", speed_rounds=3)
    tai_err = {r.name: r.rel_error for r in tai.layers}
    for r in auto.layers:
        assert r.method in ("tai", "separable_basis", "cp", "tucker2", "dense")
        if r.rank is not None:
            assert r.speedup is not None and r.speedup > 0
        if r.rank is not None and tai_err[r.name] is not None:  # else "tai" kept it dense: no reference
            assert r.rel_error <= tai_err[r.name] * (1 + 1e-9) + 1e-12
    _, loose = _run(net, reduction=2.0, method="auto", max_rel_error=10.0, speed_rounds=3)
    assert all(r.speedup is not None for r in loose.layers if r.rank is not None)
    _, energy = _run(net, energy=0.9, method="auto", speed_rounds=3)
    for r in energy.layers:
        if r.rank is not None and r.kind == "Conv2d" and "1x1" not in r.shape:
            assert r.energy >= 0.9 - 1e-6


def test_method_bad_arguments(net):
    with pytest.raises(ValueError, match="method must be one of"):
        lk.compress(net, rank=4, method="svd", progress=False)
    with pytest.raises(ValueError, match="method='auto' needs example_input"):
        lk.compress(net, rank=4, method="auto", progress=False)
    with pytest.raises(ValueError, match="max_rel_error must be"):
        lk.compress(net, rank=4, method="auto", example_input=X, max_rel_error=-1.0, progress=False)


def test_cli_method(net, tmp_path, capsys):
    src, out = tmp_path / "m.pt", tmp_path / "c.pt"
    torch.save(net, src)
    argv = ["compress", str(src), "-o", str(out), "--rank", "8", "--input-shape", "2,3,16,16", "--no-progress"]
    assert cli_main(argv + ["--method", "tucker2"]) == 0
    assert "tucker2" in capsys.readouterr().out
    compressed = torch.load(out, weights_only=False)
    assert isinstance(compressed.features[2], lk.Tucker2Conv2d)


def test_auto_with_a_mac_budget_fits_cp_only_at_the_chosen_ranks(net, monkeypatch):
    """With method="auto" a MAC budget is split by tai's spectrum, so CP-ALS must not run at every power-of-two rank
    (minutes per layer on big networks); a single-method CP budget still needs those fits."""
    import lowrank_kernels.methods as methods

    calls = []
    original = methods._cp_pseudo_spectrum
    monkeypatch.setattr(methods, "_cp_pseudo_spectrum", lambda *a: calls.append(a) or original(*a))
    _, report = _run(net, mac_budget=0.5, method="auto", speed_rounds=1)
    assert calls == [] and any(r.rank is not None for r in report.layers)
    _run(net, mac_budget=0.5, method="cp")
    assert calls


def test_cp_als_default_tolerance_stops_early():
    """The default tolerance ends ALS before n_iter_max (converged); ALS never raises the error, so a
    tighter run from the same start ends at most at the default run's error."""
    w = torch.randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, err, converged = lk.schemes.cp_als(w, 20)
    _, tight, _ = lk.schemes.cp_als(w, 20, tol=1e-9, n_iter_max=3000)
    assert converged and 0 < err < 1
    assert tight <= err * (1 + 1e-9)
