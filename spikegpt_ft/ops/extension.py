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
    sources = [KERNEL_DIR / s for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {missing}; this installation of spikegpt_ft is incomplete")
    log.info("loading the compiled kernels (the first use on a machine compiles them, about a minute)")
    return load(
        name="spikegpt_ft_kernels_cuda" if with_cuda else "spikegpt_ft_kernels_cpu",
        sources=[str(s) for s in sources],
        # -fopenmp: at::parallel_for splits the work over threads only when compiled with OpenMP;
        # -ffast-math: lets GCC vectorise exp/log (glibc's libmvec). The kernels use no inf/NaN.
        # lif_cpu.cpp switches it off for its own functions: its results must be bitwise SpikingJelly's.
        extra_cflags=["-O3", "-ffast-math", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
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
