"""Samples per CPU-minute: FD against training time for every family's README recipe and for peer baselines.

Every contender trains in its own process (`--threads` torch threads, default 2: the 2 cores) on the 4,000
training digits of `hfgen:mnist`. Its clock runs from the start of the command (data, models, a latent-diffusion
first stage included) and stops while a snapshot is evaluated: at each mark (--marks, in minutes, the last one the
budget) the run samples N images with the contender's own sampler (N=--num_samples at the budget,
--curve_num_samples before it) and computes their FD in the features of `hfgen:digit-classifier` against the 1,000
test digits at the contender's resolution. A run whose
recipe ends before the budget is evaluated once more at its end. What a mark's sampler needs fitted after
training (the VAE's Gaussian mixture) is timed and added to that mark's x, not to the running clock.

Contenders (`CONTENDERS`):
  - hfgen: the README commands, as `RECIPES` (each family's trainer, `--logger none`, no sample grids, no
    periodic checkpoints; FD with DPM-Solver++ at 20 steps (`hfgen.objectives.dpm_solver`: on a DDPM's noise
    levels or a flow model's sigmas); EMA weights where the recipe keeps an EMA);
  - plain-vae: pytorch/examples' vae/main.py (MLP 784-400-20, Bernoulli decoder, Adam 1e-3, batch 128), prior
    samples;
  - pythae-vae: pythae's VAE with its default MLP nets and trainer defaults (`pip install pythae`, for this
    benchmark only), sampled by pythae's own GaussianMixtureSampler fitted after training, with the 100
    components of hfgen's VAE recipe (pythae's default is 10);
  - plain-dcgan: a DCGAN loop in the style of pytorch/examples' dcgan/main.py, for 28 px (100-d z, BCE,
    Adam 2e-4 / 0.5, batch 64, N(0, 0.02) init);
  - diffusers-loop: diffusers' examples/unconditional_image_generation/train_unconditional.py as a loop, with
    the diffusers course's MNIST U-Net (widths 32 64 64, 2 layers per block, attention in the two inner blocks),
    its defaults (batch 16, AdamW 1e-4 (0.95, 0.999), weight decay 1e-6, cosine schedule with 500 warm-up steps
    over its 100 epochs, EMA with warm-up) and the same DPM-Solver++ 20-step sampler for FD (its script samples
    with DDPM-1000, ~5 s per image here).

Colour (`--data emoji`, its own section and figure): the same clock on the emoji folder's training split at 32 px RGB
(`benchmarks/data/emoji.py`, built on first use under $HFGEN_CACHE/emoji/folder), FD in the domain classifier's
features (`--feature_extractor classifier`, trained once on its 9 category folders) against its test split, with
`COLOUR_RECIPES` and the peers adapted to 3 channels and 32 px only (input width, the DCGAN's first kernel, the
U-Net's channels); the section also gives the real-data floor (training images against the test images).

    python benchmarks/bench_quality.py --write                         # every contender, 10 minutes each
    python benchmarks/bench_quality.py --data emoji --grids GRIDS --write   # the colour section
    python benchmarks/bench_quality.py --only hfgen-ddpm diffusers-loop --marks 0.5 1   # a short look
    python benchmarks/bench_quality.py --no_train --write            # re-draw from the recorded results
    python benchmarks/bench_quality.py --only hfgen-ddpm --extra_flags "--snr_gamma 1" --results SCREENS  # a lever

The longer budget: the recipes' schedules are sized to end near 10 minutes, so a 20-minute mark runs each hfgen
recipe with its --num_epochs doubled (--epochs_scale 2) and each peer for 20 minutes, into the data's own
`quality_<data>_long.json`; the section then gives FD at 20 minutes beside FD at 10 and adds the points to the figure.
Each run keeps its pixel-space KID in its row (the ranking check) and its grid in a committed folder, so the runs can
be spread over sessions; the last --write draws the samples figure from those grids:

    python benchmarks/bench_quality.py --data emoji --marks 20 --epochs_scale 2 \
        --results benchmarks/figures/quality_emoji_long.json --grids benchmarks/figures/quality_emoji_long_grids
    python benchmarks/bench_quality.py --data emoji --no_train --write --grids benchmarks/figures/quality_emoji_long_grids

SCREENS, benchmarks/figures/quality_screens.json, keeps the lever screens (each row with its --extra_flags).

Results (one JSON line per snapshot) accumulate in --results, so contenders can run in separate sessions;
--write redraws benchmarks/figures/quality_vs_time.png and the BENCHMARKS.md section from all of them.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    BENCHMARKS_MD, cpu_model, environment_lines, load_average, markers, pyplot, save_figure, write_section)

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
RESULTS = os.path.join(FIGURES, "quality_vs_time.json")
FEATURES = "hfgen:digit-classifier"
FD_SOLVER_STEPS = 20
# recorded with the diffusion rows (the flow rows without it were sampled with 20 Euler steps)
FD_SAMPLER = f"DPM-Solver++ {FD_SOLVER_STEPS}"
DIFFUSION_FAMILIES = ("ddpm", "ldm")  # the trainers whose pipelines FD_SAMPLER samples

# The README's commands (without --output_dir): the recipes the benchmark measures.
RECIPES = {
    "hfgen-vae": ("vae", "--num_epochs 1200 --latent_sampler gmm --latent_sampler_components 100"),
    "hfgen-cvae": ("vae", "--num_epochs 1200 --conditional --latent_sampler gmm --latent_sampler_components 10"),
    "hfgen-gan": ("gan", "--num_epochs 240 --use_ema --learning_rate 4e-4"),
    "hfgen-cgan": ("gan", "--num_epochs 240 --use_ema --conditional --learning_rate 4e-4"),
    "hfgen-ddpm": ("ddpm", "--num_epochs 26 --use_ema --lr_scheduler cosine --lr_warmup_steps 50 --train_batch_size 32 "
                           "--block_out_channels 16 64 64 --snr_gamma 5 --prediction_type v_prediction "
                           "--beta_schedule squaredcos_cap_v2"),
    "hfgen-flow": ("ddpm", "--num_epochs 22 --use_ema --objective flow_matching --lr_scheduler cosine --lr_warmup_steps 50 "
                           "--train_batch_size 32 --weighting_scheme logit_normal --block_out_channels 16 64 64"),
    "hfgen-edm": ("ddpm", "--num_epochs 22 --use_ema --objective edm --lr_scheduler cosine --lr_warmup_steps 50 "
                          "--train_batch_size 32 --block_out_channels 16 64 64"),
    "hfgen-cond-flow": ("ddpm", "--num_epochs 22 --use_ema --conditional --objective flow_matching --lr_scheduler cosine "
                                "--lr_warmup_steps 50 --train_batch_size 32 --weighting_scheme logit_normal "
                                "--block_out_channels 16 64 64"),
    "hfgen-ldm": ("ldm", "--num_epochs 60 --use_ema --vae_beta 0.1 --lr_scheduler cosine --lr_warmup_steps 50"),
    "hfgen-ldm-flow": ("ldm", "--num_epochs 40 --use_ema --objective flow_matching --vae_beta 0.1"),
}
PEERS = ("plain-vae", "pythae-vae", "plain-dcgan", "diffusers-loop")
# The colour section (--data emoji): the same families at 32 px RGB on the emoji folder's training split. The
# command-line data flags (--train_data_dir, --resolution) are added by `Data.flags`; --num_epochs is set so that
# each recipe's schedule ends near the 10-minute budget on 2 cores.
COLOUR_RECIPES = {
    "hfgen-vae": ("vae", "--num_epochs 400 --architecture conv --hidden_dims 32 64 128 --latent_dim 64 "
                         "--latent_sampler gmm --latent_sampler_components 100"),
    # a cosine learning rate: with a constant one the CVAE was best at 2.5 minutes and worse at 10 (5.7 -> 7.2); with
    # it, 4.9 at 10 minutes
    "hfgen-cvae": ("vae", "--num_epochs 400 --conditional --architecture conv --hidden_dims 32 64 128 --latent_dim 64 "
                          "--latent_sampler gmm --latent_sampler_components 10 --lr_scheduler cosine"),
    # the same for both GANs: with a constant learning rate they were best at 2.5-5 minutes and worse at 10 (GAN 7.4 ->
    # 6.9, cGAN 4.8 -> 8.1); with a cosine one the GAN reached 4.1 at 10 minutes. The cGAN's nets at twice the width
    # (--base_channels 64: 3x slower steps, 30 epochs fill the budget) took it from 5.5 to 3.7; the GAN's went from
    # 4.1 to 6.5, so it keeps 32
    "hfgen-gan": ("gan", "--num_epochs 100 --use_ema --learning_rate 4e-4 --diff_augment color,translation "
                         "--lr_scheduler cosine"),
    "hfgen-cgan": ("gan", "--num_epochs 30 --use_ema --conditional --learning_rate 4e-4 "
                          "--diff_augment color,translation --lr_scheduler cosine --base_channels 64"),
    "hfgen-flow": ("ddpm", "--num_epochs 14 --use_ema --objective flow_matching --lr_scheduler cosine "
                           "--lr_warmup_steps 50 --train_batch_size 32 --weighting_scheme logit_normal "
                           "--block_out_channels 32 64 64"),
    "hfgen-ddpm": ("ddpm", "--num_epochs 14 --use_ema --lr_scheduler cosine --lr_warmup_steps 50 --train_batch_size 32 "
                           "--block_out_channels 32 64 64 --snr_gamma 5 --prediction_type v_prediction "
                           "--beta_schedule squaredcos_cap_v2"),
    # 64 px through a 4x16x16 latent: the first stage's 25 epochs take about 2.5 minutes of the 10
    "hfgen-ldm-flow": ("ldm", "--resolution 64 --num_epochs 12 --use_ema --objective flow_matching --lr_scheduler cosine "
                              "--lr_warmup_steps 50 --train_batch_size 32 --block_out_channels 64 128 --vae_beta 0.1 "
                              "--vae_hidden_dims 32 64 --vae_num_epochs 25"),
    # the same second stage on the other first stages hfgen trains, each given about the VAE's minutes (2.3): a VQ-VAE
    # (VQModel, 256 codes) and a KL autoencoder (AutoencoderKL), both 4x16x16 latents. diffusers' encoder and decoder
    # cost 35x hfgen's conv VAE per epoch at widths 32 64 64 (212 s against 6 s): at 16 32 64 and batch 32 an epoch
    # takes 60-67 s, so 2 epochs
    "hfgen-ldm-flow-vq": ("ldm", "--resolution 64 --num_epochs 12 --use_ema --objective flow_matching --lr_scheduler "
                                 "cosine --lr_warmup_steps 50 --train_batch_size 32 --block_out_channels 64 128 "
                                 "--first_stage_type vq --ae_block_out_channels 16 32 64 --ae_num_epochs 2 "
                                 "--ae_train_batch_size 32"),
    "hfgen-ldm-flow-kl": ("ldm", "--resolution 64 --num_epochs 12 --use_ema --objective flow_matching --lr_scheduler "
                                 "cosine --lr_warmup_steps 50 --train_batch_size 32 --block_out_channels 64 128 "
                                 "--first_stage_type kl --ae_block_out_channels 16 32 64 --ae_num_epochs 2 "
                                 "--ae_train_batch_size 32"),
    # the text U-Net's step takes 2.6x the unconditional one's (1.0 s at batch 32): 5 epochs fill the budget
    "hfgen-t2i": ("ddpm", "--num_epochs 5 --use_ema --objective flow_matching --lr_scheduler cosine "
                          "--lr_warmup_steps 50 --train_batch_size 32 --weighting_scheme logit_normal "
                          "--block_out_channels 32 64 64 --caption_column text --prompt_dropout 0.1"),
}
# Text-to-image on the emoji's names: each prompt should move the samples towards its category (under the emoji's
# domain classifier) and its colour, against the other prompts and the empty one. The names are the captions'
# words ("red apple", "cat face with tears of joy"); "a" is a word the captions never use.
PROMPT_CHECKS = {"a red apple": "food-drink", "a cat face with tears of joy": "smileys-emotion", "flag: japan": "flags"}
PROMPT_CHECK_SAMPLES = 100
PROMPTS_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "quality_emoji_prompts.json")
CONTENDERS = (*dict.fromkeys([*RECIPES, *COLOUR_RECIPES]), *PEERS)
# which peer each hfgen family is compared with (the conditional ones with the unconditional peer; for the VAEs the
# stronger of the two VAE peers at 10 minutes, the plain loop: 102 vs pythae's 138)
PEER_OF = {"hfgen-vae": "plain-vae", "hfgen-cvae": "plain-vae", "hfgen-gan": "plain-dcgan",
           "hfgen-cgan": "plain-dcgan", "hfgen-ddpm": "diffusers-loop", "hfgen-flow": "diffusers-loop", "hfgen-edm": "diffusers-loop",
           "hfgen-cond-flow": "diffusers-loop", "hfgen-ldm": "diffusers-loop",
           "hfgen-ldm-flow": "diffusers-loop"}
TARGETS = {"hfgen-vae": 50, "hfgen-cvae": 50, "hfgen-gan": 50, "hfgen-cgan": 50, "hfgen-ddpm": 25, "hfgen-flow": 25, "hfgen-edm": 25,
           "hfgen-cond-flow": 25, "hfgen-ldm": 20, "hfgen-ldm-flow": 20}


@functools.cache
def _built_folder(folder: str, build) -> str:
    """`build(folder)` once per process (it checks or writes the whole folder), then the folder."""
    build(folder)
    return folder


@dataclasses.dataclass(frozen=True)
class Data:
    """What a section of the benchmark trains on and scores in: the images, the recipes and the feature space."""
    name: str  # the --data choice
    section_key: str  # its BENCHMARKS.md section
    title: str
    resolution: int
    recipes: dict  # contender -> (family, flags)
    peer_of: dict
    targets: dict  # contender -> the FD it should reach at the budget
    features: str  # how the section names the feature space
    target_ratio: float  # each hfgen recipe's FD at the budget at most 1 / this of its peer's

    @property
    def results(self) -> str:
        return RESULTS if self.name == "digits" else os.path.join(FIGURES, f"quality_{self.name}.json")

    @property
    def long_results(self) -> str:
        """The runs at a longer budget (recipes' epochs scaled): one more column and more points in the figure."""
        return os.path.join(FIGURES, f"quality_{self.name}_long.json")

    @property
    def figure(self) -> str:
        return os.path.join(FIGURES, "quality_vs_time.png" if self.name == "digits" else f"quality_{self.name}.png")

    @property
    def samples_figure(self) -> str:
        """Each contender's last grid beside real test images (`grids_figure`)."""
        return os.path.join(FIGURES, f"quality_{self.name}_samples.png")

    @property
    def contenders(self) -> tuple[str, ...]:
        return (*self.recipes, *PEERS)

    def folder(self) -> str | None:
        """The image folder (the emoji, built on first use from the npm package); None for the bundled digits."""
        if self.name == "digits":
            return None
        from data.emoji import build_emoji_folder

        from hfgen.utils import hfgen_cache_dir

        return _built_folder(os.path.join(hfgen_cache_dir(), "emoji", "folder"), build_emoji_folder)

    def flags(self, contender: str, folder: str | None = None) -> list[str]:
        """The hfgen recipes' data flags (the section's resolution, unless the recipe sets its own), with the image
        folder at `folder` (default: where `folder()` builds it)."""
        if self.name == "digits":
            return []
        folder = folder or self.folder()
        own_resolution = "--resolution" in self.recipes[contender][1].split()
        return ["--train_data_dir", folder, *([] if own_resolution else ["--resolution", str(self.resolution)])]

    def split(self, split: str, resolution: int, caption_column: str | None = None):
        """One split, unaugmented (resized and center-cropped to `resolution`)."""
        from hfgen.data import load_image_dataset

        if self.name == "digits":
            return load_image_dataset("hfgen:mnist", split, resolution, num_channels=1, caption_column=caption_column)
        return load_image_dataset(None, split, resolution, train_data_dir=self.folder(), num_channels=3,
                                  caption_column=caption_column)

    def images(self, split: str, resolution: int | None = None) -> torch.Tensor:
        """(N, C, R, R) in [0, 1]: every image of the split."""
        from hfgen.data import image_batches

        dataset = self.split(split, resolution or self.resolution)
        return torch.cat([images for images, _ in image_batches(dataset, len(dataset), shuffle=False)])

    def captions(self) -> list[str]:
        """What a text-to-image contender is asked for: the test split's captions, in `class_labels`' order."""
        dataset = self.split("test", self.resolution, caption_column="text")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        return [dataset.captions[i] for i in order]

    def class_labels(self) -> list[int]:
        """What a conditional contender is asked for: the test split's labels in a seeded random order, so that its
        samples have the test images' class frequencies (the emoji's categories are far from balanced; FD would
        penalise balanced samples). The digit rows before 2026-12-06 were sampled with balanced labels."""
        labels = torch.as_tensor(self.split("test", self.resolution).labels)
        return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))].tolist()

    def command(self, contender: str) -> str:
        """The recipe as the README writes it (the emoji folder as `emoji`, where its dataset command puts it)."""
        family, flags = self.recipes[contender]
        data_flags = " ".join(self.flags(contender, folder=self.name))
        return f"hfgen train {family} {data_flags + ' ' if data_flags else ''}{flags}"

    def feature_extractor(self):
        from hfgen.features import load_feature_extractor

        if self.name == "digits":
            return load_feature_extractor(FEATURES)
        return load_feature_extractor("classifier", dataset=self.split("train", self.resolution),
                                      dataset_name=self.name)


DIGITS = Data("digits", "quality", "Samples per CPU-minute: FD against training time", 28, RECIPES, PEER_OF, TARGETS,
              f"`{FEATURES}`", 1.5)
EMOJI = Data("emoji", "quality-colour", "Colour images: FD against training time on the emoji", 32, COLOUR_RECIPES,
             # the VAEs against the stronger VAE peer at 10 minutes: here pythae's (11.0 vs the plain loop's 27.6)
             {"hfgen-vae": "pythae-vae", "hfgen-cvae": "pythae-vae", "hfgen-gan": "plain-dcgan",
              "hfgen-cgan": "plain-dcgan", "hfgen-flow": "diffusers-loop", "hfgen-ddpm": "diffusers-loop",
              "hfgen-ldm-flow": "diffusers-loop", "hfgen-ldm-flow-vq": "diffusers-loop",
              "hfgen-ldm-flow-kl": "diffusers-loop", "hfgen-t2i": "diffusers-loop"},
             {}, "the emoji's domain classifier (`--feature_extractor classifier`, trained on the 9 category folders)",
             2.0)
DATA = {data.name: data for data in (DIGITS, EMOJI)}


def samples_by_diffusion(contender: str, data: Data = DIGITS) -> bool:
    """Whether the contender's FD samples come from a diffusion sampler (FD_SAMPLER, recorded with its rows)."""
    return contender == "diffusers-loop" or data.recipes.get(contender, ("",))[0] in DIFFUSION_FAMILIES


class BudgetReached(Exception):
    """The contender's last mark was evaluated: training stops."""


class Clock:
    """Training seconds since the start, without the time spent evaluating snapshots.

    `check(snapshot)` is called before every training step: at each passed mark it pauses, calls
    `snapshot(mark_seconds) -> extra_seconds` (the fitting a sampler needs, added to that mark's x only), and
    raises BudgetReached after the last one.
    """

    def __init__(self, marks_seconds, num_samples: int, curve_num_samples: int, record):
        self.start, self.paused = time.perf_counter(), 0.0
        self.pending = sorted(marks_seconds)
        self.final_num_samples, self.curve_num_samples = num_samples, curve_num_samples
        self.record = record  # f(training_seconds, snapshot), snapshot() -> (samples, extra_seconds)
        self.details = {}  # more of the contender's numbers for the next row (a latent model's first stage)

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @property
    def final(self) -> bool:
        """Whether the next snapshot is the last: at the budget, or at a recipe's end."""
        return len(self.pending) <= 1

    @property
    def num_samples(self) -> int:
        """What the next snapshot samples: N at the budget (and at a recipe's end), fewer at earlier marks."""
        return self.final_num_samples if self.final else self.curve_num_samples

    def check(self, snapshot) -> None:
        if self.pending and self.seconds() >= self.pending[0]:
            self.evaluate(snapshot)
            while self.pending and self.seconds() >= self.pending[0]:
                self.pending.pop(0)
        if not self.pending:
            raise BudgetReached

    def evaluate(self, snapshot) -> None:
        seconds, paused_at = self.seconds(), time.perf_counter()
        self.record(seconds, snapshot)
        self.details = {}
        self.paused += time.perf_counter() - paused_at
        if self.pending:
            self.pending.pop(0)


# ----- evaluation, shared by every contender ----------------------------------------------------------------


class Evaluator:
    """FD of (N, C, H, W) samples in [0, 1] against the data's test split at H; quantised to 8 bits like saved
    images."""

    def __init__(self, data: Data):
        self.data = data
        self.extractor = data.feature_extractor().eval()
        self.real = {}

    def fd(self, samples: torch.Tensor) -> float:
        from hfgen.frechet import frechet_distance

        size = samples.shape[-1]
        if size not in self.real:
            self.real[size] = self.data.images("test", size)
        samples = (samples.clamp(0, 1) * 255).round() / 255
        return frechet_distance(self.real[size], samples.float(), self.extractor)

    def high_frequency_ratio(self, samples: torch.Tensor) -> float:
        """Sharpness: the mean energy of the images' Laplacian (grey levels, 3x3 kernel) over the real test images'
        at the same size: about 1 for samples as sharp as the data, below 1 for blurred ones."""
        size = samples.shape[-1]
        if size not in self.real:
            self.real[size] = self.data.images("test", size)
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

        def energy(images):
            grey = images.clamp(0, 1).float().mean(1, keepdim=True)
            return torch.nn.functional.conv2d(grey, kernel).pow(2).mean().item()

        return energy(samples) / energy(self.real[size])


def sample_in_batches(sample, num_samples: int, batch_size: int = 250) -> torch.Tensor:
    """sample(n, first_index) -> (n, C, H, W) in [0, 1], called in batches; seeded per batch by the caller."""
    with torch.no_grad():
        return torch.cat([sample(min(batch_size, num_samples - start), start)
                          for start in range(0, num_samples, batch_size)])


def pipeline_sampler(pipeline, class_labels: list[int] | None = None, prompts: list[str] | None = None,
                     **call_kwargs):
    """Samples of an hfgen pipeline; for a conditional one, `class_labels` in turn (`Data.class_labels`), for a
    text-to-image one `prompts` in turn (`Data.captions`)."""
    def sample(n, start):
        generator = torch.Generator().manual_seed(start)
        if prompts:
            batch = [prompts[(start + i) % len(prompts)] for i in range(n)]
            return pipeline(prompt=batch, generator=generator, output_type="pt", **call_kwargs).images
        labels = [class_labels[(start + i) % len(class_labels)] for i in range(n)] if class_labels else None
        return pipeline(n, class_labels=labels, generator=generator, output_type="pt", **call_kwargs).images
    return sample


def prompt_grid(grids: str, prompt: str) -> str:
    """Where the prompt check's grid of `prompt`'s samples is saved in `grids`."""
    name = re.sub(r"\W+", "-", prompt).strip("-") or "empty-prompt"
    return os.path.join(grids, f"hfgen-t2i-{name}.png")


def prompt_directions(pipeline, classifier, grids: str | None = None, **call_kwargs) -> dict:
    """PROMPT_CHECKS on a text-to-image pipeline: for each prompt (and the empty one), the share of
    PROMPT_CHECK_SAMPLES samples `classifier` (the emoji's domain classifier) puts in each checked category (class
    folder), and the samples' mean redness (R - max(G, B), in [0, 1] units: high for red, about 0 for yellow, white
    and grey); a grid of each prompt's samples goes into `grids`."""
    names = classifier.config.id2label
    report = {}
    for prompt in ["", *PROMPT_CHECKS]:
        images = sample_in_batches(pipeline_sampler(pipeline, prompts=[prompt], **call_kwargs), PROMPT_CHECK_SAMPLES)
        with torch.no_grad():
            predicted = classifier(images.to(classifier.dtype)).logits.argmax(-1)
        shares = {category: float((predicted == int(key)).float().mean())
                  for key, category in names.items() if category in PROMPT_CHECKS.values()}
        redness = float((images[:, 0] - images[:, 1:].amax(1)).mean())
        report[prompt] = {"category_share": shares, "redness": round(redness, 4)}
        if grids:
            from hfgen.image_processing import image_grid, postprocess

            os.makedirs(grids, exist_ok=True)
            image_grid(postprocess(images[:64].clamp(0, 1))).save(prompt_grid(grids, prompt))
    return report


# ----- hfgen contenders -------------------------------------------------------------------------------------


def first_stage_details(vae, data: Data, resolution: int, evaluator: Evaluator) -> dict:
    """A latent model's first stage on the test images: the reconstructions' mean squared pixel error, FD and
    high-frequency energy ratio (quantised to 8 bits as samples are)."""
    from hfgen import autoencoders
    from hfgen.evaluation import reconstruction_mse

    images = data.images("test", resolution)
    with torch.no_grad():
        reconstructions = torch.cat([autoencoders.decode(vae, autoencoders.encode(vae, batch).mean).float().cpu()
                                     for batch in images.split(250)])
    return {"reconstruction_mse": round(reconstruction_mse(vae, data.split("test", resolution)), 5),
            "reconstruction_fd": round(evaluator.fd(reconstructions), 2),
            "reconstruction_high_frequency_ratio": round(evaluator.high_frequency_ratio(reconstructions), 3)}


def scale_epochs(flags: list[str], scale: float) -> list[str]:
    """A recipe's flags with its --num_epochs (the length of its learning-rate schedule) times `scale`."""
    if scale == 1:
        return flags
    at = flags.index("--num_epochs") + 1
    return [*flags[:at], str(max(1, round(int(flags[at]) * scale))), *flags[at + 1:]]


def run_hfgen(name: str, clock: Clock, output_dir: str, extra_flags: str = "", data: Data = DIGITS,
              evaluator: "Evaluator | None" = None, epochs_scale: float = 1) -> None:
    from hfgen.objectives import dpm_solver
    from hfgen.training import train_ddpm, train_gan, train_ldm, train_vae

    family, flags = data.recipes[name]
    module = {"vae": train_vae, "gan": train_gan, "ddpm": train_ddpm, "ldm": train_ldm}[family]
    trainer_class = {"vae": train_vae.VAETrainer, "gan": train_gan.GANTrainer, "ddpm": train_ddpm.DDPMTrainer,
                     "ldm": train_ldm.LDMTrainer}[family]
    argv = ["--output_dir", output_dir, *data.flags(name), *scale_epochs(flags.split(), epochs_scale),
            *extra_flags.split(), "--logger", "none",
            "--save_images_epochs", "0", "--feature_extractor", "none", "--checkpointing_steps", str(10 ** 9)]
    args = module.parse_args(argv)

    def snapshot(trainer):
        extra = 0.0
        for model in trainer.models.values():
            model.eval()
        pipeline = trainer.build_pipeline()
        call_kwargs = {}
        if family in DIFFUSION_FAMILIES:  # DPM-Solver++ at 20 steps, on a DDPM's noise levels or a flow's sigmas
            call_kwargs["num_inference_steps"] = FD_SOLVER_STEPS
            pipeline.scheduler = dpm_solver(pipeline.scheduler)
        if family == "vae" and args.latent_sampler != "none":
            fit_start = time.perf_counter()
            vae = pipeline.generative_model
            pipeline = trainer.pipeline_of(vae, trainer.fit_latent_sampler(vae))
            extra = time.perf_counter() - fit_start
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        if args.caption_column:  # the test captions, at the guidance the card reports
            call_kwargs["guidance_scale"] = trainer.guidance_scale
            sampler = pipeline_sampler(pipeline, prompts=data.captions(), **call_kwargs)
        else:
            sampler = pipeline_sampler(pipeline, data.class_labels() if pipeline.num_classes else None, **call_kwargs)
        samples = sample_in_batches(sampler, clock.num_samples)
        if family == "ldm" and clock.final:
            clock.details.update(first_stage_details(trainer.vae, data, args.resolution, evaluator),
                                 first_stage_minutes=round(first_stage_seconds[0] / 60, 2))
        for model in trainer.models.values():
            model.train()
        return samples, extra

    first_stage_seconds = []  # when latent diffusion's second stage started: the first stage's clock time

    class ClockedTrainer(trainer_class):
        def build_models(self):
            first_stage_seconds.append(clock.seconds())
            return super().build_models()

        def training_step(self, images, labels):
            clock.check(lambda: snapshot(self))
            return super().training_step(images, labels)

        def save_output(self):  # the recipe ended before the budget: its end is the last mark
            clock.pending = clock.pending[-1:]
            clock.evaluate(lambda: snapshot(self))

    ClockedTrainer(args).train()  # latent diffusion trains its first stage first, on the clock


# ----- peers (each adapted to the data's channels and size, and no further) --------------------------------


def shuffled_batches(images: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless epochs of shuffled full batches."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield images[order[start:start + batch_size]]


def run_plain_vae(clock: Clock, data: Data) -> None:
    from torch import nn
    import torch.nn.functional as F

    images = data.images("train")
    shape = images.shape[1:]
    pixels = shape.numel()  # 784 for the digits, as in the example

    class VAE(nn.Module):  # pytorch/examples vae/main.py
        def __init__(self):
            super().__init__()
            self.fc1, self.fc21, self.fc22 = nn.Linear(pixels, 400), nn.Linear(400, 20), nn.Linear(400, 20)
            self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, pixels)

        def encode(self, x):
            h = F.relu(self.fc1(x))
            return self.fc21(h), self.fc22(h)

        def decode(self, z):
            return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

        def forward(self, x):
            mu, logvar = self.encode(x.view(-1, pixels))
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.decode(z), mu, logvar

    torch.manual_seed(0)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def snapshot():
        def sample(n, start):
            return model.decode(torch.randn(n, 20, generator=torch.Generator().manual_seed(start))).view(n, *shape)
        return sample_in_batches(sample, clock.num_samples), 0.0

    for batch in shuffled_batches(images, 128, torch.Generator().manual_seed(0)):
        clock.check(snapshot)
        recon, mu, logvar = model(batch)
        bce = F.binary_cross_entropy(recon, batch.view(-1, pixels), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        optimizer.zero_grad()
        (bce + kld).backward()
        optimizer.step()


def run_pythae_vae(clock: Clock, output_dir: str, data: Data) -> None:
    import numpy as np
    from pythae.models import VAE, VAEConfig
    from pythae.samplers import GaussianMixtureSampler, GaussianMixtureSamplerConfig
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    torch.manual_seed(0)
    images = data.images("train").numpy().astype(np.float32)
    model = VAE(VAEConfig(input_dim=tuple(images.shape[1:]), latent_dim=16))
    config = BaseTrainerConfig(output_dir=output_dir, num_epochs=10 ** 4, seed=0, no_cuda=True)

    def snapshot():
        fit_start = time.perf_counter()
        model.eval()
        sampler = GaussianMixtureSampler(model, GaussianMixtureSamplerConfig(n_components=100))
        sampler.fit(images)
        extra = time.perf_counter() - fit_start
        torch.manual_seed(0)
        samples = sampler.sample(num_samples=clock.num_samples, batch_size=250)
        model.train()
        return samples.reshape(-1, *images.shape[1:]), extra

    class Marks(TrainingCallback):
        def on_train_step_begin(self, training_config, **kwargs):
            clock.check(snapshot)

    TrainingPipeline(model=model, training_config=config)(train_data=images, callbacks=[Marks()])


def run_plain_dcgan(clock: Clock, data: Data) -> None:
    from torch import nn

    images = data.images("train") * 2 - 1
    channels, size = images.shape[1], images.shape[-1]
    if size % 4:
        raise ValueError(f"the plain DCGAN needs a size divisible by 4, got {size}")
    nz, start = 100, size // 4  # 7 -> 14 -> 28 for the digits, 8 -> 16 -> 32 for the emoji
    generator_net = nn.Sequential(
        nn.ConvTranspose2d(nz, 256, start, 1, 0, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
        nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
        nn.ConvTranspose2d(128, channels, 4, 2, 1, bias=False), nn.Tanh())
    discriminator_net = nn.Sequential(
        nn.Conv2d(channels, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
        nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, True),
        nn.Conv2d(128, 1, start, 1, 0, bias=False))

    def weights_init(module):  # pytorch/examples dcgan
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    torch.manual_seed(0)
    generator_net.apply(weights_init)
    discriminator_net.apply(weights_init)
    criterion = nn.BCEWithLogitsLoss()
    opt_d = torch.optim.Adam(discriminator_net.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(generator_net.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def snapshot():
        generator_net.eval()

        def sample(n, start):
            z = torch.randn(n, nz, 1, 1, generator=torch.Generator().manual_seed(start))
            return (generator_net(z) + 1) / 2
        samples = sample_in_batches(sample, clock.num_samples)
        generator_net.train()
        return samples, 0.0

    for real in shuffled_batches(images, 64, torch.Generator().manual_seed(0)):
        clock.check(snapshot)
        ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
        fake = generator_net(torch.randn(len(real), nz, 1, 1))
        opt_d.zero_grad()
        d_loss = (criterion(discriminator_net(real).view(-1), ones)
                  + criterion(discriminator_net(fake.detach()).view(-1), zeros))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        criterion(discriminator_net(fake).view(-1), ones).backward()
        opt_g.step()


def run_diffusers_loop(clock: Clock, data: Data) -> None:
    import copy

    import torch.nn.functional as F
    from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    images = data.images("train") * 2 - 1
    channels = images.shape[1]
    model = UNet2DModel(  # the diffusers course, unit 1 ("Diffusion Models from Scratch")
        sample_size=images.shape[-1], in_channels=channels, out_channels=channels, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    batch_size, num_epochs = 16, 100
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=num_epochs * (len(images) // batch_size))
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)

    def snapshot():
        unet = copy.deepcopy(model)
        ema.copy_to(unet.parameters())
        unet.eval()
        solver = DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++")
        pipeline = DDPMPipeline(unet=unet, scheduler=solver)
        pipeline.set_progress_bar_config(disable=True)

        def sample(n, start):
            images = pipeline(n, generator=torch.Generator().manual_seed(start), num_inference_steps=FD_SOLVER_STEPS,
                              output_type="np").images
            return torch.from_numpy(images).permute(0, 3, 1, 2)
        return sample_in_batches(sample, clock.num_samples), 0.0

    for clean in shuffled_batches(images, batch_size, torch.Generator().manual_seed(0)):
        clock.check(snapshot)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),))
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # accelerator.clip_grad_norm_ in the script
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())


# ----- the worker and the driver ----------------------------------------------------------------------------


def worker(args) -> None:
    """Trains one contender under the clock, appending one JSON line per mark to --results."""
    torch.set_num_threads(args.threads)
    data = DATA[args.data]
    evaluator = Evaluator(data)
    load_before = load_average()

    def record(seconds, snapshot):
        samples, extra = snapshot()
        fd = evaluator.fd(samples)
        row = {"contender": args.worker, "train_seconds": round(seconds + extra, 1), "fit_seconds": round(extra, 1),
               "fd": round(fd, 2), "high_frequency_ratio": round(evaluator.high_frequency_ratio(samples), 3),
               **clock.details, "num_samples": len(samples), "threads": args.threads,
               "load_before": round(load_before, 2), "load_now": round(load_average(), 2),
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": cpu_model(),
               **({"sampler": FD_SAMPLER} if samples_by_diffusion(args.worker, data) else {}),
               **({"extra_flags": args.extra_flags} if args.extra_flags else {}),
               **({"epochs_scale": args.epochs_scale} if args.epochs_scale != 1 and args.worker in data.recipes
                  else {})}
        if len(samples) >= args.num_samples and data is not DIGITS:  # the final mark's: kept in the row, so the
            # ranking check needs no saved samples
            row["pixel_kid"], row["pixel_kid_std"] = (round(value, 6) for value in pixel_kid(data, samples))
        if args.grids:
            from hfgen.image_processing import image_grid, postprocess

            os.makedirs(args.grids, exist_ok=True)
            name = f"{args.worker}-{round(seconds / 60, 1)}min"
            image_grid(postprocess(samples[:64].clamp(0, 1))).save(os.path.join(args.grids, f"{name}.png"))
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as file:
            file.write(json.dumps(row) + "\n")

    for path in contender_grids(args.grids, args.worker).values() if args.grids else ():
        os.remove(path)  # a new run's grids replace an earlier run's, as its rows do (`read_results`)
    clock = Clock([60 * minutes for minutes in args.marks], args.num_samples, args.curve_num_samples, record)
    with tempfile.TemporaryDirectory() as output_dir, contextlib.suppress(BudgetReached):
        if args.worker in data.recipes:
            run_hfgen(args.worker, clock, output_dir, args.extra_flags, data, evaluator, args.epochs_scale)
        elif args.worker == "plain-vae":
            run_plain_vae(clock, data)
        elif args.worker == "pythae-vae":
            run_pythae_vae(clock, output_dir, data)
        elif args.worker == "plain-dcgan":
            run_plain_dcgan(clock, data)
        else:
            run_diffusers_loop(clock, data)


def run_prompt_check(data: Data, grids: str | None, threads: int) -> dict:
    """Trains the text-to-image recipe (the README's command) to its end, then measures PROMPT_CHECKS on the folder it
    wrote (`prompt_directions`, DPM-Solver++ at FD_SOLVER_STEPS steps, the card's guidance); the result is written to
    PROMPTS_RESULTS."""
    from hfgen import TextToImagePipeline
    from hfgen.objectives import dpm_solver
    from hfgen.prompt_following import resolve_guidance_scale
    from hfgen.training import DDPMTrainer, train_ddpm

    torch.set_num_threads(threads)
    name = "hfgen-t2i"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        argv = ["--output_dir", output_dir, *data.flags(name), *data.recipes[name][1].split(), "--logger", "none",
                "--save_images_epochs", "0", "--feature_extractor", "none", "--eval_num_samples", "16",
                "--checkpointing_steps", str(10 ** 9)]
        DDPMTrainer(train_ddpm.parse_args(argv)).train()
        minutes = (time.perf_counter() - start) / 60
        pipeline = TextToImagePipeline.from_pretrained(output_dir)
    pipeline.scheduler = dpm_solver(pipeline.scheduler)
    guidance = resolve_guidance_scale(None, pipeline.config.get("prompt_dropout"))
    report = prompt_directions(pipeline, data.feature_extractor().classifier, grids,
                               num_inference_steps=FD_SOLVER_STEPS, guidance_scale=guidance)
    result = {"contender": name, "command": data.command(name), "train_minutes": round(minutes, 1),
              "guidance_scale": guidance, "prompts": report, "threads": threads, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "cpu": cpu_model()}
    with open(PROMPTS_RESULTS, "w") as file:
        json.dump(result, file, indent=1)
    return result


def read_results(path: str) -> dict[str, list[dict]]:
    """contender -> its rows, from the latest run of each (the rows after its last restart at the first mark)."""
    runs: dict[str, list[dict]] = {}
    if not os.path.exists(path):
        return runs
    with open(path) as file:
        for line in file:
            row = json.loads(line)
            rows = runs.setdefault(row["contender"], [])
            if rows and row["train_seconds"] <= rows[-1]["train_seconds"]:
                rows.clear()  # a later run of the same contender replaces the earlier one
            rows.append(row)
    return runs


def final_fd(rows: list[dict], num_samples: int) -> float | None:
    """FD at the budget, or at the recipe's end before it: the last row, if it was sampled with the final N (a run
    stopped early has none)."""
    return rows[-1]["fd"] if rows and rows[-1]["num_samples"] >= num_samples else None


def draw(runs: dict, data: Data, floor: float | None = None, long_runs: dict | None = None) -> None:
    """FD against training minutes, a line per contender; a longer budget's runs (`long_runs`) as hollow points
    joined to their contender's line by a dotted one."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors

    def color(name):  # one colour per contender, the same in every redraw
        return colors[CONTENDERS.index(name) % len(colors)]

    for name, rows in runs.items():
        style = "-o" if name.startswith("hfgen") else "--s"
        axes.plot([row["train_seconds"] / 60 for row in rows], [row["fd"] for row in rows], style, label=name,
                  color=color(name))
    for name, rows in (long_runs or {}).items():
        joined = [*runs.get(name, [])[-1:], rows[-1]]
        axes.plot([row["train_seconds"] / 60 for row in joined], [row["fd"] for row in joined], ":", color=color(name))
        axes.plot(rows[-1]["train_seconds"] / 60, rows[-1]["fd"], "o", markerfacecolor="white", color=color(name))
    if long_runs:
        axes.plot([], [], "o:", color="grey", markerfacecolor="white",
                  label="a longer budget (hfgen: the recipe's epochs scaled to it)")
    if floor is not None:
        axes.axhline(floor, color="grey", linestyle=":", label="real training images (the floor)")
    axes.set_yscale("log")
    axes.set_xlabel("training minutes (evaluation excluded; threads per contender in BENCHMARKS.md)")
    axes.set_ylabel(f"FD vs the {data.name} test split ({'digit-classifier' if data is DIGITS else 'domain-classifier'}"
                    " features;\nN=1000 at the end, 500 before)")  # two lines: one is taller than the axes
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    save_figure(figure, data.figure, dpi=110)


def contender_grids(grids: str, name: str) -> dict[float, str]:
    """minutes -> path of each grid the contender's run saved in `grids`."""
    return {float(match.group(1)): os.path.join(grids, file) for file in os.listdir(grids) if
            (match := re.fullmatch(re.escape(name) + r"-([0-9.]+)min\.png", file))} if os.path.isdir(grids) else {}


def last_grid(grids: str, name: str) -> tuple[float, str] | None:
    """(minutes, path) of the contender's grid at its last mark in `grids`, or None."""
    saved = contender_grids(grids, name)
    return (max(saved), saved[max(saved)]) if saved else None


def grid_images(path: str, resolution: int) -> torch.Tensor:
    """The (64, 3, resolution, resolution) samples in [0, 1] of a saved 8x8 grid (hfgen.image_processing.image_grid:
    no padding), area-resized from the grid's own tile size (a 64 px contender's) where it differs."""
    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    size = pixels.shape[2] // 8
    tiles = pixels.reshape(3, 8, size, 8, size).permute(1, 3, 0, 2, 4).reshape(64, 3, size, size)
    return tiles if size == resolution else torch.nn.functional.interpolate(tiles, size=resolution, mode="area")


def pixel_kid(data: Data, samples: torch.Tensor) -> tuple[float, float]:
    """KID (mean, std) of (N, 3, H, W) samples in [0, 1] against the test images on raw pixels: the polynomial
    kernel on the 3,072 pixel values, 100 subsets of 100 (of 50 for a grid's 64)."""
    from hfgen.sample_metrics import kernel_distance

    samples = samples.clamp(0, 1)
    if samples.shape[-1] != data.resolution:
        samples = torch.nn.functional.interpolate(samples, size=data.resolution, mode="area")
    return kernel_distance(data.images("test").flatten(1), samples.flatten(1), subset_size=100 if len(samples) > 64 else 50)


def grid_memorisation(data: Data):
    """A function: a saved grid's path -> hfgen.sample_metrics.memorisation_share of its 64 samples in the data's
    domain features, the share closer to a training image than all but 5% of the test images are (about 0.05 for
    fresh draws, 1 for copies). The test and training images' features are computed once, here."""
    from hfgen.frechet import batch_features
    from hfgen.sample_metrics import memorisation_share

    extractor = data.feature_extractor().eval()

    @torch.no_grad()
    def features(images: torch.Tensor, name: str) -> torch.Tensor:
        return torch.cat([batch for _, batch in batch_features(images.split(250), extractor, name)])

    test, train = features(data.images("test"), "test images"), features(data.images("train"), "training images")
    return lambda path: memorisation_share(features(grid_images(path, data.resolution), path), test, train)


def ranking_check(runs: dict, data: Data, grids: str | None, num_samples: int, what: str = "above") -> list[str]:
    """Does the domain feature space rank the contenders as raw pixels do? Each contender's FD at the budget (N=1000,
    domain features) beside the pixel-space KID of its final samples (`pixel_kid`: all N, recorded in the row by the
    worker; for an older row without it, the 64 of its last grid in `grids`), and the Spearman correlation of the two
    rankings. With `grids`, each contender's grid also gets its memorisation share (`grid_memorisation`)."""
    from scipy.stats import spearmanr

    rows, memorisation = [], grid_memorisation(data) if grids else None
    for name, contender_rows in runs.items():
        fd = final_fd(contender_rows, num_samples)
        if fd is None:
            continue
        last, grid = contender_rows[-1], grids and last_grid(grids, name)
        memorised = f"{memorisation(grid[1]):.2f}" if grid else "–"
        if "pixel_kid" in last:
            rows.append((name, fd, last["num_samples"], last["pixel_kid"], last["pixel_kid_std"], memorised))
        elif grid:
            rows.append((name, fd, 64, *pixel_kid(data, grid_images(grid[1], data.resolution)), memorised))
    if len(rows) < 3:
        return []
    rho = spearmanr([row[1] for row in rows], [row[3] for row in rows]).statistic
    lines = [f"Does the domain feature space rank the recipes as raw pixels do? Spearman correlation of the FD ranking "
             f"{what} with the pixel-space KID of each contender's final samples: {rho:.2f} over {len(rows)} "
             "contenders. Beside them, the memorisation share of its grid's 64 samples (domain features; held-out "
             "real images score about 0.05, copies of training images 1).", "",
             "| contender | FD (domain features, N=1000) | samples for pixel KID | pixel KID ×10³ | memorisation share |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {fd:.1f} | {count} | {1000 * kid:.2f} ± {1000 * kid_std:.2f} | {memorised} |"
              for name, fd, count, kid, kid_std, memorised in sorted(rows, key=lambda row: row[1])]
    return lines


def grids_figure(data: Data, grids: str, contenders) -> str | None:
    """One figure of each contender's last saved grid (64 samples, from `--grids`) beside 64 real test images;
    returns its path, or None when no grid was saved."""
    from PIL import Image

    from hfgen.image_processing import image_grid, postprocess

    panels = [("real test images", image_grid(postprocess(data.images("test")[:64])))]
    for name in contenders:
        if grid := last_grid(grids, name):
            minutes, path = grid
            panels.append((f"{name}, {minutes:g} min", Image.open(path).convert("RGB")))
    if len(panels) == 1:
        return None
    return panels_figure(panels, data.samples_figure)


def prompts_figure(grids: str) -> str | None:
    """The text-to-image prompt check's grids (`--prompt_check --grids`), one panel per prompt; None without them."""
    from PIL import Image

    panels = []
    for prompt in ["", *PROMPT_CHECKS]:
        path = prompt_grid(grids, prompt)
        if os.path.exists(path):
            panels.append((f'"{prompt}"' if prompt else "(empty prompt)", Image.open(path).convert("RGB")))
    return panels_figure(panels, os.path.join(FIGURES, "quality_emoji_prompts.png")) if panels else None


def panels_figure(panels: list, path: str) -> str:
    """(title, image) panels side by side, each titled, saved to `path`."""
    from PIL import Image, ImageDraw

    width, height, caption = panels[0][1].width, panels[0][1].height, 16
    figure = Image.new("RGB", (len(panels) * (width + 8), height + caption), "white")
    draw = ImageDraw.Draw(figure)
    for index, (title, grid) in enumerate(panels):
        figure.paste(grid.resize((width, height)), (index * (width + 8), caption))
        draw.text((index * (width + 8) + 2, 2), title, fill="black")
    figure.save(path)
    return path


def real_data_floor(data: Data, num_samples: int) -> float:
    """FD of `num_samples` real training images (a seeded random draw: the split is in class order) against the test
    split, in the same features: what a model that reproduced the training set would score."""
    images = data.images("train")
    return Evaluator(data).fd(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:num_samples]])


def prompt_table(result: dict) -> list[str]:
    """PROMPT_CHECKS' results (`run_prompt_check`): each prompt's category shares and redness, and whether it moved
    the samples the right way (its category's share above the empty prompt's and every other prompt's)."""
    report, categories = result["prompts"], list(PROMPT_CHECKS.values())
    lines = [f"Text-to-image: does a prompt move the samples? `{result['command']}` trained to its end "
             f"({result['train_minutes']:g} minutes, {result['threads']} threads, {result['cpu']}, {result['date']}; "
             f"`python benchmarks/bench_quality.py --data emoji --prompt_check`), then {PROMPT_CHECK_SAMPLES} samples "
             f"of each prompt at guidance {result['guidance_scale']:g} with DPM-Solver++ at {FD_SOLVER_STEPS} steps: "
             "the share the domain classifier puts in each category, and the mean redness R - max(G, B).", "",
             f"| prompt | {' | '.join(categories)} | redness | raises its category's share above every other prompt's |",
             "|---|" + "---|" * (len(categories) + 2)]
    for prompt, result in report.items():
        shares = result["category_share"]
        if prompt:
            category = PROMPT_CHECKS[prompt]
            others = [other["category_share"][category] for key, other in report.items() if key != prompt]
            verdict = "yes" if shares[category] > max(others) else "no"
        else:
            verdict = "(the reference)"
        lines.append(f"| {prompt or '(empty prompt)'} | {' | '.join(f'{shares[c]:.0%}' for c in categories)} | "
                     f"{result['redness']:+.3f} | {verdict} |")
    return lines


def long_budget_table(runs: dict, long_runs: dict, data: Data, num_samples: int, budget_minutes: float) -> list[str]:
    """FD at a longer budget beside FD at the section's, and each hfgen recipe's ratio to its peer there."""
    budget = max(rows[-1]["train_seconds"] for rows in long_runs.values()) / 60
    scales = sorted({rows[-1].get("epochs_scale", 1) for name, rows in long_runs.items() if name in data.recipes})
    lines = [f"The longer budget ({budget:.0f} minutes): each hfgen recipe with its `--num_epochs` times "
             f"{' or '.join(f'{scale:g}' for scale in scales)} (its schedule sized for the longer budget; a latent "
             "recipe's first stage unchanged), evaluated at the budget or its end; each peer run for the budget. "
             f"One run each ({data.long_results.rsplit(os.sep, 1)[-1]}).", "",
             f"| contender | FD at {budget_minutes:g} min | minutes | FD at the longer budget | peer's FD there | ratio peer / hfgen |",
             "|---|---|---|---|---|---|"]
    for name, rows in long_runs.items():
        final, before = final_fd(rows, num_samples), final_fd(runs.get(name, []), num_samples)
        peer = data.peer_of.get(name)
        peer_fd = final_fd(long_runs.get(peer, []), num_samples) if peer else None
        ratio = f"{peer_fd / final:.2f}" if final and peer_fd else "–"
        lines.append(f"| {name} | {before if before is not None else '–'} | {rows[-1]['train_seconds'] / 60:.1f} | "
                     f"{final if final is not None else '–'} | {peer_fd if peer_fd is not None else '–'} | {ratio} |")
    return lines


def section(runs: dict, data: Data, budget_minutes: float, num_samples: int, environment: list[str],
            floor: float | None = None, samples_figure: str | None = None, ranking: list[str] = (),
            long_runs: dict | None = None) -> str:
    start, end = markers(data.section_key)
    if data is DIGITS:
        what = "the 4,000 training digits", "the 1,000 test digits"
    else:
        what = (f"the emoji folder's training split (`benchmarks/data/emoji.py`: 3,403 images, RGBA composited onto "
                f"white, {data.resolution} px RGB)", "its 378 test images")
    lines = [start, f"## {data.title} (`benchmarks/bench_quality.py{'' if data is DIGITS else ' --data ' + data.name}`)",
             "",
             f"Each contender trains alone in its own process on {what[0]}; its clock runs from the "
             f"start of the command and stops while snapshots are evaluated. FD against {what[1]}, of "
             "N=1000 samples at the budget and N=500 at the earlier marks (FD is biased upwards at smaller N), "
             f"in {data.features} features; DDPMs and flow models sampled with DPM-Solver++ (2nd-order multistep; "
             f"a flow model's on its sigmas) at {FD_SOLVER_STEPS} steps. "
             "See the script's docstring for every contender's recipe."
             + ("" if floor is None else f" The real-data floor, {num_samples} training images against the test "
                                         f"images in the same features: FD {floor:.2f}."), "",
             f"| contender | recipe | threads | CPU | FD at each mark (minutes: FD) | FD at {budget_minutes:g} min or the "
             f"recipe's end | peer | peer's FD | ratio peer / hfgen (target ≥ {data.target_ratio:g}) | target FD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        recipe = f"`{data.command(name)}`" if name in data.recipes else "peer"
        marks = ", ".join(f"{row['train_seconds'] / 60:.1f}: {row['fd']:.1f}" for row in rows)
        final = final_fd(rows, num_samples)
        peer = data.peer_of.get(name)
        peer_fd = final_fd(runs.get(peer, []), num_samples) if peer else None
        ratio = f"{peer_fd / final:.2f}" if final and peer_fd else "–"
        target = data.targets.get(name)
        target_text = "–" if not target else (f"≤ {target}: run not finished" if final is None else
                                              f"≤ {target}: {'met' if final <= target else 'not met'}")
        cpu = rows[-1].get("cpu", "not recorded").replace("(R)", "")
        lines.append(f"| {name} | {recipe} | {rows[-1]['threads']} | {cpu} | {marks} | {final if final is not None else '–'} | {peer or '–'} | "
                     f"{peer_fd if peer_fd is not None else '–'} | {ratio} | {target_text} |")
    if long_runs:
        lines += ["", *long_budget_table(runs, long_runs, data, num_samples, budget_minutes)]
    if data is EMOJI and os.path.exists(PROMPTS_RESULTS):
        with open(PROMPTS_RESULTS) as file:
            lines += ["", *prompt_table(json.load(file))]
        if os.path.exists(os.path.join(FIGURES, "quality_emoji_prompts.png")):
            lines += ["", "![64 samples of each prompt](benchmarks/figures/quality_emoji_prompts.png)"]
    if ranking:
        lines += ["", *ranking]
    figure = os.path.relpath(data.figure, os.path.dirname(BENCHMARKS_MD))
    lines += ["", f"![FD against training minutes]({figure})", ""]
    if samples_figure:
        lines += [f"![64 samples of each contender at its last mark, beside 64 real test images]"
                  f"({os.path.relpath(samples_figure, os.path.dirname(BENCHMARKS_MD))})", ""]
    lines += [*environment, end]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=list(DATA), default="digits",
                        help="digits: the bundled 28 px digits; emoji: the 32 px colour emoji (its own section).")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=None, help="Run these contenders only.")
    parser.add_argument("--marks", type=float, nargs="+", default=[1, 2.5, 5, 10],
                        help="Training minutes at which FD is measured; the last is the budget.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples for FD at the last mark.")
    parser.add_argument("--curve_num_samples", type=int, default=500, help="Samples for FD at the earlier marks.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=None, help="JSON lines, appended to (default: the --data's own file).")
    parser.add_argument("--grids", default=None, help="Also save a grid of 64 samples per mark into this folder; "
                        "--write then draws each contender's last grid into the samples figure.")
    parser.add_argument("--no_train", action="store_true", help="Only redraw from --results.")
    parser.add_argument("--write", action="store_true", help="Write the figure and the BENCHMARKS.md section.")
    parser.add_argument("--extra_flags", default="",
                        help="Trainer flags added to an hfgen recipe's (a lever tried; the rows record them). Use "
                             "another --results file for such trials.")
    parser.add_argument("--epochs_scale", type=float, default=1.0,
                        help="Multiply each hfgen recipe's --num_epochs by this (its schedule is sized for 10 "
                             "minutes: 2 for a 20-minute budget); the rows record it.")
    parser.add_argument("--prompt_check", action="store_true",
                        help="--data emoji: train the text-to-image recipe to its end and measure whether its prompts "
                             "move the samples (written to figures/quality_emoji_prompts.json).")
    parser.add_argument("--worker", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(minutes <= 0 for minutes in args.marks):
        parser.error("--marks must be positive minutes")
    if args.epochs_scale <= 0:
        parser.error(f"--epochs_scale must be a positive factor, got {args.epochs_scale}")
    data = DATA[args.data]
    args.results = args.results or data.results
    unknown = [name for name in args.only or () if name not in data.contenders]
    if unknown:
        parser.error(f"--only: {', '.join(unknown)} not in the {data.name} contenders ({', '.join(data.contenders)})")
    if args.worker:
        return worker(args)
    if args.prompt_check:
        if data is not EMOJI:
            parser.error("--prompt_check measures the emoji's text-to-image recipe: pass --data emoji")
        print(json.dumps(run_prompt_check(data, args.grids, args.threads), indent=1))
        return
    load_before = load_average()
    if not args.no_train:
        for name in args.only or data.contenders:
            print(f"--- {name}", file=sys.stderr, flush=True)
            command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--marks", *map(str, args.marks),
                       "--num_samples", str(args.num_samples), "--curve_num_samples", str(args.curve_num_samples),
                       "--threads", str(args.threads), f"--extra_flags={args.extra_flags}", "--data", data.name,
                       "--epochs_scale", str(args.epochs_scale),
                       "--results", args.results, *(["--grids", args.grids] if args.grids else [])]
            # progress bars off (tqdm reads TQDM_DISABLE); the worker prints one line per mark
            subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    runs = read_results(args.results)
    long_runs = read_results(data.long_results) if os.path.abspath(args.results) == data.results else {}
    floor = None if data is DIGITS or not runs else real_data_floor(data, args.num_samples)
    if args.write and runs:
        draw(runs, data, floor, long_runs)
        samples_figure = grids_figure(data, args.grids, runs) if args.grids else None
        if samples_figure is None and os.path.exists(data.samples_figure):  # the grids of an earlier --write
            samples_figure = data.samples_figure
        if args.grids and data is EMOJI:
            prompts_figure(args.grids)
        ranking = []
        if data is not DIGITS:  # on the longer budget's runs where they kept their pixel KID
            saved = any("pixel_kid" in rows[-1] for rows in long_runs.values())
            ranking = ranking_check(long_runs, data, args.grids, args.num_samples, "at the longer budget") if saved \
                else ranking_check(runs, data, args.grids, args.num_samples)
        environment = environment_lines("bench_quality.py", args.threads, load_before, load_average())
        write_section(data.section_key, section(runs, data, max(args.marks), args.num_samples, environment, floor,
                                                samples_figure, ranking, long_runs))
        print(f"wrote {BENCHMARKS_MD}", file=sys.stderr)
    elif runs:
        print(section(runs, data, max(args.marks), args.num_samples, [], floor, long_runs=long_runs))


if __name__ == "__main__":
    main()
