"""The package as a newcomer meets it: layers that import one way, lint-clean code, and a wheel that works
away from the checkout."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "spikegpt_ft"
#: Each top-level part of the package and its layer: a part imports only parts of lower layers.
LAYERS = {
    "files": 0, "paths": 0, "system": 0,
    "ops": 1,
    "model": 2,
    "adapters": 3, "data": 3,
    "runs": 4,
    "training": 5, "inference": 5,
    "tools": 6,
    "cli": 7,
}  # fmt: skip


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _imports(path: Path) -> set[str]:
    """The spikegpt_ft parts that ``path`` imports (relative imports resolved)."""
    relative = path.relative_to(ROOT).with_suffix("")
    package = list(relative.parts[:-1]) if relative.name != "__init__" else list(relative.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found |= {_part(n) for n in names if n.startswith("spikegpt_ft.") and n.count(".") >= 1}
        elif isinstance(node, ast.Import):
            found |= {_part(a.name) for a in node.names if a.name.startswith("spikegpt_ft.")}
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert parts - {"__init__"} == set(LAYERS)


def test_imports_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for part in _imports(path) - {own}:
            if part not in LAYERS or LAYERS[part] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(ROOT)} imports spikegpt_ft.{part}")
    assert not wrong, wrong


def test_no_module_reaches_into_another_modules_private_names():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name.startswith("_") for a in node.names):
                wrong.append(f"{path.relative_to(ROOT)}: from {node.module} import {[a.name for a in node.names]}")
    assert not wrong, wrong


def test_tests_share_helpers_not_test_modules():
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(m == "conftest" or m.startswith(("tests", "test_")) for m in modules), (path, modules)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    assert Path(ruff).is_file(), "ruff is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run([ruff, *command, "spikegpt_ft", "tests", "train.py", "infer.py"], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_wheel_installed_away_from_the_checkout_runs_the_compiled_kernels(tmp_path):
    """``pip wheel``, then the wheel installed into a bare folder and imported from elsewhere: a forward pass."""
    # installed at a fixed place, so that the kernels' compile (keyed on their sources' paths) is cached
    cache = Path.home() / ".cache" / "spikegpt_ft_wheel_test"
    wheel_dir, target, elsewhere = tmp_path / "wheel", cache / "site", tmp_path / "elsewhere"
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "spikegpt_ft", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
         str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheel_dir.glob("spikegpt_ft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # every kernel source and header of the checkout, the new ones included
    kernel_files = sorted(p.name for p in (PACKAGE / "ops" / "csrc").iterdir() if p.is_file())
    assert {"ops.cpp", "decode_cpu.cpp", "wkv_cuda.cu", "wkv_core.h", "cpu_floats.h"} <= set(kernel_files)
    for name in kernel_files:
        assert f"spikegpt_ft/ops/csrc/{name}" in names, name
    assert "spikegpt_ft/protocols/spikelora-spikegpt.yaml" in names
    # the same wheel as last time stays installed as it is: ninja decides by the sources' times, which a new
    # install would change, and the compile would run again
    with zipfile.ZipFile(wheel) as archive:  # of the members' names and bytes (the archive holds build times too)
        digest = hashlib.sha256(b"".join(n.encode() + archive.read(n) for n in sorted(archive.namelist()))).hexdigest()
    stamp = cache / "installed-wheel.sha256"
    if not (stamp.is_file() and stamp.read_text() == digest and target.is_dir()):
        shutil.rmtree(target, ignore_errors=True)
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                    str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert installed.returncode == 0, installed.stderr[-3000:]
        stamp.write_text(digest)
    elsewhere.mkdir()
    script = (
        "import torch, spikegpt_ft\n"
        "from spikegpt_ft.ops.extension import KERNEL_DIR, extension\n"
        f"assert spikegpt_ft.__file__.startswith({str(target)!r}), spikegpt_ft.__file__\n"
        "from spikegpt_ft import SpikeGPT, SpikeGPTConfig\n"
        "m = SpikeGPT(SpikeGPTConfig.sized(1, 16, vocab_size=50)).eval()\n"
        "with torch.no_grad(): y = m(torch.tensor([[1, 2, 3]]))\n"
        "assert y.shape == (1, 3, 50) and torch.isfinite(y).all()\n"
        "assert extension.cache_info().currsize == 1  # the kernels were compiled and used\n"
        "print(KERNEL_DIR)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
        "TORCH_EXTENSIONS_DIR": str(cache / "extensions"),
    }
    ran = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().startswith(str(target))


def test_console_script_lists_its_commands(capsys):
    from spikegpt_ft.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "infer", "bench", "energy", "report"))
    assert main(["nope"]) == 2
