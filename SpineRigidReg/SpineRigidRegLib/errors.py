"""The one exception type for bad user input.

Every public function that takes user data raises :class:`InputError` (a ``ValueError``) with a message that names
the offending input and what was expected, so that the command line and the Slicer module can show one plain line
instead of a traceback from deep inside torch or SimpleITK.
"""

from __future__ import annotations


class InputError(ValueError):
    """Raised when user input (an image, a label map, landmarks, a model file, a setting) is unusable."""


class CancelledError(RuntimeError):
    """Raised inside a long-running core function when its ``should_cancel`` callable returned True."""
