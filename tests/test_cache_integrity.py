"""Caches that cannot lie (issue 30, item 3): a latent cache or FD statistics cache file that is zeroed after its
header at full size, truncated, or missing its integrity record is rebuilt with one log line naming the file, and
what is read afterwards equals a fresh build. Nothing trains on a broken file, nothing stops with an mmap message."""

import logging
import os

import numpy as np
import pytest
import torch

from hfgen import VAEModel, VAEPipeline
from hfgen.cache_files import sidecar_path
from hfgen.data import ImageDataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import ClassifierFeatures
from hfgen.frechet import load_cached_statistics, statistics_cache_path
from hfgen.latent_cache import INFO_FILE, MOMENTS_FILE, LatentDataset, encode_to_cache
from hfgen.models.classifier import DigitClassifier

DAMAGES = ("zeroed after the header", "truncated", "no integrity record")


def damage(path, how: str, header_bytes: int) -> None:
    """Breaks a cache file as a killed run or a bad disk would."""
    size = os.path.getsize(path)
    if how == "zeroed after the header":  # the same size, all zeros after the header
        with open(path, "r+b") as file:
            file.seek(header_bytes)
            file.write(bytes(size - header_bytes))
    elif how == "truncated":
        os.truncate(path, size // 2)
    else:
        os.remove(sidecar_path(path))
    assert how == "truncated" or os.path.getsize(path) == size


def rebuild_lines(caplog, path) -> list[str]:
    """The log lines that announce a rebuild of `path`."""
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING and "rebuilding" in record.getMessage() and str(path) in record.getMessage()]


# ----- the latent cache --------------------------------------------------------------------------------------


@pytest.fixture
def first_stage_and_data():
    torch.manual_seed(0)
    vae = VAEModel(sample_size=16, architecture="conv", hidden_dims=(8, 16), latent_channels=2).eval()
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return vae, ImageDataset(images, torch.zeros(6, dtype=torch.long), name="six-random-images")


@pytest.mark.parametrize("name", [MOMENTS_FILE, INFO_FILE])
@pytest.mark.parametrize("how", DAMAGES)
def test_a_broken_latent_cache_is_rebuilt_with_one_line_naming_the_file(first_stage_and_data, tmp_path, caplog, how, name):
    vae, dataset = first_stage_and_data
    folder = encode_to_cache(vae, dataset, str(tmp_path), show_progress=False)
    fresh = LatentDataset(folder, dataset.labels, None)
    fresh_moments, fresh_info = np.array(fresh.moments), fresh.info
    del fresh
    path = os.path.join(folder, name)
    header_bytes = np.load(path, mmap_mode="r").offset if name == MOMENTS_FILE else 1
    damage(path, how, header_bytes)

    with pytest.raises(ValueError, match=f"the latent cache file {path} cannot be trusted"):  # never read as it is
        LatentDataset(folder, dataset.labels, None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert encode_to_cache(vae, dataset, str(tmp_path), show_progress=False) == folder
    assert len(rebuild_lines(caplog, path)) == 1 and len(caplog.records) == 1, caplog.text
    rebuilt = LatentDataset(folder, dataset.labels, None)
    np.testing.assert_array_equal(np.array(rebuilt.moments), fresh_moments)
    assert rebuilt.info == fresh_info
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # now intact: reused without a word
        encode_to_cache(vae, dataset, str(tmp_path), show_progress=False)
    assert not caplog.records


def test_latents_are_sealed_when_written(first_stage_and_data, tmp_path):
    vae, dataset = first_stage_and_data
    folder = encode_to_cache(vae, dataset, str(tmp_path), show_progress=False)
    assert sorted(os.listdir(folder)) == sorted([INFO_FILE, MOMENTS_FILE, INFO_FILE + ".check.json",
                                                 MOMENTS_FILE + ".check.json"])


# ----- the FD statistics cache -------------------------------------------------------------------------------


@pytest.fixture
def fd_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path))
    torch.manual_seed(0)
    pipeline = VAEPipeline(VAEModel(sample_size=8, hidden_dims=[16], latent_dim=2).eval())
    extractor = ClassifierFeatures(DigitClassifier(sample_size=8, feature_dim=16, block_out_channels=(4,), num_classes=10,
                                                   id2label={str(i): str(i) for i in range(10)}))
    generator = torch.Generator().manual_seed(0)
    dataset = ImageDataset(torch.rand(60, 1, 8, 8, generator=generator), torch.randint(10, (60,), generator=generator),
                           name="sixty-random-images")
    key = {"dataset": dataset.fingerprint, "images": "randperm(60, seed=0)[:50]", "features": extractor.cache_id}
    read = []  # one entry per real image batch read: the statistics were computed, not taken from the cache
    original = ImageDataset.__getitem__
    monkeypatch.setattr(ImageDataset, "__getitem__", lambda self, index: read.append(1) or original(self, index))

    def fd(**kwargs):
        read.clear()
        return evaluate_pipeline(pipeline, dataset, num_samples=50, feature_extractor=extractor, likelihood=False,
                                 **kwargs), bool(read)

    return fd, key


@pytest.mark.parametrize("sample_metrics", [False, True])  # the statistics alone, and with the features
@pytest.mark.parametrize("how", DAMAGES)
def test_a_broken_fd_statistics_file_is_recomputed_with_one_line_naming_it(fd_setup, caplog, how, sample_metrics):
    fd, key = fd_setup
    fresh, computed = fd(sample_metrics=sample_metrics)
    assert computed
    path = statistics_cache_path(key)
    fresh_outer_sum = load_cached_statistics(key)[0].outer_sum.clone()  # (read memory-mapped)
    damage(path, how, header_bytes=8 + int.from_bytes(open(path, "rb").read(8), "little"))  # safetensors' header

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again, computed = fd(sample_metrics=sample_metrics)
    assert computed and again == fresh
    assert len(rebuild_lines(caplog, path)) == 1, caplog.text
    statistics = load_cached_statistics(key)[0]  # the file written again is whole and equal to the fresh one
    assert statistics.num == 50 and torch.equal(statistics.outer_sum, fresh_outer_sum)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cached, computed = fd(sample_metrics=sample_metrics)
    assert not computed and cached == fresh and not rebuild_lines(caplog, path)
