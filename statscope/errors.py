"""The one exception family of statscope, and its warning categories.

Every message names the argument, the value received and what was expected, e.g.
``layers=['fc9']: no such module; available: fc1, fc2, fc3, fc4``.

Each error class carries the exit code the command line returns for it: 2 for bad input (a usage
error the user fixes by changing the command), 1 for a failure at run time (damaged data, a full
disk, another writer holding the run).
"""

__all__ = ["StatscopeError", "StoreError", "StoreDamagedError", "StoreLockedError",
           "RunCompletedError", "RecordingError", "StatscopeWarning", "NonFiniteWarning"]


class StatscopeError(ValueError):
    """Bad input or an impossible request. Subclasses ``ValueError`` so generic handlers catch it."""

    exit_code = 2


class StoreError(StatscopeError):
    """A run store is missing, of an unknown format, or in the way of a new run."""


class StoreDamagedError(StoreError):
    """A run store's data or metadata is missing, unreadable or inconsistent: nothing is made up."""

    exit_code = 1


class StoreLockedError(StoreError):
    """Another writer holds the run's lease; the message names the holder."""

    exit_code = 1


class RunCompletedError(StoreError):
    """A writer was asked to resume a run that is completed and told not to
    (``resume_completed=False``): another process finished the run since the caller planned."""

    exit_code = 1


class RecordingError(StatscopeError):
    """Recording failed while training went on (the writer thread could not write the store).

    Raised by ``Recorder.close()`` when training itself succeeded; the run is marked ``failed``
    with the reason, and every step committed before the failure stays readable.
    """

    exit_code = 1


class StatscopeWarning(UserWarning):
    """Something the user should know about that does not stop the work."""


class NonFiniteWarning(StatscopeWarning):
    """A recorded statistic was NaN or Inf; it is stored as it is and counted in the run's attrs."""
