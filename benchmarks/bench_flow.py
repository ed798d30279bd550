"""FD against sampling steps: DDPM-eps (DDIM, DPM-Solver++) vs flow matching (Euler, Heun), in pixels and in latents.

One training budget per space: the same data (the 4,000 training digits of `hfgen:mnist`), the same denoiser (config
and seed, so the same initial weights), the same optimiser, batch and number of steps; only `--objective` differs
(`ddpm` with epsilon prediction and DDPMScheduler(1000, linear), or `flow_matching` with uniform noise levels and
FlowMatchEulerDiscreteScheduler(1000, shift 1)). Each run is `hfgen.training.train_ddpm.main` or
`hfgen.training.train_ldm.main` with --feature_extractor none (the FDs are measured here).

  - pixel: diffusers' UNet2DModel on the 28 px digits, widths --pixel_widths, --pixel_train_steps steps;
  - latent: a conv VAE first stage (4x8x8 latents of the 32 px digits, --vae_epochs epochs, trained once by
    `train_vae` and shared by both objectives through --vae_path, as are its cached latents), then a U-Net of widths
    --latent_widths on the scaled latents, --latent_train_steps steps.

Each trained model is sampled with its objective's two samplers at every one of --sampling_steps (default 1 2 5 10
20 50): DDPM-eps with DDIM (timestep_spacing "trailing", so that few steps start at t = T; eta 0) and DPM-Solver++
(DPMSolverMultistepScheduler, algorithm_type "dpmsolver++", 2nd-order multistep), flow matching with
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler (2nd order: 2 S - 1 denoiser calls for S steps).
Each scheduler is swapped in with `from_config(pipe.scheduler.config)`. FD: `hfgen.evaluation.evaluate_pipeline(pipe,
test digits, num_samples=--fd_samples, likelihood=False)` in the default digit-classifier features, the same seed for
every row (the same real test digits and noise seeds); s/image is its wall time / N (batches of 250; it includes the
FD features and, for latents, the decoder). FD is biased upwards at finite N: only FDs at the same N compare.

Targets (issue 13): flow matching at 10 steps reaches an FD at most that of DDPM-eps's best sampler at 20 steps, and
at 50 steps no worse than DDPM-eps's best at 50.

    python benchmarks/bench_flow.py --write        # the recorded run: both spaces, rewrites the flow section
    python benchmarks/bench_flow.py --pixel_train_steps 5 --latent_train_steps 5 --vae_epochs 1 --fd_samples 20 \\
        --sampling_steps 1 2                       # a smoke run (~1-2 min)

The defaults are sized for ~20 min on 2 idle cores (--threads 2), extrapolated from step and forward times measured
under load (U-Net 16 32 32 on 28 px: ~0.27 s per training step of 64 and ~2 ms per image-forward when idle; 434
denoiser calls per generated digit over the 24 sampler rows); with the other core busy --threads 1 is steadier.
Progress goes to stderr, the section to stdout; --write also draws benchmarks/figures/flow_fd_vs_steps.png.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)

from common import environment_lines, finish, load_average, markers, pyplot, save_figure, start_clock
from hfgen import AutoPipeline
from hfgen.data import load_image_dataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor

KEY = "flow"  # the section <!-- flow:start --> ... <!-- flow:end --> of BENCHMARKS.md
HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "figures", "flow_fd_vs_steps.png")
FIGURE_LINK = "benchmarks/figures/flow_fd_vs_steps.png"  # relative to BENCHMARKS.md
RESULTS_JSON = os.path.join(HERE, "figures", "flow_fd_vs_steps.json")
OBJECTIVES = ("ddpm", "flow_matching")
SAMPLERS = {  # objective -> (label, scheduler class, extra config, denoiser calls for S steps)
    "ddpm": (("DDPM-eps + DDIM", DDIMScheduler, {"timestep_spacing": "trailing"}, lambda s: s),
             ("DDPM-eps + DPM-Solver++", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, lambda s: s)),
    "flow_matching": (("flow + Euler", FlowMatchEulerDiscreteScheduler, {}, lambda s: s),
                      ("flow + Heun", FlowMatchHeunDiscreteScheduler, {}, lambda s: 2 * s - 1)),
}
BATCH_SIZE, LEARNING_RATE, SEED = 64, 1e-3, 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", nargs="+", default=["pixel", "latent"], choices=["pixel", "latent"])
    parser.add_argument("--pixel_train_steps", type=int, default=1000, help="Steps of each pixel run (both objectives).")
    parser.add_argument("--latent_train_steps", type=int, default=1500, help="Steps of each latent run.")
    parser.add_argument("--pixel_widths", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--latent_widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--vae_epochs", type=int, default=6, help="Epochs of the shared latent first stage.")
    parser.add_argument("--fd_samples", type=int, default=250, help="Generated digits per FD (and real ones).")
    parser.add_argument("--sampling_steps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for everything.")
    parser.add_argument("--write", action="store_true", help="Write the section into BENCHMARKS.md and the figure.")
    args = parser.parse_args()
    for name in ("pixel_train_steps", "latent_train_steps", "vae_epochs", "fd_samples", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if min(args.sampling_steps) < 1 or max(args.sampling_steps) > 1000:
        raise SystemExit("--sampling_steps must be in [1, 1000]")
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


def common_flags(output_dir, steps):
    return ["--output_dir", str(output_dir), "--seed", str(SEED), "--train_batch_size", str(BATCH_SIZE),
            "--learning_rate", str(LEARNING_RATE), "--max_train_steps", str(steps), "--logger", "none",
            "--save_images_epochs", "0", "--feature_extractor", "none", "--checkpointing_steps", "1000000",
            "--num_validation_images", "16", "--num_inference_steps", "10", "--eval_num_samples", "16"]


def train(space, objective, args, root):
    """Trains one model; returns (its pipeline folder, training seconds)."""
    from hfgen.training import train_ddpm, train_ldm

    output_dir = os.path.join(root, f"{space}-{objective}")
    flags = ["--objective", objective]
    if objective == "ddpm":
        flags += ["--eval_vlb_num_images", "0"]  # the bound is not what this benchmark compares
    start = time.perf_counter()
    if space == "pixel":
        train_ddpm.main([*common_flags(output_dir, args.pixel_train_steps), *flags,
                         "--block_out_channels", *map(str, args.pixel_widths)])
    else:
        train_ldm.main([*common_flags(output_dir, args.latent_train_steps), *flags,
                        "--block_out_channels", *map(str, args.latent_widths), "--resolution", "32",
                        "--vae_path", first_stage(args, root), "--latent_cache_dir", os.path.join(root, "latents")])
    torch.set_num_threads(args.threads)  # whatever the trainer did
    return output_dir, time.perf_counter() - start


def first_stage(args, root):
    """The latent runs' shared conv VAE (4x8x8 latents of the 32 px digits), trained once."""
    from hfgen.training import train_ldm, train_vae

    folder = os.path.join(root, "first_stage")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        start = time.perf_counter()
        ldm_args = train_ldm.parse_args([*common_flags(root, 1), "--resolution", "32", "--vae_num_epochs",
                                         str(args.vae_epochs)])
        vae_config = dataclasses.replace(ldm_args.first_stage_config(), output_dir=folder,
                                         eval_importance_samples=1)  # its likelihood is not what is compared
        train_vae.VAETrainer(vae_config).train()
        torch.set_num_threads(args.threads)
        log(f"first stage: {args.vae_epochs} epochs in {time.perf_counter() - start:.0f} s")
    return folder


def sample_fds(space, objective, folder, test_set, features, args):
    """[(label, steps, denoiser calls, FD, s/image)] for the objective's samplers at every --sampling_steps."""
    pipe = AutoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for label, scheduler_class, extra, calls in SAMPLERS[objective]:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
        for steps in args.sampling_steps:
            start = time.perf_counter()
            fd = evaluate_pipeline(pipe, test_set, num_samples=args.fd_samples, feature_extractor=features, seed=SEED,
                                   pipeline_kwargs={"num_inference_steps": steps}, likelihood=False)["fd"]
            seconds = (time.perf_counter() - start) / args.fd_samples
            rows.append((label, steps, calls(steps), fd, seconds))
            log(f"{space} {label} {steps} steps: FD {fd:.2f}, {seconds:.4f} s/image")
    return rows


def best(rows, prefix, steps):
    """The lowest FD (and its sampler) among the rows whose label starts with `prefix`, at `steps` steps."""
    candidates = [(fd, label) for label, s, _, fd, _ in rows if label.startswith(prefix) and s == steps]
    return min(candidates) if candidates else None


def verdicts(rows, sampling_steps):
    """The issue's two targets, as sentences (or why they cannot be judged with these --sampling_steps)."""
    lines = []
    for flow_steps, ddpm_steps in ((10, 20), (50, 50)):
        if flow_steps not in sampling_steps or ddpm_steps not in sampling_steps:
            lines.append(f"- flow at {flow_steps} vs DDPM-eps at {ddpm_steps} steps: not measured in this run.")
            continue
        (flow_fd, flow_label), (ddpm_fd, ddpm_label) = best(rows, "flow", flow_steps), best(rows, "DDPM", ddpm_steps)
        met = "met" if flow_fd <= ddpm_fd else "not met"
        lines.append(f"- flow matching at {flow_steps} steps, best {flow_label} FD {flow_fd:.2f} vs DDPM-eps at "
                     f"{ddpm_steps} steps, best {ddpm_label} FD {ddpm_fd:.2f}: **{met}**.")
    return lines


def draw_figure(results, path):
    plt = pyplot()

    spaces = list(results)
    figure, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4), constrained_layout=True, squeeze=False)
    for axis, space in zip(axes[0], spaces):
        rows = results[space]["rows"]
        for label, style in (("DDPM-eps + DDIM", "C0o--"), ("DDPM-eps + DPM-Solver++", "C1s--"),
                             ("flow + Euler", "C2o-"), ("flow + Heun", "C3s-")):
            points = [(steps, fd) for row_label, steps, _, fd, _ in rows if row_label == label]
            if points:
                axis.plot(*zip(*points), style, label=label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("sampling steps (Heun: 2 S - 1 denoiser calls)")
        axis.set_ylabel("FD (digit-classifier features; lower is better)")
        axis.set_title(f"{space}: {results[space]['train_steps']} training steps per objective", fontsize=9)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def main():
    args = parse_args()
    started, load_before = start_clock(args.threads)
    features = load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR)  # trained and cached on first use
    test_sets = {"pixel": load_image_dataset("hfgen:mnist", "test"),
                 "latent": load_image_dataset("hfgen:mnist", "test", resolution=32)}
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for space in args.spaces:
            rows, train_seconds = [], {}
            for objective in OBJECTIVES:
                folder, train_seconds[objective] = train(space, objective, args, root)
                log(f"{space} {objective}: trained in {train_seconds[objective]:.0f} s")
                rows += sample_fds(space, objective, folder, test_sets[space], features, args)
            steps = args.pixel_train_steps if space == "pixel" else args.latent_train_steps
            results[space] = {"rows": rows, "train_seconds": train_seconds, "train_steps": steps}
    load_after = load_average()

    start, end = markers(KEY)
    lines = [start, "## Flow matching vs DDPM-eps: FD against sampling steps", "",
             "Same training budget per space: the 4,000 training digits of `hfgen:mnist`, the same denoiser config and "
             f"seed, AdamW lr {LEARNING_RATE:g}, batch {BATCH_SIZE}, the same number of steps; only `--objective` "
             "differs (DDPM: epsilon prediction, DDPMScheduler(1000, linear); flow matching: velocity, uniform noise "
             "levels, FlowMatchEulerDiscreteScheduler(1000, shift 1)). DDIM uses timestep_spacing \"trailing\" (so that "
             "1 step starts from t = T), DPM-Solver++ is DPMSolverMultistepScheduler(algorithm_type=\"dpmsolver++\"), "
             "Heun is FlowMatchHeunDiscreteScheduler (2 S - 1 denoiser calls for S steps). FD: "
             f"`evaluate_pipeline(..., num_samples={args.fd_samples}, likelihood=False)` against as many test digits, "
             "digit-classifier features, one seed for all rows; s/image = its wall time / N. See "
             "`benchmarks/bench_flow.py` for the details.", "",
             *environment_lines("bench_flow.py", args.threads, load_before, load_after), ""]
    for space, result in results.items():
        model = (f"U-Net widths {' '.join(map(str, args.pixel_widths))} on the 28 px digits" if space == "pixel" else
                 f"conv VAE first stage ({args.vae_epochs} epochs, 4x8x8 latents of the 32 px digits, shared), U-Net "
                 f"widths {' '.join(map(str, args.latent_widths))} on its scaled latents")
        seconds = ", ".join(f"{objective} {s:.0f} s" for objective, s in result["train_seconds"].items())
        if space == "latent":
            seconds += "; the first run's time includes encoding the shared latent cache"
        lines += [f"### {space}", "", f"{model}; {result['train_steps']} training steps each ({seconds}).", "",
                  "| sampler | steps | denoiser calls | FD | s/image |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {steps} | {calls} | {fd:.2f} | {s:.4f} |" for label, steps, calls, fd, s in result["rows"]]
        lines += ["", "Targets:", *verdicts(result["rows"], args.sampling_steps), ""]
    if args.write:
        draw_figure(results, FIGURE)
        with open(RESULTS_JSON, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=1)
        lines += [f"![FD against sampling steps]({FIGURE_LINK})", ""]
    lines.append(end)
    finish(KEY, "\n".join(lines), args.write, started)


if __name__ == "__main__":
    main()
