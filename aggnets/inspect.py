"""Deprecated name of :mod:`aggnets.inspection` (``aggnets.inspect`` read like the standard library's ``inspect``)."""
import warnings

from .inspection import *  # noqa: F401,F403
from .inspection import __all__  # noqa: F401

warnings.warn("aggnets.inspect is deprecated: import aggnets.inspection", FutureWarning, stacklevel=2)
