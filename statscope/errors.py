"""The one exception family of statscope, and its warning category.

Every message names the argument, the value received and what was expected, e.g.
``layers=['fc9']: no such module; available: fc1, fc2, fc3, fc4``.
"""

__all__ = ["StatscopeError", "StoreError", "StatscopeWarning", "NonFiniteWarning"]


class StatscopeError(ValueError):
    """Bad input or an impossible request. Subclasses ``ValueError`` so generic handlers catch it."""


class StoreError(StatscopeError):
    """A run store is missing, corrupt, of an unknown format, or in the way of a new run."""


class StatscopeWarning(UserWarning):
    """Something the user should know about that does not stop the work."""


class NonFiniteWarning(StatscopeWarning):
    """A recorded statistic was NaN or Inf; it is stored as it is and counted in the run's attrs."""
