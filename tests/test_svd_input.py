"""SVDInput and its two-branch network, trained on scikit-learn's digits (8x8 images)."""

import pytest
import torch
from torch import nn

import lowrank_kernels as lk
from lowrank_kernels.svd_input import SVDInputNet


def test_factors_reconstruct_the_images():
    torch.manual_seed(0)
    images = torch.randn(5, 3, 9, 7)
    U, S, V = lk.SVDInput(rank=7)(images)
    assert U.shape == (5, 3, 9, 7) and S.shape == (5, 3, 7) and V.shape == (5, 3, 7, 7)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, images, rtol=1e-5, atol=1e-5)
    # rank r: the best rank-r approximation (Eckart-Young), same error as LAPACK's truncation
    U, S, V = lk.SVDInput(rank=2)(images)
    ref = torch.linalg.svdvals(images.double())
    err = ((U * S.unsqueeze(-2)) @ V.mT - images).double().flatten(-2).norm(dim=-1)
    torch.testing.assert_close(err, ref[..., 2:].norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_cache_by_sample_index():
    torch.manual_seed(1)
    data = torch.randn(10, 1, 8, 8)
    svd_input = lk.SVDInput(rank=3, cache=True)
    first = svd_input(data[[2, 5, 7]], index=torch.tensor([2, 5, 7]))
    assert (svd_input.hits, svd_input.misses) == (0, 3)
    second = svd_input(data[[7, 1, 2]], index=[7, 1, 2])
    assert (svd_input.hits, svd_input.misses) == (2, 4)
    fresh = lk.SVDInput(rank=3)(data[[7, 1, 2]])
    for a, b in zip(second, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(second[0][0], first[0][2], rtol=0, atol=0)  # sample 7 both times
    svd_input.clear_cache()
    svd_input(data[[7]], index=[7])
    assert (svd_input.hits, svd_input.misses) == (0, 1)


def test_without_index_stays_differentiable():
    images = torch.randn(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    U, S, V = lk.SVDInput(rank=3, cache=True)(images)
    S.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


@pytest.mark.parametrize(
    "kwargs,images,match",
    [
        ({"rank": 0}, torch.zeros(1, 1, 4, 4), "rank must be a positive int"),
        ({"rank": 5}, torch.zeros(1, 1, 4, 6), "exceeds min"),
        ({"rank": 2}, torch.zeros(4, 4), "must be 4-D"),
    ],
)
def test_bad_input(kwargs, images, match):
    with pytest.raises(ValueError, match=match):
        lk.SVDInput(**kwargs)(images)


def test_index_length_mismatch():
    with pytest.raises(ValueError, match="index has 1 entries"):
        lk.SVDInput(2, cache=True)(torch.zeros(2, 1, 4, 4), index=[0])


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()  # 1797 real 8x8 handwritten digits, shipped with scikit-learn
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


class _PlainCNN(nn.Module):
    """Baseline of similar size: two 3x3 convs on the image, then the same kind of head."""

    def __init__(self, channels: int = 8, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(channels * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.head(self.features(x))


def _train(model, forward, train, test, epochs=15, batch=64):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x[idx], idx), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        xt, yt = test
        return (forward(xt, None).argmax(1) == yt).float().mean().item()


@pytest.fixture
def one_thread():
    # Tiny networks: one thread avoids synchronization overhead on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_branch_network_learns_digits(one_thread):
    train, test = _digits()
    rank = 4
    torch.manual_seed(0)
    svd_input = lk.SVDInput(rank, cache=True)
    net = SVDInputNet(1, 8, 8, rank, 10, channels=8, hidden=16)
    # Training batches are keyed by sample index: each image is decomposed once, then cached.
    acc_svd = _train(net, lambda xb, idx: net(*svd_input(xb, idx)), train, test)
    assert svd_input.misses == len(train[1]) and svd_input.hits == 14 * len(train[1])
    torch.manual_seed(0)
    cnn = _PlainCNN(channels=8)
    acc_cnn = _train(cnn, lambda xb, idx: cnn(xb), train, test)
    n_svd = sum(p.numel() for p in net.parameters())
    n_cnn = sum(p.numel() for p in cnn.parameters())
    print(
        f"\ndigits test accuracy: SVD-input two-branch (rank {rank}, {n_svd} params) {acc_svd:.3f}; "
        f"plain CNN ({n_cnn} params) {acc_cnn:.3f}"
    )
    assert 0.5 * n_cnn < n_svd < 2 * n_cnn  # "similar size"
    assert acc_svd >= 0.8
    assert acc_cnn >= 0.9
