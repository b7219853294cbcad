"""Builds piper_comm._C by running CMake (CMakeLists.txt over csrc/sources.txt).

Environment: PIPER_CUDA=AUTO|ON|OFF (default AUTO: the CUDA backend when nvcc is found),
PIPER_MPI=AUTO|ON|OFF (default AUTO: MPI called from C++ when mpi4py's MPI is found),
CMAKE_CUDA_ARCHITECTURES (default "80;90"), PIPER_BUILD_TYPE (default Release),
PIPER_BUILD_DIR (default build/). Install with `pip install --no-build-isolation -e .`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PIPER_BUILD_DIR", ROOT / "build"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PIPER_BUILD_TYPE', 'Release')}",
            f"-DPIPER_CUDA={os.environ.get('PIPER_CUDA', 'AUTO')}",
            f"-DPIPER_MPI={os.environ.get('PIPER_MPI', 'AUTO')}",
        ]
        if "CMAKE_CUDA_ARCHITECTURES" in os.environ:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("piper_comm._C")], cmdclass={"build_ext": CMakeBuild})
