"""Build and install videomt_fast.

The CUDA extension ``videomt_fast._C`` (csrc/) is built with ninja when the installed torch has
CUDA and nvcc is found; otherwise it is skipped with one line and the package installs as pure
Python (it then compiles the extension just in time on first CUDA use, or runs the PyTorch path).

Environment switches: ``VIDEOMT_FAST_SKIP_CUDA_BUILD=1`` skips the extension; ``MAX_JOBS`` caps
the parallel compile jobs; ``VIDEOMT_FAST_CUDA_ARCHS`` (e.g. ``"8.0;9.0"``) picks the targets.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout's kernels/ folder is installed as ``videomt_fast.kernels``; seen from here as a top-level
# ``kernels`` it would shadow the PyPI package of that name, whose setuptools entry points (installed with
# transformers) are loaded during the build. Keep the checkout itself off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


def _cuda_extension():
    """``(ext_modules, cmdclass)``. The csrc sources are always copied into the built package
    (``videomt_fast/csrc``) so an installed package can build the extension just in time
    (videomt_fast/_ext.py); the extension itself is built here only with a CUDA torch and nvcc."""
    from setuptools.command.build_py import build_py

    class build_py_with_csrc(build_py):
        def run(self):
            super().run()
            target = os.path.join(self.build_lib, "videomt_fast", "csrc")
            os.makedirs(target, exist_ok=True)
            for path in glob.glob(os.path.join(HERE, "csrc", "*")):
                if os.path.splitext(path)[1] in (".cu", ".cuh", ".h", ".cpp"):
                    shutil.copy2(path, target)

    cmdclass = {"build_py": build_py_with_csrc}
    if os.environ.get("VIDEOMT_FAST_SKIP_CUDA_BUILD", "0") == "1":
        print("videomt_fast: skipping the CUDA extension (VIDEOMT_FAST_SKIP_CUDA_BUILD=1)", file=sys.stderr)
        return [], cmdclass
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in the build environment
        print(f"videomt_fast: skipping the CUDA extension (torch not importable: {exc})", file=sys.stderr)
        return [], cmdclass
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc not found"
        print(f"videomt_fast: skipping the CUDA extension ({why}); the package runs on its PyTorch path", file=sys.stderr)
        return [], cmdclass
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return [], cmdclass
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("VIDEOMT_FAST_CUDA_ARCHS", "8.0;9.0"))
    ext = CUDAExtension(
        name="videomt_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # no --use_fast_math: the kernels reproduce ATen's bilinear and sigmoid bits (expf, IEEE division)
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-lineinfo"]},
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    return [ext], cmdclass


ext_modules, cmdclass = _cuda_extension()

setup(
    name="videomt_fast",
    version="0.1.0",
    description="Fast VidEoMT / EoMT video and image segmentation: transformers' outputs, fused kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["videomt_fast", "videomt_fast.*"]),
    package_dir={"videomt_fast.kernels": "kernels"},
    package_data={"videomt_fast": ["csrc/*", "demo/weights/*"]},
    install_requires=[
        "torch>=2.4",
        # the Triton kernels (kernels/); a CUDA torch on Linux pins its own Triton (torch 2.13: 3.7.1), a CPU
        # torch brings none and the tests run the kernels under TRITON_INTERPRET=1. Supported: 3.6 to 3.9.
        "triton>=3.6,<3.10; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        "ninja",  # builds the CUDA extension (here, or just in time on first CUDA use)
        "numpy",
        "safetensors",
        "huggingface_hub",
        "tqdm",  # the planning progress line
    ],
    extras_require={
        "video": ["av", "pycocotools", "tqdm"],
        "segment": ["av", "pycocotools", "tqdm"],
        # transformers (the oracle): the supported range, whose ends (5.17, 5.25) the suite is run against
        "test": ["pytest", "transformers>=5.17,<5.26", "scipy", "pillow", "av", "pycocotools", "tqdm", "ray",
                 "onnx>=1.16", "onnxruntime>=1.17", "onnxscript"],
        "ray": ["ray"],
        # videomt-fast export and the ONNX Runtime runner (videomt_fast.export); onnxscript is what torch's
        # dynamo exporter needs (without it the TorchScript exporter writes fixed-size graphs)
        "onnx": ["onnx>=1.16", "onnxruntime>=1.17", "onnxscript"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["videomt-fast=videomt_fast.apps.cli:main"]},
)
