"""Where things live: the pairs bundled inside the package and the benchmark data folder.

Nothing here assumes the repository layout: shipped pairs are package data, and the data root
is ``$FAIG_DATA`` or ``../shared/data`` / ``./shared/data`` seen from the working directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from faig_fast.errors import InvalidInputError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PAIRS_DIR = PACKAGE_DIR / "assets" / "pairs"


def shipped_pairs() -> list[str]:
    """Names of the model pairs bundled with the package (``<arch>_<recipe>``)."""
    return sorted(p.name for p in PAIRS_DIR.iterdir() if (p / "baseline.safetensors").is_file())


def shipped_pair_dir(name: str) -> Path:
    """Folder of the bundled pair ``name`` (e.g. ``msrresnet_small``); it may not exist."""
    return PAIRS_DIR / name


def resolve_pair_dir(pair: str | os.PathLike) -> Path:
    """A folder holding ``baseline.safetensors`` and ``target.safetensors``: a path, or a shipped name."""
    folder = Path(pair)
    if not (folder / "baseline.safetensors").is_file():
        folder = shipped_pair_dir(str(pair))
    if not (folder / "baseline.safetensors").is_file() or not (folder / "target.safetensors").is_file():
        raise InvalidInputError(
            f"pair '{pair}' is neither a folder with baseline.safetensors and target.safetensors nor a "
            f"shipped pair ({', '.join(shipped_pairs())})")
    return folder


def data_root() -> Path:
    """The benchmark image folder (Set14, Set5, BSD68, SunHays80).

    ``$FAIG_DATA`` when set; else the first of ``../shared/data`` and ``./shared/data`` (from the
    working directory) that exists; else ``../shared/data``, which callers report as missing.
    """
    env = os.environ.get("FAIG_DATA")
    if env:
        return Path(env)
    for cand in (Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return Path.cwd().parent / "shared" / "data"


def results_dir() -> Path:
    """Where ``faig bench`` and ``faig study`` write by default: ``./benchmarks/results``."""
    return Path.cwd() / "benchmarks" / "results"
