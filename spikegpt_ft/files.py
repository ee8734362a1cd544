"""Reading and writing the project's files.

Writes are atomic (temporary file beside the target, fsync, rename), so a reader or a crash half-way never
sees a half-written file. Reads of JSON and safetensors files wrap every parser error into a
``ValueError`` that names the file, so that a damaged file gets one clear line, never a traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def _umask_mode() -> int:
    """The permissions a plain ``open()`` would give a new file (mkstemp makes it owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Have ``write(tmp_path)`` fill a temporary file beside ``path``, flush it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Mapping) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` as a safetensors file, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=metadata))


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` atomically (for official-format ``.pth`` state dicts)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_json_object(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; a missing, undecodable or non-object file is an error naming it as ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got a {type(data).__name__}")
    return data


def safetensors_metadata(path: str | Path, what: str = "safetensors file") -> dict[str, str]:
    """The string metadata of a safetensors file (empty if it has none); an unreadable file is a ``ValueError``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a file it cannot parse
        raise ValueError(f"{path} is not a readable {what}: {err}") from err


def load_safetensors(path: str | Path, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU); an unreadable file is a ``ValueError`` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable {what}: {err}") from err
