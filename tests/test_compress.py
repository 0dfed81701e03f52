"""compress(): the input model stays untouched, the report is right, compiled/exported models work,
and the `lowrank compress` command line round-trips saved models."""

import json

import pytest
import torch
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.cli import main as cli_main
from lowrank_kernels.layers import _tai_matrices
from lowrank_kernels.rank_selection import macs

torch.manual_seed(0)


def set_rank(layer: nn.Module, rank: int) -> None:
    """Give a Conv2d/Linear weight an exact (per-group) rank, so low rank can be lossless."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            u, s, vh = torch.linalg.svd(layer.weight)
            layer.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])
            return
        g, (dv, dh), n = layer.groups, layer.kernel_size, layer.out_channels
        u, s, vh = torch.linalg.svd(_tai_matrices(layer.weight, g), full_matrices=False)
        m = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
        w = m.reshape(g, layer.in_channels // g, dv, dh, n // g).permute(0, 4, 1, 2, 3).reshape(layer.weight.shape)
        layer.weight.copy_(w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, (3, 5), padding=(1, 2), groups=2),
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1, dilation=1, padding_mode="reflect"),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def net():
    model = Net()
    set_rank(model.features[3], 3)
    set_rank(model.features[5], 6)
    set_rank(model.head[1], 5)
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.1, 0.1)
    return model


X = torch.randn(2, 3, 16, 16)


def test_original_model_unchanged(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    types = [type(m) for m in net.modules()]
    net.train()
    compressed, _ = lk.compress(net, energy=0.99, example_input=X, progress=False)
    assert net.training  # probe ran in eval mode, modes restored
    assert [type(m) for m in net.modules()] == types
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert compressed is not net
    assert compressed.training  # the copy keeps the original's mode
    assert isinstance(compressed.features[3], lk.SepConv2d)


def test_lossless_where_the_weights_are_low_rank(net):
    compressed, report = lk.compress(net, energy=1.0, example_input=X, progress=False)
    by_name = {r.name: r for r in report.layers}
    assert by_name["features.3"].rank == 6  # 3 per group, 2 groups
    assert by_name["features.5"].rank == 6
    assert by_name["head.1"].rank == 5
    assert by_name["features.0"].rank is None  # full rank 27 is not cheaper than the dense layer
    assert "would not cut MACs" in by_name["features.0"].decision
    net.eval(), compressed.eval()
    with torch.no_grad():
        torch.testing.assert_close(compressed(X), net(X), rtol=1e-4, atol=1e-4)
    assert report.model_rel_error < 1e-5


def test_report_contents(net, tmp_path):
    compressed, report = lk.compress(net, rank=4, example_input=X, progress=False)
    modules = dict(compressed.named_modules())
    originals = dict(net.named_modules())
    inputs = {}

    def record(name):
        def hook(_module, args):
            inputs.setdefault(name, args[0])

        return hook

    hooks = [originals[r.name].register_forward_pre_hook(record(r.name)) for r in report.layers]
    net.eval()
    with torch.no_grad():
        net(X)
    for h in hooks:
        h.remove()
    assert [r.name for r in report.layers] == ["features.0", "features.3", "features.5", "head.1", "head.3"]
    for r in report.layers:
        new, old = modules[r.name], originals[r.name]
        assert r.params_before == sum(p.numel() for p in old.parameters())
        assert r.params_after == sum(p.numel() for p in new.parameters())
        assert r.macs_before == macs(old, (1, *inputs[r.name].shape[1:]))
        assert r.macs_after == macs(new, (1, *inputs[r.name].shape[1:]))
        if r.rank is None:
            assert new is not old and type(new) is type(old) and r.energy == 1.0
            continue
        assert new.rank == r.rank
        with torch.no_grad():
            ref = old(inputs[r.name])
            want = ((new(inputs[r.name]) - ref).norm() / ref.norm()).item()
        assert r.rel_error == pytest.approx(want, rel=1e-3)
        w = old.weight.detach().double()
        s = torch.linalg.svdvals(_tai_matrices(w, old.groups) if isinstance(old, nn.Conv2d) else w[None])
        kept = (s[:, : r.rank // s.shape[0]] ** 2).sum() / (s**2).sum()
        assert r.energy == pytest.approx(kept.item(), rel=1e-9)
    assert report.layers[1].rank == 4  # groups=2: 2 per group
    table = str(report)
    for r in report.layers:
        assert r.name in table
    assert "TOTAL" in table
    path = report.save_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["settings"]["rule"] == "rank" and data["settings"]["value"] == 4
    assert len(data["layers"]) == 5 and data["layers"][1]["rank"] == 4
    assert data["totals"]["params_after"] == sum(r.params_after for r in report.layers)
    assert "machine" in data


def test_rules_budget_and_reduction(net):
    _, report = lk.compress(net, mac_budget=0.5, example_input=X, progress=False)
    t = report.totals()
    assert t["macs_after"] <= 0.5 * t["macs_before"]
    _, report = lk.compress(net, reduction=2.0, example_input=X, progress=False)
    for r in report.layers:
        if r.rank is not None:
            assert r.macs_after <= r.macs_before / 2
    _, report = lk.compress(net, energy=0.9, progress=False)  # no probe: costs per output position
    assert all(r.macs_before is None and r.rel_error is None for r in report.layers)


def test_include_exclude_and_shared_layers():
    shared = nn.Linear(16, 16)
    set_rank(shared, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 16))
    set_rank(model[3], 2)
    compressed, report = lk.compress(model, rank=2, exclude=["3"], progress=False)
    assert [r.name for r in report.layers] == ["0"]
    assert compressed[0] is compressed[2] and isinstance(compressed[0], lk.LowRankLinear)
    assert type(compressed[3]) is nn.Linear
    _, report = lk.compress(model, rank=2, include=lambda name, m: name == "3", progress=False)
    assert [r.name for r in report.layers] == ["3"]


def test_min_speedup_keeps_slow_layers_dense(net):
    compressed, report = lk.compress(net, rank=4, example_input=X, min_speedup=1e9, speed_rounds=1, progress=False)
    for r in report.layers:
        assert r.rank is None
        if "measured speedup" in r.decision:
            assert r.speedup is not None and r.speedup > 0
    assert not any(isinstance(m, (lk.SepConv2d, lk.LowRankLinear)) for m in compressed.modules())
    _, report = lk.compress(net, rank=4, example_input=X, measure_speed=True, speed_rounds=1, progress=False)
    assert all((r.speedup is not None) == (r.rank is not None) for r in report.layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(rank=2, energy=0.5), "exactly one"),
        (dict(rank=0), "rank"),
        (dict(rank=-1), "rank"),
        (dict(energy=0.0), "energy"),
        (dict(energy=1.01), "energy"),
        (dict(reduction=0.5), "reduction"),
        (dict(mac_budget=2.0), "mac_budget"),
        (dict(energy=0.5, measure_speed=True), "example_input"),
        (dict(energy=0.5, min_speedup=-1.0), "min_speedup"),
    ],
)
def test_bad_arguments(net, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lk.compress(net, progress=False, **kwargs)


def test_compile_and_export(net):
    compressed, _ = lk.compress(net, energy=0.95, example_input=X, progress=False)
    compressed.eval()
    with torch.no_grad():
        want = compressed(X)
        compiled = torch.compile(compressed, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(X), want)
        ep = torch.export.export(compressed, (X,))
        targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
        assert torch.ops.lowrank.sep_conv.default in targets
        torch.testing.assert_close(ep.module()(X), want)


def test_compile_inductor_training_step():
    layer = lk.SepConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), rank=2)
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).sum().backward()
    for got, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(got, p.grad)


def test_cli_round_trip(net, tmp_path, capsys):
    src, out, rep = tmp_path / "m.pt", tmp_path / "c.pt", tmp_path / "r.json"
    torch.save(net, src)
    argv = ["compress", str(src), "-o", str(out), "--energy", "1.0", "--input-shape", "2,3,16,16"]
    assert cli_main(argv + ["--report-json", str(rep), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "features.3" in printed and "weights_only=False" in printed
    compressed = torch.load(out, weights_only=False)
    net.eval(), compressed.eval()
    with torch.no_grad():
        torch.testing.assert_close(compressed(X), net(X), rtol=1e-4, atol=1e-4)
    assert json.loads(rep.read_text())["settings"]["rule"] == "energy"


def test_cli_exported_program_and_torchscript(net, tmp_path):
    net.eval()
    ep_path, out = tmp_path / "m.pt2", tmp_path / "c.pt2"
    torch.export.save(torch.export.export(net, (X,)), ep_path)
    assert cli_main(["compress", str(ep_path), "-o", str(out), "--energy", "1.0", "--no-progress"]) == 0
    loaded = torch.export.load(out)
    targets = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.lowrank.sep_conv.default) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(X), net(X), rtol=1e-4, atol=1e-4)
    ts = tmp_path / "m.ts"
    torch.jit.script(nn.Sequential(nn.Linear(3, 3))).save(ts)
    with pytest.raises(SystemExit, match="TorchScript"):
        cli_main(["compress", str(ts), "-o", str(tmp_path / "x.pt"), "--rank", "1"])
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(SystemExit, match="state_dict"):
        cli_main(["compress", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "x.pt"), "--rank", "1"])


def test_cli_bad_values(net, tmp_path):
    src = tmp_path / "m.pt"
    torch.save(net, src)
    with pytest.raises(SystemExit, match="energy"):
        cli_main(["compress", str(src), "-o", str(tmp_path / "x.pt"), "--energy", "1.5", "--no-progress"])
    with pytest.raises(SystemExit, match="does not exist"):
        cli_main(["compress", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt"), "--rank", "2"])
