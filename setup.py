import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """hfgen.__version__, the one place the version is kept (read, not imported: the dependencies may be missing)."""
    with open(os.path.join(HERE, "hfgen", "__init__.py"), encoding="utf-8") as file:
        return re.search(r'^__version__ = "([^"]+)"$', file.read(), re.MULTILINE).group(1)


setup(
    name="hfgen",
    version=version(),
    description="Hugging Face-style VAEs, GANs, diffusion and latent diffusion models",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # pipelines/ and training/ live at the top of the repository but install inside hfgen,
    # so nothing but `hfgen` lands in site-packages.
    packages=["hfgen", "hfgen.data", "hfgen.models", "hfgen.pipelines", "hfgen.training"],
    package_dir={"hfgen": "hfgen", "hfgen.pipelines": "pipelines", "hfgen.training": "training"},
    install_requires=[
        "torch>=2.1,<3",
        # hfgen relies on how 0.42 records and loads custom pipeline components (see tests/test_pipelines.py).
        "diffusers>=0.42.1,<0.43",
        "accelerate>=1.0,<2",
        "huggingface_hub>=0.34",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "datasets>=3",
        "mlxtend>=0.23",
        "scikit-learn>=1.3",
        "torchmetrics>=1.4",  # Fréchet distance with a custom feature extractor
        "transformers>=4.40",  # image encoders for FD (DINOv2, CLIP), text encoders
        "psutil",  # free memory, checked before a large batch is sampled
    ],
    extras_require={
        "tensorboard": ["tensorboard"],
        # FID proper (Inception-v3): torch-fidelity pulls torchvision, which must match the installed torch build
        "fid": ["torch-fidelity"],
        # `hfgen demo` and --push_demo (gradio_client calls a running app)
        "demo": ["gradio>=6,<7", "gradio_client"],
        # the browser test drives Debian's chromium through its chromedriver (.ci/run installs both)
        "test": ["pytest>=8", "pytest-xdist>=3", "tensorboard", "gradio>=6,<7", "gradio_client", "selenium>=4"],
    },
    entry_points={"console_scripts": ["hfgen=hfgen.cli:main"]},
)
