"""Latent diffusion vs the VAE prior vs pixel DDPM on the digits: the study of docs/maths.md §7.2-§7.3.

One run trains, with hfgen's own trainers and --seed, on the 4,000 training digits of `hfgen:mnist` resized to 32 px:

  - latent diffusion as `hfgen.training.train_ldm.main` does it: the conv VAE first stage (4x8x8 latent,
    `train_ldm.train_first_stage(config)`, --vae_epochs epochs), then `LDMTrainer` (a U-Net of widths 64 128 on
    the scaled latents) for --train_steps steps;
  - a pixel DDPM, `DDPMTrainer` with train_ddpm.py's default U-Net (widths 32 64 64) at `--resolution 32`, for the
    same --train_steps steps (same batch 64, lr 1e-3, DDPMScheduler(1000), epsilon prediction).
Both trainers run with --feature_extractor none --save_images_epochs 0 --eval_vlb_num_images 0 (their own final
FD and bits/dim are skipped; the study evaluates everything itself), and their `training_step` is timed step by
step (forward, loss, backward and fused AdamW step; the in-memory batch indexing is outside).

Then it measures, all against the 1,000 test digits at 32 px, with --fd_samples samples (N) for every FD:

  1. FD (`hfgen.metrics.evaluate_pipeline`, likelihood=False, the same seed, so the same real digits and noise
     seeds) of: the VAE decoding prior samples z ~ N(0, I) (`VAEPipeline.from_pretrained(.../first_stage)`), the
     same decoder on samples of a Gaussian mixture fitted to q(z) (`GaussianMixtureSampler`, --gmm_components K,
     --gmm_covariance, fitted to one z ~ q(z|x) per training digit as `hfgen train vae --latent_sampler gmm` fits it,
     and sampled as the pipeline's `latent_sampler`),
     latent diffusion sampled with its saved DDPMScheduler config and clip_sample=False, and again with
     clip_sample=True (DDPMScheduler's default, which clips the predicted z0 to [-1, 1]: meant for pixels, wrong for
     unit-variance latents; train_ldm saved it until ed6e201), the pixel DDPM; all diffusion samplers with
     --inference_steps DDPM steps, batches of 250.
     References: the same decoder on exact aggregated-posterior samples z ~ q(z|x_n) of N random training digits,
     and N real training digits (the FD floor at this N).
  2. The prior / aggregated-posterior gap, in the VAE's latent space (256 dims): q(z) = 1/4000 sum_n q(z|x_n) over
     the training digits' cached diagonal Gaussians, log q(z) by logsumexp over the components (float64, chunks of
     250). Scored: one z ~ q(z|x) per held-out test digit (so the mixture never scores its own samples), one per
     N random training digits with their own component left out (leave-one-out), the N prior samples and the N
     mixture samples the VAE decoded in 1., and the N final latents z0 / scaling_factor of each latent-diffusion sampler in 1. Reported:
     the share of each set below the 1st / 5th percentile of log q over the held-out samples; MMD^2 (unbiased, RBF
     kernel) of each set against the held-out samples, with one bandwidth for all: the median pairwise distance
     among the held-out samples; KL(q || p) = E_q[log q(z) - log p(z)] estimated in-sample (the leave-one-out
     samples scored with their own component: unbiased for the mixture itself) and without the own component
     (leave-one-out, held-out), against the exact bracket ELBO-KL - log 4000 <= KL(q || p) <= ELBO-KL (the ELBO's
     mean KL term is I(x; z) + KL(q || p), and I(x; z) <= log 4000); the share of q(z) a sample's own component
     holds; the active latent dimensions (Var_x E[z|x] > 0.01).
  3. Cost: median seconds per training step of each trainer, the wall time of each stage, parameter counts,
     and sampling seconds per image (the wall time of the pipeline calls inside the FD evaluation / N).
  4. A figure, benchmarks/figures/ldm_study.png: sample grids and a histogram of log q(z).

    python benchmarks/bench_ldm.py --quick                # ~2-3 min smoke run, writes nothing
    python benchmarks/bench_ldm.py --write                # the recorded run: rewrites the ldm section and the figure

Runs with `torch.set_num_threads(1)` by default (--threads): on 2 shared cores two threads wait for each other
(see the ddpm section). Progress goes to stderr, the section to stdout. --output_dir keeps the trained folders
and --reuse evaluates them again without training (the section then says so; its training times are those of the
run that trained them, from timings.json). Sampling is deterministic: --reuse reproduces the FDs exactly.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from common import (
    benchmark_parser, environment_lines, finish, load_average, markers, pyplot, save_figure, start_clock)

from diffusers import DDPMScheduler
from hfgen import DDPMPipeline, LatentDiffusionPipeline, VAEPipeline
from hfgen.data import load_image_dataset
from hfgen.distributions import LOG_2PI, standard_normal_log_prob
from hfgen.latent_tools import encode_images
from hfgen.models.latent_sampler import COVARIANCE_TYPES, GaussianMixtureSampler
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor
from hfgen.frechet import frechet_distance
from hfgen.training import train_ddpm, train_ldm

KEY = "ldm"  # the section <!-- ldm:start --> ... <!-- ldm:end --> of BENCHMARKS.md
FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "ldm_study.png")
FIGURE_LINK = "benchmarks/figures/ldm_study.png"  # relative to BENCHMARKS.md
RESOLUTION, FD_SEED, WARMUP_STEPS, GRID = 32, 0, 5, 64
CHUNK = 250
TRAINING_FLAGS = ("vae_epochs", "train_steps", "seed")  # what --reuse takes from the earlier run


def parse_args():
    parser = benchmark_parser(__doc__.split("\n\n")[0], rounds=1)
    parser.set_defaults(threads=1)
    parser.add_argument("--vae_epochs", type=int, default=10, help="Epochs of the VAE first stage.")
    parser.add_argument("--train_steps", type=int, default=496, help="Training steps of each diffusion model.")
    parser.add_argument("--fd_samples", type=int, default=1000, help="N: samples per FD (and latents per set).")
    parser.add_argument("--inference_steps", type=int, default=50, help="Denoising steps of both diffusion models.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed.")
    parser.add_argument("--gmm_components", type=int, default=10,
                        help="K of the Gaussian mixture fitted to q(z) (`hfgen train vae`'s default: 10).")
    parser.add_argument("--gmm_covariance", default="full", choices=COVARIANCE_TYPES, help="Its covariances.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: 1 VAE epoch, 20 steps, N = 100, 20 denoising steps; cannot --write.")
    parser.add_argument("--output_dir", default=None, help="Keep the trained folders here (default: a temporary one).")
    parser.add_argument("--reuse", action="store_true", help="Evaluate the folders in --output_dir without training.")
    args = parser.parse_args()
    if args.quick:
        args.vae_epochs, args.train_steps, args.fd_samples, args.inference_steps = 1, 20, 100, 20
        if args.write:
            parser.error("--quick is a smoke run: it does not --write")
    if args.rounds != 1:
        parser.error("this study trains each model once: --rounds must be 1")
    for name in ("vae_epochs", "train_steps", "fd_samples", "inference_steps", "threads", "gmm_components"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.fd_samples < 2 or args.fd_samples > 1000:
        parser.error("--fd_samples must be in [2, 1000] (the test split has 1,000 digits)")
    if args.reuse and not args.output_dir:
        parser.error("--reuse needs --output_dir")
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----- training -------------------------------------------------------------------------------------------------


class StepTimer:
    """Records the wall time of every `training_step` (forward, loss, backward, optimizer step)."""

    def __init__(self, args):
        super().__init__(args)
        self.step_seconds = []

    def training_step(self, images, labels):
        start = time.perf_counter()
        logs = super().training_step(images, labels)
        self.step_seconds.append(time.perf_counter() - start)
        return logs


class TimedLDMTrainer(StepTimer, train_ldm.LDMTrainer):
    pass


class TimedDDPMTrainer(StepTimer, train_ddpm.DDPMTrainer):
    pass


def common_flags(args, output_dir):
    return ["--output_dir", output_dir, "--seed", str(args.seed), "--resolution", str(RESOLUTION),
            "--max_train_steps", str(args.train_steps), "--logger", "none", "--save_images_epochs", "0",
            "--feature_extractor", "none", "--checkpointing_steps", "1000000000", "--num_validation_images", "16",
            "--num_inference_steps", str(args.inference_steps), "--eval_vlb_num_images", "0"]


def check_threads(threads, what):
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"{what} changed torch's thread count to {torch.get_num_threads()}")


def train_all(args, root):
    """Trains the VAE, the latent diffusion U-Net and the pixel DDPM into root/ldm and root/ddpm; returns timings."""
    timings = {"trained_with": {name: getattr(args, name) for name in TRAINING_FLAGS}}
    ldm_args = train_ldm.parse_args(common_flags(args, os.path.join(root, "ldm")) + ["--vae_num_epochs", str(args.vae_epochs)])
    stages = (
        ("vae", lambda: train_ldm.train_first_stage(ldm_args)),
        ("ldm", lambda: TimedLDMTrainer(dataclasses.replace(
            ldm_args, vae_path=os.path.join(ldm_args.output_dir, train_ldm.FIRST_STAGE)))),
        ("ddpm", lambda: TimedDDPMTrainer(train_ddpm.parse_args(common_flags(args, os.path.join(root, "ddpm"))))),
    )
    for name, build in stages:
        load_before = load_average()
        start = time.perf_counter()
        trainer = build()
        if name != "vae":
            trainer.train()
        seconds = time.perf_counter() - start
        check_threads(args.threads, f"training {name}")
        timings[name] = {"wall_s": seconds, "load_before": load_before, "load_after": load_average()}
        if name != "vae":
            steps = trainer.step_seconds
            if len(steps) != args.train_steps:
                raise RuntimeError(f"{name} ran {len(steps)} steps, not {args.train_steps}")
            timed = steps[WARMUP_STEPS:] or steps
            timings[name].update(step_seconds=steps, median_step_s=statistics.median(timed), fastest_step_s=min(timed))
            log(f"{name}: {len(steps)} steps, median {timings[name]['median_step_s']:.3f} s/step, "
                f"stage {seconds:.0f} s")
        else:
            log(f"vae first stage: {seconds:.0f} s (training and its own final evaluation)")
    with open(os.path.join(root, "timings.json"), "w") as file:
        json.dump(timings, file)
    return timings


# ----- sampling -------------------------------------------------------------------------------------------------


class Recorder:
    """A pipeline that times its calls, keeps its first images, and (subclasses) its latents."""

    def start_recording(self):
        self.call_seconds, self.kept_images, self.recorded_latents = 0.0, [], []
        self.set_progress_bar_config(disable=True)
        return self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        output = super().__call__(*args, **kwargs)
        self.call_seconds += time.perf_counter() - start
        if sum(len(images) for images in self.kept_images) < GRID:
            self.kept_images.append(output.images[:GRID])
        return output

    def grid_images(self):
        return torch.cat(self.kept_images)[:GRID]

    def latents(self):
        return torch.cat(self.recorded_latents).flatten(1).double()


class RecordingVAEPipeline(Recorder, VAEPipeline):
    def prepare_latents(self, batch_size, generator=None, latents=None):
        latents = super().prepare_latents(batch_size, generator, latents)  # z ~ p(z), or the latent sampler's z
        self.recorded_latents.append(latents.detach().float().cpu())
        return latents


class RecordingLDMPipeline(Recorder, LatentDiffusionPipeline):
    def to_images(self, sample):
        # the reverse process's z0 in the denoiser's scaled space; the VAE's latents are z0 / scaling_factor
        self.recorded_latents.append((sample.detach().float() / self.config.scaling_factor).cpu())
        return super().to_images(sample)


class RecordingDDPMPipeline(Recorder, DDPMPipeline):
    pass


def evaluate(name, pipe, test_set, features, args):
    start = time.perf_counter()
    fd = evaluate_pipeline(pipe, test_set, num_samples=args.fd_samples, feature_extractor=features, seed=FD_SEED,
                           likelihood=False, pipeline_kwargs=pipe.fd_kwargs)["fd"]
    log(f"{name}: FD {fd:.1f} (N={args.fd_samples}; {pipe.call_seconds / args.fd_samples:.4f} s/image sampling, "
        f"{time.perf_counter() - start:.0f} s in all)")
    return {"fd": fd, "s_per_image": pipe.call_seconds / args.fd_samples}


def fit_mixture(train_post, args):
    """A GaussianMixtureSampler fitted to one z ~ q(z|x) per training digit (`train_post`: their posteriors), as
    `hfgen train vae --latent_sampler gmm` fits it (its seed: the training seed)."""
    start = time.perf_counter()
    latents = train_post.sample(torch.Generator().manual_seed(args.seed)).flatten(1).float()
    sampler = GaussianMixtureSampler(latent_dim=latents.shape[1], num_components=args.gmm_components,
                                     covariance_type=args.gmm_covariance).fit(latents, seed=args.seed)
    log(f"gmm: K={args.gmm_components} ({args.gmm_covariance}) fitted in {time.perf_counter() - start:.0f} s")
    return sampler


# ----- the aggregated posterior ---------------------------------------------------------------------------------


def log_mixture(z, means, logvars, exclude=None):
    """log q(z) = log 1/K sum_k N(z; m_k, diag exp(lv_k)) for z (M, D), means/logvars (K, D), all float64: (M,).

    exclude: (M,) component index left out for each z (leave-one-out; then the mixture has K - 1 components).
    Expanded as -1/2 [sum z^2 w - 2 sum z m w + sum (m^2 w + lv) + D log 2 pi], w = exp(-lv), so each chunk of
    queries is two matmuls."""
    weights = torch.exp(-logvars)
    scaled_means = means * weights
    constant = (means**2 * weights + logvars).sum(1) + means.shape[1] * LOG_2PI
    values = []
    for start in range(0, len(z), CHUNK):
        chunk = z[start:start + CHUNK]
        log_densities = -0.5 * ((chunk**2) @ weights.T - 2 * chunk @ scaled_means.T + constant)
        if exclude is not None:
            log_densities[torch.arange(len(chunk)), exclude[start:start + CHUNK]] = -math.inf
        values.append(torch.logsumexp(log_densities, dim=1))
    return torch.cat(values) - math.log(len(means) - (exclude is not None))


def check_log_mixture(means, logvars):
    """The matmul form against a direct sum over components, on a few points."""
    z = means[:3] + 0.3
    direct = torch.logsumexp(torch.stack([
        (-0.5 * ((z - m) ** 2 / torch.exp(lv) + lv + LOG_2PI)).sum(1) for m, lv in zip(means, logvars)]), 0)
    direct = direct - math.log(len(means))
    if not torch.allclose(log_mixture(z, means, logvars), direct, rtol=1e-9, atol=1e-6):
        raise RuntimeError("log_mixture disagrees with the direct sum")


def mmd2(x, y, bandwidth):
    """Unbiased MMD^2 with the RBF kernel exp(-|a - b|^2 / (2 bandwidth^2))."""
    def kernel_sum(a, b, same):
        k = torch.exp(-torch.cdist(a, b) ** 2 / (2 * bandwidth**2))
        return (k.sum() - k.diagonal().sum()) / (len(a) * (len(a) - 1)) if same else k.mean()

    return (kernel_sum(x, x, True) + kernel_sum(y, y, True) - 2 * kernel_sum(x, y, False)).item()


def latent_study(vae, train_post, test_set, latent_sets, args):
    """log q(z), KL estimates, low-density shares and MMD^2 of each set of latents (name -> (N, D) float64);
    `train_post`: the training digits' posteriors q(z|x_n)."""
    generator = torch.Generator().manual_seed(FD_SEED + 1)
    test_post = encode_images(vae, test_set.images)
    means, logvars = train_post.mean.flatten(1).double(), train_post.logvar.flatten(1).double()
    check_log_mixture(means[:50], logvars[:50])
    held_out = test_post.mean.flatten(1).double() + test_post.std.flatten(1).double() * torch.randn(
        len(test_set), means.shape[1], generator=generator, dtype=torch.float64)
    loo_index = torch.randperm(len(means), generator=generator)[:args.fd_samples]
    loo = means[loo_index] + torch.exp(0.5 * logvars[loo_index]) * torch.randn(
        len(loo_index), means.shape[1], generator=generator, dtype=torch.float64)
    sets = {"held-out": held_out, "leave-one-out": loo, **latent_sets}
    log_q = {name: log_mixture(z, means, logvars, exclude=loo_index if name == "leave-one-out" else None)
             for name, z in sets.items()}
    log_p = {name: standard_normal_log_prob(z) for name, z in sets.items()}
    thresholds = {p: torch.quantile(log_q["held-out"], p / 100).item() for p in (1, 5)}
    distances = torch.cdist(held_out, held_out)
    bandwidth = distances[~torch.eye(len(held_out), dtype=torch.bool)].median().item()
    rows = {}
    for name, z in sets.items():
        rows[name] = {
            "n": len(z),
            "mean_log_q": log_q[name].mean().item(),
            "median_log_q": log_q[name].median().item(),
            "mean_log_p": log_p[name].mean().item(),
            "below": {p: (log_q[name] < t).double().mean().item() for p, t in thresholds.items()},
            "mmd2": None if name == "held-out" else mmd2(held_out, z, bandwidth),
            "sq_norm": (z**2).mean().item(),
        }
        log(f"latents {name}: {rows[name]}")
    # the leave-one-out samples scored by the whole mixture, their own component included: an unbiased Monte Carlo
    # estimate of KL(q || p) for q the 4,000-component mixture itself (what the decoder was trained on)
    log_q_in = log_mixture(loo, means, logvars)
    own = (-0.5 * ((loo - means[loo_index]) ** 2 / torch.exp(logvars[loo_index]) + logvars[loo_index] + LOG_2PI)).sum(1)

    def estimate(values):  # mean and its standard error
        return values.mean().item(), values.std().item() / math.sqrt(len(values))

    return {
        "rows": rows, "log_q": log_q, "thresholds": thresholds, "bandwidth": bandwidth,
        "kl_in_sample": estimate(log_q_in - log_p["leave-one-out"]),
        "kl_held_out": estimate(log_q["held-out"] - log_p["held-out"]),
        "kl_loo": estimate(log_q["leave-one-out"] - log_p["leave-one-out"]),
        # share of q(z) that the sample's own component holds: near 1 when the components barely overlap
        "own_share": torch.exp(own - math.log(len(means)) - log_q_in).mean().item(),
        # active units (Burda et al.): latent dims whose posterior mean varies over the digits, Var_x E[z|x] > 0.01
        "active_units": int((means.var(0) > 0.01).sum()),
        "elbo_kl": train_post.kl_standard_normal().mean().item(),
        "num_components": len(means), "dims": means.shape[1],
    }


# ----- figure -----------------------------------------------------------------------------------------------------


def tile(images, columns=8, pad=1):
    """(B, 1, H, W) in [0, 1] -> one (rows * (H + pad), columns * (W + pad)) array, grey padding."""
    images = torch.nn.functional.pad(images[:, 0], (0, pad, 0, pad), value=0.5)
    rows = math.ceil(len(images) / columns)
    images = torch.cat([images, torch.full((rows * columns - len(images), *images.shape[1:]), 0.5)])
    height, width = images.shape[1:]
    return images.view(rows, columns, height, width).permute(0, 2, 1, 3).reshape(rows * height, columns * width).numpy()


def draw_figure(grids, study, hist_sets, path):
    plt = pyplot()

    figure = plt.figure(figsize=(4 * len(grids), 8.2), constrained_layout=True)
    panels = figure.subplot_mosaic([list(range(len(grids))), ["hist"] * len(grids)], height_ratios=[1, 0.85])
    for index, (title, images) in enumerate(grids):
        panels[index].imshow(tile(images), cmap="gray", vmin=0, vmax=1)
        panels[index].set_title(title, fontsize=10)
        panels[index].axis("off")
    axis = panels["hist"]
    values = {label: study["log_q"][name] for label, name in hist_sets}
    # the axis spans the held-out and prior samples' range (+10%) and the others' maxima; what lies further left
    # is counted in the legend instead of squashing the rest
    reference = torch.cat([study["log_q"]["held-out"], study["log_q"]["prior"]])
    high = max(v.max().item() for v in values.values())
    low = reference.min().item() - 0.1 * (high - reference.min().item())
    bins = torch.linspace(low, high, 80).numpy()
    for label, v in values.items():
        outside = int((v < low).sum())
        note = f", {outside} below the axis" if outside else ""
        axis.hist(v[v >= low].numpy(), bins=bins, histtype="step", linewidth=1.5,
                  label=f"{label} (N={len(v)}{note})")
    for percentile, threshold in study["thresholds"].items():
        axis.axvline(threshold, color="grey", linestyle=":" if percentile == 1 else "--", linewidth=1)
    axis.set_xlabel("log q(z), q = aggregated posterior of the 4,000 training digits "
                    "(dotted / dashed: 1st / 5th percentile of the held-out samples)")
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    save_figure(figure, path)


# ----- run and report ---------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    started, load_before = start_clock(args.threads)
    train_set = load_image_dataset("hfgen:mnist", "train", resolution=RESOLUTION)
    test_set = load_image_dataset("hfgen:mnist", "test", resolution=RESOLUTION)
    features = load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR)

    with tempfile.TemporaryDirectory() as temporary:
        root = args.output_dir or temporary
        os.makedirs(root, exist_ok=True)
        if args.reuse:
            with open(os.path.join(root, "timings.json")) as file:
                timings = json.load(file)
            for name, value in timings.get("trained_with", {}).items():  # the section describes the models as trained
                setattr(args, name, value)
        else:
            timings = train_all(args, root)
        torch.set_num_threads(args.threads)
        ldm = LatentDiffusionPipeline.from_pretrained(os.path.join(root, "ldm"))
        prior = VAEPipeline.from_pretrained(os.path.join(root, "ldm", train_ldm.FIRST_STAGE))
        ddpm = DDPMPipeline.from_pretrained(os.path.join(root, "ddpm"))
    check_threads(args.threads, "loading the pipelines")
    vae = prior.vae.eval()
    ldm_state, vae_state = ldm.vae.state_dict(), vae.state_dict()
    if ldm_state.keys() != vae_state.keys() or not all(torch.equal(ldm_state[k], vae_state[k]) for k in vae_state):
        raise RuntimeError("the LDM's VAE differs from its first_stage folder")
    scaling = ldm.config.scaling_factor
    saved_clip = bool(ldm.scheduler.config.clip_sample)

    def ldm_sampler(clip_sample):  # the saved U-Net and scheduler config, clipping z0 to [-1, 1] or not
        scheduler = DDPMScheduler.from_config(ldm.scheduler.config, clip_sample=clip_sample)
        return RecordingLDMPipeline(ldm.vae, ldm.unet, scheduler, scaling)

    train_post = encode_images(vae, train_set.images)  # q(z|x_n) of every training digit, for the mixture and the study
    samplers = {  # name -> recording pipeline
        "prior": RecordingVAEPipeline(vae),
        "gmm": RecordingVAEPipeline(vae, latent_sampler=fit_mixture(train_post, args)),
        "ldm_noclip": ldm_sampler(False),
        "ldm_clip": ldm_sampler(True),
        "ddpm": RecordingDDPMPipeline(ddpm.unet, ddpm.scheduler),
    }
    saved_name = "ldm_clip" if saved_clip else "ldm_noclip"

    def clip_label(name):
        return f"clip_sample={name == 'ldm_clip'}" + (", as saved" if name == saved_name else "")
    results = {}
    for name, pipe in samplers.items():
        vae_sampler = name in ("prior", "gmm")
        pipe.start_recording().fd_kwargs = {} if vae_sampler else {"num_inference_steps": args.inference_steps}
        results[name] = evaluate(name, pipe, test_set, features, args)

    # references at the same N: the decoder on exact aggregated-posterior samples, and real training digits
    generator = torch.Generator().manual_seed(FD_SEED)
    real_test = test_set.images[torch.randperm(len(test_set), generator=generator)[:args.fd_samples]]  # as evaluate_pipeline
    reference_index = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(FD_SEED + 2))[:args.fd_samples]
    with torch.no_grad():
        posterior = encode_images(vae, train_set.images[reference_index])
        exact_q = vae.decode(posterior.sample(torch.Generator().manual_seed(FD_SEED + 3))).sample.clamp(0, 1)
    results["exact_q"] = {"fd": frechet_distance(real_test, exact_q, features), "s_per_image": None}
    results["real"] = {"fd": frechet_distance(real_test, train_set.images[reference_index], features), "s_per_image": None}
    log(f"references: exact q FD {results['exact_q']['fd']:.1f}, real training digits FD {results['real']['fd']:.1f}")

    latent_sets = {name: samplers[name].latents() for name in ("prior", "gmm", "ldm_noclip", "ldm_clip")}
    study = latent_study(vae, train_post, test_set, latent_sets, args)
    max_scaled = {name: (latent_sets[name] * scaling).abs().max().item() for name in ("ldm_noclip", "ldm_clip")}
    at_bound = (latent_sets["ldm_clip"] * scaling).abs().ge(1 - 1e-6).double().mean().item()
    exact_scaled_share = ((posterior.sample(torch.Generator().manual_seed(FD_SEED + 4)) * scaling).abs() > 1).double().mean().item()

    gmm_label = f"GMM fitted to q(z) (K={args.gmm_components}, {args.gmm_covariance})"
    figure_ok = True
    try:
        draw_figure(
            [(f"VAE: z ~ p(z) = N(0, I)\nFD {results['prior']['fd']:.1f}", samplers["prior"].grid_images()),
             (f"VAE: z ~ {gmm_label}\nFD {results['gmm']['fd']:.1f}", samplers["gmm"].grid_images()),
             *[(f"latent diffusion ({clip_label(name)})\nFD {results[name]['fd']:.1f}", samplers[name].grid_images())
               for name in ("ldm_noclip", "ldm_clip")],
             (f"pixel DDPM\nFD {results['ddpm']['fd']:.1f}", samplers["ddpm"].grid_images())],
            study,
            [("held-out q(z|x_test) samples", "held-out"), ("prior N(0, I)", "prior"), (gmm_label, "gmm"),
             *[(f"LDM latents ({clip_label(name)})", name) for name in ("ldm_noclip", "ldm_clip")]],
            FIGURE if args.write else os.path.join(tempfile.gettempdir(), "ldm_study_quick.png"))
    except ImportError as error:  # matplotlib missing: the section says so
        figure_ok = False
        log(f"no figure: {error}")
    load_after = load_average()
    kl_in, kl_loo, kl_ho = study["kl_in_sample"], study["kl_loo"], study["kl_held_out"]

    # ----- the section -----
    n = args.fd_samples
    params = {"vae": num_parameters(vae), "ldm_unet": num_parameters(ldm.unet), "ddpm_unet": num_parameters(ddpm.unet)}
    unet_widths = {name: " ".join(map(str, pipe.unet.config.block_out_channels)) for name, pipe in (("ldm", ldm), ("ddpm", ddpm))}

    def fd_row(label, latents, name):
        r = results[name]
        s = "–" if r["s_per_image"] is None else f"{r['s_per_image']:.4f}"
        return f"| {label} | {latents} | {n} | {r['fd']:.1f} | {s} |"

    fd_rows = [
        "| sampler | latents decoded | N | FD vs test digits (lower is better) | sampling s/image |",
        "|---|---|---|---|---|",
        fd_row("VAE decoder on its prior", "z ~ p(z) = N(0, I)", "prior"),
        fd_row("VAE decoder on the fitted latent sampler", f"z ~ {gmm_label}", "gmm"),
        *[fd_row(f"latent diffusion ({clip_label(name)}), {args.inference_steps} steps", "z0 / scaling_factor", name)
          for name in ("ldm_noclip", "ldm_clip")],
        fd_row(f"pixel DDPM, {args.inference_steps} steps", "–", "ddpm"),
        fd_row("reference: VAE decoder on exact aggregated-posterior samples", "z ~ q(z\\|x_n), N random training digits",
               "exact_q"),
        fd_row("reference: real training digits", "–", "real"),
    ]
    labels = {
        "held-out": "held-out: z ~ q(z\\|x), one per test digit",
        "leave-one-out": "leave-one-out: z ~ q(z\\|x_n), N training digits, own component left out",
        "prior": "prior z ~ N(0, I) (the VAE's samples above)",
        "gmm": f"z ~ {gmm_label} (the VAE's samples above)",
        "ldm_noclip": f"latent diffusion z0 / scaling_factor ({clip_label('ldm_noclip')})",
        "ldm_clip": f"latent diffusion z0 / scaling_factor ({clip_label('ldm_clip')})",
    }
    rows = study["rows"]
    latent_rows = [
        "| latents (VAE space, 4x8x8 = 256 dims) | N | mean log q(z) | median log q(z) | share below q's 1st pct | "
        "share below q's 5th pct | MMD² vs held-out | mean z² per dim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in labels.items():
        r = rows[name]
        mmd = "–" if r["mmd2"] is None else f"{r['mmd2']:.4f}"
        latent_rows.append(f"| {label} | {r['n']} | {r['mean_log_q']:.1f} | {r['median_log_q']:.1f} | "
                           f"{100 * r['below'][1]:.1f}% | {100 * r['below'][5]:.1f}% | {mmd} | {r['sq_norm']:.3f} |")

    if "median_step_s" in timings["ldm"]:
        def cost_row(label, name, sampler, model_params):
            t, r = timings[name], results[sampler]
            return (f"| {label} | {model_params} | {args.train_steps} | {t['median_step_s']:.3f} | {t['fastest_step_s']:.3f} | "
                    f"{t['wall_s']:.0f} | {r['s_per_image']:.4f} | {r['fd']:.1f} |")

        cost_rows = [
            "| model | parameters | training steps (batch 64) | median s/step | fastest step (s) | stage wall time (s) | "
            f"sampling s/image ({args.inference_steps} steps, batch 250) | FD (N={n}) |",
            "|---|---|---|---|---|---|---|---|",
            f"| VAE first stage (conv, 4x8x8 latent) | {params['vae']:,} | {args.vae_epochs} epochs | – | – | "
            f"{timings['vae']['wall_s']:.0f} | {results['prior']['s_per_image']:.4f} (prior samples) | {results['prior']['fd']:.1f} |",
            cost_row(f"latent diffusion U-Net (widths {unet_widths['ldm']}) on 4x8x8 (sampled as saved: clip_sample={saved_clip})",
                     "ldm", saved_name, f"{params['ldm_unet']:,}"),
            cost_row(f"pixel DDPM U-Net (widths {unet_widths['ddpm']}) on 1x32x32", "ddpm", "ddpm", f"{params['ddpm_unet']:,}"),
        ]
        step_ratio = timings["ddpm"]["median_step_s"] / timings["ldm"]["median_step_s"]
        load_note = ", ".join(f"{name} {timings[name]['load_before']:.2f} → {timings[name]['load_after']:.2f}"
                              for name in ("vae", "ldm", "ddpm"))
        trained = (("Trained by an earlier run of this script (`--reuse`: the times are from its timings.json)" if args.reuse
                    else "Trained in this run") + f"; 1-minute load average before → after each stage: {load_note}. Stage wall times "
                   "include set-up and the trainers' own save (the VAE's also its final ELBO / IWAE evaluation on the test "
                   f"digits); seconds per step are each `training_step` (forward, loss, backward, fused AdamW step), steps "
                   f"{WARMUP_STEPS + 1}.. (the first {WARMUP_STEPS} are warm-up).")
    else:
        cost_rows, step_ratio = [], None
        trained = "The models were trained by an earlier run (`--reuse`): no training times in this section."
    sample_ratio = results["ddpm"]["s_per_image"] / results[saved_name]["s_per_image"]
    prior_below, clip_below, noclip_below = (rows[k]["below"][1] for k in ("prior", "ldm_clip", "ldm_noclip"))

    def compare(a, b, lower="lower", higher="higher"):
        return lower if a < b else higher

    fd = {name: results[name]["fd"] for name in results}
    held, clip_row, noclip_row = rows["held-out"], rows["ldm_clip"], rows["ldm_noclip"]
    findings = [
        f"On the same VAE, {100 * noclip_below:.1f}% of the latent-diffusion latents ({clip_label('ldm_noclip')}) fall below "
        f"the 1st percentile of held-out log q(z) against {100 * prior_below:.1f}% of prior samples (MMD² to q-samples "
        f"{noclip_row['mmd2']:.4f} vs {rows['prior']['mmd2']:.4f}), and their decoded samples have a "
        f"{compare(fd['ldm_noclip'], fd['prior'])} FD ({fd['ldm_noclip']:.1f} vs {fd['prior']:.1f}).",
        f"Without any denoiser, the {gmm_label} puts {100 * rows['gmm']['below'][1]:.1f}% of its samples there (MMD² "
        f"{rows['gmm']['mmd2']:.4f}), and the same decoder on them reaches FD {fd['gmm']:.1f}: "
        f"{100 * (fd['prior'] - fd['gmm']) / (fd['prior'] - fd['exact_q']):.0f}% of the way from the prior's "
        f"{fd['prior']:.1f} to exact q-samples' {fd['exact_q']:.1f}.",
    ]
    ratio = clip_row["sq_norm"] / held["sq_norm"]
    shape = (f"too concentrated (mean z² per dimension {clip_row['sq_norm']:.3f} against {held['sq_norm']:.3f} for "
             f"q-samples, so {100 * clip_below:.1f}% below the threshold but MMD² {clip_row['mmd2']:.4f})"
             if ratio < 0.8 else f"at MMD² {clip_row['mmd2']:.4f} from q-samples")
    findings.append(
        ("As saved, the pipeline's DDPMScheduler clips the predicted z0 to [-1, 1] (its default clip_sample=True, meant "
         "for pixels in [-1, 1]) although the scaled latents have unit variance: its latents are " if saved_clip else
         "With DDPMScheduler's default clip_sample=True, which clips the predicted z0 to [-1, 1] (meant for pixels in "
         "[-1, 1]; the saved scheduler does not clip), the same U-Net's latents are ")
        + f"{shape}, and the FD is {fd['ldm_clip']:.1f}.")
    pixel_speed = (f"{sample_ratio:.1f}× slower" if sample_ratio >= 1 else f"{1 / sample_ratio:.1f}× faster")
    best_latent = min(fd["ldm_clip"], fd["ldm_noclip"])
    limit = (f"All latent samplers stay far from the decoder on exact q-samples (FD {fd['exact_q']:.1f}): after "
             f"{args.train_steps} steps the latent denoiser, not the decoder, limits latent diffusion; "
             if fd["exact_q"] < best_latent / 2 else
             f"The decoder on exact q-samples gives FD {fd['exact_q']:.1f}; ")
    findings += [
        limit + "the pixel DDPM, trained for the same steps"
        + (f" at {step_ratio:.1f}× the seconds per step" if step_ratio else "")
        + f" and sampling {pixel_speed} per image, reaches a {compare(fd['ddpm'], best_latent)} FD than the best "
        f"latent-diffusion sampler ({fd['ddpm']:.1f} vs {best_latent:.1f}).",
        f"One seed and one training run per model, N={n}: small FD differences (a tenth of the value, say) may come "
        f"from the training run alone, which this study does not repeat (real training digits give {fd['real']:.1f} at "
        "this N); these short-trained models show how each samples, not what converged models reach.",
    ]

    start, end = markers(KEY)
    text = "\n".join([
        start,
        "## Latent diffusion vs the VAE prior vs pixel DDPM (docs/maths.md §7.2)",
        "",
        f"What was trained (`benchmarks/bench_ldm.py`, seed {args.seed}, the 4,000 training digits of `hfgen:mnist` at "
        f"{RESOLUTION} px): latent diffusion as `hfgen.training.train_ldm.main` trains it, a conv VAE first stage "
        f"(hidden dims 32 64, 4x8x8 latent, Bernoulli decoder, {args.vae_epochs} epochs, lr 2e-3, {params['vae']:,} "
        f"parameters) then a U-Net on its scaled latents (scaling factor {scaling:.4f}; widths {unet_widths['ldm']}, "
        f"{params['ldm_unet']:,} parameters) for {args.train_steps} steps; and a pixel DDPM with `train_ddpm.py`'s default "
        f"U-Net (widths {unet_widths['ddpm']}, {params['ddpm_unet']:,} parameters) on the same digits at `--resolution "
        f"{RESOLUTION}`, also {args.train_steps} steps. Both diffusion models: batch 64, AdamW lr 1e-3, DDPMScheduler(1000, "
        "linear betas), epsilon prediction, no EMA. " + trained,
        "",
        f"Samples: FD in the features of `{DEFAULT_FEATURE_EXTRACTOR}` (resized to 28 px inside it) between N={n} samples "
        f"and {'the 1,000' if n == 1000 else f'{n} random'} test digits at 32 px, by `hfgen.metrics.evaluate_pipeline(..., "
        f"likelihood=False, seed={FD_SEED})` for every pipeline (the same real digits and noise seeds); diffusion with the saved "
        f"DDPMScheduler at {args.inference_steps} steps, batches of 250. Sampling s/image is the wall time of the "
        "pipeline calls / N (FD features excluded). Latent diffusion is sampled twice with the same U-Net, by "
        "`DDPMScheduler.from_config(saved config, clip_sample=...)`: clip_sample=True, the DDPMScheduler default, clips the "
        "predicted z0 to [-1, 1], meant for pixels but here applied to the scaled latents, which have unit variance; "
        f"the saved scheduler has clip_sample={saved_clip}.",
        "",
        *fd_rows,
        "",
        f"The prior / aggregated-posterior gap, in the VAE's latent space: q(z) = 1/{study['num_components']:,} Σ q(z|x_n) "
        "over the training digits' posteriors (a mixture of diagonal Gaussians; log q(z) by logsumexp over the components, "
        "float64). It is scored on posterior samples of the held-out test digits (so the mixture never scores its own "
        "samples), on leave-one-out training samples, on the prior samples the VAE decoded above and on the final latents "
        f"z0 / {scaling:.4f} of the latent-diffusion samples above. Thresholds: the 1st / 5th percentile of log q over the "
        f"held-out samples ({study['thresholds'][1]:.1f} / {study['thresholds'][5]:.1f}). MMD²: unbiased, RBF kernel with "
        f"one bandwidth for every row, the median pairwise distance among the held-out samples ({study['bandwidth']:.2f}).",
        "",
        *latent_rows,
        "",
        f"KL(q(z) ‖ N(0, I)) = E_q[log q(z) − log p(z)] (± one standard error over the samples). For q the "
        f"{study['num_components']:,}-component mixture itself, scored on the leave-one-out samples with their own "
        f"component included (an unbiased Monte Carlo estimate for that mixture): **{kl_in[0]:.1f} ± {kl_in[1]:.1f} "
        f"nats**. A bracket without sampling: the ELBO's mean KL term over the training digits is E_x KL(q(z|x) ‖ p(z)) "
        f"= I(x; z) + KL(q ‖ p) = {study['elbo_kl']:.1f} nats, and I(x; z) ≤ log {study['num_components']:,} = "
        f"{math.log(study['num_components']):.2f} nats, so {study['elbo_kl'] - math.log(study['num_components']):.1f} ≤ "
        f"KL(q ‖ p) ≤ {study['elbo_kl']:.1f} nats. Scored without their own component, as the held-out rows above are, "
        f"the estimates drop to {kl_loo[0]:.1f} ± {kl_loo[1]:.1f} (leave-one-out) and {kl_ho[0]:.1f} ± {kl_ho[1]:.1f} nats "
        f"(held-out test digits): in {study['dims']} dimensions the components barely overlap (a sample's own component "
        f"holds {100 * study['own_share']:.1f}% of q(z) at it, on average), so at a new point the mixture of "
        f"{study['num_components']:,} posteriors is a poor density estimate and these numbers fall far below the bracket; "
        "the held-out log q(z) above serves only to rank points by how close they lie to the training digits' "
        f"posteriors. {study['active_units']} of the {study['dims']} latent dimensions are active "
        "(variance of the posterior mean over the digits > 0.01); the rest keep q(z|x) ≈ N(0, 1).",
        f"With clip_sample=True the latent-diffusion latents reach at most |z0| = {max_scaled['ldm_clip']:.3f} in the scaled "
        f"space ({100 * at_bound:.1f}% of their coordinates sit at ±1), where {100 * exact_scaled_share:.1f}% of the "
        f"coordinates of exact posterior samples lie beyond ±1; with clip_sample=False, at most {max_scaled['ldm_noclip']:.2f}.",
        "",
        "Cost, latent diffusion vs pixel DDPM (the same number of training steps and denoising steps, the same batches):",
        "",
        *cost_rows,
        "",
        (f"![VAE prior samples, latent diffusion and pixel DDPM samples; histogram of log q(z)]({FIGURE_LINK})"
         if figure_ok else "(no figure: matplotlib is not installed)"),
        "",
        "What the numbers show: " + " ".join(findings),
        "",
        *[line.replace("compare the per-run medians and the fastest epochs", "compare the fastest steps")
          for line in environment_lines("bench_ldm.py", args.threads, load_before, load_after)],
        end,
    ])
    finish(KEY, text, args.write, started)


if __name__ == "__main__":
    main()
