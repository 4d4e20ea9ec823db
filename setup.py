from setuptools import find_packages, setup

# Version ranges: the lower bound is the oldest release we support, the upper bound the first we have not tested
# (CI installs the newest release inside each range). diffusers is bounded tightly on both sides because our
# schedulers follow its scheduler contract closely: DIFFUSERS_TESTED lists the releases whose contract tests
# (tests/test_parity.py, test_contract.py, test_hardening.py, test_pipelines.py, …) passed.
DIFFUSERS_TESTED = ("0.37.1", "0.38.0", "0.40.0", "0.42.1")  # 2026-12-07; 0.35.2 and 0.36.0 fail (flow grids)
# running the notebooks (CI: tests/test_notebooks.py) ; opening them: JupyterLab, where jupytext ≥ 1.16 brings its
# extension ("Open With → Jupytext Notebook" on a percent script)
NOTEBOOKS_RUN = ["jupytext>=1.16,<2", "nbclient>=0.10,<1", "nbformat>=5.9,<6", "ipykernel>=6.29,<8",
                 "ipywidgets>=8.1,<9"]
NOTEBOOKS = [*NOTEBOOKS_RUN, "jupyterlab>=4,<5"]
TRITON = "triton>=3.0,<4"
TORCHMETRICS = "torchmetrics>=1.4,<2"
PIPELINES = ["transformers>=4.40,<6", "accelerate>=0.26,<2"]

setup(
    name="fastsampler",
    version="0.1.0",
    description="Fast, training-free ODE samplers for diffusion models as drop-in diffusers schedulers",
    packages=find_packages(include=["fastsampler", "fastsampler.*"]),
    package_data={"fastsampler": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<3",
        f"diffusers>={DIFFUSERS_TESTED[0]},<0.43",
        "numpy>=1.24,<3",
        "scipy>=1.10,<2",
        "click>=8.0,<9",
        "tqdm>=4.60,<5",
        "matplotlib>=3.7,<4",
        "safetensors>=0.4,<1",
        "scikit-learn>=1.3,<2",
        "optuna>=3.6,<6",  # fastsampler.tune(method="s3"): resumable, multi-worker studies
    ],
    extras_require={
        "triton": [TRITON],
        "fid": [TORCHMETRICS, "torch-fidelity>=0.3,<1"],
        "pipelines": PIPELINES,
        # notebooks/: jupytext turns the percent scripts into notebooks, nbclient runs them on an ipykernel kernel,
        # JupyterLab opens them
        "notebooks": NOTEBOOKS,
        # hypothesis: property tests; torchsde / torchdiffeq: k-diffusion's sampling module, the reference of
        # fastsampler.k_diffusion (k-diffusion itself goes in with --no-deps: its torchvision has no CPU build here);
        # import-linter: the one-way layers (.importlinter, tests/test_layers.py)
        "test": ["pytest>=7,<10", "hypothesis>=6.100,<7", "torchsde>=0.2.6,<0.3", "torchdiffeq>=0.2.4,<0.3",
                 "import-linter>=2.1,<3", TRITON,
                 TORCHMETRICS, *PIPELINES, *NOTEBOOKS_RUN],
    },
    entry_points={"console_scripts": ["fastsampler=fastsampler.cli:main"]},
)
