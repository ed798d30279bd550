"""Shared test set-up: no network, small seeded models, and one short training run reused by several tests."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What hfgen trains on first use (the FD's digit classifier) is cached once per test session, away from ~/.cache.
os.environ.setdefault("HFGEN_CACHE", tempfile.mkdtemp(prefix="hfgen-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from hfgen.data import load_image_dataset  # noqa: E402
from helpers import quick_vae_args  # noqa: E402



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a run that really learns, or launches processes; "
                                       '`pytest -m "not slow"` is the quick loop')


# The tests' models are small: one thread avoids OpenMP's spin-waiting, which made tiny steps ~80x slower
# when the second core was busy.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_train():
    return load_image_dataset("hfgen:mnist", "train")


@pytest.fixture(scope="session")
def mnist_test():
    return load_image_dataset("hfgen:mnist", "test")


@pytest.fixture(scope="session")
def digit_classifier(mnist_train, mnist_test):
    """A logistic-regression digit classifier trained on the 4,000 training digits: images (B,1,28,28) -> labels."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=300, C=0.05)
    classifier.fit(mnist_train.images.flatten(1).numpy(), mnist_train.labels.numpy())
    accuracy = classifier.score(mnist_test.images.flatten(1).numpy(), mnist_test.labels.numpy())
    assert accuracy > 0.85, f"the test classifier itself is too weak: {accuracy:.3f}"
    return lambda images: torch.from_numpy(classifier.predict(images.flatten(1).numpy()))


@pytest.fixture(scope="session")
def trained_vae_dir(tmp_path_factory):
    """An MLP VAE trained for 5 epochs on the real digits with the README's trainer (a few seconds)."""
    from hfgen.training.train_vae import main

    output_dir = tmp_path_factory.mktemp("vae") / "out"
    main(quick_vae_args(output_dir, "--num_epochs", "5", "--save_images_epochs", "5"))
    return output_dir


@pytest.fixture(scope="session")
def trained_cvae_dir(tmp_path_factory):
    from hfgen.training.train_vae import main

    output_dir = tmp_path_factory.mktemp("cvae") / "out"
    main(quick_vae_args(output_dir, "--num_epochs", "10", "--conditional", "--latent_dim", "2"))
    return output_dir
