"""MRML side of the SpineRigidReg Slicer module: nodes <-> core images, output nodes, corrections, undo.

It is a package beside ``SpineRigidReg.py`` rather than a ``SpineRigidRegLogic.py`` file because Slicer loads every
top-level ``.py`` file of a scripted-module folder as a module of its own; a sub-folder is only imported. It imports
``slicer`` MRML classes, vtk and the core, never Qt, so CI tests it against a real MRML scene (``slicer-core``).
"""

from .logic import (
    HISTORY_LENGTH,
    RIGIDITY_PRESETS,
    OutputNodes,
    RegistrationInputs,
    RegistrationRun,
    SpineRigidRegLogic,
    makeSettings,
)

__all__ = [
    "HISTORY_LENGTH",
    "RIGIDITY_PRESETS",
    "OutputNodes",
    "RegistrationInputs",
    "RegistrationRun",
    "SpineRigidRegLogic",
    "makeSettings",
]
