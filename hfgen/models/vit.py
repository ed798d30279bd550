"""A small ViT denoiser for diffusion (docs/maths.md §6.8), unconditional, class-conditional or text-conditioned.

diffusers' DiTTransformer2DModel cannot be built without classes, and hfgen needs both, so this is a
compact DiT: patch tokens + learned positions, transformer blocks whose layer norms are modulated by the
time (and class) embedding with zero-initialised gates (adaLN-Zero, Peebles & Xie, 2023).
Text conditioning (`cross_attention_dim`): each block also attends to the text encoder's token states after its
self-attention, as PixArt-alpha's blocks do (Chen et al., 2023). It has the call of diffusers' UNet2DModel (and
with text, of UNet2DConditionModel), so the pipelines and the trainer take either.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..utils import check_images, check_positive_int


class _ModulatedBlock(nn.Module):
    """x + gate * attention(modulated LN(x)), [x + cross-attention(LN(x), text states),] then
    x + gate * MLP(modulated LN(x)); tokens (B, N, D), cond (B, D), text states (B, L, cross_attention_dim)."""

    def __init__(self, dim: int, num_heads: int, cross_attention_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        if cross_attention_dim:
            self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attention = nn.MultiheadAttention(dim, num_heads, kdim=cross_attention_dim,
                                                         vdim=cross_attention_dim, batch_first=True)
            nn.init.zeros_(self.cross_attention.out_proj.weight)  # starts as the unconditional block
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, text_states: torch.Tensor | None = None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).unsqueeze(1).chunk(6, dim=-1)
        hidden = self.norm1(tokens) * (1 + scale1) + shift1
        tokens = tokens + gate1 * self.attention(hidden, hidden, hidden, need_weights=False)[0]
        if text_states is not None:
            tokens = tokens + self.cross_attention(self.cross_norm(tokens), text_states, text_states,
                                                   need_weights=False)[0]
        hidden = self.norm2(tokens) * (1 + scale2) + shift2
        return tokens + gate2 * self.mlp(hidden)


class ViTDenoiser(ModelMixin, ConfigMixin):
    r"""eps_theta(x_t, t[, y]) (or x0 / v) with a vision transformer.

    Args:
        sample_size, in_channels, out_channels: image size and channels (as UNet2DModel).
        patch_size: pixels per patch side; sample_size must be divisible by it.
        hidden_size, num_layers, num_heads: transformer width, depth and heads.
        num_class_embeds: None (unconditional) or the number of class ids, hfgen's null class included.
        cross_attention_dim: None, or the width of the text states each block attends to (`encoder_hidden_states`).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_class_embeds: int | None = None,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        for name, value in (("sample_size", sample_size), ("in_channels", in_channels), ("out_channels", out_channels),
                            ("patch_size", patch_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads)):
            check_positive_int(name, value)
        if cross_attention_dim is not None:
            check_positive_int("cross_attention_dim", cross_attention_dim)
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` {sample_size} must be divisible by `patch_size` {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` {hidden_size} must be divisible by `num_heads` {num_heads}")
        self.grid = sample_size // patch_size
        self.patchify = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size))
        nn.init.normal_(self.position, std=0.02)
        self.time_embedding = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden_size) if num_class_embeds else None
        self.blocks = nn.ModuleList(_ModulatedBlock(hidden_size, num_heads, cross_attention_dim) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.unpatchify = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        for layer in (self.final_modulation[1], self.unpatchify):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True):
        """sample: (B, C, H, W); timestep: int or (B,) or 0-d tensor; class_labels: (B,); encoder_hidden_states:
        (B, L, cross_attention_dim) -> UNet2DOutput(sample)."""
        config = self.config
        check_images("sample", sample, config.in_channels, config.sample_size)
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError("`class_labels` must be given exactly when the denoiser has class embeddings "
                             f"(num_class_embeds={config.num_class_embeds})")
        if (encoder_hidden_states is None) != (config.cross_attention_dim is None):
            raise ValueError("`encoder_hidden_states` must be given exactly when the denoiser has cross-attention "
                             f"(cross_attention_dim={config.cross_attention_dim})")
        if encoder_hidden_states is not None and (
                encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != sample.shape[0]
                or encoder_hidden_states.shape[-1] != config.cross_attention_dim):
            raise ValueError(f"`encoder_hidden_states` must be ({sample.shape[0]}, L, {config.cross_attention_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        cond = self.time_embedding(get_timestep_embedding(timesteps, config.hidden_size).to(sample.dtype))
        if class_labels is not None:
            cond = cond + self.class_embedding(class_labels)
        tokens = self.patchify(sample).flatten(2).transpose(1, 2) + self.position  # (B, N, D)
        for block in self.blocks:
            tokens = block(tokens, cond, encoder_hidden_states)
        shift, scale = self.final_modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        patches = self.unpatchify(self.final_norm(tokens) * (1 + scale) + shift)  # (B, N, p * p * C)
        batch, p, grid = sample.shape[0], config.patch_size, self.grid
        output = patches.view(batch, grid, grid, p, p, config.out_channels).permute(0, 5, 1, 3, 2, 4)
        output = output.reshape(batch, config.out_channels, grid * p, grid * p)
        return UNet2DOutput(sample=output) if return_dict else (output,)
