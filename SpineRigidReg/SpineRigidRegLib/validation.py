"""Checks on tensors and arrays at public entry points; each failure raises :class:`InputError` naming the problem."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError

_LAYOUTS = {6: "(B, 3, 3, D, H, W)", 5: "(B, C, D, H, W)", 4: "(C, D, H, W)", 3: "(D, H, W)"}


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
        layout = _LAYOUTS.get(ndim, f"{ndim}-D")
        raise InputError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"{name} must have {channels} channel(s) in dimension 1, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if finite and x.is_floating_point() and not all_finite(x):
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True when a floating-point tensor holds no NaN or infinity."""
    with torch.no_grad():
        # The sum is NaN or infinite whenever an element is, and is far cheaper than a full isfinite(); only when it
        # is not finite (a NaN, or an overflow of large finite values) is every element checked.
        return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_image(image: object, name: str = "image", components: int | None = 1) -> sitk.Image:
    """Return ``image`` after checking that it is a 3D SimpleITK image with ``components`` values per voxel."""
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name} must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{name} must be a 3D image, got a {image.GetDimension()}D image")
    if components is not None and image.GetNumberOfComponentsPerPixel() != components:
        raise InputError(
            f"{name} must have {components} component(s) per voxel, got {image.GetNumberOfComponentsPerPixel()}"
        )
    return image


def check_points(points: object, name: str = "points") -> np.ndarray:
    """Return ``points`` as a finite ``(N, 3)`` float64 array."""
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be numbers, got {type(points).__name__}") from error
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"{name} must be an (N, 3) array, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{name} contain NaN or infinite values")
    return pts


def check_shape3(shape: object, name: str = "shape") -> tuple[int, int, int]:
    """Return a ``(D, H, W)`` grid size as three positive ints."""
    try:
        values = tuple(shape)  # type: ignore[arg-type]
    except TypeError as error:
        raise TypeError(f"{name} must be a sequence of three sizes, got {type(shape).__name__}") from error
    if len(values) != 3 or not all(_is_int(v) and int(v) > 0 for v in values):
        raise InputError(f"{name} must be three positive whole numbers (D, H, W), got {shape!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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


def check_settings_fields(settings: object, what: str, similarities: Mapping[str, object]) -> None:
    """Raise :class:`InputError` unless the dataclass ``settings`` names a known ``similarity`` (a key of
    ``similarities``), every bool field a bool and every other field a finite number >= 0 (``what`` names the
    settings in the message)."""
    similarity = settings.similarity
    if similarity not in similarities:
        raise InputError(f"unknown similarity {similarity!r}; choose from {sorted(similarities)}")
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "similarity":
            continue
        if f.type in ("bool", bool):
            if not isinstance(value, bool):
                raise InputError(f"{what} {f.name} must be true or false, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{what} {f.name} must be a finite non-negative number, got {value!r}")
