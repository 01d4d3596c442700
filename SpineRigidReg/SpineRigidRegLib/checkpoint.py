"""Self-describing checkpoints, safe loading, the bundled model, and device selection.

A checkpoint is ``{"format", "version", "config", "state_dict", ...extra}`` saved with ``torch.save``. It is loaded
only with ``torch.load(..., weights_only=True)`` (no pickled code runs), optionally after a sha256 check, and
``load_state_dict(strict=True)`` so a missing or unexpected weight is an error, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .network import NetworkConfig, RegistrationNet

CHECKPOINT_FORMAT = "spinerigidreg-checkpoint"
CHECKPOINT_VERSION = 1

#: Environment variable that points to a different ``Resources`` folder (e.g. in an installed Slicer extension).
RESOURCES_ENV = "SPINERIGIDREG_RESOURCES"
DEFAULT_MODEL_CARD = "Models/default.json"


def resources_dir() -> Path:
    """The extension's top-level ``Resources`` folder (``$SPINERIGIDREG_RESOURCES`` overrides)."""
    override = os.environ.get(RESOURCES_ENV)
    if override:
        return Path(override)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "Resources" / "Models"
        if candidate.is_dir():
            return candidate.parent
    return here.parents[2] / "Resources"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, network: RegistrationNet, **extra: Any) -> Path:
    """Write ``network`` with its config (and any extra tensors/plain values, e.g. optimiser state) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": network.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


def read_checkpoint(
    path: str | os.PathLike, expected_sha256: str | None = None, expected_format: str = CHECKPOINT_FORMAT
) -> dict:
    """Load a checkpoint dictionary safely (``weights_only=True``) after an optional sha256 check.

    ``expected_format`` tells the kinds of network apart (registration: :data:`CHECKPOINT_FORMAT`; MR segmentation:
    :data:`..segmentation.net.SEGMENTATION_FORMAT`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise InputError(
                f"model file {path.name} fails its checksum (sha256 {actual[:12]}..., expected "
                f"{expected_sha256[:12]}...): it is damaged or not the published model"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise InputError(f"cannot read model file {path.name}: {error.__class__.__name__}") from error
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise InputError(
            f"{path.name} is not a SpineRigidReg checkpoint of the kind needed here ({expected_format}; its format: "
            f"{found!r})"
        )
    if int(payload.get("version", 0)) > CHECKPOINT_VERSION:
        raise InputError(f"{path.name} needs a newer SpineRigidReg (checkpoint version {payload['version']})")
    return payload


def load_network(
    path: str | os.PathLike, expected_sha256: str | None = None, device: torch.device | str = "cpu"
) -> RegistrationNet:
    """Rebuild a :class:`RegistrationNet` from a checkpoint file, in eval mode on ``device``."""
    payload = read_checkpoint(path, expected_sha256)
    network = RegistrationNet(NetworkConfig.from_dict(payload["config"]))
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        raise InputError(f"{Path(path).name} does not match its own architecture: {error}") from error
    return network.to(device).eval()


def model_card(card_path: str | os.PathLike | None = None) -> dict:
    """The bundled model's card (JSON): architecture, training, sha256, benchmark figures."""
    card_path = Path(card_path) if card_path else resources_dir() / DEFAULT_MODEL_CARD
    if not card_path.is_file():
        raise InputError(f"no model card at {card_path}")
    with open(card_path, encoding="utf-8") as stream:
        card = json.load(stream)
    card["_path"] = str(card_path)
    return card


def card_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 that a model card beside the weights file records for it, or ``None`` without such a card.

    The card is ``<name>.json`` next to ``<name>.pt`` (as ``Resources/Models/default.json`` sits beside
    ``default.pt``) and must name that file in ``weights``; a card that names it without a valid sha256 is an error.
    """
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"the model card {card_path} beside {path.name} is not readable JSON") from error
    if not isinstance(card, dict) or card.get("weights") != path.name:
        return None
    digest = card.get("sha256")
    if not is_sha256(digest):
        raise InputError(f"the model card {card_path} names {path.name} but holds no valid sha256")
    return digest


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a 64-digit hexadecimal string."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def load_bundled_network(device: torch.device | str = "cpu", card_path: str | None = None) -> RegistrationNet:
    """Load the default model shipped under ``Resources/Models`` after checking its sha256 against the card."""
    card = model_card(card_path)
    weights = Path(card["_path"]).parent / card["weights"]
    return load_network(weights, expected_sha256=card["sha256"], device=device)


def select_device(requested: str | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda[:N]"``; an unavailable GPU is an error."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("a CUDA GPU was requested but none is available (use --device cpu or auto)")
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise InputError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N") from error
        if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
            raise InputError(f"no GPU {requested!r}: {torch.cuda.device_count()} CUDA device(s) available")
        return device
    raise InputError(f"unknown device {requested!r}: use auto, cpu or cuda")
