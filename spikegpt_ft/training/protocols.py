"""Named protocols: YAML files of option values that reproduce one source's experiment (``--protocol``).

Each file in ``spikegpt_ft/protocols/`` names the tasks and adapters it covers and holds ``defaults``, then
``per_task`` and ``per_adapter`` overrides; its comments cite the source it follows. The values become the
command line's defaults: a signature's default < the protocol < ``--config`` < a flag.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "protocols"
SECTIONS = {"name", "summary", "tasks", "adapters", "defaults", "per_task", "per_adapter"}


@dataclass(frozen=True)
class Protocol:
    """One protocol file: where it applies and its values."""

    name: str
    summary: str
    tasks: tuple[str, ...]
    adapters: tuple[str, ...]
    defaults: dict
    per_task: dict
    per_adapter: dict
    path: Path

    def values(self, task: str, adapter: str) -> dict:
        """The option values for ``task`` and ``adapter``: defaults, then the task's, then the adapter's."""
        if task not in self.tasks:
            raise ValueError(f"protocol {self.name!r} covers the tasks {list(self.tasks)}, not {task!r}")
        if adapter not in self.adapters:
            raise ValueError(f"protocol {self.name!r} covers the adapters {list(self.adapters)}, not {adapter!r}")
        return {**self.defaults, **self.per_task.get(task, {}), **self.per_adapter.get(adapter, {})}

    def check_options(self, known: Collection[str]) -> None:
        """A ``ValueError`` naming any value of the file that is not an option in ``known``."""
        sections = [self.defaults, *self.per_task.values(), *self.per_adapter.values()]
        unknown = sorted({key for section in sections for key in section} - set(known))
        if unknown:
            raise ValueError(f"protocol file {self.path} sets unknown options: {unknown}")


def protocol_names() -> list[str]:
    """The names of the protocols shipped with the package."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def _mapping(data: dict, key: str, path: Path) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"protocol file {path}: {key} must be a mapping")
    return value


def load_protocol(name: str) -> Protocol:
    """The protocol ``name`` (a shipped protocol's name, or a path to a protocol YAML file)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROTOCOL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown protocol {name!r}; choose one of {', '.join(protocol_names())} or a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"protocol file {path} is not readable YAML: {err}") from err
    if not isinstance(data, dict) or not set(data) <= SECTIONS or "tasks" not in data or "adapters" not in data:
        raise ValueError(f"protocol file {path} must be a mapping of {sorted(SECTIONS)} with tasks and adapters")
    per_task, per_adapter = _mapping(data, "per_task", path), _mapping(data, "per_adapter", path)
    for section in (*per_task.values(), *per_adapter.values()):
        if not isinstance(section, dict):
            raise ValueError(f"protocol file {path}: every per_task / per_adapter entry must be a mapping")
    return Protocol(
        name=str(data.get("name") or path.stem),
        summary=str(data.get("summary") or ""),
        tasks=tuple(data["tasks"]),
        adapters=tuple(data["adapters"]),
        defaults=_mapping(data, "defaults", path),
        per_task=per_task,
        per_adapter=per_adapter,
        path=path,
    )
