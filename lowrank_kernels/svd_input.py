"""Feed a CNN the rank-r SVD factors of each input image instead of the image.

`SVDInput(rank)` turns images (B, C, H, W) into (U_r, S_r, V_r) with `batched_svd`; with
`cache=True` and sample indices, each sample's factors are computed once and reused in every
later epoch (which takes the SVD's cost out of every epoch but the first). `SVDInputNet` is a
two-branch network for these inputs: U and V each go through a small conv branch, are flattened,
concatenated with S, and classified by fully connected layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._conv_args import _as_int
from .batched_svd import batched_svd

__all__ = ["SVDInput", "SVDInputNet"]


class SVDInput(nn.Module):
    """Images (B, C, H, W) -> rank-r SVD factors of every channel.

    Returns ``U`` (B, C, H, r), ``S`` (B, C, r) and ``V`` (B, C, W, r) with
    ``image[b, c] ~= U[b, c] @ diag(S[b, c]) @ V[b, c].T`` (exact for r = min(H, W)).

    Args:
        rank: number of singular triplets kept, 1 <= rank <= min(H, W).
        cache: keep the factors of every sample seen with an ``index`` (keyed by sample
            index, stored detached on the device they were computed on).

    ``forward(images, index=None)``: ``index`` is a (B,) integer tensor or sequence of sample
    indices. With the cache on, cached samples are not recomputed; the missing ones are
    decomposed in one ``batched_svd`` call. Without ``index`` nothing is cached and the
    factors stay differentiable with respect to ``images``.
    """

    def __init__(self, rank: int, cache: bool = False) -> None:
        super().__init__()
        if _as_int(rank) is None or _as_int(rank) < 1:
            raise ValueError(f"SVDInput: rank must be a positive int, got {rank!r}")
        self.rank = _as_int(rank)
        self.cache = cache
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def clear_cache(self) -> None:
        """Forget every cached sample (e.g. after changing the data or the rank)."""
        self._store.clear()
        self.hits = self.misses = 0

    def extra_repr(self) -> str:
        return f"rank={self.rank}, cache={self.cache}, cached={len(self._store)}"

    def _decompose(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"SVDInput: images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if self.rank > min(H, W):
            raise ValueError(f"SVDInput: rank={self.rank} exceeds min(H, W) = {min(H, W)}")
        U, S, Vh = batched_svd(images, self.rank)
        return U, S, Vh.mT

    def forward(
        self, images: torch.Tensor, index: torch.Tensor | Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if index is None or not self.cache:
            return self._decompose(images)
        keys = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        if len(keys) != images.shape[0]:
            raise ValueError(f"SVDInput: index has {len(keys)} entries but images has batch size {images.shape[0]}")
        missing = [pos for pos, key in enumerate(keys) if key not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                U, S, V = self._decompose(images[missing])
            for j, pos in enumerate(missing):
                self._store[keys[pos]] = (U[j], S[j], V[j])
        factors = [self._store[key] for key in keys]
        return tuple(torch.stack([f[i] for f in factors]) for i in range(3))


class SVDInputNet(nn.Module):
    """A two-branch network on (U, S, V) from `SVDInput`.

    U (B, C, H, r) and V (B, C, W, r) are treated as C-channel images of size H x r and
    W x r; each goes through two 3x1 convolutions (along the image axis, singular vectors
    kept apart) with ReLU, is flattened, and the two feature vectors are concatenated with
    S (B, C*r) and classified by two linear layers.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        rank: int,
        num_classes: int,
        channels: int = 16,
        hidden: int = 64,
    ) -> None:
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, (3, 1), padding=(1, 0)),
                nn.ReLU(),
                nn.Conv2d(channels, channels, (3, 1), padding=(1, 0)),
                nn.ReLU(),
                nn.Flatten(),
            )

        self.u_branch = branch()
        self.v_branch = branch()
        features = channels * rank * (height + width) + in_channels * rank
        self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.u_branch(U), self.v_branch(V), S.flatten(1)], dim=1))
