"""A Gaussian mixture fitted to a VAE's aggregated posterior, to sample latents from (docs/maths.md §2.5, §7.2).

A VAE's decoder is trained on codes z ~ q(z) = E_x q(z|x), not on the prior N(0, I); prior samples that land
where q(z) has little mass (the prior hole) decode badly. `GaussianMixtureSampler` is fitted by EM to codes of
the training images and is saved with the pipeline like any model (its parameters are buffers, in safetensors).
For a conditional VAE it holds one mixture per class, fitted to q(z|y) = E_{x|y} q(z|x, y).
"""

import logging

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from ..utils import (
    check_choice, check_class_labels, check_non_negative_int, check_non_negative_number, check_positive_int)

logger = logging.getLogger(__name__)

COVARIANCE_TYPES = ("full", "diag")


def _uniform(num: int, generator, device: torch.device) -> torch.Tensor:
    """(num,) float64 draws from U[0, 1): from one generator, or one draw from each of a list (as `randn_tensor`)."""
    if isinstance(generator, list):
        draws = [torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generator]
        return torch.cat([draw.to(device) for draw in draws])
    source_device = generator.device if generator is not None else device
    return torch.rand(num, generator=generator, device=source_device, dtype=torch.float64).to(device)


class GaussianMixtureSampler(ModelMixin, ConfigMixin):
    r"""A K-component Gaussian mixture over flat latents z in R^D:
    q(z) ~= sum_k w_k N(z; mu_k, Sigma_k), or with `num_classes` Y > 0 one such mixture per class y, q(z|y).

    Built unfitted (it then refuses to sample); `fit(latents)` estimates it by EM, after which it is saved and
    loaded with `save_pretrained` / `from_pretrained` (or as a pipeline component) like any model.

    Example:
        ```py
        >>> sampler = GaussianMixtureSampler(latent_dim=20, num_components=10).fit(latents)  # latents: (N, 20)
        >>> z = sampler.sample(16, generator=torch.manual_seed(0))  # (16, 20)
        >>> sampler.log_prob(z)  # (16,)
        >>> per_class = GaussianMixtureSampler(latent_dim=20, num_classes=10).fit(latents, class_labels=labels)
        >>> z = per_class.sample(4, class_labels=[0, 1, 2, 3])  # z_i ~ q(z | y_i)
        ```

    Args:
        latent_dim: D, the size of a flat latent (a spatial latent (C, S, S) is flattened to D = C * S * S).
        num_components: K, the number of mixture components (per class).
        covariance_type: "full" (one D x D covariance per component) or "diag" (one variance per dim).
        num_classes: Y; 0 for one mixture of q(z), Y > 0 for one mixture per class (a conditional VAE's q(z|y)).

    Buffers (float32), with a leading class axis (Y, ...) when num_classes > 0: `weights` (K,); `means` (K, D);
    `scales`: the lower Cholesky factors L_k of the covariances, Sigma_k = L_k L_k^T, (K, D, D) for "full", or
    the standard deviations (K, D) for "diag"; `num_fit_samples` (): how many latents it was fitted to (0: not
    fitted).
    """

    @register_to_config
    def __init__(self, latent_dim: int = 20, num_components: int = 10, covariance_type: str = "full",
                 num_classes: int = 0):
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("num_components", num_components)
        check_choice("covariance_type", covariance_type, COVARIANCE_TYPES)
        check_non_negative_int("num_classes", num_classes)
        # unfitted: K copies of the prior N(0, I) (per class), with equal weights
        classes = (num_classes,) if num_classes else ()
        scales = torch.eye(latent_dim) if covariance_type == "full" else torch.ones(latent_dim)
        self.register_buffer("weights", torch.full((*classes, num_components), 1 / num_components))
        self.register_buffer("means", torch.zeros(*classes, num_components, latent_dim))
        self.register_buffer("scales", scales.expand(*classes, num_components, *scales.shape).clone())
        self.register_buffer("num_fit_samples", torch.tensor(0, dtype=torch.long))

    @property
    def is_fitted(self) -> bool:
        return int(self.num_fit_samples) > 0

    def _check_latents(self, name: str, latents) -> torch.Tensor:
        if isinstance(latents, np.ndarray):
            latents = torch.from_numpy(latents)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor or numpy array of shape (N, {self.config.latent_dim}), "
                            f"got {type(latents).__name__}")
        if latents.dim() != 2 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"`{name}` must have shape (N, {self.config.latent_dim}) (flatten spatial latents), got "
                             f"{tuple(latents.shape)}")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError(f"`{name}` must hold finite floating-point values")
        return latents

    def _class_labels(self, class_labels, num: int) -> torch.Tensor:
        """`class_labels` checked against num_classes -> (num,) long on the buffers' device: the mixture each latent
        belongs to (all 0 for an unconditional sampler, which takes none)."""
        labels = check_class_labels(class_labels, self.config.num_classes, num)
        if labels is None:
            return torch.zeros(num, dtype=torch.long, device=self.weights.device)
        return labels.to(self.weights.device)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("this GaussianMixtureSampler is not fitted: call `fit(latents)` first")

    @torch.no_grad()
    def fit(self, latents, class_labels=None, seed: int = 0, num_iterations: int = 100, tol: float = 1e-3,
            reg_covar: float = 1e-6) -> "GaussianMixtureSampler":
        """Fits the mixture to `latents` (N, D) by EM (scikit-learn's `GaussianMixture`, k-means initialisation
        drawn from `seed`), in float64; returns self. With num_classes > 0, `class_labels` (N,) are required and
        class y's mixture is fitted to the latents labelled y.

        Args:
            num_iterations: EM iterations at most (a warning is logged if EM has not converged by then).
            tol: EM stops once the mean log-likelihood per latent improves by less than this.
            reg_covar: added to the covariances' diagonals, which keeps them positive definite.
        """
        latents = self._check_latents("latents", latents)
        labels = self._class_labels(class_labels, len(latents)).cpu()
        check_non_negative_int("seed", seed)
        check_positive_int("num_iterations", num_iterations)
        check_non_negative_number("tol", tol)
        check_non_negative_number("reg_covar", reg_covar)
        num_components, num_mixtures = self.config.num_components, max(1, self.config.num_classes)
        counts = torch.bincount(labels, minlength=num_mixtures).tolist()
        for label, count in enumerate(counts):
            if count < num_components:
                of_class = f" of class {label}" if self.config.num_classes else ""
                raise ValueError(f"`latents` holds {count} latents{of_class}, fewer than the {num_components} "
                                 "components (`num_components`) to fit")
        fits = [self._fit_mixture(latents[labels == label], seed, num_iterations, tol, reg_covar)
                for label in range(num_mixtures)]
        for name, values in zip(("weights", "means", "scales"), zip(*fits)):
            buffer = getattr(self, name)
            buffer.copy_(torch.from_numpy(np.stack(values)).view(buffer.shape).to(buffer.device, buffer.dtype))
        self.num_fit_samples.fill_(len(latents))
        return self

    def _fit_mixture(self, latents: torch.Tensor, seed: int, num_iterations: int, tol: float, reg_covar: float):
        """One mixture fitted by EM to latents (n, D) -> numpy weights (K,), means (K, D), scales."""
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        mixture = GaussianMixture(self.config.num_components, covariance_type=self.config.covariance_type, tol=tol,
                                  reg_covar=reg_covar, max_iter=num_iterations, random_state=int(seed))
        # The matrices are small: one BLAS thread. With more, OpenMP's spin-waiting made a 4,000 x 20 fit 30x
        # slower (0.4 s -> 14 s) when the other core was busy.
        with threadpool_limits(limits=1):
            mixture.fit(latents.detach().double().cpu().numpy())
        if not mixture.converged_:
            logger.warning("the Gaussian mixture's EM did not converge in %d iterations (tol %g)", num_iterations, tol)
        if self.config.covariance_type == "full":
            scales = np.linalg.cholesky(mixture.covariances_)  # Sigma_k = L_k L_k^T
        else:
            scales = np.sqrt(mixture.covariances_)
        return mixture.weights_, mixture.means_, scales

    def _parameters64(self):
        """weights (Y', K), means (Y', K, D) and scales (Y', K, ...) in float64, with a class axis of
        Y' = max(1, num_classes) mixtures."""
        weights, means, scales = self.weights.double(), self.means.double(), self.scales.double()
        if not self.config.num_classes:
            weights, means, scales = weights[None], means[None], scales[None]
        return weights, means, scales

    def distribution(self) -> MixtureSameFamily:
        """The mixture as a `torch.distributions` object (float64), of batch shape (Y,) with num_classes Y > 0."""
        weights, means, scales = self.weights.double(), self.means.double(), self.scales.double()
        if self.config.covariance_type == "full":
            components = MultivariateNormal(means, scale_tril=scales)
        else:
            components = Independent(Normal(means, scales), 1)
        return MixtureSameFamily(Categorical(probs=weights / weights.sum(-1, keepdim=True)), components)

    @torch.no_grad()
    def log_prob(self, latents, class_labels=None) -> torch.Tensor:
        """log q(z) of latents (N, D), or log q(z|y) given `class_labels` (N,) when num_classes > 0: (N,) float64."""
        self._check_fitted()
        latents = self._check_latents("latents", latents).to(self.weights.device, torch.float64)
        labels = self._class_labels(class_labels, len(latents))
        if not self.config.num_classes:
            return self.distribution().log_prob(latents)
        every_class = self.distribution().log_prob(latents[:, None])  # (N, Y)
        return every_class.gather(1, labels[:, None])[:, 0]

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | list[torch.Generator] | None = None,
               dtype: torch.dtype | None = None, class_labels=None) -> torch.Tensor:
        """`num_samples` latents z ~ q(z), or z_i ~ q(z|y_i) given `class_labels` (num_samples,) when
        num_classes > 0: (num_samples, D), in the buffers' dtype unless `dtype` is given.

        Ancestral sampling: component k by the inverse CDF of the (class's) weights at u ~ U[0, 1), then
        z = mu_k + L_k eps (L_k the Cholesky factor, or the standard deviations for "diag"), eps ~ N(0, I_D). All
        u are drawn first, then all eps, from `generator`; a list of generators gives sample i its u and eps from
        `generator[i]`, so that a sample does not depend on the batch it is drawn in.
        """
        self._check_fitted()
        check_positive_int("num_samples", num_samples)
        labels = self._class_labels(class_labels, num_samples)
        if isinstance(generator, list) and len(generator) != num_samples:
            raise ValueError(f"`generator` is a list of {len(generator)} generators: it must hold one per sample "
                             f"({num_samples}), or be a single generator")
        device = self.weights.device
        uniform = _uniform(num_samples, generator, device)
        eps = randn_tensor((num_samples, self.config.latent_dim), generator=generator, device=device,
                           dtype=torch.float64)
        weights, means, scales = self._parameters64()
        cumulative = weights.cumsum(-1) / weights.sum(-1, keepdim=True)  # (Y', K)
        num_components = weights.shape[-1]
        components = torch.searchsorted(cumulative[labels], uniform[:, None], right=True)[:, 0]
        # one index per (class, component) into the flattened (Y' * K, ...) parameters
        chosen_index = labels * num_components + components.clamp(max=num_components - 1)
        means, scales = means.flatten(0, 1), scales.flatten(0, 1)
        latents = torch.empty_like(eps)
        for index in chosen_index.unique().tolist():  # z = mu_k + L_k eps for the samples of component k
            chosen = chosen_index == index
            if self.config.covariance_type == "full":
                latents[chosen] = means[index] + eps[chosen] @ scales[index].T
            else:
                latents[chosen] = means[index] + scales[index] * eps[chosen]
        return latents.to(dtype or self.weights.dtype)
