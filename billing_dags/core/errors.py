"""The one base type of every input error: bad seeds, files, arguments, requests or settings.

Whoever meets one reports its message, which names the input and the fix: the CLI exits 2, a
server answers 4xx, a Dagster step fails with it. Any other exception is a bug.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input; the message names the input and the fix."""


def input_error_names() -> frozenset[str]:
    """Class names of every InputError subclass loaded so far (a failed Dagster step records only the name)."""
    names, todo = set(), [InputError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)
