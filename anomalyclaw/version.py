"""The package version (also in pyproject.toml; a test keeps the two equal)."""
import functools

__version__ = "0.1.0"


#: Distributions whose version can move a run's numbers (image ops, features, metrics) or its
#: requests; recorded in every ``run_*.json`` (a fresh install's OpenCV 5.1 moved the demo's
#: third decimals against 5.0).
RECORDED_LIBRARIES = ("numpy", "opencv-python-headless", "opencv-python", "scikit-image", "scikit-learn", "scipy",
                      "pillow", "torch", "transformers", "langgraph", "langchain-core", "langchain-openai", "openai")


def library_versions() -> dict[str, str]:
    """``{distribution: version}`` of the :data:`RECORDED_LIBRARIES` installed here, and Python's."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    # Looked up once per process (~10-60 ms of metadata reads): a run writes its run file at the
    # start and again at the end, and the installed versions cannot change in between.
    import platform
    from importlib import metadata

    out = [("python", platform.python_version())]
    for name in RECORDED_LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(out)
