from setuptools import find_packages, setup

NOTEBOOKS = ["jupytext>=1.16", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "ipywidgets>=8.1"]

setup(
    name="fastsampler",
    version="0.1.0",
    description="Fast, training-free ODE samplers for diffusion models as drop-in diffusers schedulers",
    packages=find_packages(include=["fastsampler", "fastsampler.*"]),
    package_data={"fastsampler": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.35,<0.43",
        "numpy>=1.24",
        "scipy>=1.10",
        "click>=8.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "optuna>=3.6",  # fastsampler.tune(method="s3"): resumable, multi-worker studies
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "fid": ["torchmetrics>=1.4", "torch-fidelity"],
        "pipelines": ["transformers>=4.40", "accelerate"],
        # notebooks/: jupytext turns the percent scripts into notebooks, nbclient runs them on an ipykernel kernel
        "notebooks": NOTEBOOKS,
        "test": ["pytest>=7", "triton>=3.0", "torchmetrics>=1.4", "transformers>=4.40", "accelerate", *NOTEBOOKS],
    },
    entry_points={"console_scripts": ["fastsampler=fastsampler.cli:main"]},
)
