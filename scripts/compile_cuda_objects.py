"""Compiles every csrc/cuda/*.cu to an object file with nvcc against torch's headers, exactly as
setup.py's CUDA build would, without linking or running anything: catches CUDA code that does not
compile on a machine with the CUDA toolkit but no GPU (CI). Needs a CUDA build of torch.

    CUDA_HOME=/usr/local/cuda python scripts/compile_cuda_objects.py [--arch 9.0] [-j 2]
"""

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cxx_standard():
    """The standard torch's headers demand (C++20 from torch 2.12 on, C++17 before)."""
    aten = os.path.join(cpp_extension.include_paths()[0], "ATen", "ATen.h")
    return "c++20" if "C++20" in open(aten).read() else "c++17"


def nvcc_command(source, output, arch):
    includes = cpp_extension.include_paths(device_type="cuda") + [
        os.path.join(ROOT, "csrc"),
        sysconfig.get_paths()["include"],
    ]
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    if os.path.isdir(nvidia):  # cusparse/cublas headers pulled in by ATen/cuda includes
        includes.append(nvidia)
    code = arch.replace(".", "")
    return [
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"),
        "-c",
        source,
        "-o",
        output,
        *[f"-I{p}" for p in includes],
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-O3",
        "--extended-lambda",
        f"-std={cxx_standard()}",
        "--compiler-options",
        "-fPIC",
        f"-gencode=arch=compute_{code},code=sm_{code}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DRGLCD_FAST_WITH_CUDA",
        "-Xptxas",
        "-v",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="9.0")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        sys.exit("needs a CUDA build of torch and CUDA_HOME pointing at the toolkit")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    with tempfile.TemporaryDirectory() as out:

        def compile_one(source):
            obj = os.path.join(out, os.path.basename(source) + ".o")
            result = subprocess.run(nvcc_command(source, obj, args.arch), capture_output=True, text=True)
            return source, result

        failed = 0
        with ThreadPoolExecutor(args.jobs) as pool:
            for source, result in pool.map(compile_one, sources):
                status = "ok" if result.returncode == 0 else "FAILED"
                print(f"{status}: {os.path.relpath(source, ROOT)}")
                if result.returncode != 0:
                    failed += 1
                    print(result.stdout + result.stderr)
    print(f"{len(sources) - failed} compiled, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
