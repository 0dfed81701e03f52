"""Other low-rank decompositions of a convolution, each a chain of small convolutions.

`SepConv2d` (layers.py) is Tai et al.'s closed form of Jaderberg et al.'s scheme 2. This module adds:

* `CPConv2d` -- CP (canonical polyadic) decomposition of the kernel (Denton et al. 2014; Lebedev et al.
  2015, "Speeding-up convolutional neural networks using fine-tuned CP-decomposition"). Per group,
  W[n, c, y, x] ~= sum_r A[n, r] B[c, r] V[y, r] H[x, r], run as a 1x1 conv (C -> R), a depthwise dv x 1
  conv, a depthwise 1 x dh conv (the pair runs fused as `sep_conv` with groups = R) and a 1x1 conv
  (R -> N, with the bias). Fitted by CP-ALS from TensorLy (optional dependency: `pip install
  lowrank_kernels[schemes]`).
* `SeparableBasisConv2d` -- Jaderberg et al. 2014 ("Speeding up convolutional neural networks with
  low rank expansions"), scheme 1: every input channel c is filtered by M separable basis filters
  v_{c,m} h_{c,m}^T and the C*M responses are combined by a 1x1 conv into the N outputs:
  W[n, c] ~= sum_m a[n, c, m] v_{c,m} h_{c,m}^T. Initialisation (closed form, no iterations): per input
  channel, the (N, dv, dh) stack of its filters gets a two-mode HOSVD -- V_c and H_c, the left singular
  vectors of its vertical (dv x N*dh) and horizontal (dh x N*dv) unfoldings. The dv*dh separable
  products v_i h_j^T are then an orthonormal basis of the dv x dh filters, so each filter's coordinates
  G[n, i, j] = v_i^T W[n, c] h_j are exact, and keeping the M pairs (i, j) with the largest energy
  sum_n G[n, i, j]^2 is the best choice of M pairs from that basis: the squared reconstruction error is
  exactly the dropped energy (Parseval), and M = dv*dh reproduces the kernel.
* `Tucker2Conv2d` -- Tucker-2 decomposition (Kim et al. 2016, "Compression of deep convolutional neural
  networks for fast and low power mobile applications"): 1x1 conv (C -> R1), dense dv x dh core conv
  (R1 -> R2), 1x1 conv (R2 -> N). Initialised by the truncated HOSVD of the kernel's input- and
  output-channel modes (optionally refined by HOOI), ranks given, from an energy fraction, or chosen by
  the analytic empirical variational Bayesian matrix factorization of Nakajima et al. 2013 (`vbmf_rank`).

Every layer has `dense_weight()` (the (N, C/groups, dv, dh) kernel it computes) and `from_conv`.
Stride, padding and dilation belong to the spatial stage; the 1x1 stages have none. Non-zero padding
modes are applied to the spatial stage's input: the first 1x1 stage has no bias and acts per pixel, so
padding before or after it is the same."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._conv_args import IntOrPair, _pair
from .layers import _PADDING_MODES, _check_energy, _check_rank, _padding_sides
from .sep_conv import sep_conv

__all__ = ["CPConv2d", "SeparableBasisConv2d", "Tucker2Conv2d", "vbmf_rank", "cp_als", "set_fused"]


# --------------------------------------------------------------------------- shared geometry


class _ChainConv2d(nn.Module):
    """Geometry shared by the chains: nn.Conv2d's arguments, checked, the spatial stage's padding, and
    how a depthwise spatial pair runs (`fused`, see `set_fused`)."""

    # True: a depthwise dv x 1 / 1 x dh pair runs as one sep_conv call; False: as two plain
    # F.conv2d calls, the chain other decomposition tools run (for comparisons; same weights).
    fused: bool = True

    def _depthwise_pair(self, t: torch.Tensor, weight_v: torch.Tensor, weight_h: torch.Tensor) -> torch.Tensor:
        """The spatial stage on (already padded) `t` with C channels: per channel, weight_v.shape[0] / C
        vertical filters (output channel c*M + m from input channel c), then one horizontal filter per
        resulting channel."""
        c, cm = t.shape[1], weight_v.shape[0]
        (sv, sh), (pv, ph), (dv, dh) = self.stride, self._op_padding, self.dilation
        if not self.fused:
            t = F.conv2d(t, weight_v, None, (sv, 1), (pv, 0), (dv, 1), c)
            return F.conv2d(t, weight_h, None, (1, sh), (0, ph), (1, dh), cm)
        if cm != c:
            t = t.repeat_interleave(cm // c, dim=1)
        return sep_conv(t, weight_v, weight_h, None, self.stride, self._op_padding, self.dilation, cm)

    def _init_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair,
        padding: IntOrPair | str,
        dilation: IntOrPair,
        groups: int,
        padding_mode: str,
    ) -> None:
        name = type(self).__name__
        in_channels, out_channels, groups = (
            _check_rank(v, f"{name}: {n}")
            for n, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups))
        )
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by "
                f"groups ({groups})"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(_pair(kernel_size, "kernel_size"))
        self.stride = tuple(_pair(stride, "stride"))
        self.dilation = tuple(_pair(dilation, "dilation"))
        for n, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if min(v) <= 0:
                raise ValueError(f"{name}: {n} must be positive, got {v}")
        self.padding_mode = padding_mode
        sides = _padding_sides(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else (sides[0], sides[2])
        if padding_mode == "zeros" and sides[0] == sides[1] and sides[2] == sides[3]:
            self._op_padding, self._explicit_pad = (sides[0], sides[2]), None
        else:
            self._op_padding, self._explicit_pad = (0, 0), (sides[2], sides[3], sides[0], sides[1])

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        if self._explicit_pad is None:
            return t
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(t, self._explicit_pad, mode=mode)

    def _geometry_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", rank={self.rank}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s

    def extra_repr(self) -> str:
        return self._geometry_repr() + ("" if self.bias is not None else ", bias=False")

    @staticmethod
    def _conv_kwargs(conv: nn.Conv2d) -> dict:
        return {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
            "device": conv.weight.device,
            "dtype": conv.weight.dtype,
        }


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """Run the depthwise spatial pair of every `CPConv2d` and `SeparableBasisConv2d` in `model` fused
    on `sep_conv` (True, the default) or as two plain convolutions (False); in place, returns `model`.
    `Tucker2Conv2d` has no depthwise pair and always runs its plain chain."""
    if not isinstance(fused, bool):
        raise ValueError(f"set_fused: fused must be a bool, got {fused!r}")
    for m in model.modules():
        if isinstance(m, _ChainConv2d):
            m.fused = fused
    return model


def _check_conv(conv: nn.Module, layer: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{layer}.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
    if not conv.weight.dtype.is_floating_point:
        raise ValueError(f"{layer}.from_conv needs a floating-point conv weight, got {conv.weight.dtype}")


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C/g, dv, dh) -> (g, N/g, C/g, dv, dh) in float64."""
    n = weight.shape[0]
    return weight.detach().to(torch.float64).reshape(groups, n // groups, *weight.shape[1:])


def _init_uniform(weights, bias, fan_in: int) -> None:
    for w in weights:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)


# --------------------------------------------------------------------------- CP


def _cp_max_rank(shape: tuple[int, ...]) -> int:
    """A generic upper bound on the CP rank of a tensor: the product of all its sizes but the largest."""
    return math.prod(shape) // max(shape)


# CP-ALS stops when an iteration lowers the relative error by less than this. At the large ranks
# whole networks need, ALS creeps: hundreds more iterations past this point change the error in
# its third digit, at seconds per iteration on a 512-channel layer.
CP_TOL = 1e-4


def _mttkrp(tensor, cp_tensor, mode: int):
    """TensorLy's `unfolding_dot_khatri_rao` (unfold(tensor, mode) @ khatri_rao(other factors), columns
    scaled by the weights) without forming the Khatri-Rao product.

    TensorLy's default forms it explicitly: (product of the other sizes) x rank entries, which for a
    conv kernel's small spatial modes is both channel counts times 3 times the rank (gigabytes at the
    ranks a 512-channel layer needs) and dominates CP-ALS. Here the largest other mode is contracted
    first by one matrix product (rank x the tensor's size / that mode's size), the remaining modes by
    products with their factors' columns; the result is the same matrix."""
    weights, factors = cp_tensor
    as_numpy = not isinstance(tensor, torch.Tensor)
    x = torch.as_tensor(tensor)
    fs = [torch.as_tensor(f) for f in factors]
    rank = fs[0].shape[1]
    others = [i for i in range(x.dim()) if i != mode]
    j = max(others, key=lambda i: x.shape[i])
    kept = [i for i in range(x.dim()) if i != j]
    # ALS updates the modes in turn, so the spatial modes' products contract the same (unchanged)
    # channel factor: keep the last product, keyed by the very tensors (held, so never a reused id)
    # and the factor's in-place version counter.
    key = (x, j, fs[j], fs[j]._version)
    hit = _MTTKRP_CACHE.get("key")
    if hit is not None and all(a is b for a, b in zip(hit[:3], key[:3])) and hit[3] == key[3]:
        t = _MTTKRP_CACHE["value"]
    else:
        t = (fs[j].T @ x.movedim(j, 0).reshape(x.shape[j], -1)).reshape(rank, *(x.shape[i] for i in kept))
        _MTTKRP_CACHE.update(key=key, value=t)
    letters = "abcdefghijklmnopqrstuvwxy"
    rest = [i for i in kept if i != mode]
    spec = ",".join(["z" + "".join(letters[i] for i in kept), *(letters[i] + "z" for i in rest)])
    out = torch.einsum(f"{spec}->{letters[mode]}z", t, *(fs[i] for i in rest))
    if weights is not None:
        out = out * torch.as_tensor(weights)
    return out.numpy() if as_numpy else out


_TENALG = None
_MTTKRP_CACHE: dict = {}  # one entry, cleared when cp_als returns


def _tenalg_backend():
    """TensorLy's core tensor-algebra backend with `_mttkrp` as its `unfolding_dot_khatri_rao`
    (a subclass: TensorLy's own backend is left as it is)."""
    global _TENALG
    if _TENALG is None:
        from tensorly.tenalg.core_tenalg import CoreTenalgBackend

        class _LowrankTenalg(CoreTenalgBackend, backend_name="lowrank_kernels_core"):
            pass

        _LowrankTenalg.register_method("unfolding_dot_khatri_rao", _mttkrp)
        _TENALG = _LowrankTenalg()
    return _TENALG


def cp_als(
    tensor: torch.Tensor, rank: int, *, n_iter_max: int = 1000, tol: float = CP_TOL, random_state: int = 0
) -> tuple[list[torch.Tensor], float, bool]:
    """Rank-`rank` CP decomposition of `tensor` by TensorLy's CP-ALS (SVD initialisation; the
    matricized-tensor-times-Khatri-Rao products by `_mttkrp`).

    ALS stops after `n_iter_max` iterations, or once an iteration lowers the relative error by less
    than `tol` (a decrease, not the error itself).

    Returns (factors, relative error, converged): factor i is (tensor.shape[i], rank) in float64, the
    weights balanced across the factors (every factor's column r has norm lambda_r^(1/ndim)), so that
    the product of the factors' columns is the tensor's approximation. Never returns non-finite factors:
    if ALS diverges from the SVD start it is retried from a random start, then a ValueError is raised."""
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac
    except ImportError as e:  # pragma: no cover - the optional dependency is installed in the test env
        raise ImportError(
            "CP decompositions need TensorLy: pip install 'lowrank_kernels[schemes]' (or tensorly>=0.9)"
        ) from e
    array = tensor.detach().to(torch.float64).cpu()
    norm = float((array**2).sum()) ** 0.5
    if norm == 0:
        return [torch.zeros(s, rank, dtype=torch.float64) for s in array.shape], 0.0, True
    for init in ("svd", "random"):
        with (
            # TensorLy's PyTorch backend: its linear solves and SVDs run on torch's LAPACK (threaded).
            tl.backend_context("pytorch"),
            tl.tenalg.backend_context(_tenalg_backend()),
            warnings.catch_warnings(),
        ):
            # TensorLy warns when the SVD start has fewer singular vectors than the rank (it pads randomly).
            warnings.simplefilter("ignore", UserWarning)
            try:
                cp, errors = parafac(
                    tl.tensor(array / norm),
                    rank,
                    n_iter_max=n_iter_max,
                    init=init,
                    tol=tol,
                    random_state=random_state,
                    normalize_factors=True,
                    return_errors=True,
                )
            finally:
                _MTTKRP_CACHE.clear()
        weights, factors = cp
        factors = [f.detach().clone() for f in factors]
        weights = weights.detach().clone() * norm
        if all(torch.isfinite(f).all() for f in factors) and torch.isfinite(weights).all():
            break
    else:
        raise ValueError(f"CP-ALS produced non-finite factors at rank {rank} (even from a random start)")
    # Balance the weights: column r of each factor gets |lambda_r|^(1/ndim), the sign goes to factor 0.
    root = weights.abs() ** (1.0 / len(factors))
    factors = [f * root for f in factors]
    factors[0] = factors[0] * torch.sign(weights).where(weights != 0, torch.ones_like(weights))
    approx = _cp_full(factors)
    rel_err = float((approx - array).norm() / norm)
    converged = len(errors) < n_iter_max
    return factors, rel_err, converged


def _cp_full(factors: list[torch.Tensor]) -> torch.Tensor:
    letters = "abcdefgh"[: len(factors)]
    return torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)


class CPConv2d(_ChainConv2d):
    """CP-decomposed convolution: 1x1 (C -> R), depthwise dv x 1 then 1 x dh on R channels (fused
    `sep_conv` with groups = R), 1x1 (R -> N, with the bias). `rank` R is a multiple of `groups`:
    each group of the original conv gets its own rank-R/groups CP decomposition and both 1x1 stages
    are grouped like the original conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        rank = _check_rank(rank, "CPConv2d: rank")
        if rank % self.groups:
            raise ValueError(f"CPConv2d: rank ({rank}) must be divisible by groups ({self.groups})")
        self.rank = rank
        dv, dh = self.kernel_size
        f = {"device": device, "dtype": dtype}
        self.weight_in = nn.Parameter(torch.empty(rank, self.in_channels // self.groups, 1, 1, **f))
        self.weight_v = nn.Parameter(torch.empty(rank, 1, dv, 1, **f))
        self.weight_h = nn.Parameter(torch.empty(rank, 1, 1, dh, **f))
        self.weight_out = nn.Parameter(torch.empty(self.out_channels, rank // self.groups, 1, 1, **f))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **f)) if bias else None
        _init_uniform((self.weight_in, self.weight_v, self.weight_h, self.weight_out), self.bias, rank // self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        t = self._pad(F.conv2d(input, self.weight_in, groups=self.groups))
        t = self._depthwise_pair(t, self.weight_v, self.weight_h)
        return F.conv2d(t, self.weight_out, self.bias, groups=self.groups)

    def dense_weight(self) -> torch.Tensor:
        g, rg = self.groups, self.rank // self.groups
        a = self.weight_out.reshape(g, self.out_channels // g, rg)
        b = self.weight_in.reshape(g, rg, self.in_channels // g)
        v = self.weight_v.reshape(g, rg, -1)
        h = self.weight_h.reshape(g, rg, -1)
        w = torch.einsum("gnr,grc,gry,grx->gncyx", a, b, v, h)
        return w.reshape(self.out_channels, self.in_channels // g, *self.kernel_size)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int | None = None,
        energy: float | None = None,
        *,
        n_iter_max: int = 1000,
        tol: float = CP_TOL,
    ) -> CPConv2d:
        """CP-ALS decomposition of a trained `nn.Conv2d` (TensorLy's `parafac`, SVD start).

        Give exactly one of `rank` (total R, a multiple of `conv.groups`) or `energy` (in (0, 1]: the
        smallest rank found by bisection whose fit keeps that fraction of the kernel's squared norm,
        1 - relative error^2, in every group). Warns (RuntimeWarning, with the reached relative error)
        when ALS stops at `n_iter_max` without converging; the factors are finite either way."""
        _check_conv(conv, "CPConv2d")
        if (rank is None) == (energy is None):
            raise ValueError("CPConv2d.from_conv: give exactly one of rank= or energy=")
        g = conv.groups
        w = _grouped(conv.weight, g)
        bound = _cp_max_rank(tuple(w.shape[1:]))
        if rank is not None:
            rank = _check_rank(rank, "CPConv2d.from_conv: rank")
            if rank % g:
                raise ValueError(f"CPConv2d.from_conv: rank ({rank}) must be a multiple of groups ({g})")
            if rank // g > bound:
                raise ValueError(
                    f"CPConv2d.from_conv: rank {rank} exceeds the CP rank bound {g * bound} of this kernel "
                    f"({bound} per group: the product of all its sizes but the largest)"
                )
            fits = [cp_als(w[i], rank // g, n_iter_max=n_iter_max, tol=tol) for i in range(g)]
        else:
            energy = _check_energy(energy)
            fits = [_cp_for_energy(w[i], energy, bound, n_iter_max, tol) for i in range(g)]
            r = max(f[0][0].shape[1] for f in fits)
            fits = [
                f if f[0][0].shape[1] == r else cp_als(w[i], r, n_iter_max=n_iter_max, tol=tol)
                for i, f in enumerate(fits)
            ]
            rank = g * r
        worst = max(f[1] for f in fits)
        if not all(f[2] for f in fits):
            warnings.warn(
                f"CPConv2d.from_conv: CP-ALS did not converge in {n_iter_max} iterations at rank {rank}; "
                f"reached relative error {worst:.3e} (the layer uses these finite factors)",
                RuntimeWarning,
                stacklevel=2,
            )
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, **cls._conv_kwargs(conv))
        layer.fit_error = worst
        n, cg, dv, dh = conv.weight.shape
        with torch.no_grad():
            a = torch.stack([f[0][0] for f in fits])  # (g, N/g, r)
            b = torch.stack([f[0][1] for f in fits])  # (g, C/g, r)
            v = torch.stack([f[0][2] for f in fits])  # (g, dv, r)
            h = torch.stack([f[0][3] for f in fits])  # (g, dh, r)
            r = rank // g
            layer.weight_out.copy_(a.reshape(n, r, 1, 1))
            layer.weight_in.copy_(b.transpose(1, 2).reshape(rank, cg, 1, 1))
            layer.weight_v.copy_(v.transpose(1, 2).reshape(rank, 1, dv, 1))
            layer.weight_h.copy_(h.transpose(1, 2).reshape(rank, 1, 1, dh))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer


def _cp_for_energy(w: torch.Tensor, energy: float, bound: int, n_iter_max: int, tol: float):
    """Smallest rank in [1, bound] (bisection; the CP fit improves with rank up to ALS's local optima)
    whose fit keeps `energy` of the squared norm; the bound's fit if none does."""
    lo, hi = 1, bound
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        fit = cp_als(w, mid, n_iter_max=n_iter_max, tol=tol)
        if 1 - fit[1] ** 2 >= energy - 1e-12:
            best, hi = fit, mid - 1
        else:
            lo = mid + 1
    return best if best is not None else cp_als(w, bound, n_iter_max=n_iter_max, tol=tol)


# --------------------------------------------------------------------------- Jaderberg scheme 1


def separable_basis_spectrum(weight: torch.Tensor):
    """Per input channel, the two-mode HOSVD of its (N, dv, dh) filter stack.

    Returns (V, H, G, energies, order): V (C, dv, dv) and H (C, dh, dh) the orthonormal vertical and
    horizontal bases (columns), G (C, N, dv, dh) the coordinates of every filter in the separable basis
    v_i h_j^T, energies (C, dv*dh) the pair energies sum_n G^2 sorted descending, order (C, dv*dh) the
    flat pair index i*dh + j of each sorted entry. Channels are those of the weight (C/groups of them)."""
    w = weight.detach().to(torch.float64).transpose(0, 1)  # (C, N, dv, dh)
    c, n, dv, dh = w.shape
    vert = w.permute(0, 2, 1, 3).reshape(c, dv, n * dh)
    horz = w.permute(0, 3, 1, 2).reshape(c, dh, n * dv)
    # Only the square left factors are needed: the reduced SVD already has them when the unfolding is
    # wide (full_matrices=True would also build the N*dh x N*dh right factor, per channel).
    V = torch.linalg.svd(vert, full_matrices=n * dh < dv)[0]  # (C, dv, dv)
    H = torch.linalg.svd(horz, full_matrices=n * dv < dh)[0]  # (C, dh, dh)
    G = torch.einsum("ciy,cnyx,cxj->cnij", V.transpose(1, 2), w, H)
    pair = (G**2).sum(1).reshape(c, dv * dh)
    energies, order = pair.sort(-1, descending=True)
    return V, H, G, energies, order


class SeparableBasisConv2d(_ChainConv2d):
    """Jaderberg et al.'s scheme 1: `rank` = M separable basis filters per input channel.

    Runs as a depthwise dv x 1 then 1 x dh pair over the C*M channels (each input channel repeated M
    times; fused `sep_conv` with groups = C*M), then a 1x1 conv (C*M -> N, grouped like the original
    conv, with the bias). Basis filter m of channel c is channel c*M + m."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self.rank = _check_rank(rank, "SeparableBasisConv2d: rank (basis filters per input channel)")
        cm = self.in_channels * self.rank
        dv, dh = self.kernel_size
        f = {"device": device, "dtype": dtype}
        self.weight_v = nn.Parameter(torch.empty(cm, 1, dv, 1, **f))
        self.weight_h = nn.Parameter(torch.empty(cm, 1, 1, dh, **f))
        self.weight_out = nn.Parameter(torch.empty(self.out_channels, cm // self.groups, 1, 1, **f))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **f)) if bias else None
        _init_uniform((self.weight_v, self.weight_h, self.weight_out), self.bias, cm // self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        t = self._depthwise_pair(self._pad(input), self.weight_v, self.weight_h)
        return F.conv2d(t, self.weight_out, self.bias, groups=self.groups)

    def dense_weight(self) -> torch.Tensor:
        g, m = self.groups, self.rank
        c, n, (dv, dh) = self.in_channels, self.out_channels, self.kernel_size
        a = self.weight_out.reshape(n, c // g, m)  # a[n, c within the group, m]
        v = self.weight_v.reshape(g, c // g, m, dv)
        h = self.weight_h.reshape(g, c // g, m, dh)
        w = torch.einsum("gncm,gcmy,gcmx->gncyx", a.reshape(g, n // g, c // g, m), v, h)
        return w.reshape(n, c // g, dv, dh)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int | None = None, energy: float | None = None) -> SeparableBasisConv2d:
        """Closed-form initialisation from a trained `nn.Conv2d` (per-channel two-mode HOSVD, see the module
        docstring). Give exactly one of `rank` (M basis filters per input channel, at most dv*dh) or
        `energy` (in (0, 1]: the smallest M keeping that fraction of every channel's filter energy)."""
        _check_conv(conv, "SeparableBasisConv2d")
        if (rank is None) == (energy is None):
            raise ValueError("SeparableBasisConv2d.from_conv: give exactly one of rank= or energy=")
        n, cg, dv, dh = conv.weight.shape
        g, c = conv.groups, conv.in_channels
        # Each group's input channels are only seen by that group's outputs: decompose per group.
        ws = conv.weight.detach().reshape(g, n // g, cg, dv, dh)
        spectra = [separable_basis_spectrum(ws[i]) for i in range(g)]
        energies = torch.cat([s[3] for s in spectra])  # (C, dv*dh)
        if rank is not None:
            m = _check_rank(rank, "SeparableBasisConv2d.from_conv: rank")
            if m > dv * dh:
                raise ValueError(
                    f"SeparableBasisConv2d.from_conv: rank {m} exceeds dv*dh = {dv * dh}, the number of "
                    "independent separable filters of this kernel size"
                )
        else:
            m = _smallest_rank_for_energy(energies, _check_energy(energy))
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, m, **cls._conv_kwargs(conv))
        with torch.no_grad():
            vs, hs, coefs = [], [], []
            for V, H, G, _, order in spectra:
                keep = order[:, :m]  # (C/g, m) flat pair indices
                i, j = keep // dh, keep % dh
                vs.append(torch.gather(V.transpose(1, 2), 1, i.unsqueeze(-1).expand(-1, -1, dv)))  # (C/g, m, dv)
                hs.append(torch.gather(H.transpose(1, 2), 1, j.unsqueeze(-1).expand(-1, -1, dh)))
                flat = G.reshape(G.shape[0], G.shape[1], dv * dh)  # (C/g, N/g, dv*dh)
                coefs.append(torch.gather(flat, 2, keep.unsqueeze(1).expand(-1, flat.shape[1], -1)))  # (C/g,N/g,m)
            layer.weight_v.copy_(torch.cat(vs).reshape(c * m, 1, dv, 1))
            layer.weight_h.copy_(torch.cat(hs).reshape(c * m, 1, 1, dh))
            a = torch.stack(coefs).permute(0, 2, 1, 3)  # (g, N/g, C/g, m)
            layer.weight_out.copy_(a.reshape(n, cg * m, 1, 1))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer


def _smallest_rank_for_energy(energies: torch.Tensor, energy: float) -> int:
    """Smallest count keeping `energy` of every row's sum (rows sorted descending)."""
    total = energies.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    kept = energies.cumsum(-1) / total
    return int((kept >= energy - 1e-12).float().argmax(-1).max()) + 1


# --------------------------------------------------------------------------- VBMF


def _vbmf_tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return 0.5 * (x - (1 + alpha) + torch.sqrt(((x - (1 + alpha)) ** 2 - 4 * alpha).clamp_min(0)))


def vbmf_rank(matrix: torch.Tensor, *, grid: int = 2000) -> tuple[int, float]:
    """Rank of `matrix` estimated by empirical variational Bayesian matrix factorization (EVBMF), using
    the global analytic solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 14, 2013), with the
    noise variance estimated as in Nakajima, Tomioka, Sugiyama and Babacan (2015, Theorem 2-3).

    For an L x M matrix (L <= M after transposing), alpha = L / M and singular values gamma_h, EVBMF
    keeps component h iff gamma_h > sigma sqrt(M x_) with x_ = (1 + tau_)(1 + alpha / tau_) and
    tau_ = 2.5129 sqrt(alpha). The noise variance sigma^2 minimises
        Omega(sigma^2) = sum_h psi0(x_h) + [x_h > x_] psi1(x_h),   x_h = gamma_h^2 / (M sigma^2),
        psi0(x) = x - log x,
        psi1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x),
        tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,
    over sigma^2 in [max(gamma_{L}^2 ... ) lower bound, sum gamma_h^2 / (L M)]; found here by a log-spaced
    grid search (`grid` points) refined by golden-section search around the best point.

    Returns (rank, sigma^2)."""
    m64 = matrix.detach().to(torch.float64)
    if m64.dim() != 2 or min(m64.shape) < 1:
        raise ValueError(f"vbmf_rank: matrix must be 2-D and non-empty, got shape {tuple(matrix.shape)}")
    L, M = sorted(m64.shape)
    s = torch.linalg.svdvals(m64)
    if float(s[0]) == 0:
        return 0, 0.0
    alpha = L / M
    tau_ = 2.5129 * math.sqrt(alpha)
    x_ = (1 + tau_) * (1 + alpha / tau_)
    g2 = s**2
    total = float(g2.sum())
    upper = total / (L * M)
    # Lower end: no more than L-1 components can be kept (the noise needs at least one), and the average
    # of the components not kept bounds sigma^2 from below.
    h_max = min(L - 1, math.ceil(L / (1 + alpha)) - 1)
    h_max = max(h_max, 0)
    tail = g2[h_max:]
    lower = max(float(g2[h_max]) / (M * x_) if h_max < L else 0.0, float(tail.mean()) / M)
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        lower = upper * 1e-6

    def omega(sigma2: torch.Tensor) -> torch.Tensor:
        x = g2.unsqueeze(0) / (M * sigma2.unsqueeze(1))
        tau = _vbmf_tau(x, alpha)
        psi1 = torch.log(tau + 1) + alpha * torch.log(tau / alpha + 1) - tau
        return (x - torch.log(x) + torch.where(x > x_, psi1, torch.zeros_like(x))).sum(1)

    cand = torch.logspace(math.log10(lower), math.log10(upper), grid, dtype=torch.float64)
    vals = omega(cand)
    i = int(vals.argmin())
    a, b = float(cand[max(i - 1, 0)]), float(cand[min(i + 1, grid - 1)])
    ratio = (math.sqrt(5) - 1) / 2

    def at(v: float) -> float:
        return float(omega(torch.tensor([v], dtype=torch.float64)))

    for _ in range(60):
        c1, c2 = b - ratio * (b - a), a + ratio * (b - a)
        if at(c1) < at(c2):
            b = c2
        else:
            a = c1
    sigma2 = 0.5 * (a + b)
    if at(sigma2) > float(vals[i]):
        sigma2 = float(cand[i])
    threshold = math.sqrt(M * sigma2 * x_)
    return int((s > threshold).sum()), sigma2


# --------------------------------------------------------------------------- Tucker-2


def _leading(mat: torch.Tensor, k: int) -> torch.Tensor:
    """(g, rows, cols) -> (g, rows, k): the k leading left singular vectors of each matrix."""
    return torch.linalg.svd(mat, full_matrices=False)[0][..., :k]


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """(g, N, C, dv, dh) -> the per-group mode-`mode` unfolding (mode 0: N, mode 1: C as rows)."""
    return w.movedim(mode + 1, 1).flatten(2)


def tucker2_factors(
    w: torch.Tensor, r_out: int, r_in: int, hooi_iters: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD (plus `hooi_iters` HOOI sweeps) of (g, N, C, dv, dh) in modes N and C.

    Returns (U_out (g, N, r_out), U_in (g, C, r_in), core (g, r_out, r_in, dv, dh)) in float64; the
    approximation is core x_N U_out x_C U_in."""
    u_out = _leading(_unfold(w, 0), r_out)
    u_in = _leading(_unfold(w, 1), r_in)
    for _ in range(hooi_iters):
        u_in = _leading(_unfold(torch.einsum("gnr,gncyx->grcyx", u_out, w), 1), r_in)
        u_out = _leading(_unfold(torch.einsum("gcs,gncyx->gnsyx", u_in, w), 0), r_out)
    # One factor at a time: contracting the two factors first would form a (g, N, r_out, C, r_in) outer product.
    core = torch.einsum("gcs,grcyx->grsyx", u_in, torch.einsum("gnr,gncyx->grcyx", u_out, w))
    return u_out, u_in, core


class Tucker2Conv2d(_ChainConv2d):
    """Tucker-2 convolution: 1x1 (C -> R1), dense dv x dh core (R1 -> R2) carrying the stride, padding
    and dilation, 1x1 (R2 -> N, with the bias); all three grouped like the original conv.
    `rank` is (R1, R2) (an int r means (r, r)); both must be multiples of `groups`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int | tuple[int, int],
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        r_in, r_out = _tucker_ranks(rank, "Tucker2Conv2d: rank")
        if r_in % self.groups or r_out % self.groups:
            raise ValueError(f"Tucker2Conv2d: rank {(r_in, r_out)} must be divisible by groups ({self.groups})")
        self.rank = (r_in, r_out)
        g = self.groups
        f = {"device": device, "dtype": dtype}
        self.weight_in = nn.Parameter(torch.empty(r_in, self.in_channels // g, 1, 1, **f))
        self.weight_core = nn.Parameter(torch.empty(r_out, r_in // g, *self.kernel_size, **f))
        self.weight_out = nn.Parameter(torch.empty(self.out_channels, r_out // g, 1, 1, **f))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **f)) if bias else None
        _init_uniform((self.weight_in, self.weight_core, self.weight_out), self.bias, r_out // g)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        t = self._pad(F.conv2d(input, self.weight_in, groups=self.groups))
        t = F.conv2d(t, self.weight_core, None, self.stride, self._op_padding, self.dilation, self.groups)
        return F.conv2d(t, self.weight_out, self.bias, groups=self.groups)

    def dense_weight(self) -> torch.Tensor:
        g = self.groups
        (r_in, r_out), n, c = self.rank, self.out_channels, self.in_channels
        u_out = self.weight_out.reshape(g, n // g, r_out // g)
        u_in = self.weight_in.reshape(g, r_in // g, c // g)
        core = self.weight_core.reshape(g, r_out // g, r_in // g, *self.kernel_size)
        w = torch.einsum("gnr,gsc,grsyx->gncyx", u_out, u_in, core)
        return w.reshape(n, c // g, *self.kernel_size)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int | tuple[int, int] | str | None = None,
        energy: float | None = None,
        *,
        hooi_iters: int = 0,
    ) -> Tucker2Conv2d:
        """Tucker-2 decomposition of a trained `nn.Conv2d` (truncated HOSVD; `hooi_iters` > 0 refines it
        by HOOI, never increasing the error). Give exactly one of `rank` ((R1, R2) totals, multiples of
        `conv.groups`; an int r means (r, r); "vbmf": per group, each mode's rank estimated by `vbmf_rank`
        on its unfolding, at least 1) or `energy` (in (0, 1]: per mode, the smallest rank keeping that
        fraction of the unfolding's squared singular values in every group; the squared error is then at
        most 2 (1 - energy) of the kernel's squared norm)."""
        _check_conv(conv, "Tucker2Conv2d")
        if (rank is None) == (energy is None):
            raise ValueError("Tucker2Conv2d.from_conv: give exactly one of rank= or energy=")
        if isinstance(hooi_iters, bool) or not isinstance(hooi_iters, int) or hooi_iters < 0:
            raise ValueError(f"Tucker2Conv2d.from_conv: hooi_iters must be a non-negative int, got {hooi_iters!r}")
        g = conv.groups
        w = _grouped(conv.weight, g)
        n_g, c_g = w.shape[1], w.shape[2]
        if energy is not None:
            energy = _check_energy(energy)
            s_out = torch.linalg.svdvals(_unfold(w, 0))
            s_in = torch.linalg.svdvals(_unfold(w, 1))
            r_in, r_out = (
                g * _smallest_rank_for_energy(s_in**2, energy),
                g * _smallest_rank_for_energy(s_out**2, energy),
            )
        elif isinstance(rank, str):
            if rank != "vbmf":
                raise ValueError(f"Tucker2Conv2d.from_conv: rank must be an int, a pair or 'vbmf', got {rank!r}")
            r_in = g * max(max(vbmf_rank(_unfold(w, 1)[i])[0] for i in range(g)), 1)
            r_out = g * max(max(vbmf_rank(_unfold(w, 0)[i])[0] for i in range(g)), 1)
        else:
            r_in, r_out = _tucker_ranks(rank, "Tucker2Conv2d.from_conv: rank")
            for name, r, full in (("R1 (input side)", r_in, c_g), ("R2 (output side)", r_out, n_g)):
                if r % g:
                    raise ValueError(f"Tucker2Conv2d.from_conv: rank {name} = {r} must be a multiple of groups ({g})")
                if r // g > full:
                    raise ValueError(
                        f"Tucker2Conv2d.from_conv: rank {name} = {r} exceeds the channels it compresses "
                        f"({g * full}, {full} per group)"
                    )
        u_out, u_in, core = tucker2_factors(w, r_out // g, r_in // g, hooi_iters)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, (r_in, r_out), **cls._conv_kwargs(conv))
        with torch.no_grad():
            layer.weight_out.copy_(u_out.reshape(conv.out_channels, r_out // g, 1, 1))
            layer.weight_in.copy_(u_in.transpose(1, 2).reshape(r_in, c_g, 1, 1))
            layer.weight_core.copy_(core.reshape(r_out, r_in // g, *conv.kernel_size))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer


def _tucker_ranks(rank, name: str) -> tuple[int, int]:
    if isinstance(rank, (tuple, list)):
        if len(rank) != 2:
            raise ValueError(f"{name} must be an int or a pair (R1, R2), got {rank!r}")
        return _check_rank(rank[0], name), _check_rank(rank[1], name)
    r = _check_rank(rank, name)
    return r, r
