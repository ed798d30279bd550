"""Training entry points, one per family, on the shared skeleton in `trainer.py` and the typed configs of
`config.py`. From Python:

    from hfgen.training import VAETrainer, VAETrainingConfig
    folder = VAETrainer(VAETrainingConfig(output_dir="hfgen-vae-mnist", num_epochs=2)).train()
"""

from .config import TrainingConfig
from .train_autoencoder import AutoencoderTrainer, AutoencoderTrainingConfig
from .train_ddpm import DDPMTrainer, DDPMTrainingConfig
from .train_gan import GANTrainer, GANTrainingConfig
from .train_ldm import LDMTrainer, LDMTrainingConfig
from .train_vae import VAETrainer, VAETrainingConfig

__all__ = ["TrainingConfig", "VAETrainingConfig", "GANTrainingConfig", "DDPMTrainingConfig", "LDMTrainingConfig",
           "AutoencoderTrainingConfig", "VAETrainer", "GANTrainer", "DDPMTrainer", "LDMTrainer", "AutoencoderTrainer"]
