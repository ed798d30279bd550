r"""Fréchet distance (FD) between two sets of images in the features of an extractor (hfgen.features).

FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) between Gaussians fitted to the two feature sets
(Heusel et al., 2017). The fits need only the number of features, their sum and the sum of their outer products,
so `feature_statistics` accumulates those batch by batch (in float64, as torchmetrics' FrechetInceptionDistance
does): any number of images in the memory of one batch. The statistics of a set of real images can be saved in
a small cache file and reused by later evaluations (`save_cached_statistics`, `load_cached_statistics`), with the
features themselves when the metrics of hfgen.sample_metrics need them (`load_cached_features`). Each cache file
is sealed (hfgen.cache_files) when written and checked when read: a broken one is recomputed, with one log line.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .cache_files import broken_reason, report_broken, seal
from .utils import hfgen_cache_dir
from .utils import check_positive_int

STATISTICS_DIR = "fd-statistics"  # under hfgen_cache_dir()
STATISTICS_FORMAT = "1"  # part of every cache key: a new format never reads an old file


@dataclass
class FeatureStatistics:
    """What FD needs of a set of features, in float64: `num` vectors, their sum (d,) and the sum of their outer
    products (d, d)."""

    num: int
    feature_sum: torch.Tensor
    outer_sum: torch.Tensor

    @classmethod
    def empty(cls, num_features: int, device: torch.device | str = "cpu") -> "FeatureStatistics":
        zeros = torch.zeros(num_features, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(num_features, num_features, dtype=torch.float64, device=device))

    def update(self, features: torch.Tensor) -> None:
        """Adds features (B, d)."""
        features = features.double().to(self.feature_sum.device)
        self.num += features.shape[0]
        self.feature_sum += features.sum(0)
        self.outer_sum += features.T @ features

    @property
    def mean(self) -> torch.Tensor:
        return self.feature_sum / self.num

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased covariance (d, d): (sum x x^T - n mu mu^T) / (n - 1)."""
        mean = self.mean
        return (self.outer_sum - self.num * torch.outer(mean, mean)) / (self.num - 1)


def _check_feature_extractor(feature_extractor) -> None:
    num_features = getattr(feature_extractor, "num_features", None)
    if not isinstance(feature_extractor, nn.Module) or not isinstance(num_features, int):
        raise TypeError(f"`feature_extractor` must be an nn.Module with an integer `num_features`, got "
                        f"{type(feature_extractor).__name__} with num_features={num_features!r}")


def _check_unit_images(name: str, images, feature_extractor: nn.Module, min_images: int = 1) -> None:
    channels = getattr(feature_extractor, "in_channels", None)
    shape = f"(N, {channels}, S, S)" if channels else "(N, C, H, W)"
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"`{name}` must be a float tensor {shape} in [0, 1], got {got}")
    if images.dim() != 4 or (channels is not None and (images.shape[1] != channels or images.shape[2] != images.shape[3])):
        raise ValueError(f"`{name}` must have shape {shape} for this feature extractor, got {tuple(images.shape)}")
    if images.shape[0] < min_images:
        raise ValueError(f"`{name}` must hold at least {min_images} images (FD compares covariances), "
                         f"got {images.shape[0]}")
    low, high = images.min().item(), images.max().item()
    if not (0 <= low and high <= 1):  # also refuses NaN
        raise ValueError(f"`{name}` must hold values in [0, 1], got values in [{low:.3g}, {high:.3g}]")


def statistics_device(feature_extractor: nn.Module) -> torch.device | str:
    """Where `feature_statistics` keeps its float64 sums: the extractor's device, as torchmetrics does (but MPS
    has no float64: the CPU there)."""
    _check_feature_extractor(feature_extractor)
    parameter = next(feature_extractor.parameters(), None)
    return "cpu" if parameter is None or parameter.device.type == "mps" else parameter.device


@torch.no_grad()
def batch_features(batches: Iterable[torch.Tensor], feature_extractor: nn.Module, name: str = "batches"):
    """Yields (images, features) for image batches, each (B, C, H, W) float in [0, 1], read one at a time:
    the images checked and moved to the extractor's device and dtype, their features (B, num_features).
    `name` names the images in error messages."""
    _check_feature_extractor(feature_extractor)
    parameter = next(feature_extractor.parameters(), None)
    for images in batches:
        _check_unit_images(name, images, feature_extractor)
        if parameter is not None:
            images = images.to(parameter.device, parameter.dtype)
        features = feature_extractor(images)
        if features.shape != (images.shape[0], feature_extractor.num_features):
            raise ValueError(f"`feature_extractor` must map {tuple(images.shape)} images to (B, num_features) = "
                             f"{(images.shape[0], feature_extractor.num_features)}, got {tuple(features.shape)}")
        yield images, features


@torch.no_grad()
def feature_statistics(batches: Iterable[torch.Tensor], feature_extractor: nn.Module,
                       name: str = "batches") -> FeatureStatistics:
    """The FD statistics of the features of image batches, each (B, C, H, W) float in [0, 1], read one at a time
    and moved to the extractor's device and dtype. `name` names the images in error messages."""
    device = statistics_device(feature_extractor)  # checks the extractor first
    statistics = FeatureStatistics.empty(feature_extractor.num_features, device)
    for _, features in batch_features(batches, feature_extractor, name):
        statistics.update(features)
    return statistics


def frechet_distance_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    r"""FD = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) between two sets' statistics."""
    for name, statistics in (("real", real), ("fake", fake)):
        if not isinstance(statistics, FeatureStatistics):
            raise TypeError(f"`{name}` must be FeatureStatistics, got {type(statistics).__name__}")
        if statistics.num < 2:
            raise ValueError(f"`{name}` must hold the features of at least 2 images (FD compares covariances), "
                             f"got {statistics.num}")
    if real.feature_sum.shape != fake.feature_sum.shape:
        raise ValueError(f"`real` and `fake` must hold features of one width, got {real.feature_sum.numel()} "
                         f"and {fake.feature_sum.numel()}")
    cov_real, cov_fake = real.covariance, fake.covariance.to(real.outer_sum.device)
    # Tr((S_r S_f)^{1/2}) is the sum of the square roots of the eigenvalues of S_r S_f, which are real and >= 0
    # (a product of two PSD matrices) up to rounding; torchmetrics computes it the same way.
    trace_sqrt = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()
    mean_term = (real.mean - fake.mean.to(real.mean.device)).square().sum()
    return (mean_term + cov_real.trace() + cov_fake.trace() - 2 * trace_sqrt).item()


@torch.no_grad()
def frechet_distance(
    real_images: torch.Tensor, fake_images: torch.Tensor, feature_extractor: nn.Module, batch_size: int = 250
) -> float:
    r"""FD between Gaussians fitted to the features of two image sets: (N, C, H, W) and (M, C, H, W) in [0, 1].

    `feature_extractor` is a module with an integer `num_features`, in eval mode (see hfgen.features); features
    are extracted `batch_size` images at a time on its device. For image sets that do not fit in memory, use
    `feature_statistics` on batches and `frechet_distance_from_statistics`.
    """
    _check_feature_extractor(feature_extractor)
    check_positive_int("batch_size", batch_size)
    _check_unit_images("real_images", real_images, feature_extractor, min_images=2)
    _check_unit_images("fake_images", fake_images, feature_extractor, min_images=2)
    if real_images.shape[1:] != fake_images.shape[1:]:
        raise ValueError(f"`real_images` and `fake_images` must have the same image shape, got "
                         f"{tuple(real_images.shape[1:])} and {tuple(fake_images.shape[1:])}")
    real, fake = (
        feature_statistics((images[start:start + batch_size] for start in range(0, len(images), batch_size)),
                           feature_extractor, name)
        for images, name in ((real_images, "real_images"), (fake_images, "fake_images"))
    )
    return frechet_distance_from_statistics(real, fake)


# ----- the cache of real images' statistics ---------------------------------------------------------------


def statistics_cache_path(key: dict[str, str], cache_dir: str | None = None) -> str:
    """The cache file for `key` (what identifies the statistics: e.g. the dataset's fingerprint, which of its
    images, the feature extractor's `cache_id`), under `cache_dir` (default: hfgen_cache_dir())/fd-statistics."""
    name = hashlib.sha256(_key_text(key).encode()).hexdigest()[:32]
    return os.path.join(cache_dir or hfgen_cache_dir(), STATISTICS_DIR, f"{name}.safetensors")


def _key_text(key: dict[str, str]) -> str:
    return json.dumps({"format": STATISTICS_FORMAT, **key}, sort_keys=True)


def save_cached_statistics(key: dict[str, str], statistics: FeatureStatistics, labels: torch.Tensor | None = None,
                           cache_dir: str | None = None, features: torch.Tensor | None = None) -> str:
    """Saves `statistics` (and the images' labels (N,) and features (N, d), if given: hfgen.sample_metrics needs
    the features themselves) as the cache entry of `key`; returns its path.

    The file is written to a temporary name in the same folder, then renamed (`os.replace`) and sealed: a reader
    never uses half a file, and of two processes writing the same entry the last one wins with a whole file.
    """
    path = statistics_cache_path(key, cache_dir)
    tensors = {"num": torch.tensor([statistics.num]), "feature_sum": statistics.feature_sum.cpu(),
               "outer_sum": statistics.outer_sum.cpu()}
    if labels is not None:
        tensors["labels"] = labels.cpu().long()
    if features is not None:
        if features.shape != (statistics.num, statistics.feature_sum.numel()):
            raise ValueError(f"`features` must be the {statistics.num} feature vectors of `statistics`, got shape "
                             f"{tuple(features.shape)}")
        tensors["features"] = features.detach().cpu().contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=".fd-statistics-", suffix=".tmp", dir=os.path.dirname(path))
    os.close(descriptor)
    try:
        save_file(tensors, staging, metadata={"key": _key_text(key)})
        os.replace(staging, path)
        seal(path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def _read_cache_entry(key: dict[str, str], names: tuple[str, ...], cache_dir: str | None) -> dict | None:
    """The tensors `names` (those present) of the cache entry of `key`, or None when there is none or it is
    broken (then logged: the caller recomputes and overwrites it)."""
    path = statistics_cache_path(key, cache_dir)
    if not os.path.isfile(path):
        return None
    reason = broken_reason(path)
    if reason is not None:
        report_broken(path, reason, what="FD statistics cache")
        return None
    try:
        with safe_open(path, "pt") as file:
            if (file.metadata() or {}).get("key") != _key_text(key):
                return None  # another key with the same hash prefix
            return {name: file.get_tensor(name) for name in names if name in file.keys()}
    except SafetensorError as error:  # written by something else: recompute and overwrite it
        report_broken(path, f"safetensors cannot read it: {error}", what="FD statistics cache")
        return None


def load_cached_statistics(key: dict[str, str], cache_dir: str | None = None
                           ) -> tuple[FeatureStatistics, torch.Tensor | None] | None:
    """(statistics, labels or None) of the cache entry of `key`, or None when there is none."""
    tensors = _read_cache_entry(key, ("num", "feature_sum", "outer_sum", "labels"), cache_dir)
    if tensors is None:
        return None
    statistics = FeatureStatistics(int(tensors["num"].item()), tensors["feature_sum"], tensors["outer_sum"])
    return statistics, tensors.get("labels")


def load_cached_features(key: dict[str, str], cache_dir: str | None = None) -> torch.Tensor | None:
    """The feature vectors (N, d) saved with the cache entry of `key`, or None when it has none."""
    tensors = _read_cache_entry(key, ("features",), cache_dir)
    return None if tensors is None else tensors.get("features")
