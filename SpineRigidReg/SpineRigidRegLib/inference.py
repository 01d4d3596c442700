"""How the bundled networks run for inference: their weights' memory layout and the arithmetic's precision.

One owner for both, used by the registration network's stage (:func:`..pipeline.network_velocity`) and the MR
segmentation (:func:`.segmentation.predict.predict_bone`). Training never goes through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import InputError

#: Choices of ``RegistrationSettings.network_precision``: ``"auto"`` runs the networks' convolutions in bfloat16
#: where the CPU has bfloat16 arithmetic units (:func:`native_bfloat16`), float32 elsewhere; ``"float32"`` always.
PRECISIONS = ("auto", "float32")


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else a one-line :class:`InputError`."""
    if precision not in PRECISIONS:
        raise InputError(f"network precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def native_bfloat16(device: torch.device | str) -> bool:
    """True on a CPU with bfloat16 arithmetic units and oneDNN: Intel AMX tiles (Sapphire Rapids and later) or
    AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake). Their bfloat16 3D convolutions run about twice as fast as
    float32 (the registration network on 2 cores: 0.30 -> 0.15 s with AMX, 0.72 -> 0.37 s on a Zen 4; the speed
    report's float32 row, docs/BENCHMARKS.md). False elsewhere: GPUs (not measured) and CPUs without such units,
    where bfloat16 is emulated and may be slower."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return any(_cpu_has(feature) for feature in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def _cpu_has(feature: str) -> bool:
    """``torch.cpu.<feature>()``, False where this torch lacks the query (they are private and may move)."""
    query = getattr(torch.cpu, feature, None)
    return bool(query is not None and query())


def uses_bfloat16(device: torch.device | str, precision: str) -> bool:
    """Whether :func:`network_arithmetic` runs in bfloat16 for ``device`` and ``precision``."""
    return check_precision(precision) == "auto" and native_bfloat16(device)


def network_arithmetic_name(device: torch.device | str, precision: str) -> str:
    """``"bfloat16"`` or ``"float32"``: what :func:`network_arithmetic` runs in (the summary and reports say it)."""
    return "bfloat16" if uses_bfloat16(device, precision) else "float32"


@contextmanager
def network_arithmetic(device: torch.device | str, precision: str) -> Iterator[None]:
    """Inference mode, and autocast to bfloat16 when :func:`uses_bfloat16`: convolutions and matrix products in
    bfloat16 with float32 accumulation; their outputs come out bfloat16, so a caller casts what it keeps to float32.
    Measured against float32 (``Testing/test_inference.py``, docs/BENCHMARKS_TIERS.md): a velocity within 1.4 % of
    float32's (relative norm, a test network far from the identity), the MR bone mask the same to a Dice of 0.995 or
    more, the registrations as accurate."""
    bfloat16 = uses_bfloat16(device, precision)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        yield


def exact_in_own_dtype(function: Callable[..., torch.Tensor], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``function(x, *args, **kwargs)`` with autocast off, for an operation whose result is exact in ``x``'s own
    dtype (max-pooling, nearest upsampling): CPU autocast runs those in float32, and copying a bfloat16 ``x`` to
    float32 and back took a third of the registration network's time in bfloat16. The result is the same."""
    with torch.autocast(x.device.type, enabled=False):
        return function(x, *args, **kwargs)


def with_fast_layout(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` (changed in place) with its weights in the channels-last layout (NDHWC) when it is on a CPU:
    oneDNN's 3D convolutions run faster on it (docs/SPEED_PROFILE.md), and its outputs differ from the standard
    layout's only by the order of the sums. Its outputs come out channels-last too. On a GPU the layout is left as
    it is (not measured there)."""
    if next(network.parameters()).device.type == "cpu":
        network.to(memory_format=torch.channels_last_3d)
    return network
