"""parafuse: patch-parallel inference for high-resolution diffusion images."""
from setuptools import setup

TORCH = "torch>=2.11,<2.14"   # the CPU 2.13.0 on development machines; 2.11 on GPU machines


def torch_pin() -> str:
    """Extras that pull packages built against one torch (xformers) must never replace the torch in
    place: pin the installed version when setup.py can see it, else the supported range."""
    try:
        import torch
        return f"torch=={torch.__version__.split('+')[0]}"
    except ImportError:
        return TORCH


setup(
    name="parafuse",
    version="0.1.0",
    description="Patch-parallel multi-GPU runtime for high-resolution diffusion images",
    python_requires=">=3.10",
    packages=["parafuse", "parafuse.models", "parafuse.solvers", "parafuse.parallel", "parafuse.diffusers",
              "parafuse_kernels"],
    package_dir={"parafuse_kernels": "kernels/parafuse_kernels"},
    package_data={"parafuse.models": ["weights/*.safetensors", "weights/*.md", "weights/*.png"],
                  "parafuse": ["attention_auto.json"]},
    install_requires=[TORCH, "triton>=3.2; platform_system == 'Linux'", "numpy", "pillow", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "diffusers>=0.30", "transformers", "peft", "scikit-image", "scipy", "matplotlib"],
        "train": ["scikit-image"],
        # diffusers pipelines exist only beside transformers; peft is diffusers' LoRA backend
        "diffusers": ["diffusers>=0.30", "transformers", "peft"],
        "xformers": ["xformers", torch_pin()],
    },
    entry_points={"console_scripts": ["parafuse-generate=parafuse.generate:main",
                                      "parafuse-train=parafuse.train:main"]},
)
