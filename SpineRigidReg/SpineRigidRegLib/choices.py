"""User choices -> :class:`~.pipeline.RegistrationSettings`: the one place where they meet.

``srr-register`` (``--preset``, ``--config`` and its flags), the Slicer Logic (``makeSettings``), the Slicer panel
(through the Logic) and the benchmark all call :func:`make_settings`.

Presets are data files, ``presets/<name>.json`` beside this module; a ``--config`` file (JSON or YAML) has the same
form::

    {"description": "...",                 # optional, shown by srr-register --list-presets
     "rigidity_scale": 4.0,                # optional: multiplies the refinement's rigidity weights
     "settings": {"refine_steps": 20,      # any field of RegistrationSettings; the two nested ones take
                  "refine_weights": {"pc": 0.2},     # a mapping of their own fields
                  "vertebra_rigid": {"steps": 50}}}

Order of application: the core's defaults, the preset, the config file, the rigidity scale (preset's times the
config's), then the explicit choices (``None`` leaves a value alone).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path

from .errors import InputError
from .losses.rigidity import RIGIDITY_TERMS

#: The shipped presets' folder.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "default"
#: The panel's "custom": the default preset with the rigidity weights given explicitly.
CUSTOM = "custom"
_FILE_KEYS = {"description", "rigidity_scale", "settings"}


def preset_names() -> list[str]:
    """The shipped presets, ``"default"`` first."""
    names = sorted(path.stem for path in PRESETS_DIR.glob("*.json"))
    return sorted(names, key=lambda name: name != DEFAULT_PRESET)


def read_preset(name: str) -> dict:
    """The preset file ``presets/<name>.json`` as a dictionary (``"custom"`` is the default preset).

    Raises:
        InputError: An unknown name.
    """
    name = DEFAULT_PRESET if name == CUSTOM else str(name)
    if name not in preset_names():
        raise InputError(f"unknown rigidity preset {name!r}; choose from {', '.join([*preset_names(), CUSTOM])}")
    return read_config(PRESETS_DIR / f"{name}.json")


def read_config(path: str | os.PathLike) -> dict:
    """A settings file (JSON, or YAML for ``.yaml``/``.yml``) in the form of the module docstring, checked.

    Raises:
        InputError: Missing or unreadable file, or keys outside that form.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"settings file not found: {path}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise InputError(f"settings file {path} cannot be read ({error})") from None
    if not isinstance(data, Mapping) or not set(data) <= _FILE_KEYS:
        raise InputError(f"settings file {path} must be a mapping with keys among {sorted(_FILE_KEYS)}")
    if not isinstance(data.get("settings", {}), Mapping):
        raise InputError(f"'settings' of {path} must be a mapping of RegistrationSettings fields")
    return dict(data)


def apply_settings(settings, values: Mapping):
    """``settings`` (a :class:`~.pipeline.RegistrationSettings`) with ``values`` (the ``settings`` mapping of a file).

    Raises:
        InputError: An unknown field or a value the dataclasses refuse.
    """
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    changes = dict(values)
    try:
        for nested in ("refine_weights", "vertebra_rigid"):
            if nested in changes:
                changes[nested] = replace(getattr(settings, nested), **dict(changes[nested]))
        if changes.get("vertebra_weights") is not None:
            changes["vertebra_weights"] = {int(k): float(v) for k, v in changes["vertebra_weights"].items()}
        return replace(settings, **changes)
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid settings {dict(values)!r}: {error}") from None


def scale_rigidity(settings, scale: float):
    """``settings`` with the refinement's rigidity weights multiplied by ``scale`` (>= 0)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise InputError(f"rigidity_scale must be a number >= 0, got {scale!r}")
    weights = settings.refine_weights
    return replace(
        settings, refine_weights=replace(weights, **{t: getattr(weights, t) * scale for t in RIGIDITY_TERMS})
    )


def make_settings(
    preset: str | None = DEFAULT_PRESET,
    config: str | os.PathLike | Mapping | None = None,
    **choices,
):
    """Registration settings from a user's choices (the order of the module docstring).

    Args:
        preset: A shipped preset (:func:`preset_names`), ``"custom"`` (= the default) or ``None`` (= the default).
        config: A settings file or its contents as a mapping.
        **choices: The explicit choices, applied last (:func:`update_settings`).

    Returns:
        A :class:`~.pipeline.RegistrationSettings`.

    Raises:
        InputError: An unknown preset, setting or rigidity term, or a value out of range.
    """
    from .pipeline import RegistrationSettings

    settings = RegistrationSettings()
    scale = 1.0
    sources = [read_preset(preset or DEFAULT_PRESET)]
    if config is not None:
        sources.append(dict(config) if isinstance(config, Mapping) else read_config(config))
    for source in sources:
        settings = apply_settings(settings, source.get("settings", {}))
        scale *= source.get("rigidity_scale", 1.0)
    if scale != 1.0:
        settings = scale_rigidity(settings, scale)
    return update_settings(settings, **choices)


def update_settings(
    settings,
    *,
    device: str | None = None,
    model_path: str | os.PathLike | None = None,
    model_sha256: str | None = None,
    refine_steps: int | None = None,
    vertebra_steps: int | None = None,
    rigidity: Mapping[str, float] | None = None,
    vertebra_weights: Mapping[int, float] | None = None,
    mr_segmentation: bool | None = None,
    bone_prealign: bool | None = None,
    bias_correction: bool | None = None,
    network_precision: str | None = None,
):
    """``settings`` with explicit choices applied (``None`` leaves a value alone); the last step of
    :func:`make_settings`, and how the Slicer Logic's corrections change a result's settings.

    Args:
        settings: A :class:`~.pipeline.RegistrationSettings`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
        model_path, model_sha256: A checkpoint instead of the bundled model, and the sha256 it must have.
        refine_steps: Dense refinement steps (0 = off).
        vertebra_steps: Steps of the vertebra-wise rigid alignment (0 = off).
        rigidity: Refinement weights of the rigidity terms (:data:`RIGIDITY_TERMS`), replacing the preset's.
        vertebra_weights: Label -> multiplier of the rigidity terms (0 excludes a vertebra; 1 is left out); see
            :func:`label_weights` to get it from vertebra names.
        mr_segmentation, bone_prealign, bias_correction, network_precision: See
            :class:`~.pipeline.RegistrationSettings`.

    Raises:
        InputError: An unknown rigidity term or a value out of range.
    """
    if rigidity:
        unknown = sorted(set(rigidity) - set(RIGIDITY_TERMS))
        if unknown:
            raise InputError(
                f"unknown rigidity weight(s): {', '.join(unknown)}; choose from {', '.join(RIGIDITY_TERMS)}"
            )
        settings = apply_settings(settings, {"refine_weights": {k: float(v) for k, v in rigidity.items()}})
    if vertebra_steps is not None and int(vertebra_steps) < 0:
        raise InputError("vertebra alignment steps must be >= 0")
    explicit = {
        "device": device,
        "model_path": None if model_path is None else str(model_path),
        "model_sha256": model_sha256,
        "refine_steps": None if refine_steps is None else int(refine_steps),
        "vertebra_rigid": None if vertebra_steps is None else {"steps": int(vertebra_steps)},
        "mr_segmentation": mr_segmentation,
        "bone_prealign": bone_prealign,
        "bias_correction": bias_correction,
        "network_precision": network_precision,
    }
    settings = apply_settings(settings, {k: v for k, v in explicit.items() if v is not None})
    if vertebra_weights is not None:
        cleaned = {int(k): float(v) for k, v in vertebra_weights.items() if float(v) != 1.0}
        settings = replace(settings, vertebra_weights=cleaned or None)
    return settings


def parse_assignments(text: str | Iterable[str] | None) -> dict[str, float]:
    """``"a=1,b=0.5"`` (or several such strings) -> ``{"a": 1.0, "b": 0.5}``, with a clear error for bad items."""
    parts = [text] if isinstance(text, str) or text is None else list(text)
    weights: dict[str, float] = {}
    for item in filter(None, (piece.strip() for part in parts for piece in (part or "").split(","))):
        key, sep, value = item.partition("=")
        try:
            weights[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InputError(f"expected NAME=NUMBER, got {item!r}")
    return weights


def label_weights(
    weights: Mapping[int | str, float] | None,
    names: Mapping[int, str],
    aliases: Mapping[str, int] | None = None,
) -> dict[int, float]:
    """Per-vertebra rigidity multipliers keyed by label value, from keys that are label values or vertebra names.

    Args:
        weights: Key -> multiplier (>= 0); a key is a label value (``int`` or digits) or a name (any case).
        names: The CT label map's vertebrae, label -> name (:func:`.data.vertebrae.label_names`).
        aliases: Other names of a label (upper case), e.g. the Slicer segment names.

    Raises:
        InputError: A key that is not a vertebra of ``names``, or a negative or non-finite weight.
    """
    by_name = {str(k).upper(): int(v) for k, v in (aliases or {}).items()}
    by_name.update({name.upper(): int(value) for value, name in names.items()})
    out: dict[int, float] = {}
    for key, weight in (weights or {}).items():
        text = str(key).strip()
        value = int(key) if isinstance(key, int) else int(text) if text.isdigit() else by_name.get(text.upper())
        if value is None or value not in names:
            raise InputError(f"{key!r} is not a vertebra of the CT segmentation")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise InputError(f"the rigidity weight of {key} must be a number >= 0, got {weight}")
        out[int(value)] = float(weight)
    return out


__all__ = [
    "CUSTOM",
    "DEFAULT_PRESET",
    "PRESETS_DIR",
    "RIGIDITY_TERMS",
    "apply_settings",
    "label_weights",
    "make_settings",
    "parse_assignments",
    "preset_names",
    "read_config",
    "read_preset",
    "scale_rigidity",
    "update_settings",
]
