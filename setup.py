"""Build rglcd_fast: the C++ extension always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment switches (every build choice is one):
  RGLCD_FAST_NO_EXT=1          skip the extension; the pure-PyTorch references serve as the kernels
  RGLCD_FAST_CUDA=auto|0|1     CUDA kernels: when possible (default), never, or always (fail if impossible)
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default: the visible GPUs', else default_cuda_arch_list's)
  MAX_JOBS                     parallel compile jobs (read by torch's ninja builder)
"""

import glob
import os

from setuptools import setup


def default_cuda_arch_list(cuda_version: str, gpu_visible: bool):
    """TORCH_CUDA_ARCH_LIST when unset: None (torch's own choice, the visible GPUs' architectures) where a GPU
    is visible; else the current data-centre and consumer GPUs (Turing T4 / RTX 20, A100, RTX 30 / A10,
    RTX 40 / L4, H100, and with CUDA >= 12.8 B200 and RTX 50), PTX for the newest so later cards compile it
    at load time."""
    if gpu_visible:
        return None
    major, minor = (int(x) for x in cuda_version.split(".")[:2])
    archs = ["7.5", "8.0", "8.6", "8.9", "9.0"] + (["10.0", "12.0"] if (major, minor) >= (12, 8) else [])
    return ";".join(archs) + "+PTX"


def _extensions():
    if os.environ.get("RGLCD_FAST_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_mode = os.environ.get("RGLCD_FAST_CUDA", "auto")
    if cuda_mode not in ("auto", "0", "1"):
        raise ValueError(f"RGLCD_FAST_CUDA must be auto, 0 or 1, got {cuda_mode!r}")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_mode == "1" and not cuda_possible:
        raise RuntimeError("RGLCD_FAST_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    with_cuda = cuda_possible and cuda_mode != "0"

    debug = os.environ.get("RGLCD_FAST_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fopenmp", "-fno-math-errno"]  # torch's builder adds the C++ standard it needs
    sources = sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")) + ["csrc/module.cpp"]
    extra = {"cxx": cxx_flags}
    kwargs = dict(
        name="rglcd_fast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,  # torch's builder defines Py_LIMITED_API to match
        define_macros=[],
    )
    if with_cuda:
        archs = default_cuda_arch_list(torch.version.cuda, torch.cuda.is_available() and torch.cuda.device_count() > 0)
        if archs and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-lineinfo", "--extended-lambda"]  # torch's DistributionTemplates.h needs it
        kwargs["define_macros"].append(("RGLCD_FAST_WITH_CUDA", None))
        ext = CUDAExtension(extra_compile_args=extra, **kwargs)
    else:
        ext = CppExtension(extra_compile_args=extra, **kwargs)
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    ext_modules, cmdclass = _extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    )
