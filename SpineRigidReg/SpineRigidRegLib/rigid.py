"""Weighted least-squares rigid fits (Kabsch / orthogonal Procrustes) and rigid displacement fields.

A rigid map is ``y = R x + t`` with ``R`` a proper rotation (``det R = +1``) and ``t`` a translation, both in mm.
Point sets are ``(B, N, 3)``; rotations ``(B, 3, 3)``; translations ``(B, 3)``.

For fields, points live in the *array-aligned millimetre frame* of a grid: voxel index ``x = (k, j, i)`` sits at
``x_mm = x * spacing`` (spacing in array order ``(D, H, W)``). A voxel displacement field ``u`` (see
:mod:`.geometry`) maps ``x_mm`` to ``x_mm + u(x) * spacing``; :func:`fit_rigid_to_field` finds the rigid map closest
to that over a weighted region and :func:`rigid_displacement` turns a rigid map back into a voxel field. The image
direction is a rotation of this frame, so fitted rotations are exact up to that change of basis and residuals (mm) are
unchanged by it.

The rotation is the proper polar factor of the weighted cross-covariance, computed by SVD in float64. Its gradient
uses the closed-form derivative of the polar factor, whose denominators are sums of pairs of (sign-corrected)
singular values rather than the differences that ``torch.linalg.svd``'s backward divides by. It therefore stays
finite for symmetric shapes (a cube or a sphere has three equal singular values), where autograd through the SVD
returns NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError
from .validation import check_spacing, check_tensor
from .warp import identity_grid

#: Weight of the tiny pull toward the identity rotation, relative to the spread of the points. It only decides the
#: rotation where the data leave it undetermined (one point, collinear points, zero weights).
_IDENTITY_PRIOR = 1e-10


class _ProperPolarFactor(torch.autograd.Function):
    """``R = argmax_{R in SO(3)} <R, M>_F`` for ``M`` ``(..., 3, 3)``, with a stable backward."""

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u, s, vh = torch.linalg.svd(m)
        d = torch.sign(torch.det(u @ vh))
        d = torch.where(d == 0, torch.ones_like(d), d)
        signs = torch.ones_like(s)
        signs[..., 2] = d
        r = (u * signs[..., None, :]) @ vh
        ctx.save_for_backward(u, s, vh, signs, r)
        return r

    @staticmethod
    def backward(ctx, grad_r: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        u, s, vh, signs, r = ctx.saved_tensors
        v = vh.transpose(-1, -2)
        # With P = R^T M = V diag(p) V^T, p = signs * s, a perturbation dM gives dR = R Omega, Omega antisymmetric,
        # where in the V basis (p_i + p_j) Omega'_ij = A_ij - A_ji and A = diag(signs) U^T dM V.
        p = signs * s
        denom = p[..., :, None] + p[..., None, :]
        scale = s[..., :1, None].clamp_min(torch.finfo(s.dtype).tiny)
        b = v.transpose(-1, -2) @ r.transpose(-1, -2) @ grad_r @ v
        ok = denom.abs() > 1e-12 * scale
        c = torch.where(ok, (b - b.transpose(-1, -2)) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
        return (u * signs[..., None, :]) @ c @ vh


def _check_points(x: object, name: str) -> torch.Tensor:
    x = check_tensor(x, name, ndim=3, floating=True, finite=True)
    if x.shape[-1] != 3:
        raise InputError(f"{name} must be (B, N, 3) points, got shape {tuple(x.shape)}")
    return x


def fit_rigid(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares rigid fit ``target ~ source @ R^T + t`` (Kabsch with reflection correction).

    Minimises ``sum_n w_n |R s_n + t - q_n|^2`` over proper rotations. Reflections in the data never yield
    ``det R = -1``. Where the rotation is undetermined (zero total weight, a single point, collinear points) the
    rotation closest to the identity is returned; with zero total weight ``R = I`` and ``t = 0``. Differentiable with
    respect to all inputs, finite also for symmetric point sets.

    Args:
        source: ``(B, N, 3)`` points (mm or any consistent unit).
        target: ``(B, N, 3)`` corresponding points.
        weights: ``(B, N)`` non-negative weights; ``None`` means all ones.

    Returns:
        ``R`` ``(B, 3, 3)`` and ``t`` ``(B, 3)`` in the dtype of ``source`` (computed in float64).
    """
    source = _check_points(source, "source points")
    target = _check_points(target, "target points")
    if source.shape != target.shape:
        raise InputError(f"source points {tuple(source.shape)} and target points {tuple(target.shape)} differ")
    if weights is None:
        w = torch.ones(source.shape[:2], dtype=torch.float64, device=source.device)
    else:
        weights = check_tensor(weights, "weights", ndim=2, floating=True, finite=True)
        if weights.shape != source.shape[:2]:
            raise InputError(f"weights must be (B, N) = {tuple(source.shape[:2])}, got {tuple(weights.shape)}")
        if bool((weights < 0).any()):
            raise InputError("weights must be non-negative")
        w = weights.double()
    src, tgt = source.double(), target.double()
    total = w.sum(1)
    safe_total = total.clamp_min(torch.finfo(torch.float64).tiny)
    c_src = (w[..., None] * src).sum(1) / safe_total[:, None]
    c_tgt = (w[..., None] * tgt).sum(1) / safe_total[:, None]
    xs, xt = src - c_src[:, None], tgt - c_tgt[:, None]
    cross = torch.einsum("bn,bni,bnj->bij", w, xt, xs)
    spread = (w * ((xs**2).sum(-1) + (xt**2).sum(-1))).sum(1)
    r, t = _rigid_from_moments(total, c_src, c_tgt, cross, spread)
    return r.to(source.dtype), t.to(source.dtype)


def _rigid_from_moments(
    total: torch.Tensor, c_src: torch.Tensor, c_tgt: torch.Tensor, cross: torch.Tensor, spread: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation and translation from weighted moments (any leading batch shape ``...``, float64).

    ``total`` ``(...)``: sum of weights; ``c_src``/``c_tgt`` ``(..., 3)``: weighted centroids; ``cross``
    ``(..., 3, 3)``: ``sum w (q - c_q)(s - c_s)^T``; ``spread`` ``(...)``: ``sum w (|s - c_s|^2 + |q - c_q|^2)``
    (sets the prior's scale).
    """
    eye = torch.eye(3, dtype=cross.dtype, device=cross.device)
    prior = (_IDENTITY_PRIOR * spread + 1e-30)[..., None, None] * eye
    empty = (total <= 0)[..., None, None]
    m = torch.where(empty, eye.expand_as(cross), cross + prior)
    r = _ProperPolarFactor.apply(m)
    t = c_tgt - (r @ c_src[..., None])[..., 0]
    t = torch.where(empty[..., 0], torch.zeros_like(t), t)
    return r, t


def _mm_grid(shape: Sequence[int], spacing: tuple[float, float, float], device, dtype) -> torch.Tensor:
    """``(1, 3, D, H, W)`` voxel-centre positions in the array-aligned mm frame."""
    step = torch.tensor(spacing, dtype=dtype, device=device).view(1, 3, 1, 1, 1)
    return identity_grid(shape, device=device, dtype=dtype) * step


def fit_rigid_to_regions(
    weights: torch.Tensor, displacement: torch.Tensor, spacing: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid fit of ``x_mm -> x_mm + u_mm(x)`` over several weighted regions at once.

    Like :func:`fit_rigid_to_field` for ``K`` regions sharing one displacement field; used by the per-vertebra
    losses and metrics. Not differentiable (the rigidity losses detach the fit anyway).

    Args:
        weights: ``(B, K, D, H, W)`` non-negative region weights on the displacement's grid.
        displacement: ``(B, 3, D, H, W)`` voxels.
        spacing: mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm.

    Returns:
        ``R`` ``(B, K, 3, 3)`` and ``t`` ``(B, K, 3)`` (mm), in the displacement's dtype. An empty region gives the
        identity.
    """
    weights = check_tensor(weights, "region weights", ndim=5, floating=True, finite=True)
    displacement = check_tensor(displacement, "displacement", ndim=5, channels=3, floating=True, finite=True)
    if weights.shape[0] != displacement.shape[0] or weights.shape[2:] != displacement.shape[2:]:
        raise InputError(
            f"region weights {tuple(weights.shape)} and displacement {tuple(displacement.shape)} must share batch "
            "size and (D, H, W)"
        )
    if bool((weights < 0).any()):
        raise InputError("region weights must be non-negative")
    step = check_spacing(spacing)
    with torch.no_grad():
        b, k = weights.shape[:2]
        w = weights.detach().double().reshape(b, k, -1)
        grid = _mm_grid(displacement.shape[2:], step, displacement.device, torch.float64)
        # Centre coordinates on the grid's middle so that the float64 moments do not lose digits on large grids.
        centre = grid.flatten(2).mean(-1)[:, :, None]
        src = (grid.flatten(2) - centre).expand(b, 3, -1)
        scale = torch.tensor(step, dtype=torch.float64, device=displacement.device).view(1, 3, 1)
        tgt = src + displacement.detach().double().reshape(b, 3, -1) * scale
        total = w.sum(-1)
        safe = total.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
        c_src = torch.einsum("bkv,bcv->bkc", w, src) / safe
        c_tgt = torch.einsum("bkv,bcv->bkc", w, tgt) / safe
        # sum w q s^T - W c_q c_s^T, one source component at a time to keep memory at a few volumes.
        cross = torch.stack([torch.einsum("bkv,bcv->bkc", w, tgt * src[:, e : e + 1]) for e in range(3)], dim=-1)
        cross = cross - total[..., None, None] * c_tgt[..., :, None] * c_src[..., None, :]
        second = torch.einsum("bkv,bv->bk", w, (src**2).sum(1) + (tgt**2).sum(1))
        spread = (second - total * ((c_src**2).sum(-1) + (c_tgt**2).sum(-1))).clamp_min(0.0)
        r, t = _rigid_from_moments(total, c_src, c_tgt, cross, spread)
        # Undo the centring: y = R (x - c) + t + c  =>  t' = t + c - R c.
        c = centre[0, :, 0]
        t = t + c - (r @ c)
        t = torch.where((total <= 0)[..., None], torch.zeros_like(t), t)
    return r.to(displacement.dtype), t.to(displacement.dtype)


def fit_rigid_to_field(
    weights: torch.Tensor, displacement: torch.Tensor, spacing: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest rigid map (weighted least squares, mm) to the displacement field over a region.

    Fits ``x_mm -> R x_mm + t`` to ``x_mm -> x_mm + u(x) * spacing`` with weights ``w(x)``, in the array-aligned mm
    frame (``x_mm = index * spacing``, array order). The result is detached from the graph.

    Args:
        weights: ``(B, 1, D, H, W)`` soft or binary region on the displacement's grid (non-negative).
        displacement: ``(B, 3, D, H, W)`` voxels, array-order channels.
        spacing: mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm.

    Returns:
        ``R`` ``(B, 3, 3)`` and ``t`` ``(B, 3)`` (mm); an empty region gives ``R = I``, ``t = 0``.
    """
    check_tensor(weights, "region weights", ndim=5, channels=1, floating=True)
    r, t = fit_rigid_to_regions(weights, displacement, spacing)
    return r[:, 0], t[:, 0]


def rigid_displacement(
    rotation: torch.Tensor, translation: torch.Tensor, shape: Sequence[int], spacing: Sequence[float] | None = None
) -> torch.Tensor:
    """Voxel displacement field of the rigid map ``x_mm -> R x_mm + t``.

    ``u(x) = (R x_mm + t - x_mm) / spacing`` with ``x_mm = index * spacing`` (the representation
    :func:`fit_rigid_to_field` returns). Differentiable with respect to ``R`` and ``t``.

    Args:
        rotation: ``(B, 3, 3)``, array-order axes.
        translation: ``(B, 3)`` mm.
        shape: Grid size ``(D, H, W)``.
        spacing: mm per voxel in array order; ``None`` means 1 mm.

    Returns:
        ``(B, 3, D, H, W)`` voxels, in the rotation's dtype.
    """
    rotation = check_tensor(rotation, "rotation", ndim=3, floating=True, finite=True)
    translation = check_tensor(translation, "translation", ndim=2, floating=True, finite=True)
    if rotation.shape[1:] != (3, 3) or translation.shape != (rotation.shape[0], 3):
        raise InputError(
            f"rotation must be (B, 3, 3) and translation (B, 3), got {tuple(rotation.shape)} and "
            f"{tuple(translation.shape)}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"shape must be three positive sizes (D, H, W), got {shape}")
    step = check_spacing(spacing)
    grid = _mm_grid(shape, step, rotation.device, rotation.dtype)
    moved = torch.einsum("bce,bedhw->bcdhw", rotation, grid.expand(rotation.shape[0], -1, -1, -1, -1))
    moved = moved + translation.to(rotation.dtype)[:, :, None, None, None]
    scale = torch.tensor(step, dtype=rotation.dtype, device=rotation.device).view(1, 3, 1, 1, 1)
    return (moved - grid) / scale
