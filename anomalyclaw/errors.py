"""The exceptions every part of AnomalyClaw raises, each naming what the user must look at.

Each class carries the command line's exit status for it (``exit_status``; the README's table
"Exit status" lists them all): 2 for a usage or input mistake, 3 when the endpoint or the file
system will not let a run go on.
"""
from __future__ import annotations

#: Exit statuses of the ``anomalyclaw`` command (one table in the README says the same).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_ALL_ERRORS = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class AnomalyClawError(Exception):
    """Base class: an error whose message tells the user what went wrong and what to do."""

    exit_status = EXIT_USAGE


class ManifestError(AnomalyClawError):
    """A manifest (or one item of it) is malformed.

    ``problems`` lists every problem found as ``(where, field, message)`` so that one run of the
    validator reports all of them, not only the first.
    """

    def __init__(self, source: str, problems: list[tuple[str, str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{where}: field '{field}': {message}" for where, field, message in self.problems[:20]]
        more = len(self.problems) - 20
        if more > 0:
            lines.append(f"... and {more} more")
        super().__init__(f"invalid manifest {source}:\n  " + "\n  ".join(lines))


class ImageLoadError(AnomalyClawError):
    """An image file could not be turned into pixels: missing, empty, truncated, not an image..."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


class WeightsNotFoundError(AnomalyClawError):
    """A backbone's weights are not on disk and downloads are not allowed."""


class EndpointFatalError(AnomalyClawError):
    """The VLM endpoint refuses every request (bad key, unknown model or URL): stop the run now."""

    exit_status = EXIT_UNAVAILABLE


class EndpointUnreachableError(EndpointFatalError):
    """The endpoint does not answer at all (connection refused, unknown host, no reply in time)."""


class OutputError(AnomalyClawError):
    """A file or folder the command must write cannot be written (read-only, a file where a
    folder belongs, disk full)."""

    exit_status = EXIT_UNAVAILABLE


class SelectionError(AnomalyClawError):
    """A split or domain asked for matches no item of the manifest; the message lists what the
    manifest has."""


class RunMismatchError(AnomalyClawError):
    """``--resume`` on a run folder whose records were made with other settings."""


class ConfigError(AnomalyClawError):
    """A setting (flag, environment variable, file) has a value that cannot work."""
