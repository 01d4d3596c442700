"""Multi-modal image similarity losses: MIND-SSC, normalised mutual information (Parzen) and NGF.

Every loss takes the fixed image and the warped moving image as ``(B, 1, D, H, W)`` float tensors with intensities
normalised to ``[0, 1]`` (as the preprocessing produces), returns a scalar to *minimise*, and accepts an optional
``mask`` ``(B, 1, D, H, W)`` of non-negative voxel weights (e.g. the field of view shared by both images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..jacobian import spatial_gradient
from ..validation import check_same_spatial_shape, check_tensor

# Six-neighbourhood offsets (unit steps along the array axes) and the 12 pairs of them that are not opposite: the
# self-similarity context of MIND-SSC (Heinrich et al., MICCAI 2013). Each pair is sqrt(2) steps apart.
_SIX_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple(
    (a, b)
    for a in range(6)
    for b in range(a + 1, 6)
    if any(x != -y for x, y in zip(_SIX_NEIGHBOURS[a], _SIX_NEIGHBOURS[b], strict=True))
)


def _check_image(image: object, name: str) -> torch.Tensor:
    return check_tensor(image, name, ndim=5, channels=1, floating=True, finite=True)


def _check_pair(fixed: object, warped: object) -> tuple[torch.Tensor, torch.Tensor]:
    fixed = _check_image(fixed, "fixed image")
    warped = _check_image(warped, "warped image")
    check_same_spatial_shape(fixed, warped, "fixed image", "warped image")
    return fixed, warped


def _check_mask(mask: object, like: torch.Tensor) -> torch.Tensor | None:
    """``None`` or the mask as non-negative float weights shaped like ``like`` ``(B, 1, D, H, W)``."""
    if mask is None:
        return None
    mask = check_tensor(mask, "mask", ndim=5, channels=1)
    check_same_spatial_shape(like, mask, "image", "mask")
    mask = mask.to(like.dtype)
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise InputError("mask must hold finite non-negative weights")
    return mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``(B, C, D, H, W)`` values over everything, voxels weighted by ``mask`` ``(B, 1, D, H, W)``."""
    if mask is None:
        return values.mean()
    total = mask.sum() * values.shape[1]
    if float(total) <= 0:
        raise InputError("mask is empty: no voxel to compare")
    return (values * mask).sum() / total


def _check_positive_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


# --------------------------------------------------------------------------------------------------------- MIND-SSC
# Axes longer than this are box-filtered by a grouped 1-D convolution; shorter ones by a dense banded matrix product,
# which the BLAS makes faster than either the convolution or a 3-D average pool up to about this length.
_MAX_MATRIX_AXIS = 192


def _box_mean(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the cube of side ``2 radius + 1`` around each voxel, borders replicated: ``(B, C, D, H, W)``.

    Equal to ``avg_pool3d(pad(volume, radius, "replicate"), 2 radius + 1, stride=1)``: clamping the indices is done
    per axis, so the 3-D box mean factorises into three 1-D ones (125 taps become 15 for ``radius = 2``).
    """
    shape = volume.shape
    out = volume
    for axis in range(3):
        n = shape[2 + axis]
        post = shape[3 + axis :].numel()
        if n > _MAX_MATRIX_AXIS:
            out = _box_mean_conv(out, radius, axis)
        elif post == 1:
            out = (out.reshape(-1, n) @ _box_matrix(n, radius, out.dtype, out.device).T).reshape(shape)
        else:
            out = torch.matmul(_box_matrix(n, radius, out.dtype, out.device), out.reshape(-1, n, post)).reshape(shape)
    return out


def _box_matrix(n: int, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)`` matrix of the 1-D box mean with replicated borders: row ``i`` averages ``clamp(i + s)``."""
    index = torch.arange(n, device=device)
    taps = (index[:, None] + torch.arange(-radius, radius + 1, device=device)).clamp(0, n - 1)
    return F.one_hot(taps, n).sum(1).to(dtype) / (2 * radius + 1)


def _box_mean_conv(volume: torch.Tensor, radius: int, axis: int) -> torch.Tensor:
    """1-D box mean along spatial ``axis`` (0, 1, 2) by a grouped convolution, borders replicated."""
    pad = [0] * 6
    pad[4 - 2 * axis] = pad[5 - 2 * axis] = radius
    size = [1, 1, 1]
    size[axis] = 2 * radius + 1
    channels = volume.shape[1]
    kernel = torch.full((channels, 1, *size), 1.0 / (2 * radius + 1), dtype=volume.dtype, device=volume.device)
    return F.conv3d(F.pad(volume, pad, mode="replicate"), kernel, groups=channels)


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013).

    For each of the 12 pairs ``(p, q)`` of six-neighbourhood offsets (length ``dilation`` voxels) that are not
    opposite, the patch distance ``D_pq(x) = sum_s (I(x + s + p) - I(x + s + q))^2`` is taken over a cubic box patch
    ``s`` of side ``2 radius + 1``. With ``D'`` = ``D`` minus its minimum over the 12 channels (so the largest
    descriptor entry is 1) and ``V(x)`` = the mean of ``D'(x)`` over the channels (the local variance estimate),
    clamped to ``[1e-3, 1e3]`` times its mean over the volume, the descriptor is ``exp(-D' / (V + eps))``.
    Borders are replicated. The descriptor is invariant to affine intensity changes ``a I + b``; see the tests for
    how close it stays under non-linear monotone ones.

    Args:
        image: ``(B, 1, D, H, W)`` float.
        radius: Half size of the box patch in voxels (0 = single voxel).
        dilation: Distance in voxels of the six neighbours from the centre.
        eps: Floor added to the variance estimate (intensity units squared) so flat images stay finite.

    Returns:
        ``(B, 12, D, H, W)`` descriptor in ``(0, 1]``.
    """
    image = _check_image(image, "image")
    radius = _check_positive_int(radius, "radius", 0)
    dilation = _check_positive_int(dilation, "dilation", 1)
    d = dilation
    size = image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")

    def shifted(offset: tuple[int, int, int]) -> torch.Tensor:
        k, j, i = (d + o * d for o in offset)
        return padded[:, :, k : k + size[0], j : j + size[1], i : i + size[2]]

    ssd = torch.cat([(shifted(_SIX_NEIGHBOURS[a]) - shifted(_SIX_NEIGHBOURS[b])) ** 2 for a, b in _SSC_PAIRS], dim=1)
    if radius > 0:
        ssd = _box_mean(ssd, radius)
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)
    level = variance.mean(dim=(2, 3, 4), keepdim=True)
    variance = torch.minimum(torch.maximum(variance, 1e-3 * level), 1e3 * level) + eps
    return torch.exp(ssd * (-1.0 / variance))  # one 12-channel product instead of a negation and a division


def mind_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    radius: int = 2,
    dilation: int = 2,
    mask: torch.Tensor | None = None,
    fixed_descriptor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors of two images (0 when the descriptors agree).

    Args:
        fixed: ``(B, 1, D, H, W)`` in ``[0, 1]``.
        warped: ``(B, 1, D, H, W)`` in ``[0, 1]``.
        radius: Patch half size (voxels), see :func:`mind_ssc`.
        dilation: Neighbour distance (voxels), see :func:`mind_ssc`.
        mask: Optional ``(B, 1, D, H, W)`` voxel weights.
        fixed_descriptor: Optional precomputed ``mind_ssc(fixed, radius, dilation)`` ``(B, 12, D, H, W)``, reused
            when the fixed image does not change between calls (test-time refinement); ``fixed`` then serves only
            the shape checks.

    Returns:
        Scalar, mean over voxels (mask-weighted) and the 12 descriptor channels.

    Note:
        MIND is contrast-invariant, so it also responds to the artificial edge that zero padding creates where the
        warped image samples outside the moving grid. Warp with ``padding_mode="border"`` or pass a ``mask`` of the
        shared field of view when the images do not fade to 0 at their borders.
    """
    fixed, warped = _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    if fixed_descriptor is None:
        fixed_descriptor = mind_ssc(fixed, radius, dilation)
    else:
        fixed_descriptor = check_tensor(fixed_descriptor, "fixed MIND descriptor", ndim=5, channels=len(_SSC_PAIRS))
        check_same_spatial_shape(fixed, fixed_descriptor, "fixed image", "fixed MIND descriptor")
    diff = (fixed_descriptor - mind_ssc(warped, radius, dilation)) ** 2
    return _masked_mean(diff, mask)


# ---------------------------------------------------------------------------------------------------------- NMI
def parzen_weights(image: torch.Tensor, bins: int, sigma_ratio: float) -> torch.Tensor:
    """``(B, 1, D, H, W)`` -> ``(B, V, bins)`` Gaussian Parzen weights over ``bins`` centres on ``[0, 1]``.

    Intensities are clamped to ``[0, 1]``; the kernel's SD is ``sigma_ratio`` times the bin spacing and each voxel's
    weights sum to 1. Only the bins near each value are computed (:func:`_window_width`); the others hold 0 where the
    whole formula gives at most ``exp(_PARZEN_FLOOR)``. Differentiable with respect to ``image`` by a closed-form
    backward pass (:class:`_ParzenWeights`).
    """
    centres = torch.linspace(0.0, 1.0, bins, dtype=image.dtype, device=image.device)
    sigma = sigma_ratio / (bins - 1)
    values = image.clamp(0.0, 1.0).flatten(1)[..., None]
    width = _window_width(bins, sigma_ratio)
    if values.requires_grad:
        return _ParzenWeights.apply(values, centres, sigma, width)
    weights, index, _, _ = _parzen(values, centres, sigma, width)
    return _spread(weights, index, bins)


#: Exponents below this are floored: exp() of the far bins' large negative arguments took 40x longer on a CPU than of
#: the rest, for weights below 1e-13 either way.
_PARZEN_FLOOR = -30.0


def _window_width(bins: int, sigma_ratio: float) -> int:
    """How many neighbouring bins (an even number, at most ``bins``) hold every bin whose exponent is above the floor:
    those within ``sigma_ratio * sqrt(-2 * floor)`` bin spacings of the value (8 of 32 bins for a ratio of 0.5)."""
    reach = math.ceil(sigma_ratio * math.sqrt(-2.0 * _PARZEN_FLOOR))
    return min(bins, 2 * reach)


def _parzen(
    values: torch.Tensor, centres: torch.Tensor, sigma: float, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights ``(B, V, width)`` of ``values`` ``(B, V, 1)`` (in ``[0, 1]``) at the ``width`` bins around each
    value, those bins' indices ``(B, V, width)``, the values' offsets from those bins' centres and the exponent's
    argument there.

    Computing 8 of 32 bins made the vertebra-wise stage's NMI steps faster (issue 16's closing note has the times)."""
    bins = len(centres)
    first = (values * (bins - 1)).floor().long() - (width // 2 - 1)
    index = first.clamp(0, bins - width) + torch.arange(width, device=values.device)
    offset = values - torch.take(centres, index)
    argument = -0.5 * (offset / sigma) ** 2
    weights = torch.exp(argument.clamp_min(_PARZEN_FLOOR))
    return weights / weights.sum(-1, keepdim=True), index, offset, argument


def _spread(weights: torch.Tensor, index: torch.Tensor, bins: int) -> torch.Tensor:
    """Window weights ``(B, V, width)`` at ``index`` spread onto all ``bins``: ``(B, V, bins)``."""
    dense = torch.zeros(*weights.shape[:-1], bins, dtype=weights.dtype, device=weights.device)
    return dense.scatter_(-1, index, weights)


class _ParzenWeights(torch.autograd.Function):
    """:func:`parzen_weights` with the gradient in closed form. With ``w_i = e_i / sum_j e_j`` and
    ``e_i = exp(-(v - c_i)^2 / (2 s^2))``: ``dw_i/dv = w_i (g_i - sum_j w_j g_j)``, ``g_i = -(v - c_i) / s^2``
    (0 where the exponent is floored), over the window's bins. Autograd's chain through the exponent, the division
    and the sum kept five ``(B, V, bins)`` intermediates and was most of the NMI's cost in the vertebra-wise stage."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, centres: torch.Tensor, sigma: float, width: int) -> torch.Tensor:  # type: ignore[override]
        weights, index, offset, argument = _parzen(values, centres, sigma, width)
        slope = (argument > _PARZEN_FLOOR) * -offset / sigma**2  # g_i
        ctx.save_for_backward(weights, index, slope)
        return _spread(weights, index, len(centres))

    @staticmethod
    def backward(ctx, grad_dense: torch.Tensor):  # type: ignore[override]
        weights, index, slope = ctx.saved_tensors
        weighted = grad_dense.gather(-1, index) * weights
        grad = (weighted * slope).sum(-1, keepdim=True) - weighted.sum(-1, keepdim=True) * (weights * slope).sum(
            -1, keepdim=True
        )
        return grad, None, None, None


def joint_histogram(
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: torch.Tensor | None = None,
    weights_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable joint intensity histogram with Gaussian Parzen windows.

    Args:
        image_a: ``(B, 1, D, H, W)`` in ``[0, 1]`` (clamped), binned along the rows.
        image_b: ``(B, 1, D, H, W)`` in ``[0, 1]`` (clamped), binned along the columns.
        bins: Number of bins; centres at ``linspace(0, 1, bins)``.
        sigma_ratio: Parzen kernel SD as a fraction of the bin spacing.
        mask: Optional ``(B, 1, D, H, W)`` voxel weights.
        weights_a: ``image_a``'s Parzen weights ``(B, V, bins)`` when already known (:func:`parzen_weights`; an
            optimisation's fixed image has the same ones at every step).

    Returns:
        ``(B, bins, bins)`` joint probabilities (each sample sums to 1).
    """
    image_a, image_b = _check_pair(image_a, image_b)
    mask = _check_mask(mask, image_a)
    bins = _check_positive_int(bins, "bins", 2)
    if not sigma_ratio > 0:
        raise InputError(f"sigma_ratio must be positive, got {sigma_ratio}")
    wa = parzen_weights(image_a, bins, sigma_ratio) if weights_a is None else weights_a
    wb = parzen_weights(image_b, bins, sigma_ratio)
    if mask is None:
        joint = wa.transpose(1, 2) @ wb
        return joint / wa.shape[1]
    m = mask.flatten(1)[..., None]
    total = m.sum(dim=(1, 2))
    if bool((total <= 0).any()):
        raise InputError("mask is empty for at least one sample: no voxel to compare")
    joint = (wa * m).transpose(1, 2) @ wb
    return joint / total[:, None, None]


def _entropies(joint: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Marginal and joint entropies (nats) ``(B,)`` of a ``(B, n, n)`` joint distribution."""
    pa, pb = joint.sum(2), joint.sum(1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p + eps)).flatten(1).sum(1)

    return entropy(pa), entropy(pb), entropy(joint)


def mutual_information(
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Mutual information ``sum p_ab log(p_ab / (p_a p_b))`` (nats) from :func:`joint_histogram`; ``(B,)``."""
    joint = joint_histogram(image_a, image_b, bins, sigma_ratio, mask)
    h_a, h_b, h_ab = _entropies(joint, eps)
    return h_a + h_b - h_ab


def nmi_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    bins: int = 32,
    mask: torch.Tensor | None = None,
    sigma_ratio: float = 0.5,
    eps: float = 1e-10,
    fixed_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative normalised mutual information (Studholme et al. 1999): ``-(H(A) + H(B)) / H(A, B)``.

    The NMI lies in ``[1, 2]`` (1 for independent images, 2 for images that determine each other), so the loss lies in
    ``[-2, -1]``. Entropies come from :func:`joint_histogram` (Gaussian Parzen windows), which keeps the loss
    differentiable with respect to both images.

    Args:
        fixed: ``(B, 1, D, H, W)`` in ``[0, 1]`` (values outside are clamped).
        warped: ``(B, 1, D, H, W)`` in ``[0, 1]``.
        bins: Number of histogram bins.
        mask: Optional ``(B, 1, D, H, W)`` voxel weights.
        sigma_ratio: Parzen kernel SD as a fraction of the bin spacing.
        eps: Added inside the logarithms.
        fixed_weights: ``fixed``'s Parzen weights, when precomputed (:func:`parzen_weights`).

    Returns:
        Scalar: minus the NMI, averaged over the batch.
    """
    joint = joint_histogram(fixed, warped, bins, sigma_ratio, mask, weights_a=fixed_weights)
    h_a, h_b, h_ab = _entropies(joint, eps)
    return -((h_a + h_b) / h_ab.clamp_min(eps)).mean()


# ---------------------------------------------------------------------------------------------------------- NGF
def ngf_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    eps: float = 0.01,
    spacing: Sequence[float] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised gradient fields (Haber and Modersitzki 2006): ``1 - mean cos^2`` of the gradient angle.

    Per voxel ``(grad F . grad M)^2 / ((|grad F|^2 + eps^2) (|grad M|^2 + eps^2))``, which is the squared cosine of
    the angle between the gradients where both exceed ``eps`` and tends to 0 in flat regions. Gradients are central
    differences per mm (``jacobian.spatial_gradient``).

    Args:
        fixed: ``(B, 1, D, H, W)`` in ``[0, 1]``.
        warped: ``(B, 1, D, H, W)`` in ``[0, 1]``.
        eps: Edge parameter in intensity per mm: gradients much weaker than it (noise) count as flat.
        spacing: mm per voxel in array order ``(D, H, W)``; ``None`` means 1 mm.
        mask: Optional ``(B, 1, D, H, W)`` voxel weights.

    Returns:
        Scalar in ``[0, 1]``; 0 only where every gradient pair is parallel or anti-parallel and much stronger than
        ``eps``.
    """
    fixed, warped = _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    if not eps > 0:
        raise InputError(f"NGF eps must be positive, got {eps}")
    gf = spatial_gradient(fixed, spacing)[:, 0]
    gw = spatial_gradient(warped, spacing)[:, 0]
    dot = (gf * gw).sum(1, keepdim=True)
    norms = ((gf**2).sum(1, keepdim=True) + eps**2) * ((gw**2).sum(1, keepdim=True) + eps**2)
    return 1.0 - _masked_mean(dot**2 / norms, mask)


# ------------------------------------------------------------------------------------------------------- modules
class MINDSSCLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`mind_loss`."""

    def __init__(self, radius: int = 2, dilation: int = 2) -> None:
        super().__init__()
        self.radius = radius
        self.dilation = dilation

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return mind_loss(fixed, warped, self.radius, self.dilation, mask=mask)


class NMILoss(nn.Module):
    """``nn.Module`` wrapper of :func:`nmi_loss`."""

    def __init__(self, bins: int = 32, sigma_ratio: float = 0.5) -> None:
        super().__init__()
        self.bins = bins
        self.sigma_ratio = sigma_ratio

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return nmi_loss(fixed, warped, self.bins, mask=mask, sigma_ratio=self.sigma_ratio)


class NGFLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`ngf_loss`."""

    def __init__(self, eps: float = 0.01, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return ngf_loss(fixed, warped, self.eps, self.spacing, mask=mask)


#: Similarity losses by name; each is ``f(fixed, warped, mask=None) -> scalar`` (keyword ``mask``).
SIMILARITY_LOSSES = {"mind": mind_loss, "nmi": nmi_loss, "ngf": ngf_loss}
