r"""Sample-quality metrics beyond the Fréchet distance, in the same features (hfgen.features).

FD at N = 1,000 is biased upwards (its covariance estimates are), and one number mixes fidelity with diversity.
These metrics take the same feature matrices as FD, real (N, d) and generated (M, d); `evaluate_pipeline(...,
sample_metrics=True)` extracts each set once and shares the real features between FD and all of them.

- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared maximum mean
  discrepancy with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Unbiased: about 0
  for two samples of one distribution at any N. Called KID whatever the features are (FD is FID in Inception's).
- precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing
  generative models"): the share of generated features inside the real manifold (the union of the balls that
  reach each real feature's k-th nearest real neighbour), and of real features inside the generated manifold.
- density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models"):
  how many real balls hold a generated feature, on average, divided by k; the share of real balls that hold at
  least one generated feature.
- `class_accuracy`: a classifier's accuracy on the classes a conditional model was asked for.
- `memorisation_share`: how many samples are closer to the training set than held-out real images are.

A point is inside a ball when its distance is strictly below the radius, as in Naeem et al.'s reference code
(`prdc`): a set compared with itself then gives precision = recall = coverage = 1 and density = 1 exactly (no
ties). Distances are Euclidean, in float64, computed `torch.cdist` block by block (`DISTANCE_BLOCK_ELEMENTS`
distances at a time), so memory stays O(block) rather than O(N M); they run on the features' device (MPS, which
has no float64, on the CPU).
"""

from collections.abc import Iterable

import torch

from .utils import check_fraction, check_positive_int

DISTANCE_BLOCK_ELEMENTS = 2**22  # pairwise distances held at once: 32 MiB in float64
KID_MAX_SUBSET_SIZE = 1000
MEMORISATION_QUANTILE = 0.05  # of the held-out images' distances to their nearest training image


def _as_features(name: str, features, min_rows: int = 1) -> torch.Tensor:
    """`features` (N, d) as float64, checked: a float tensor of finite values with at least `min_rows` rows."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        got = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
        raise TypeError(f"`{name}` must be a float tensor of features (N, d), got {got}")
    if features.dim() != 2:
        raise ValueError(f"`{name}` must be a matrix of features (N, d), got shape {tuple(features.shape)}")
    if features.shape[0] < min_rows:
        raise ValueError(f"`{name}` must hold at least {min_rows} feature vectors, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError(f"`{name}` holds non-finite values (NaN or inf)")
    if features.device.type == "mps":
        features = features.cpu()
    return features.double()


def _as_pair(real, fake, min_rows: int = 1, names=("real_features", "fake_features")):
    """Both sets checked, of one width, on one device (an accelerator if either is on one)."""
    real, fake = _as_features(names[0], real, min_rows), _as_features(names[1], fake, min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"`{names[0]}` and `{names[1]}` must hold features of one width, got {real.shape[1]} "
                         f"and {fake.shape[1]}")
    device = fake.device if real.device.type == "cpu" else real.device
    return real.to(device), fake.to(device)


def _row_blocks(num_rows: int, num_columns: int):
    """(start, stop) of blocks of rows whose distances to `num_columns` points fit DISTANCE_BLOCK_ELEMENTS."""
    size = max(1, DISTANCE_BLOCK_ELEMENTS // max(1, num_columns))
    return ((start, min(start + size, num_rows)) for start in range(0, num_rows, size))


def _check_nearest_k(nearest_k, *sets) -> None:
    check_positive_int("nearest_k", nearest_k)
    for name, features in sets:
        if features.shape[0] <= nearest_k:
            raise ValueError(f"`nearest_k` ({nearest_k}) must be below the number of `{name}` "
                             f"({features.shape[0]}): each needs {nearest_k} neighbours besides itself")


def nearest_neighbour_radii(features: torch.Tensor, nearest_k: int = 3) -> torch.Tensor:
    """(N,) float64: the distance from each row of `features` (N, d) to its `nearest_k`-th nearest other row."""
    features = _as_features("features", features)
    _check_nearest_k(nearest_k, ("features", features))
    radii = []
    for start, stop in _row_blocks(len(features), len(features)):
        distances = torch.cdist(features[start:stop], features)
        # the (k+1)-th smallest: the row itself, at distance 0, is the first
        radii.append(distances.kthvalue(nearest_k + 1, dim=1).values)
    return torch.cat(radii)


@torch.no_grad()
def precision_recall_density_coverage(real_features: torch.Tensor, fake_features: torch.Tensor,
                                      nearest_k: int = 3) -> dict[str, float]:
    r"""Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) of generated
    features (M, d) against real ones (N, d), with k = `nearest_k` nearest-neighbour balls.

    With r_k(x) the distance from x to its k-th nearest other point of its own set, and B(x) the open ball of
    radius r_k(x) around x:

    - precision = (1/M) sum_j 1[fake_j is in some B(real_i)]: samples that look real;
    - recall = (1/N) sum_i 1[real_i is in some B(fake_j)], radii taken among the samples: real images the model
      can draw;
    - density = (1/(k M)) sum_j sum_i 1[fake_j in B(real_i)]: about 1 when samples are distributed as the real
      images, more when they crowd dense real regions;
    - coverage = (1/N) sum_i 1[some fake_j is in B(real_i)]: real neighbourhoods that hold a sample.

    Returns {"precision", "recall", "density", "coverage"}, each in [0, 1] except density (in [0, N/k]).
    """
    real, fake = _as_pair(real_features, fake_features)
    _check_nearest_k(nearest_k, ("real_features", real), ("fake_features", fake))
    real_radii, fake_radii = nearest_neighbour_radii(real, nearest_k), nearest_neighbour_radii(fake, nearest_k)
    real_balls_holding = torch.zeros(len(fake), dtype=torch.long, device=fake.device)  # per sample
    in_fake_manifold, covered = [], []
    for start, stop in _row_blocks(len(real), len(fake)):
        distances = torch.cdist(real[start:stop], fake)  # (block of real, M)
        inside_real_balls = distances < real_radii[start:stop, None]
        real_balls_holding += inside_real_balls.sum(0)
        covered.append(inside_real_balls.any(1))
        in_fake_manifold.append((distances < fake_radii[None]).any(1))
    return {
        "precision": (real_balls_holding > 0).double().mean().item(),
        "recall": torch.cat(in_fake_manifold).double().mean().item(),
        "density": real_balls_holding.sum().item() / (nearest_k * len(fake)),
        "coverage": torch.cat(covered).double().mean().item(),
    }


@torch.no_grad()
def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor, subset_size: int | None = None,
                    num_subsets: int = 100, seed: int = 0, degree: int = 3, gamma: float | None = None,
                    coef: float = 1.0) -> tuple[float, float]:
    r"""KID (Bińkowski et al. 2018) between real (N, d) and generated (M, d) features: (mean, std) over subsets.

    Each of `num_subsets` rounds draws `subset_size` = m real and m generated features without replacement (a
    generator seeded with `seed`: the same seed gives the same subsets) and computes the unbiased MMD^2

        (1/(m(m-1))) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - (2/m^2) sum_{i, j} k(x_i, y_j),

    k(x, y) = (gamma x.y + coef)^degree, gamma = 1/d by default (torchmetrics' `poly_mmd`, in float64).
    Returns the mean and the (population) standard deviation of the `num_subsets` estimates, as torchmetrics'
    `KernelInceptionDistance` does.

    `subset_size` defaults to min(1000, min(N, M) // 2): 1,000 as in Bińkowski et al. when there are at least
    2,000 of each, else half of the smaller set, so that subsets differ (subsets of all N images would all be
    the same set, and their standard deviation 0).
    """
    from torchmetrics.image.kid import poly_mmd

    real, fake = _as_pair(real_features, fake_features, min_rows=2)
    smaller = min(len(real), len(fake))
    if subset_size is None:
        subset_size = max(2, min(KID_MAX_SUBSET_SIZE, smaller // 2))
    check_positive_int("subset_size", subset_size)
    check_positive_int("num_subsets", num_subsets)
    if not 2 <= subset_size <= smaller:
        raise ValueError(f"`subset_size` must be in [2, {smaller}] (the smaller of the two sets), got {subset_size}")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(num_subsets):
        real_subset = real[torch.randperm(len(real), generator=generator)[:subset_size].to(real.device)]
        fake_subset = fake[torch.randperm(len(fake), generator=generator)[:subset_size].to(fake.device)]
        scores.append(poly_mmd(real_subset, fake_subset, degree=degree, gamma=gamma, coef=coef))
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item()


def sample_quality_metrics(real_features: torch.Tensor, fake_features: torch.Tensor, nearest_k: int = 3,
                           kid_subset_size: int | None = None, kid_num_subsets: int = 100,
                           seed: int = 0) -> dict[str, float]:
    """`kernel_distance` and `precision_recall_density_coverage` of one pair of feature sets:
    {"kid", "kid_std", "precision", "recall", "density", "coverage"}."""
    kid, kid_std = kernel_distance(real_features, fake_features, kid_subset_size, kid_num_subsets, seed)
    return {"kid": kid, "kid_std": kid_std,
            **precision_recall_density_coverage(real_features, fake_features, nearest_k)}


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose most likely class under a classifier, logits (M, num_classes), is the class
    they were generated for, labels (M,)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"`logits` must be a tensor (M, num_classes), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    labels = torch.as_tensor(labels)
    if labels.shape != logits.shape[:1] or labels.is_floating_point() or len(labels) == 0:
        raise ValueError(f"`labels` must hold one class id per row of `logits` ({logits.shape[0]}), got "
                         f"shape {tuple(labels.shape)} and dtype {labels.dtype}")
    return (logits.argmax(1).cpu() == labels.cpu()).double().mean().item()


@torch.no_grad()
def nearest_distances(queries: torch.Tensor, references: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """(N,) float64: the distance from each row of `queries` (N, d) to its nearest reference feature.

    `references` is a matrix (R, d) or an iterable of such blocks (e.g. the features of a training set, batch
    by batch), read once: memory holds one block of references, never all of them.
    """
    queries = _as_features("queries", queries)
    blocks = (references,) if isinstance(references, torch.Tensor) else references
    nearest = torch.full((len(queries),), float("inf"), dtype=torch.float64, device=queries.device)
    seen = 0
    for block in blocks:
        block = _as_features("references", block).to(queries.device)
        if block.shape[1] != queries.shape[1]:
            raise ValueError(f"`queries` and `references` must hold features of one width, got {queries.shape[1]} "
                             f"and {block.shape[1]}")
        for start, stop in _row_blocks(len(queries), len(block)):
            distances = torch.cdist(queries[start:stop], block).min(1).values
            nearest[start:stop] = torch.minimum(nearest[start:stop], distances)
        seen += len(block)
    if not seen:
        raise ValueError("`references` holds no feature vectors")
    return nearest


@torch.no_grad()
def memorisation_share(sample_features: torch.Tensor, test_features: torch.Tensor,
                       train_features: torch.Tensor | Iterable[torch.Tensor],
                       quantile: float = MEMORISATION_QUANTILE) -> float:
    r"""The share of samples closer to the training set than all but a `quantile` q of held-out real images.

    For a feature vector x, let d_train(x) = min_t ||x - t|| over the training features t. The threshold is
    tau = the q-quantile (linear interpolation) of d_train over the test features, real images the model never
    saw: a fresh draw from the data distribution comes that close to a training image with probability q.
    Returns (1/M) sum_s 1[d_train(s) < tau] over the M samples s.

    A model that draws fresh images from the data distribution gives about q; samples that copy training images
    (d_train = 0) push it towards 1, so a share well above q means memorisation; blurry or off-distribution
    samples give less than q. `train_features` is a matrix (T, d) or an iterable of blocks of rows, read once.
    """
    check_fraction("quantile", quantile)
    samples, test = _as_pair(sample_features, test_features, names=("sample_features", "test_features"))
    # one pass over the training features for both sets
    nearest = nearest_distances(torch.cat([samples, test]), train_features)
    sample_nearest, test_nearest = nearest[:len(samples)], nearest[len(samples):]
    threshold = torch.quantile(test_nearest, quantile)
    if threshold <= 0:
        raise ValueError(f"the {quantile} quantile of the test images' distances to their nearest training image is "
                         "0: at least that share of the test images are also training images, so the check has no "
                         "reference; compare with held-out images")
    return (sample_nearest < threshold).double().mean().item()
