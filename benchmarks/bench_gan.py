"""DCGAN on the digits, trained by hfgen's trainer and by a plain PyTorch loop, side by side.

What it measures, for hfgen's DCGAN (`--base_channels` C, latent 64, non-saturating loss, one D step per
G step, Adam(W) lr 2e-4, betas (0.5, 0.999), no weight decay, batch 64) on the 4,000 training digits of
`hfgen:mnist` mapped to [-1, 1] (test: its 1,000 test digits):

  (a) hfgen: `hfgen.training.train_gan.GANTrainer` with the matching flags. The trained generator is loaded
      back from the output folder with `GANPipeline.from_pretrained`.
  (b) plain: the same nets (`hfgen.Generator` / `hfgen.Discriminator` with the same config, and with the
      same seed the same initial weights) trained by a loop written here: a torch DataLoader (shuffle,
      drop_last) over the digits, torch.optim.AdamW per net, and per batch the same maths as train_gan.py:
      a D step on real and fake (fake from G under no_grad; real and fake through D separately) with
      BCE-with-logits (= softplus) losses, then a G step with the non-saturating loss, D frozen.

After the same number of epochs, for both:
  - seconds per epoch of training steps: hfgen's `trainer.epoch_seconds` and time.perf_counter around
    each epoch of the plain loop; the median over all epochs but the first (warm-up) of every run;
  - the Fréchet distance (FD) between --fd_samples generated digits and as many test digits, in the features
    of hfgen's default extractor (a digit classifier, trained and cached on first use), both from the same
    code, `hfgen.metrics.evaluate_pipeline` with the same seed; also for the untrained generator (seed 0's
    initial weights), as a reference.

Both trainers use the same `torch.set_num_threads`. To reduce drift they run alternately, in the order
plain, hfgen, hfgen, plain, ... (`--rounds` runs of each per seed; benchmarks/common.py, shared with
bench_vae.py). Only the generators of each seed's first round are evaluated; the other rounds add timings.

    python benchmarks/bench_gan.py --write          # default run; rewrites the GAN section of BENCHMARKS.md
    python benchmarks/bench_gan.py --seeds 3 --rounds 1 2>/dev/null     # the FD spread over training seeds

The default run takes about 75 s on 2 quiet cores (4 runs of 5 epochs of ~3 s, and 3 FDs of ~1 s; the first
run ever also trains and caches the feature extractor), at most ~5 min when other work shares the cores.

The trainer's progress bar and logs go to stderr; the results table goes to stdout. With 2 threads on 2 cores,
a process busy on one of them makes single epochs of either trainer up to ~10x slower (threads wait for each
other): compare the per-run medians and fastest epochs, or rerun on a quiet machine; `--threads 1` is steadier.
"""

import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from common import (
    benchmark_parser,
    TARGET_RATIO, TIMING_HEADER, check_positive, environment_lines, finish, load_average, markers,
    mean_sd, ratio_sentence, run_alternately, start_clock, timing_cells, timing_summary,
)
from hfgen import Discriminator, GANPipeline, Generator
from hfgen.data import load_image_dataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor
from hfgen.training.train_gan import GANTrainer, parse_args as gan_trainer_args

KEY = "gan"  # the section <!-- gan:start --> ... <!-- gan:end --> of BENCHMARKS.md

LATENT = 64
LEARNING_RATE, BETAS, BATCH_SIZE = 2e-4, (0.5, 0.999), 64
FD_SEED = 0  # the same sampling seed for every generator evaluated


def parse_args():
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--base_channels", type=int, default=32, help="Width of the DCGAN nets (trainer's flag).")
    parser.add_argument("--seeds", type=int, default=1, help="Train seeds 0 .. N-1 with each trainer.")
    parser.add_argument("--fd_samples", type=int, default=1000, help="Generated digits per FD.")
    return parser.parse_args()


def net_config(base_channels):
    """What GANTrainer.build_models passes for unconditional 28x28 digits."""
    return dict(sample_size=28, channels=1, architecture="dcgan", base_channels=base_channels, num_classes=0,
                id2label=None)


def build_nets(seed, base_channels):
    """G then D from `seed`, in the trainer's order, so both trainers start from the same weights."""
    torch.manual_seed(seed)
    config = net_config(base_channels)
    return Generator(latent_dim=LATENT, **config), Discriminator(spectral_norm=False, **config)


# ----- (b) the plain PyTorch loop ---------------------------------------------------------------------------


def train_plain(seed, epochs, base_channels, train_set):
    generator, discriminator = build_nets(seed, base_channels)
    g_optimizer = torch.optim.AdamW(generator.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=0.0)
    d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    real_target, fake_target = torch.ones(BATCH_SIZE), torch.zeros(BATCH_SIZE)
    generator.train()
    discriminator.train()
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for real, _labels in loader:
            # D step: -log D(x) - log(1 - D(G(z))), i.e. softplus(-l(x)) + softplus(l(G(z)))
            with torch.no_grad():
                fake = generator(torch.randn(BATCH_SIZE, LATENT)).sample
            real_logits = discriminator(real).logits
            fake_logits = discriminator(fake).logits
            d_loss = (F.binary_cross_entropy_with_logits(real_logits, real_target)
                      + F.binary_cross_entropy_with_logits(fake_logits, fake_target))
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
            # G step, D frozen: non-saturating -log D(G(z)) = softplus(-l(G(z)))
            discriminator.requires_grad_(False)
            fake = generator(torch.randn(BATCH_SIZE, LATENT)).sample
            g_loss = F.binary_cross_entropy_with_logits(discriminator(fake).logits, real_target)
            g_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            g_optimizer.step()
            discriminator.requires_grad_(True)
        epoch_seconds.append(time.perf_counter() - start)
    return GANPipeline(generator.eval()), epoch_seconds


# ----- (a) hfgen's trainer ----------------------------------------------------------------------------------


def hfgen_flags(seed, epochs, base_channels, output_dir):
    return (
        f"--output_dir {output_dir} --seed {seed} --architecture dcgan --base_channels {base_channels} "
        f"--latent_dim {LATENT} --loss non_saturating --d_steps 1 --learning_rate {LEARNING_RATE} "
        f"--adam_beta1 {BETAS[0]} --adam_beta2 {BETAS[1]} --train_batch_size {BATCH_SIZE} --num_epochs {epochs} "
        f"--logger none --save_images_epochs 0 --checkpointing_steps 1000000"
    ).split()


def train_hfgen(seed, epochs, base_channels, output_dir):
    trainer = GANTrainer(gan_trainer_args(hfgen_flags(seed, epochs, base_channels, output_dir)))
    trainer.train()
    return GANPipeline.from_pretrained(output_dir), trainer.epoch_seconds


# ----- measurement ------------------------------------------------------------------------------------------


def check_same_nets(base_channels):
    """The trainer builds the plain loop's nets: the same config and, for the same seed, the same weights."""
    with torch.no_grad(), tempfile.TemporaryDirectory() as output_dir:
        trainer = GANTrainer(gan_trainer_args(hfgen_flags(0, 1, base_channels, output_dir)))
        for name, plain in zip(("generator", "discriminator"), build_nets(0, base_channels)):
            ours = trainer.unwrap(name)
            state, plain_state = ours.state_dict(), plain.state_dict()
            same = (dict(ours.config) == dict(plain.config) and state.keys() == plain_state.keys()
                    and all(torch.equal(state[key], plain_state[key]) for key in state))
            if not same:
                raise RuntimeError(f"the plain loop's {name} differs from GANTrainer's (config or initial weights)")
        trainer.accelerator.end_training()


def run(args):
    torch.set_num_threads(args.threads)
    train_data = load_image_dataset("hfgen:mnist", "train")
    test_set = load_image_dataset("hfgen:mnist", "test")
    plain_train_set = torch.utils.data.TensorDataset(train_data.images * 2 - 1, train_data.labels)  # [-1, 1]
    check_same_nets(args.base_channels)
    start = time.perf_counter()
    features = load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR)  # trained and cached on first use

    def fd(pipeline):
        return evaluate_pipeline(pipeline, test_set, num_samples=args.fd_samples, feature_extractor=features,
                                 seed=FD_SEED)

    untrained = fd(GANPipeline(build_nets(0, args.base_channels)[0].eval()))
    print(f"untrained generator: {untrained} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    seconds, run_medians, metrics = run_alternately(
        {
            "plain": lambda seed, _output_dir: train_plain(seed, args.epochs, args.base_channels, plain_train_set),
            "hfgen": lambda seed, output_dir: train_hfgen(seed, args.epochs, args.base_channels, output_dir),
        },
        lambda _name, pipeline, _seed: fd(pipeline),
        seeds=args.seeds, rounds=args.rounds, epochs=args.epochs, threads=args.threads,
    )
    return seconds, run_medians, metrics, untrained


# ----- report -----------------------------------------------------------------------------------------------


def report(args, seconds, run_medians, metrics, untrained):
    timing = timing_summary(seconds, run_medians)
    fd = {name: [m["fd"] for m in metrics[name]] for name in metrics}
    rows = [
        f"| trainer | {TIMING_HEADER} | test FD after {args.epochs} epochs | per-seed FD |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("plain", "plain PyTorch loop"), ("hfgen", "hfgen `GANTrainer`")):
        rows.append(f"| {label} | {timing_cells(timing, name, 3)} | {mean_sd(fd[name], 1)} | "
                    f"{', '.join(f'{v:.1f}' for v in fd[name])} |")
    rows.append(f"| untrained generator (reference) | – | – | – | {untrained['fd']:.1f} | |")
    gap = [h - p for h, p in zip(fd["hfgen"], fd["plain"])]
    lines = rows + [
        "",
        f"{ratio_sentence(timing)} FD, hfgen − plain, per seed: {', '.join(f'{d:+.1f}' for d in gap)}.",
    ]
    return "\n".join(lines), timing["ratio"]


def section(args, table, load_before, load_after):
    start, end = markers(KEY)
    c = args.base_channels
    real = "the 1,000 test digits" if args.fd_samples == 1000 else f"{args.fd_samples:,} of the 1,000 test digits"
    return "\n".join([
        start,
        "## GAN: hfgen trainer vs a plain PyTorch loop",
        "",
        f"hfgen's DCGAN (`--base_channels {c}`: G 64 → {4 * c}×7×7 → {2 * c}×14×14 → 1×28×28 with batch norm, "
        f"D 1 → {c} → {2 * c} channels, then a linear score), latent 64, non-saturating loss, one D step per G "
        "step, Adam(W) lr 2e-4, betas (0.5, 0.999), no weight decay, batch 64, on the 4,000 training digits of "
        f"`hfgen:mnist` in [-1, 1], {args.epochs} epochs, trained by `hfgen.training.train_gan.GANTrainer` and "
        "by a plain PyTorch loop of the same nets (`hfgen.Generator` / `hfgen.Discriminator`, same config and "
        "initial weights) with the same maths as `train_gan.py`: D on real and fake separately (fake from G "
        "under no_grad), BCE-with-logits losses, then G with D frozen. Seconds per epoch: median over epochs "
        f"2..{args.epochs} of every run ({args.epochs - 1} per run, {args.seeds} seed(s) × {args.rounds} runs "
        "per trainer, run alternately). Both generators are evaluated by the same code, "
        f"`hfgen.metrics.evaluate_pipeline` with the same seed: the Fréchet distance (FD, lower is better) between "
        f"{args.fd_samples:,} samples and {real} in the features of the default extractor "
        f"`{DEFAULT_FEATURE_EXTRACTOR}` (a small classifier trained on the training digits)"
        + (" (± is the standard deviation over training seeds)." if args.seeds > 1 else "."),
        "",
        f"Target: hfgen's seconds per epoch within {TARGET_RATIO:.2f}× the plain loop's, and the same FD within "
        "noise (GAN training is noisy: compare with the untrained generator's FD).",
        "",
        "The two loops differ where the trainer made choices of its own: hfgen's `GANTrainer` uses a fused "
        "AdamW (one kernel for all parameters) and whole-batch indexing of the in-memory digits (one index "
        "per batch, see `training/trainer.py` and `hfgen.data.training_dataloader`), and runs under accelerate; "
        "the plain loop uses torch's defaults: AdamW's default implementation (on CPU, a loop over the parameters) "
        "and a DataLoader that looks up 64 items and stacks them per batch. The trainer's own end-of-training "
        "evaluation and output folder are outside its timed epochs.",
        "",
        *environment_lines("bench_gan.py", args.threads, load_before, load_after),
        "",
        table,
        end,
    ])


def main():
    args = parse_args()
    check_positive(args, ("epochs", "base_channels", "seeds", "rounds", "fd_samples", "threads"))
    started, load_before = start_clock()
    seconds, run_medians, metrics, untrained = run(args)
    table, _ = report(args, seconds, run_medians, metrics, untrained)
    finish(KEY, section(args, table, load_before, load_average()), args.write, started)


if __name__ == "__main__":
    main()
