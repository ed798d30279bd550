"""Text vs class conditioning of latent diffusion on the digits, at equal training steps: what text costs and buys.

One run, seed 0, on the 4,000 training digits of `hfgen:mnist` at 32 px, all with `hfgen.training.train_ldm.main`,
one shared conv VAE first stage (4x8x8 latents) and the same second stage (U-Net widths --widths, flow matching,
batch 64, AdamW lr 1e-3, --train_steps steps):

  - class: `--conditional --label_dropout 0.1` (UNet2DModel with class embeddings);
  - text: `--caption_column text --prompt_dropout 0.1`: hfgen's captions of the digits (digit name, thickness, slant,
    size), the default small CLIPTextModel (2 layers, width 64) trained with a UNet2DConditionModel of the same widths;
  - text, frozen encoder: the same, with that encoder and tokenizer built, saved and passed frozen through
    `--text_encoder_name_or_path` (random weights: the choice "train the small encoder or freeze a given one" as it can
    be measured offline; a pretrained CLIP or T5 cannot be downloaded here).

Measured for each, with --sampling_steps Euler steps and guidance --guidance_scale, against the 1,000 test digits:
  - FD (digit-classifier features) of N samples conditioned on the test digits: the class model on their labels, the
    text models on "a <digit>" prompts for the same labels (each phrasing in turn);
  - requested-digit accuracy under the digit classifier, on those samples;
  - for the text models, `hfgen.prompt_following.digit_prompt_following` (thickness / slant / size separation and
    accuracy; a class label cannot ask for them);
  - cost: training seconds per step (the run's training wall time / steps), sampling seconds per image, parameters.

    python benchmarks/bench_text.py --write
    python benchmarks/bench_text.py --train_steps 100 --fd_samples 100     # a quick look, writes nothing
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment_lines, finish, load_average, markers, start_clock  # noqa: E402

KEY = "text"
SEED, BATCH_SIZE, LEARNING_RATE = 0, 64, 1e-3
CONTENDERS = ("class", "text", "text, frozen encoder")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_steps", type=int, default=1000)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--vae_epochs", type=int, default=6)
    parser.add_argument("--fd_samples", type=int, default=500)
    parser.add_argument("--prompts_per_digit", type=int, default=20)
    parser.add_argument("--sampling_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="Write the section into BENCHMARKS.md.")
    args = parser.parse_args()
    for name in ("train_steps", "vae_epochs", "fd_samples", "prompts_per_digit", "sampling_steps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    return args


def log(message):
    print(message, file=sys.stderr, flush=True)


def common_flags(output_dir, args):
    return ["--output_dir", str(output_dir), "--seed", str(SEED), "--train_batch_size", str(BATCH_SIZE),
            "--learning_rate", str(LEARNING_RATE), "--max_train_steps", str(args.train_steps), "--logger", "none",
            "--save_images_epochs", "0", "--feature_extractor", "none", "--checkpointing_steps", "1000000",
            "--num_validation_images", "16", "--num_inference_steps", str(args.sampling_steps),
            "--eval_num_samples", "16", "--resolution", "32", "--objective", "flow_matching",
            "--block_out_channels", *map(str, args.widths), "--eval_prompts_per_digit", "1"]


def first_stage(args, root):
    from hfgen.training import train_ldm, train_vae

    folder = os.path.join(root, "first_stage")
    ldm_args = train_ldm.parse_args([*common_flags(root, args), "--vae_num_epochs", str(args.vae_epochs)])
    vae_config = dataclasses.replace(ldm_args.first_stage_config(), output_dir=folder, eval_importance_samples=1)
    train_vae.VAETrainer(vae_config).train()
    return folder


def frozen_encoder(root):
    """The default small encoder and its tokenizer, built from the training captions and saved as a given one."""
    from hfgen import text
    from hfgen.data import load_image_dataset

    captions = load_image_dataset("hfgen:mnist", "train", 32, caption_column="text").captions
    tokenizer = text.build_word_tokenizer(captions)
    folder = os.path.join(root, "frozen-encoder")
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    text.tiny_text_encoder(tokenizer, 64, 2, 4, seed=SEED).save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def train(name, args, root, vae_path):
    from hfgen.training import train_ldm

    output_dir = os.path.join(root, name.replace(", ", "-").replace(" ", "-"))
    flags = {"class": ["--conditional", "--label_dropout", "0.1"],
             "text": ["--caption_column", "text", "--prompt_dropout", "0.1"],
             "text, frozen encoder": ["--caption_column", "text", "--prompt_dropout", "0.1",
                                      "--text_encoder_name_or_path", frozen_encoder(root)]}[name]
    start = time.perf_counter()
    train_ldm.main([*common_flags(output_dir, args), *flags, "--vae_path", vae_path,
                    "--latent_cache_dir", os.path.join(root, "latents")])
    torch.set_num_threads(args.threads)
    return output_dir, time.perf_counter() - start


@torch.no_grad()
def conditioned_samples(pipe, labels, args):
    """Samples (N, 1, 32, 32) for the test labels: class labels, or "a <digit>" prompts; and seconds per image."""
    from hfgen import text

    images, start = [], time.perf_counter()
    for first in range(0, len(labels), 250):
        batch = labels[first:first + 250]
        generator = torch.Generator().manual_seed(SEED + first)
        kwargs = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.sampling_steps, generator=generator,
                      output_type="pt")
        if hasattr(pipe, "encode_prompt"):
            prompts = [text.digit_caption(int(d), phrasing=first + i) for i, d in enumerate(batch)]
            images.append(pipe(prompt=prompts, **kwargs).images)
        else:
            images.append(pipe(len(batch), class_labels=batch, **kwargs).images)
    return torch.cat(images), (time.perf_counter() - start) / len(labels)


def evaluate(name, folder, args, test, test_captioned, features):
    from hfgen import AutoPipeline
    from hfgen.frechet import feature_statistics, frechet_distance_from_statistics
    from hfgen.prompt_following import digit_prompt_following

    pipe = AutoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    labels = test.labels[:args.fd_samples]
    samples, seconds_per_image = conditioned_samples(pipe, labels, args)
    real = feature_statistics([test.images[:args.fd_samples]], features)
    fd = frechet_distance_from_statistics(real, feature_statistics([samples], features))
    classifier = features.classifier
    accuracy = float((classifier(samples).logits.argmax(1) == labels).float().mean())
    row = {"fd": fd, "digit_accuracy": accuracy, "sample_seconds": seconds_per_image,
           "parameters": sum(p.numel() for p in pipe.unet.parameters()),
           "text_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()) if hasattr(pipe, "text_encoder") else 0}
    if hasattr(pipe, "encode_prompt"):
        row.update(digit_prompt_following(pipe, test_captioned, classifier, args.prompts_per_digit, seed=SEED,
                                          pipeline_kwargs={"guidance_scale": args.guidance_scale,
                                                           "num_inference_steps": args.sampling_steps}))
    log(f"{name}: {row}")
    return row


def main():
    args = parse_args()
    from hfgen.data import load_image_dataset
    from hfgen.features import DEFAULT_FEATURE_EXTRACTOR, load_feature_extractor
    from hfgen.text import ATTRIBUTES

    started, load_before = start_clock(args.threads)
    features = load_feature_extractor(DEFAULT_FEATURE_EXTRACTOR)
    test = load_image_dataset("hfgen:mnist", "test", 32)
    test_captioned = load_image_dataset("hfgen:mnist", "test", 32, caption_column="text")
    rows, train_seconds = {}, {}
    with tempfile.TemporaryDirectory() as root:
        vae_path = first_stage(args, root)
        for name in CONTENDERS:
            folder, train_seconds[name] = train(name, args, root, vae_path)
            log(f"{name}: trained in {train_seconds[name]:.0f} s")
            rows[name] = evaluate(name, folder, args, test, test_captioned, features)
    load_after = load_average()

    start, end = markers(KEY)
    lines = [start, "## Text vs class conditioning (latent diffusion, equal steps)", "",
             f"`benchmarks/bench_text.py`: one shared conv VAE first stage ({args.vae_epochs} epochs, 4x8x8 latents of "
             f"the 32 px `hfgen:mnist` digits), then {args.train_steps} flow-matching steps of a U-Net of widths "
             f"{' '.join(map(str, args.widths))} per contender (batch {BATCH_SIZE}, AdamW lr {LEARNING_RATE:g}, seed "
             f"{SEED}): class = `--conditional --label_dropout 0.1`; text = `--caption_column text --prompt_dropout "
             "0.1` (hfgen's captions, the default 2-layer CLIPTextModel of width 64 trained with a "
             "UNet2DConditionModel); text, frozen encoder = the same encoder at its random initialisation, frozen "
             "(`--text_encoder_name_or_path`; a pretrained CLIP or T5 cannot be downloaded on this machine). "
             f"Sampling: Euler, {args.sampling_steps} steps, guidance {args.guidance_scale:g}. FD and digit accuracy: "
             f"{args.fd_samples} samples conditioned on the first {args.fd_samples} test digits' labels (text: \"a "
             "<digit>\" prompts, each phrasing in turn) against those test digits, digit-classifier features and "
             "classifier. Attributes: `hfgen.prompt_following.digit_prompt_following` with "
             f"{args.prompts_per_digit} images per digit per prompt set (separation: pooled SDs between the low and "
             "high word; accuracy: share at the requested tertile, chance 0.33).", "",
             *environment_lines("bench_text.py", args.threads, load_before, load_after), "",
             "| conditioning | FD | digit accuracy | " + " | ".join(f"{a} separation (real) / accuracy" for a in ATTRIBUTES)
             + " | train s/step | sample s/image | U-Net params | text encoder params |",
             "|---" * (7 + len(ATTRIBUTES)) + "|"]
    for name, row in rows.items():
        attributes = [(f"{row[f'{a}_separation']:.2f} ({row[f'real_{a}_separation']:.2f}) / {row[f'{a}_accuracy']:.2f}"
                       if f"{a}_separation" in row else "–") for a in ATTRIBUTES]
        lines.append(f"| {name} | {row['fd']:.1f} | {row['digit_accuracy']:.3f} | {' | '.join(attributes)} | "
                     f"{train_seconds[name] / args.train_steps:.3f} | {row['sample_seconds']:.4f} | "
                     f"{row['parameters']:,} | {row['text_parameters']:,} |")
    cls, txt = rows["class"], rows["text"]
    lines += ["", f"Cost: text takes {train_seconds['text'] / train_seconds['class']:.2f}x the class model's training "
              f"time per step (set-up and final save included) and {txt['sample_seconds'] / cls['sample_seconds']:.2f}x "
              f"its sampling time per image. Requested digit: {txt['digit_accuracy']:.3f} (text) vs "
              f"{cls['digit_accuracy']:.3f} (class); FD {txt['fd']:.1f} vs {cls['fd']:.1f}. What only text gives: "
              "prompts for thickness, slant and size, followed as the separations above show (the real digits' own "
              "separation in brackets is what exact following gives).", end]
    finish(KEY, "\n".join(lines), args.write, started)


if __name__ == "__main__":
    main()
