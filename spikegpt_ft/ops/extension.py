"""The compiled kernels of ``csrc/``: WKV, and on the CPU the LIF neuron, the inference products (streaming,
AMX) and the recurrent step.

One extension holds every kernel, with one bindings file (``csrc/ops.cpp``). It is built by
``torch.utils.cpp_extension.load`` with ninja at first use, into the torch extensions cache; the CUDA
sources join the build when a GPU and the CUDA toolkit are present. The sources are package data, so an
installed wheel builds the same kernels as a checkout.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

#: Where the kernel sources live: ``csrc/`` beside this module, inside the package.
KERNEL_DIR = Path(__file__).resolve().parent / "csrc"

#: The C++ sources of every build, bindings first.
CPU_SOURCES = (
    "ops.cpp", "wkv_cpu.cpp", "lif_cpu.cpp", "linear_cpu.cpp", "amx_linear.cpp", "decode_cpu.cpp", "memory_cpu.cpp",
)  # fmt: skip
#: The CUDA sources added when a GPU build is possible.
CUDA_SOURCES = ("wkv_cuda.cu",)

#: The environment variable that builds the CPU loops of ``csrc/cpu_clones.h`` for one target only, and the
#: define each of its values sets. Unset, the loops are compiled for AVX-512, AVX2 and the baseline x86-64 and
#: the loader picks one per CPU; ``avx2`` or ``baseline`` runs on this machine the loops that machines without
#: AVX-512 (or without AVX2) run, to check them (``tests/test_cpu_loops.py``) or to reproduce their results.
CPU_LOOPS_VARIABLE = "SPIKEGPT_FT_CPU_LOOPS"
CPU_LOOPS_DEFINES = {"avx2": "-DSPIKEGPT_FT_CPU_LOOPS_AVX2", "baseline": "-DSPIKEGPT_FT_CPU_LOOPS_BASELINE"}


def cpu_loops_unavailable(loops: str) -> str | None:
    """Why this machine cannot run the CPU loops built for ``loops`` alone (a key of :data:`CPU_LOOPS_DEFINES`),
    or ``None`` where it can: they have x86-64 targets only, and AVX2 loops on a CPU without AVX2 would stop the
    process with an illegal instruction."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"x86-64 targets only, not {platform.machine()}"
    if loops == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    return None


def requested_cpu_loops() -> str | None:
    """The one target :data:`CPU_LOOPS_VARIABLE` asks the CPU loops to be built for, or ``None`` (all of them).

    Raises ``ValueError`` for a value it does not know, or one this machine cannot run (:func:`cpu_loops_unavailable`).
    """
    loops = os.environ.get(CPU_LOOPS_VARIABLE, "")
    if not loops:
        return None
    if loops not in CPU_LOOPS_DEFINES:
        raise ValueError(f"{CPU_LOOPS_VARIABLE}={loops!r}: expected one of {sorted(CPU_LOOPS_DEFINES)}, or unset")
    unavailable = cpu_loops_unavailable(loops)
    if unavailable is not None:
        raise ValueError(f"{CPU_LOOPS_VARIABLE}={loops!r}: {unavailable}")
    return loops


def cuda_buildable() -> bool:
    """Whether this machine can build and run the CUDA kernels (a GPU, a CUDA torch and a toolkit)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


@functools.cache
def extension(with_cuda: bool | None = None) -> ModuleType:
    """Build (once per machine, cached by ninja) and import the kernels' extension.

    torch.utils.cpp_extension keys the build directory on the sources and flags, rebuilds only
    when they change, and holds a file lock so that a second process waits rather than rebuilds.
    """
    from torch.utils.cpp_extension import load

    with_cuda = cuda_buildable() if with_cuda is None else with_cuda
    if torch.cuda.is_available() and not with_cuda:
        log.warning(
            "a GPU is present but no CUDA toolkit (nvcc, CUDA_HOME) was found: the kernels are built for the CPU "
            "only, and the model cannot run on the GPU"
        )
    loops = requested_cpu_loops()
    sources = [KERNEL_DIR / s for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {missing}; this installation of spikegpt_ft is incomplete")
    log.info("loading the compiled kernels (the first use on a machine compiles them, about a minute)")
    name = "spikegpt_ft_kernels_cuda" if with_cuda else "spikegpt_ft_kernels_cpu"
    return load(
        name=name if loops is None else f"{name}_{loops}_loops",
        sources=[str(s) for s in sources],
        # -fopenmp: at::parallel_for splits the work over threads only when compiled with OpenMP;
        # -ffast-math: lets GCC vectorise exp/log (glibc's libmvec). The kernels use no inf/NaN.
        # lif_cpu.cpp switches it off for its own functions: its results must be bitwise SpikingJelly's.
        extra_cflags=["-O3", "-ffast-math", "-fopenmp"]
        + (["-DWITH_CUDA"] if with_cuda else [])
        + ([CPU_LOOPS_DEFINES[loops]] if loops else []),
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        with_cuda=with_cuda,
        verbose=False,
    )


def needs_autograd(*inputs: torch.Tensor) -> bool:
    """Whether a kernel call on ``inputs`` must go through its autograd Function (else: call it directly).

    Decoding and evaluation differentiate nothing; calling the kernel directly skips the Function's overhead.
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
