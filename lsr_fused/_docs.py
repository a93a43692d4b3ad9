"""Docstrings shared by several definitions (the functional form and its module), attached at the
definition with :func:`extends_doc`, so that reading the ``def`` shows its summary."""

from __future__ import annotations


def extends_doc(shared: str):
    """Decorator: the object's own docstring (its summary) followed by ``shared``."""

    def attach(obj):
        obj.__doc__ = (obj.__doc__ or "").rstrip() + "\n" + shared
        return obj

    return attach
