"""The exceptions every part of AnomalyClaw raises, each naming what the user must look at."""
from __future__ import annotations


class AnomalyClawError(Exception):
    """Base class: an error whose message tells the user what went wrong and what to do."""


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


class ConfigError(AnomalyClawError):
    """A setting (flag, environment variable, file) has a value that cannot work."""
