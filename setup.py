"""Install faig_fast.

The optional C++/CUDA extension in ``csrc/`` is not built here, so an install never needs a
compiler, a CUDA toolkit or a torch inside pip's build environment.  Nor is it compiled on a call:
backend ``auto`` only loads an extension that is already built, else uses PyTorch.  Build it once
with ``faig info --build`` (or ``make ext``; ``torch.utils.cpp_extension.load`` with ninja, into a
per-torch-version cache), or by asking for ``backend="cpp"``/``"cuda"`` explicitly.  A failed build is
reported once as a warning and the library falls back to PyTorch.
"""
from setuptools import setup

setup(
    name="faig_fast",
    version="0.1.0",
    description="Fast FAIG: filter attribution based on integral gradients for blind SR",
    python_requires=">=3.9",
    packages=["faig_fast", "faig_fast.core", "faig_fast.core.strategies", "faig_fast.training", "faig_fast.ops",
              "faig_fast.models", "faig_fast.data", "faig_fast.analyses", "faig_fast.apps", "faig_fast.utils",
              "faig_fast.kernels", "faig_fast.csrc"],
    package_dir={"faig_fast": "faig_fast", "faig_fast.kernels": "kernels", "faig_fast.csrc": "csrc"},
    package_data={"faig_fast": ["assets/*", "assets/*/*", "assets/*/*/*"], "faig_fast.csrc": ["*.cpp", "*.cu"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "Pillow>=9.0",
        "scikit-image>=0.21",
        "pybind11>=2.10",
        "ninja>=1.11",
        "triton>=3.0; platform_system=='Linux'",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "opencv-python-headless>=4.8",
        ],
    },
    entry_points={"console_scripts": ["faig=faig_fast.apps.cli:main"]},
)
