"""griffe extension for the API reference: the docstrings' Sphinx roles (:func:`x`, :class:`~a.B`) as plain code."""
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):(`+)~?")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"\1", obj.docstring.value)
