"""Checks on tensors and arrays at public entry points; each failure raises :class:`InputError` naming the problem."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError


def check_tensor(
    x: object,
    name: str,
    ndim: int | None = None,
    channels: int | None = None,
    floating: bool = False,
    finite: bool = False,
) -> torch.Tensor:
    """Return ``x`` after checking that it is a tensor of the expected rank, channel count and dtype.

    Args:
        x: The value to check.
        name: How the message refers to it (e.g. ``"moving image"``).
        ndim: Expected number of dimensions (5 for ``(B, C, D, H, W)``).
        channels: Expected size of dimension 1, if any.
        floating: Require a floating-point dtype.
        finite: Require every value to be finite (no NaN or inf).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        layout = {5: "(B, C, D, H, W)", 4: "(C, D, H, W)", 3: "(D, H, W)"}.get(ndim, f"{ndim}-D")
        raise InputError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"{name} must have {channels} channel(s) in dimension 1, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def check_same_spatial_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise unless two ``(B, C, D, H, W)`` tensors share batch size and spatial shape."""
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise InputError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must share batch size and (D, H, W) shape"
        )


def check_spacing(spacing: Sequence[float] | None, name: str = "spacing") -> tuple[float, float, float]:
    """Return spacing as three positive floats (mm); ``None`` means 1 mm isotropic."""
    if spacing is None:
        return (1.0, 1.0, 1.0)
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise InputError(f"{name} must be three positive finite numbers (mm), got {spacing!r}")
    return values  # type: ignore[return-value]


def check_label_tensor(labels: object, name: str = "label map") -> torch.Tensor:
    """Return a ``(B, 1, D, H, W)`` integer label tensor; floats are accepted only if they hold whole numbers."""
    labels = check_tensor(labels, name, ndim=5, channels=1)
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise InputError(f"{name} must hold integer label values, found non-integer values")
        labels = labels.long()
    if bool((labels < 0).any()):
        raise InputError(f"{name} must hold non-negative label values")
    return labels
