"""DDPM on the digits: hfgen's trainer vs a diffusers-example-style loop, and DDPM / DDIM / DPM-Solver++ sampling.

What it measures, in one run, for diffusers' UNet2DModel as hfgen's `train_ddpm.py` builds it (widths
--block_out_channels 32 64 64, one layer per block, DownBlock2D / UpBlock2D, norm_num_groups = min(8, 32),
epsilon prediction, DDPMScheduler with 1000 linear-beta steps), AdamW lr 1e-3, batch 64, on the 4,000
training digits of `hfgen:mnist` mapped to [-1, 1] (62 full batches per epoch):

  1. Training throughput, images per second:
     (a) hfgen: `hfgen.training.train_ddpm.DDPMTrainer(parse_args([...]))` with --logger none
         --save_images_epochs 0 --feature_extractor none --checkpointing_steps 1000000 --max_train_steps
         --train_steps; its own `trainer.epoch_seconds` (wall time of each epoch's training steps; set-up,
         the final sample grid and the saved folder are outside it). Its choices: fused AdamW and whole-batch
         indexing of the in-memory digits, under accelerate.
     (b) reference: a loop in the style of diffusers' examples/unconditional_image_generation/
         train_unconditional.py: the same UNet2DModel config (same seed, same initial weights), a plain
         torch DataLoader (shuffle, drop_last) over a TensorDataset of the digits, DDPMScheduler(1000).add_noise,
         MSE on the noise, torch.optim.AdamW with torch's default implementation, no clipping, no EMA,
         no lr schedule (to match hfgen's defaults); time.perf_counter around each epoch.
     Timed windows are epochs (62 steps = 3,968 images); each run's first epoch (warm-up) is dropped, so
     --train_steps is rounded up to whole epochs and must cover at least 2. The runs alternate
     (plain, hfgen, hfgen, plain, ... over --rounds; benchmarks/common.py). Reported: median images/s of
     each and the ratio hfgen / reference (target >= 1.0).
     Also: FLOPs of one training step (forward + MSE + backward of one batch of 64, counted by
     torch.utils.flop_counter.FlopCounterMode; the optimizer step is not counted) divided by each trainer's
     median seconds per step, against the float32 matmul peak measured in this process (a 2048x2048
     torch.mm, median of 5 after a warm-up, at the same thread count).
  2. Sampling with ONE model: the hfgen model of the first hfgen run (--train_steps steps: small and
     short-trained, good for a relative comparison of samplers only), sampled by DDPM ancestral with 1000
     steps, DDIM with 50 and DPM-Solver++ (DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", 2nd
     order) with 20, each swapped in by `Scheduler.from_config(pipe.scheduler.config)`. Seconds per image =
     wall time of `hfgen.metrics.evaluate_pipeline(pipe, test digits, num_samples=N, pipeline_kwargs=
     {"num_inference_steps": S}, likelihood=False)` / N (batches of 250; the FD features are a small part),
     and its FD. DDPM-1000 is ~20-50x slower per image, so its N is chosen from a timed probe to fit
     --ddpm_budget_s seconds (at most --fd_samples); DDIM and DPM-Solver++ are also evaluated at that N
     (same seed, so the same real digits and the same noise seeds) because FD is biased upwards at small N.

    python benchmarks/bench_ddpm.py --write              # rewrites the ddpm section of BENCHMARKS.md
    python benchmarks/bench_ddpm.py --threads 1 --rounds 2 --train_steps 186

The recorded run (`--threads 1 --write`) took ~7 min on 2 shared cores: 2 runs of 124 steps of ~0.86 s, then
~3.5 min of sampling (DDPM-1000 alone ~90 s for 19 images); the first run ever also trains the FD extractor.
With 2 threads on 2 cores a process busy on one core makes each step several times slower (the threads wait
for each other); `--threads 1` is steadier on a shared machine. Progress goes to stderr, the table to stdout.
"""

import math
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from common import (
    benchmark_parser,
    check_positive, environment_lines, finish, load_average, markers, run_alternately, start_clock,
)
from hfgen import DDPMPipeline
from hfgen.data import load_image_dataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor
from hfgen.training.train_ddpm import DDPMTrainer, parse_args as ddpm_trainer_args

KEY = "ddpm"  # the section <!-- ddpm:start --> ... <!-- ddpm:end --> of BENCHMARKS.md
WIDTHS, LAYERS, BATCH_SIZE, LEARNING_RATE, TIMESTEPS = (32, 64, 64), 1, 64, 1e-3, 1000
NUM_TRAIN = 4000
STEPS_PER_EPOCH = NUM_TRAIN // BATCH_SIZE  # 62, drop_last
FD_SEED = 0
SAMPLERS = (  # label, scheduler class, extra config, steps
    ("DDPM ancestral", DDPMScheduler, {}, 1000),
    ("DDIM", DDIMScheduler, {}, 50),
    ("DPM-Solver++ (2M)", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, 20),
)


def parse_args():
    parser = benchmark_parser(__doc__.split("\n\n")[0], rounds=1)
    parser.add_argument("--train_steps", type=int, default=124,
                        help="Steps per training run, rounded up to whole epochs of 62 (at least 2 epochs).")
    parser.add_argument("--fd_samples", type=int, default=200, help="Generated digits per FD (DDIM, DPM-Solver++).")
    parser.add_argument("--ddpm_budget_s", type=int, default=90, help="Seconds for the DDPM-1000 FD; sets its N.")
    return parser.parse_args()


def build_unet(seed):
    """The UNet2DModel of DDPMTrainer.build_models for 1x28x28 digits, with its initial weights for `seed`."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=WIDTHS, layers_per_block=LAYERS,
        down_block_types=("DownBlock2D",) * len(WIDTHS), up_block_types=("UpBlock2D",) * len(WIDTHS),
        norm_num_groups=min(8, WIDTHS[0]),
    )


# ----- (b) the reference loop, after diffusers' train_unconditional.py ------------------------------------------


def train_reference(seed, epochs, train_set):
    model = build_unet(seed)
    noise_scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)  # torch's default implementation
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for (clean_images,) in loader:
            noise = torch.randn_like(clean_images)
            timesteps = torch.randint(0, TIMESTEPS, (clean_images.shape[0],), device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        epoch_seconds.append(time.perf_counter() - start)
    return None, epoch_seconds


# ----- (a) hfgen's trainer ----------------------------------------------------------------------------------


def hfgen_flags(seed, steps, output_dir):
    return (
        f"--output_dir {output_dir} --seed {seed} --denoiser unet --block_out_channels {' '.join(map(str, WIDTHS))} "
        f"--layers_per_block {LAYERS} --num_train_timesteps {TIMESTEPS} --learning_rate {LEARNING_RATE} "
        f"--train_batch_size {BATCH_SIZE} --max_train_steps {steps} --logger none --save_images_epochs 0 "
        f"--feature_extractor none --checkpointing_steps 1000000 --num_validation_images 16"
    ).split()


def train_hfgen(seed, steps, output_dir):
    trainer = DDPMTrainer(ddpm_trainer_args(hfgen_flags(seed, steps, output_dir)))
    trainer.train()
    return DDPMPipeline.from_pretrained(output_dir), trainer.epoch_seconds


def check_same_unet(output_dir):
    """DDPMTrainer builds the reference loop's UNet: the same config and, for seed 0, the same weights."""
    trainer = DDPMTrainer(ddpm_trainer_args(hfgen_flags(0, 1, output_dir)))
    ours, plain = trainer.unwrap("unet"), build_unet(0)
    state, plain_state = ours.state_dict(), plain.state_dict()

    def config(model):  # diffusers' private bookkeeping (which values were defaults) left out
        return {k: v for k, v in model.config.items() if not k.startswith("_")}

    if not (config(ours) == config(plain) and state.keys() == plain_state.keys()
            and all(torch.equal(state[k], plain_state[k]) for k in state)):
        raise RuntimeError("the reference loop's UNet differs from DDPMTrainer's (config or initial weights)")
    trainer.accelerator.end_training()


# ----- FLOPs and the matmul peak ------------------------------------------------------------------------------


def step_flops():
    model = build_unet(0).train()
    images = torch.rand(BATCH_SIZE, 1, 28, 28) * 2 - 1
    timesteps = torch.randint(0, TIMESTEPS, (BATCH_SIZE,))
    with FlopCounterMode(display=False) as counter:
        loss = F.mse_loss(model(images, timesteps).sample, torch.randn_like(images))
        loss.backward()
    return counter.get_total_flops()


def matmul_peak(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


# ----- sampling ---------------------------------------------------------------------------------------------------


def with_scheduler(pipe, scheduler_class, extra):
    sampler = DDPMPipeline(pipe.unet, scheduler_class.from_config(pipe.scheduler.config, **extra))
    sampler.set_progress_bar_config(disable=True)
    return sampler


def evaluate_sampler(pipe, test_set, features, num_samples, steps):
    start = time.perf_counter()
    metrics = evaluate_pipeline(pipe, test_set, num_samples=num_samples, feature_extractor=features, seed=FD_SEED,
                                pipeline_kwargs={"num_inference_steps": steps}, likelihood=False)
    return metrics["fd"], (time.perf_counter() - start) / num_samples


def sampling(args, pipe, test_set, features):
    results = []  # (label, steps, N, FD, s/image)
    # probe DDPM-1000's cost per image: 20 of its 1000 steps on a batch of 50
    ddpm = with_scheduler(pipe, DDPMScheduler, {})
    ddpm.scheduler.set_timesteps(1000)
    sample = torch.randn(50, 1, 28, 28)
    start = time.perf_counter()
    with torch.no_grad():
        for timestep in ddpm.scheduler.timesteps[:20]:
            sample = ddpm.scheduler.step(pipe.unet(sample, timestep).sample, timestep, sample).prev_sample
    estimate = (time.perf_counter() - start) / 50 * 1000 / 20
    ddpm_n = max(2, min(args.fd_samples, int(args.ddpm_budget_s / estimate)))
    print(f"DDPM-1000 probe: ~{estimate:.2f} s/image -> N = {ddpm_n}", file=sys.stderr, flush=True)
    for label, scheduler_class, extra, steps in SAMPLERS:
        sampler = with_scheduler(pipe, scheduler_class, extra)
        sizes = [ddpm_n] if steps == 1000 else sorted({ddpm_n, args.fd_samples}, reverse=True)
        for n in sizes:
            fd, seconds = evaluate_sampler(sampler, test_set, features, n, steps)
            results.append((label, steps, n, fd, seconds))
            print(f"{label} {steps} steps, N={n}: FD {fd:.1f}, {seconds:.3f} s/image", file=sys.stderr, flush=True)
    return results, estimate


# ----- run and report -------------------------------------------------------------------------------------------


class Kept:
    """The trained pipeline, handed through run_alternately's "metrics" (which it prints) without its long repr."""

    def __init__(self, model):
        self.model = model

    def __repr__(self):
        return "model kept for the sampling comparison" if self.model is not None else "-"


def main():
    args = parse_args()
    check_positive(args, ("train_steps", "rounds", "fd_samples", "ddpm_budget_s", "threads"))
    epochs = max(2, math.ceil(args.train_steps / STEPS_PER_EPOCH))
    steps = epochs * STEPS_PER_EPOCH
    started, load_before = start_clock(args.threads)
    train_data = load_image_dataset("hfgen:mnist", "train")
    test_set = load_image_dataset("hfgen:mnist", "test")
    if len(train_data) != NUM_TRAIN:
        raise RuntimeError(f"expected {NUM_TRAIN} training digits, got {len(train_data)}")
    reference_set = torch.utils.data.TensorDataset(train_data.images * 2 - 1)  # [-1, 1]
    with tempfile.TemporaryDirectory() as output_dir:
        check_same_unet(output_dir)
    features = load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR)  # trained and cached on first use
    flops = step_flops()
    peak = matmul_peak()
    print(f"FLOPs per training step {flops / 1e9:.2f} G; matmul peak {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)

    seconds, run_medians, models = run_alternately(
        {"plain": lambda seed, _dir: train_reference(seed, epochs, reference_set),
         "hfgen": lambda seed, output_dir: train_hfgen(seed, steps, output_dir)},
        lambda _name, model, _seed: Kept(model),
        seeds=1, rounds=args.rounds, epochs=epochs, threads=args.threads,
    )
    peak_after = matmul_peak()
    images_per_epoch = STEPS_PER_EPOCH * BATCH_SIZE
    ips = {name: [images_per_epoch / s for s in times] for name, times in seconds.items()}
    median_ips = {name: statistics.median(v) for name, v in ips.items()}
    ratio = median_ips["hfgen"] / median_ips["plain"]
    results, estimate = sampling(args, models["hfgen"][0].model, test_set, features)
    load_after = load_average()

    rows = ["| trainer | median images/s | per-window images/s | median s/step | achieved GFLOP/s | % of matmul peak |",
            "|---|---|---|---|---|---|"]
    for name, label in (("plain", "reference loop (diffusers example style)"), ("hfgen", "hfgen `DDPMTrainer`")):
        step_s = BATCH_SIZE / median_ips[name]
        rows.append(f"| {label} | {median_ips[name]:.1f} | {', '.join(f'{v:.1f}' for v in ips[name])} | "
                    f"{step_s:.3f} | {flops / step_s / 1e9:.1f} | {100 * flops / step_s / peak:.1f}% |")
    sample_rows = ["| sampler | steps | N (FD samples) | FD (lower is better) | s/image |", "|---|---|---|---|---|"]
    for label, steps_, n, fd, s in results:
        note = " (N scaled down to fit the time budget)" if steps_ == 1000 and n < args.fd_samples else ""
        sample_rows.append(f"| {label} | {steps_} | {n}{note} | {fd:.1f} | {s:.3f} |")
    start, end = markers(KEY)
    text = "\n".join([
        start,
        "## DDPM: hfgen trainer vs a diffusers-example loop; DDPM / DDIM / DPM-Solver++ sampling",
        "",
        f"diffusers' `UNet2DModel` as `train_ddpm.py` builds it (widths {' '.join(map(str, WIDTHS))}, "
        f"{LAYERS} layer per block, DownBlock2D / UpBlock2D, 8 groups, {sum(p.numel() for p in build_unet(0).parameters()):,} "
        f"parameters), epsilon prediction, DDPMScheduler(1000), AdamW lr 1e-3, batch 64, on the 4,000 training "
        f"digits of `hfgen:mnist` in [-1, 1]; {epochs} epochs ({steps} steps) per run, trained by "
        "`hfgen.training.train_ddpm.DDPMTrainer` (its `epoch_seconds`) and by a loop in the style of diffusers' "
        "`examples/unconditional_image_generation/train_unconditional.py` (same config and initial weights, plain "
        "DataLoader over a TensorDataset, `add_noise`, MSE on the noise, torch's default AdamW, no clipping / EMA / "
        "lr schedule). Timed windows: epochs 2.. of every run (62 steps = 3,968 images each), "
        f"{args.rounds} run(s) per trainer, alternating. Target: hfgen / reference images/s ≥ 1.0.",
        "",
        f"Achieved GFLOP/s = {flops / 1e9:.2f} GFLOP per training step (forward + MSE + backward of one batch, "
        "`torch.utils.flop_counter.FlopCounterMode`; the optimizer step is not counted) / median seconds per step, "
        f"against a float32 `torch.mm` 2048×2048 peak of {peak / 1e9:.1f} GFLOP/s measured in the same process "
        f"before training ({peak_after / 1e9:.1f} GFLOP/s after), same thread count.",
        "",
        "Thread count: with `--threads 2` on these 2 cores, while other processes keep one core busy, a training "
        "step (forward + backward of one batch) took ~6.7 s instead of ~1 s with `--threads 1` (the two threads wait for each other), so "
        "the recorded run uses `--threads 1` for everything, matmul peak included.",
        "",
        *environment_lines("bench_ddpm.py", args.threads, load_before, load_after),
        "",
        *rows,
        "",
        f"**hfgen / reference images per second: {ratio:.3f}** (target ≥ 1.0: {'met' if ratio >= 1.0 else 'not met'}).",
        "",
        f"Sampling, one model: the hfgen model of the first hfgen run above ({steps} steps only: a small, "
        "short-trained model, so the FDs compare samplers with each other, not with a converged DDPM). "
        "Schedulers swapped in with `from_config(pipe.scheduler.config)`; DPM-Solver++ is "
        "`DPMSolverMultistepScheduler(algorithm_type=\"dpmsolver++\")` (2nd-order multistep). FD and time from "
        "`hfgen.metrics.evaluate_pipeline(..., likelihood=False)` with the same seed (so the same real test digits "
        f"and noise seeds at the same N), batches of 250; s/image is its wall time / N. DDPM-1000 costs ~{estimate:.1f} "
        f"s/image (probe), so its N was scaled to fit {args.ddpm_budget_s} s; the fast samplers are also shown at that N, "
        "because FD at small N is biased upwards and only FDs at equal N compare.",
        "",
        *sample_rows,
        end,
    ])
    finish(KEY, text, args.write, started)


if __name__ == "__main__":
    main()
