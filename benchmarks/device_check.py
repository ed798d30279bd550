"""A short check of hfgen on a CUDA GPU: VAE, GAN, DDPM and latent diffusion training with mixed precision,
sampling, evaluation.

    python benchmarks/device_check.py            # prints one line per check, exits non-zero on failure

A GPU machine without network needs hfgen and the packages its image lacks as wheels (diffusers, datasets,
dill, multiprocess, mlxtend; `pip download --no-deps --python-version 3.12 --only-binary=:all:` here, and
`pip wheel --no-deps .` for hfgen), installed there with `pip install --no-deps --no-index wheels/*.whl`.

Tests run on the CPU; this script covers what only a GPU shows: device placement of data, labels, noise
and generators, fp16/bf16 autocast with accelerate, and that a GPU-trained folder samples the same
images on GPU and CPU (up to float rounding) for the same CPU generator.
"""

import json
import sys
import tempfile
import time

import torch

from hfgen import AutoPipeline, VAEPipeline
from hfgen.training.train_ddpm import main as train_ddpm
from hfgen.training.train_gan import main as train_gan
from hfgen.training.train_ldm import main as train_ldm
from hfgen.training.train_vae import main as train_vae


def check(name, condition, detail=""):
    print(f"{'ok  ' if condition else 'FAIL'} {name} {detail}", flush=True)
    return bool(condition)


def check_sampling_devices(name: str, folder: str) -> list[bool]:
    """The folder samples the same images on CPU and GPU for one CPU generator, and takes a CUDA generator."""
    pipe = AutoPipeline.from_pretrained(folder)
    labels = list(range(10)) if pipe.num_classes else None
    kwargs = {"num_inference_steps": 50} if hasattr(pipe, "scheduler") else {}
    on_cpu = pipe(10, class_labels=labels, generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    on_gpu = pipe.to("cuda")(10, class_labels=labels, generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    cuda_generator = pipe(4, class_labels=labels and labels[:4], generator=torch.Generator("cuda").manual_seed(0),
                          output_type="np", **kwargs).images
    return [check(f"sample {name} cuda == cpu", torch.allclose(on_cpu, on_gpu, atol=1e-3),
                  f"max diff {(on_cpu - on_gpu).abs().max().item():.2e}"),
            check(f"sample {name} with a cuda generator", cuda_generator.shape == (4, pipe.sample_size, pipe.sample_size, 1))]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = []
    with tempfile.TemporaryDirectory() as root:
        # name -> (trainer, flags, metric that must stay below a bound, bound); diffusion FD with 50 steps
        runs = {
            "mlp-fp16": (train_vae, ["--num_epochs", "10", "--checkpointing_steps", "200", "--mixed_precision", "fp16"],
                         "test_negative_elbo", 200),
            "conv-bf16": (train_vae, ["--num_epochs", "10", "--checkpointing_steps", "200", "--mixed_precision", "bf16",
                                      "--architecture", "conv", "--hidden_dims", "32", "64"], "test_negative_elbo", 200),
            "cvae-bf16": (train_vae, ["--num_epochs", "10", "--checkpointing_steps", "200", "--mixed_precision", "bf16",
                                      "--conditional", "--latent_dim", "2"], "test_negative_elbo", 200),
            "gan-fp16-ema-r1": (train_gan, ["--num_epochs", "5", "--checkpointing_steps", "100", "--mixed_precision",
                                            "fp16", "--use_ema", "--r1_gamma", "1"], "fd", 600),
            "cgan-bf16-sn-hinge": (train_gan, ["--num_epochs", "5", "--checkpointing_steps", "100", "--mixed_precision",
                                               "bf16", "--conditional", "--spectral_norm", "--loss", "hinge"], "fd", 600),
            "cddpm-bf16-ema": (train_ddpm, ["--num_epochs", "3", "--checkpointing_steps", "500", "--eval_num_samples",
                                            "500", "--mixed_precision", "bf16", "--conditional", "--use_ema"], "fd", 700),
            "ldm-fp16": (train_ldm, ["--num_epochs", "3", "--vae_num_epochs", "5", "--checkpointing_steps", "500",
                                     "--eval_num_samples", "500", "--mixed_precision", "fp16"], "fd", 700),
            # hfgen's VQ-VAE (EMA codebook, restarts, patch discriminator) as the first stage, under autocast
            "ldm-vq-bf16": (train_ldm, ["--num_epochs", "3", "--first_stage_type", "vq", "--ae_num_epochs", "3",
                                        "--ae_adversarial_weight", "0.5", "--ae_adversarial_start_step", "50",
                                        "--checkpointing_steps", "500", "--eval_num_samples", "500",
                                        "--mixed_precision", "bf16"], "fd", 700),
        }
        for name, (train, flags, metric, bound) in runs.items():
            out = f"{root}/{name}"
            start = time.perf_counter()
            train(["--output_dir", out, "--logger", "none", "--save_images_epochs", "0", *flags])
            seconds = time.perf_counter() - start
            metrics = json.load(open(f"{out}/metrics.json"))
            results.append(check(f"train {name}", metrics[metric] < bound, f"{seconds:.1f}s, metrics {metrics}"))
            results += check_sampling_devices(name, out)
        # resume on the GPU
        out = f"{root}/resume"
        flags = ["--output_dir", out, "--max_train_steps", "60", "--checkpointing_steps", "30", "--logger", "none",
                 "--save_images_epochs", "0", "--mixed_precision", "fp16"]
        train_vae(flags)
        train_vae([*flags, "--max_train_steps", "90", "--resume_from_checkpoint", "latest"])
        results.append(check("resume on cuda", isinstance(VAEPipeline.from_pretrained(out), VAEPipeline)))
    print("all ok" if all(results) else "FAILURES")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
