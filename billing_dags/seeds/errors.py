"""The error of a seed file or row that cannot be used."""

from billing_dags.core.errors import InputError


class SeedError(InputError):
    """A seed file or row that cannot be used; the message names file, line and fix."""
