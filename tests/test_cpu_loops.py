"""The CPU loops that other machines run (csrc/cpu_clones.h).

The LIF, WKV, memory-read and recurrent-step loops are compiled for AVX-512, AVX2 and the baseline x86-64, and
the loader picks one per CPU: a machine with AVX-512 runs only the first. Built with ``SPIKEGPT_FT_CPU_LOOPS``
set, the extension holds the AVX2 or the baseline loops alone, and the tests of everything those loops compute
run again in a separate process on that build: LIF bitwise SpikingJelly's, WKV against its plain references,
the compiled step bitwise the modules' path, recurrent equal to parallel, every byte read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spikegpt_ft.ops import extension
from spikegpt_ft.ops.extension import (
    CPU_LOOPS_DEFINES,
    CPU_LOOPS_VARIABLE,
    cpu_loops_unavailable,
    requested_cpu_loops,
)

ROOT = Path(__file__).resolve().parents[1]
#: The tests of what the cloned loops compute.
LOOP_TESTS = ["test_lif.py", "test_wkv.py", "test_decode_step.py", "test_decoding.py", "test_read_bytes.py"]


def run_with_loops(loops: str, command: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, CPU_LOOPS_VARIABLE: loops}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("loops", sorted(CPU_LOOPS_DEFINES))
def test_the_loop_tests_pass_on_the_loops_machines_without_avx512_run(loops):
    unavailable = cpu_loops_unavailable(loops)
    if unavailable is not None:
        pytest.skip(unavailable)
    probe = "from spikegpt_ft.ops import extension; print(extension().cpu_loops())"
    built = run_with_loops(loops, [sys.executable, "-c", probe], timeout=900)  # the build: a minute or two
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.strip().splitlines()[-1] == loops  # the process runs the build with those loops alone
    tests = [str(ROOT / "tests" / name) for name in LOOP_TESTS]
    ran = run_with_loops(loops, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], timeout=900)
    summary = ran.stdout.strip().splitlines()[-1]
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def test_this_process_runs_the_build_its_environment_asks_for():
    requested, built = requested_cpu_loops(), extension().cpu_loops()
    if requested is None:  # the usual case: every target's loops, the loader's pick
        assert built not in CPU_LOOPS_DEFINES
    else:
        assert built == requested


@pytest.mark.parametrize("value", ["avx512", "AVX2", "sse2", "avx2 "])
def test_an_unknown_choice_of_loops_is_refused_with_the_choices(monkeypatch, value):
    monkeypatch.setenv(CPU_LOOPS_VARIABLE, value)
    with pytest.raises(ValueError, match=r"expected one of \['avx2', 'baseline'\]"):
        requested_cpu_loops()
