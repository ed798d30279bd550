"""Training in two real processes (gloo on CPU) and resuming across process counts.

A launch spends ~12 s starting interpreters and the process group, so there are four: one 2-process run per
family, shared by the tests through module-scoped fixtures. The VAE run is also resumed in 1 process (in this
process), and the DDPM run is the 2-process resume of a 1-process checkpoint.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import Interrupted, interrupt_after, quick_training_args
from safetensors.torch import load_file

from hfgen import (AutoPipeline, ConditionalPipeline, DDPMPipeline, LatentTextToImagePipeline, VAEModel,
                   VAEPipeline)
from hfgen.cli import evaluate
from hfgen.training.trainer import TRAINER_STATE, list_checkpoints

pytestmark = pytest.mark.slow  # real runs: launched processes

# gloo's abort at interpreter exit, after a run has finished (seen in about 1 two-process run in 6-10)
EXIT_ABORT = "terminate called without an active exception"
LEARNING_RATE = 1e-3

# --ema_power 1 (inv_gamma 1) makes the EMA decay 1 - 1/k at step k: the EMA is the mean of the weights of steps 1..k.
VAE_FLAGS = ["--hidden_dims", "16", "--latent_dim", "4", "--eval_importance_samples", "1", "--train_batch_size", "100",
             "--eval_num_samples", "50", "--max_train_steps", "6", "--checkpointing_steps", "1",
             "--use_ema", "--ema_power", "1", "--lr_scheduler", "linear", "--learning_rate", str(LEARNING_RATE)]
GAN_FLAGS = ["--base_channels", "8", "--latent_dim", "8", "--conditional", "--train_batch_size", "32",
             "--eval_num_samples", "50", "--max_train_steps", "4", "--checkpointing_steps", "2"]
DDPM_FLAGS = ["--block_out_channels", "8", "16", "--num_train_timesteps", "20", "--num_inference_steps", "2",
              "--eval_vlb_num_images", "20", "--train_batch_size", "32", "--eval_num_samples", "50",
              "--max_train_steps", "4", "--checkpointing_steps", "1", "--lr_scheduler", "linear",
              "--learning_rate", str(LEARNING_RATE)]
# latent diffusion trains text-to-image with flow matching and EMA here (docs/maths.md §6.7, §6.9): the 2-process run
# of captions (the small text encoder trains with the denoiser, both averaged) and of that objective, whose folder has
# no variational bound to evaluate; the DDPM objective's is the ddpm run
LDM_FLAGS = ["--block_out_channels", "8", "16", "--num_train_timesteps", "20", "--num_inference_steps", "2",
             "--train_batch_size", "32", "--eval_num_samples", "50", "--max_train_steps", "3", "--checkpointing_steps", "3",
             "--resolution", "32", "--objective", "flow_matching", "--use_ema", "--caption_column", "text",
             "--text_encoder_hidden_size", "16", "--text_encoder_layers", "1", "--eval_prompts_per_digit", "1"]
# `hfgen evaluate` flags that repeat the trainer's final evaluation of each run
SAMPLE_METRICS = ["--sample_metrics", "--memorisation"]  # as the trainers' final evaluation computes them
EVALUATE_FLAGS = {
    "vae": ["--num_samples", "50", "--num_importance_samples", "1", *SAMPLE_METRICS],
    "gan": ["--num_samples", "50", *SAMPLE_METRICS],
    "ddpm": ["--num_samples", "50", "--num_inference_steps", "2", "--vlb_num_images", "20", *SAMPLE_METRICS],
    "ldm": ["--num_samples", "50", "--num_inference_steps", "2", "--prompts_per_digit", "1", *SAMPLE_METRICS],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(module: str, args: list[str], timeout: float = 300) -> tuple[int, str]:
    """`accelerate launch` of hfgen.training.<module> in two CPU processes -> (exit code, output).

    The FD classifier cache ($HFGEN_CACHE) is this session's. On a timeout the launcher and its workers are killed.
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", f"hfgen.training.{module}", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"`accelerate launch` of {module} ran over {timeout} s:\n{output[-5000:]}")
    return process.returncode, output


def trainer_step(checkpoint) -> int:
    return json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"]


def assert_finished(launched: tuple[int, str], output_dir, final_step: int) -> str:
    """Checks that a 2-process run finished and returns its log.

    Finished means: both processes trained, the last checkpoint is at `final_step`, and the model card, which the
    trainer writes last, is there. The exit code alone does not decide: gloo sometimes aborts at interpreter exit
    after all that is written (the launcher then exits non-zero); that abort, and no other failure, is accepted once
    the outputs are complete.
    """
    returncode, log = launched
    assert returncode == 0 or EXIT_ABORT in log, log[-5000:]
    assert "2 processes" in log, log[-5000:]  # a silent fallback to 1 process (accelerate --cpu) fails here
    checkpoints = list_checkpoints(str(output_dir / "checkpoints"))
    assert checkpoints, log[-5000:]
    last = pathlib.Path(checkpoints[-1])
    assert trainer_step(last) == final_step
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(last))
    assert {"model_index.json", "metrics.json", "README.md"} <= set(os.listdir(output_dir)), log[-5000:]
    if returncode:
        warnings.warn(f"gloo aborted at exit after a finished run (exit code {returncode}); tolerated")
    return log


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("vae-2proc") / "out"
    assert_finished(launch("train_vae", quick_training_args(output_dir, *VAE_FLAGS)), output_dir, 6)
    return output_dir


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cgan-2proc") / "out"
    assert_finished(launch("train_gan", quick_training_args(output_dir, *GAN_FLAGS)), output_dir, 4)
    return output_dir


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A 1-process run cut after 2 of its 4 steps, resumed to the end in 2 processes; returns (folder, 2-process log)."""
    from hfgen.training.train_ddpm import DDPMTrainer, main

    output_dir = tmp_path_factory.mktemp("ddpm-1to2proc") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupt_after(monkeypatch, DDPMTrainer, 2)
        with pytest.raises(Interrupted):
            main(quick_training_args(output_dir, *DDPM_FLAGS))
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["checkpoint-1", "checkpoint-2"]
    result = launch("train_ddpm", quick_training_args(output_dir, *DDPM_FLAGS, "--resume_from_checkpoint", "latest"))
    return output_dir, assert_finished(result, output_dir, 4)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory):
    """Text-to-image latent diffusion in 2 processes on an (untrained) conv VAE first stage with 4x8x8 latents."""
    output_dir = tmp_path_factory.mktemp("ldm-2proc") / "out"
    torch.manual_seed(0)
    first_stage = VAEModel(sample_size=32, architecture="conv", hidden_dims=(8, 16), latent_channels=4)
    VAEPipeline(first_stage).save_pretrained(output_dir.parent / "first-stage")
    flags = [*LDM_FLAGS, "--vae_path", output_dir.parent / "first-stage"]
    assert_finished(launch("train_ldm", quick_training_args(output_dir, *flags)), output_dir, 3)
    return output_dir


@pytest.fixture(scope="module")
def vae_resumed_run(vae_run, tmp_path_factory):
    """A copy of the 2-process VAE run, resumed from its checkpoint-4 to step 6 in 1 process (this one)."""
    from hfgen.training.train_vae import main

    output_dir = tmp_path_factory.mktemp("vae-2to1proc") / "out"
    shutil.copytree(vae_run, output_dir)
    main(quick_training_args(output_dir, *VAE_FLAGS, "--resume_from_checkpoint",
                             str(output_dir / "checkpoints" / "checkpoint-4")))
    return output_dir


def run_folder(request, family: str):
    folder = request.getfixturevalue(f"{family}_run")
    return folder[0] if family == "ddpm" else folder


@pytest.mark.parametrize("family, pipeline_class, size", [
    ("vae", VAEPipeline, 28), ("gan", ConditionalPipeline, 28), ("ddpm", DDPMPipeline, 28),
    ("ldm", LatentTextToImagePipeline, 32),
])
def test_two_process_run_writes_a_loadable_pipeline(request, family, pipeline_class, size):
    pipe = AutoPipeline.from_pretrained(run_folder(request, family))
    assert type(pipe) is pipeline_class
    kwargs = {"num_inference_steps": 2} if family in ("ddpm", "ldm") else {}
    labels = [0, 9] if pipe.num_classes else None
    images = pipe(2, class_labels=labels, generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    assert images.shape == (2, 1, size, size) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", [
    "vae",
    "gan",  # batch norm: the recorded FD must come from the generator in eval mode, as it is loaded
    "ddpm",
    "ldm",
])
def test_metrics_of_a_two_process_run_are_those_of_its_folder_evaluated_in_one_process(request, family):
    """Only the main process evaluates: metrics.json must be what one process computes from the saved folder."""
    folder = run_folder(request, family)
    recorded = json.loads((folder / "metrics.json").read_text())
    if family == "ldm":  # one evaluation path: the trainer's family extras are `hfgen evaluate`'s too
        assert "first_stage_reconstruction_mse" in recorded
    assert "fd" in recorded
    assert evaluate([str(folder), *EVALUATE_FLAGS[family]]) == pytest.approx(recorded, rel=1e-6)


def ema_weights(folder):
    return load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")


def mean_of_checkpoint_weights(folder, steps):
    weights = [load_file(folder / "checkpoints" / f"checkpoint-{step}" / "model.safetensors") for step in steps]
    return {name: torch.stack([w[name] for w in weights]).mean(0) for name in weights[0]}


def test_ema_is_the_mean_of_the_weights_in_two_processes_and_after_a_resume_in_one(vae_run, vae_resumed_run):
    """EMA with decay 1 - 1/k: its weights are the mean of the checkpointed weights of every step, whichever
    number of processes made them; a resumed EMA that lost its state or counted steps twice is off."""
    torch.testing.assert_close(ema_weights(vae_run), mean_of_checkpoint_weights(vae_run, range(1, 7)), rtol=0, atol=1e-6)

    resumed = vae_resumed_run
    assert [trainer_step(resumed / "checkpoints" / f"checkpoint-{step}") for step in (5, 6)] == [5, 6]
    # steps 5 and 6 were trained again, by 1 process
    assert not (resumed / "checkpoints" / "checkpoint-6" / "random_states_1.pkl").exists()
    torch.testing.assert_close(ema_weights(resumed), mean_of_checkpoint_weights(resumed, range(1, 7)), rtol=0, atol=1e-6)
    ema_state = torch.load(resumed / "checkpoints" / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema_state["optimization_step"] == 6


def test_each_process_draws_its_own_noise(vae_run):
    """Same weights everywhere, but not the same reparameterization noise: the ranks' torch RNGs differ."""
    states = [torch.load(vae_run / "checkpoints" / "checkpoint-2" / f"random_states_{rank}.pkl", weights_only=False)
              for rank in (0, 1)]
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])


def test_one_process_checkpoint_resumes_in_two_processes(ddpm_run):
    folder, log = ddpm_run
    assert "checkpoint-2 at step 2" in log  # "resumed from <the 1-process checkpoint> at step 2"
    assert [trainer_step(folder / "checkpoints" / f"checkpoint-{step}") for step in range(1, 5)] == [1, 2, 3, 4]
    # the optimizer state came along: AdamW has taken all 4 steps, not the 2 of the resumed run
    optimizer = torch.load(folder / "checkpoints" / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {4}


def last_learning_rate(checkpoint) -> float:
    return torch.load(checkpoint / "scheduler.bin", weights_only=False)["_last_lr"][0]


def test_lr_schedule_continues_across_process_counts(ddpm_run, vae_resumed_run):
    """Linear decay to 0 at the last step: at step k of n the lr is lr0 (n - k) / n, however many processes ran."""
    ddpm_rates = [last_learning_rate(ddpm_run[0] / "checkpoints" / f"checkpoint-{step}") for step in (2, 3, 4)]
    vae_rates = [last_learning_rate(vae_resumed_run / "checkpoints" / f"checkpoint-{step}") for step in (4, 5, 6)]
    assert ddpm_rates == pytest.approx([LEARNING_RATE * (4 - k) / 4 for k in (2, 3, 4)])  # 1 -> 2 processes
    assert vae_rates == pytest.approx([LEARNING_RATE * (6 - k) / 6 for k in (4, 5, 6)])  # 2 -> 1 process


def test_a_two_process_run_on_a_folder_with_workers_and_flips_resumes_bit_identically(tmp_path_factory):
    """Random flips drawn per sample and 2 DataLoader workers per process: a 2-process run resumed from its
    middle checkpoint ends with the weights of the uninterrupted run. FD of the RGB samples in (tiny, random)
    DINOv2 features, computed by the main process."""
    from helpers import write_mixed_folder
    from helpers import save_dinov2

    root = tmp_path_factory.mktemp("folder-2proc")
    dinov2 = save_dinov2(root / "dinov2")
    for copy in range(6):
        write_mixed_folder(root / "images" / f"part{copy}")
    flags = ["--train_data_dir", root / "images", "--resolution", "16", "--num_channels", "3", "--random_flip",
             "--dataloader_num_workers", "2", "--architecture", "conv", "--hidden_dims", "8", "16", "--latent_dim", "4",
             "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "3",
             "--feature_extractor", f"dinov2:{dinov2}", "--eval_importance_samples", "1", "--eval_num_samples", "8"]
    full = root / "full"
    assert_finished(launch("train_vae", quick_training_args(full, *flags)), full, 6)
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    log = assert_finished(launch("train_vae", quick_training_args(resumed, *flags, "--resume_from_checkpoint", "latest")),
                          resumed, 6)
    assert "checkpoint-3 at step 3" in log
    a, b = (load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (full, resumed)]
    assert metrics[0]["fd"] > 0 and metrics[0] == metrics[1]
