"""Data files that other packages ship (weights, digits, photos), found in their installed
folders without importing the packages, so that their dependencies never enter."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str, install: str) -> Path:
    """`relative` inside the installed `package`; a one-line exit saying `install` if not."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations)), relative)
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the {package} package: {install}")
    return path
