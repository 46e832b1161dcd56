"""Atomic file writes (text, JSON, safetensors): a failure or a kill while writing never leaves a
torn file behind.  Every result, report, index file and manifest the library writes goes through here."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not safe to toggle per write


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp path in ``path``'s folder; on success fsync it and ``os.replace`` it onto ``path``.

    On any error the temp file is removed and the previous ``path`` (if any) stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def _jsonable(o: Any) -> Any:
    """numpy scalars, tensors and paths as plain JSON values."""
    if hasattr(o, "tolist"):  # numpy scalars/arrays, torch tensors
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """``json.dump`` to ``path`` atomically (numpy scalars, tensors and paths allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_jsonable) + "\n")


def atomic_save_safetensors(tensors: dict, metadata: dict[str, str], path: str | os.PathLike) -> Path:
    """safetensors ``save_file``, atomically."""
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)
