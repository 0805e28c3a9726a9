"""Build script for fastcells.

CPU extension always. The CUDA backend is added when torch has CUDA, CUDA_HOME
is found, and a GPU is present or FORCE_CUDA=1. Honours TORCH_CUDA_ARCH_LIST
(default "8.0;9.0") and MAX_JOBS. Debug info is stripped (-g0) so the shared
object stays small; DEBUG=1 builds with -O0 -g and assertions on instead.
Build against the installed torch:

    pip install --no-build-isolation .
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    import torch

    if os.environ.get("FASTCELLS_NO_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fno-trapping-math/-fno-math-errno let the gate loops vectorise; unlike
    # -ffast-math they change no result (NaN and inf still propagate).
    debug = os.environ.get("DEBUG", "0") == "1"
    # DEBUG=1: no optimisation, debug info, and assert() on (-UNDEBUG: Python's
    # own compile flags define NDEBUG).
    opt = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3", "-g0"]
    cxx = opt + ["-std=c++17", "-fopenmp", "-fvisibility=hidden", "-fno-trapping-math",
                 "-fno-math-errno"]
    # No -march: the CPU kernels are compiled once per ISA path
    # (csrc/cpu/isa_*.cpp, each with its own `#pragma GCC target`) and the
    # path is picked at load time from the CPU's features (csrc/cpu/isa.h),
    # so a build runs at the speed of whatever host it is installed on.
    define_macros = []
    # --exclude-libs,ALL hides the symbols of every static archive linked in.
    # Toolchains that link libstdc++ statically (some distributions' g++
    # wrappers do) would otherwise export its locale and facet objects, and the
    # libstdc++.so.6 that torch loads would take some of those references and
    # not others: then `stream << integer` in every TORCH_CHECK message reads
    # another copy's facet table, printing nothing or crashing the process.
    extra_link = ["-fopenmp", "-Wl,--exclude-libs,ALL"] + (["-g"] if debug else [])
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        nvcc = (["-O0", "-g", "-lineinfo", "-UNDEBUG"] if debug else ["-O3"]) + ["-std=c++17"]
        return cpp_extension.CUDAExtension(
            "fastcells._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
    return cpp_extension.CppExtension(
        "fastcells._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=extra_link,
    )


setup(
    name="fastcells",
    version="0.1.0",
    description="Fused LSTM, GRU and RNN kernels for PyTorch (CPU and CUDA), drop-in for torch.nn",
    packages=find_packages(include=["fastcells", "fastcells.*"]),
    package_data={"fastcells": ["data/*.csv", "data/*.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    license="BSD-3-Clause",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "data": ["pandas"],
        "bench": ["pandas", "matplotlib", "tqdm"],
        "test": ["pytest", "hypothesis", "pandas", "matplotlib", "tqdm"],
    },
)
