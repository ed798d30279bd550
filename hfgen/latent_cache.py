"""The latents of a dataset under a first stage (`hfgen.autoencoders`), encoded once into a memory-mapped file and
reused.

Latent diffusion trains on z ~ q(z|x) of every training image (a point encoder's latents are stored as a Gaussian of
log-variance `POINT_LOGVAR`). Holding the posteriors in RAM grows with the
dataset; here they are written to disk in chunks, as one (N, V, 2C, S, S) float32 array of posterior moments
(mean and log-variance stacked on the channel axis; V = 2 views, the image and its mirror image, when flips
are asked for, else 1), and read back by memory mapping. The cache folder is named by a hash of the first
stage's weights, the data's fingerprint and the views, so a later run with the same first stage and data
reuses it and any other run gets its own. Both files are sealed (hfgen.cache_files) when written and checked
when opened: a cache truncated, zeroed or missing its integrity record is rebuilt with one log line, never read.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .cache_files import broken_reason, report_broken, seal
from .data import collate_function
from .data.image_datasets import ImageDataset, _Augmented
from .autoencoders import encode, latent_shape
from .data.transforms import sample_generator
from .distributions import DiagonalGaussian
from .latent_tools import PooledLatentVariance

MOMENTS_FILE = "moments.npy"
INFO_FILE = "latents.json"
CACHE_FILES = (INFO_FILE, MOMENTS_FILE)
CACHE_FORMAT = 2  # 2: latents.json holds the latents' pooled mean and std


def broken_cache_file(folder: str) -> tuple[str, str] | None:
    """(path, why) of the first file of the latent cache `folder` that cannot be trusted, or None when the
    cache is intact."""
    for name in CACHE_FILES:
        path = os.path.join(folder, name)
        reason = broken_reason(path)
        if reason is not None:
            return path, reason
    return None


def latent_cache_key(vae, dataset, flips: bool) -> str:
    """A hash of the cache format, the first stage's weights and config, the dataset's fingerprint and whether mirror
    images are cached."""
    digest = hashlib.sha1(f"format={CACHE_FORMAT}".encode())
    digest.update(json.dumps({"class": type(vae).__name__, **vae.config}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{dataset.fingerprint}|{len(dataset)}|flips={flips}".encode())
    return digest.hexdigest()[:20]


class LatentDataset(_Augmented, Dataset):
    """Cached posterior moments as training data: batches of (moments (B, 2C, S, S), labels (B,)).

    With two views, each sample takes the mirror image's latents with probability 1/2, drawn from
    (seed, epoch, index) as the image flips of the pixel data path are.
    """

    def __init__(self, folder: str, labels: torch.Tensor, id2label, seed: int = 0):
        self.folder = folder
        broken = broken_cache_file(folder)
        if broken is not None:
            path, reason = broken
            raise ValueError(f"the latent cache file {path} cannot be trusted ({reason}): encode_to_cache rebuilds it")
        self.moments = np.load(os.path.join(folder, MOMENTS_FILE), mmap_mode="r")
        with open(os.path.join(folder, INFO_FILE)) as file:
            self.info = json.load(file)
        if len(labels) != len(self.moments):
            raise ValueError(f"the latent cache {folder!r} holds {len(self.moments)} latents for {len(labels)} images")
        self.labels, self.id2label, self.seed, self.augment = labels, id2label, seed, True

    def __len__(self) -> int:
        return len(self.moments)

    @property
    def latent_mean(self) -> float:
        """The mean of z ~ q(z|x) over the training images, all latent coordinates pooled."""
        return self.info["latent_mean"]

    @property
    def latent_std(self) -> float:
        """The standard deviation of z ~ q(z|x) over the training images, all latent coordinates pooled."""
        return self.info["latent_std"]

    def posterior(self, moments: torch.Tensor) -> DiagonalGaussian:
        """(B, 2C, S, S) moments -> q(z|x)."""
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.moments.shape[1]
        chosen = [int(sample_generator(self.seed, self.epoch, i).random() < 0.5) if views == 2 else 0 for i in indices]
        moments = torch.from_numpy(np.stack([self.moments[i, v] for i, v in zip(indices, chosen)]))
        return moments, self.labels[torch.as_tensor(indices)]


@torch.no_grad()
def encode_to_cache(vae, dataset, cache_dir: str, flips: bool = False, batch_size: int = 256,
                    num_workers: int = 0, show_progress: bool = True) -> str:
    """Encodes every image of `dataset` (unaugmented, in order) into `cache_dir`/<key>, unless it is there already;
    returns that folder. Written to a temporary folder first, sealed and renamed when complete; a cache folder
    that is there but broken is rebuilt, with one log line naming the file."""
    folder = os.path.join(cache_dir, latent_cache_key(vae, dataset, flips))
    if os.path.isdir(folder):
        broken = broken_cache_file(folder)
        if broken is None:
            return folder
        report_broken(*broken, what="latent cache")
    partial = folder + ".incomplete"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    views = 2 if flips else 1
    channels, *size = latent_shape(vae, dataset.image_shape)
    shape = (len(dataset), views, 2 * channels, *size)
    moments = np.lib.format.open_memmap(os.path.join(partial, MOMENTS_FILE), mode="w+", dtype=np.float32, shape=shape)
    if isinstance(dataset, ImageDataset):
        batches = (dataset[start:start + batch_size] for start in range(0, len(dataset), batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_function(dataset), num_workers=num_workers)
    pooled = PooledLatentVariance()  # of z ~ q(z|x): the latents' normalization
    start = 0
    progress = tqdm(total=len(dataset), desc="encoding latents", disable=not show_progress)
    for images, _ in batches:
        if len(images) != min(batch_size, len(dataset) - start):
            raise ValueError("the latent cache needs every training image: a corrupt image was skipped "
                             "(drop --skip_corrupt_images and remove the file)")
        for view in range(views):
            pixels = images.flip(-1) if view else images
            q = encode(vae, pixels)
            mean, logvar = q.mean.double().cpu(), q.logvar.double().cpu()
            moments[start:start + len(images), view] = torch.cat([mean, logvar], dim=1).float().numpy()
            pooled.update(mean, logvar.exp())
        start += len(images)
        progress.update(len(images))
    progress.close()
    moments.flush()
    with open(os.path.join(partial, INFO_FILE), "w") as file:
        json.dump({"num_images": len(dataset), "views": views, "latent_shape": [channels, *size],
                   "latent_mean": pooled.mean, "latent_std": pooled.std}, file)
    del moments
    for name in CACHE_FILES:
        seal(os.path.join(partial, name))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder
