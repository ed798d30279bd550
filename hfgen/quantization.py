"""Vector quantisation, the VQ-VAE's bottleneck (docs/maths.md §7.4; van den Oord et al., 2017; Razavi et al., 2019).

Each encoder output vector z (one per latent position) is replaced by its nearest codebook entry e_k; the decoder
sees e_k, and the encoder gets the decoder's gradient through the straight-through estimator. The codebook follows
exponential moving averages of the vectors assigned to each entry, entries left unused are restarted on encoder
outputs, and the encoder is held near its codes by the commitment loss. The codebook is a diffusers `VQModel`'s
`quantize.embedding.weight`, so that diffusers' own `decode` quantises exactly as training did (nearest entry by
`torch.cdist`).
"""

import torch
import torch.nn.functional as F


def flatten_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, D, S, S) -> (B * S * S, D): one vector per latent position."""
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """k = argmin_k ||z - e_k|| for each vector (N, D) of a codebook (K, D): (N,) indices."""
    return torch.cdist(vectors, codebook).argmin(dim=1)


def quantize(latents: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, D, S, S) -> (their nearest codebook entries (B, D, S, S), the indices (B * S * S,))."""
    indices = nearest_codes(flatten_latents(latents), codebook)
    batch, dims, height, width = latents.shape
    quantized = codebook[indices].view(batch, height, width, dims).permute(0, 3, 1, 2)
    return quantized, indices


def straight_through(latents: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """z + sg(e - z): the value of e, the gradient of z (the decoder's gradient passes to the encoder unchanged)."""
    return latents + (quantized - latents).detach()


def commitment_loss(latents: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """||z - sg(e)||^2, the mean over every latent coordinate: pulls the encoder towards its codes."""
    return F.mse_loss(latents, quantized.detach())


def code_usage(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How many vectors chose each entry: (K,) float counts."""
    return torch.bincount(indices, minlength=num_codes).float()


def perplexity(counts: torch.Tensor) -> float:
    """exp(H(p)) of the code frequencies p = counts / sum: the number of equally used codes with the same entropy
    (1: one code for everything, K: all used alike)."""
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp())


def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, counts: torch.Tensor,
                        sums: torch.Tensor, decay: float, epsilon: float = 1e-5) -> torch.Tensor:
    """One EMA step of the codebook, in place on the running statistics; returns the new codebook (K, D).

    N_k <- decay N_k + (1 - decay) n_k, m_k <- decay m_k + (1 - decay) sum of the vectors assigned to k, and
    e_k = m_k / N~_k with N~_k = (N_k + eps) / (N + K eps) N (Laplace smoothing, so an entry seldom chosen is not
    divided by ~0). `counts` (K,) and `sums` (K, D) are this batch's n_k and sums (all processes together)."""
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + epsilon) / (total + len(cluster_size) * epsilon) * total
    return embed_sum / smoothed.unsqueeze(1)


def assignment_sums(vectors: torch.Tensor, indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The sum of the vectors (N, D) assigned to each entry: (K, D)."""
    sums = torch.zeros(num_codes, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    return sums.index_add_(0, indices, vectors)
