"""What a run needs to record so its outputs can be traced: file checksums and package versions."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import erc

PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "facenet-pytorch",
    "opensmile",
    "opencv-python-headless",
    "av",
    "h5py",
    "dask",
    "distributed",
    "numpy",
    "xlstm",
)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weight files are hundreds of MB)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of erc and of the libraries whose behaviour shapes its outputs ("not installed" if absent)."""
    versions = {"erc": erc.__version__}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
