"""Portable paths: how a manifest writes a file's path so the folder (or the data) can move."""
from __future__ import annotations

import os
from pathlib import Path

#: What a manifest path starts with when it lies under the data root (``ANOMALYCLAW_DATA``).
DATA_ROOT_PLACEHOLDER = "{DATA_ROOT}"


def portable_path(value: str | os.PathLike, *, base: str | os.PathLike | None = None,
                  data_root: str | os.PathLike | None = None) -> str:
    """``value`` as a manifest writes it: unchanged when it already starts with
    :data:`DATA_ROOT_PLACEHOLDER`; relative (POSIX) when it lies under ``base`` (the manifest's
    folder, so the folder moves as a whole); ``{DATA_ROOT}/...`` when under ``data_root``; else
    absolute."""
    text = str(value)
    if text.startswith(DATA_ROOT_PLACEHOLDER):
        return text
    path = Path(text).resolve()
    if base is not None:
        try:
            return path.relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    if data_root is not None:
        try:
            return f"{DATA_ROOT_PLACEHOLDER}/" + path.relative_to(Path(data_root).resolve()).as_posix()
        except ValueError:
            pass
    return text
