"""The error every converter raises: names the file, tensor or field and the fix."""

from __future__ import annotations

import logging

logger = logging.getLogger("speculators_hf.convert")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, tensor or field and the fix."""
