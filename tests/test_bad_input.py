"""Bad input, by class: each case checks the exception type, that the message names the argument or the file,
and, on the command line, that the error is one line without a traceback."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import cli_error, quick_training_args
from diffusers import DDPMScheduler
from helpers import tiny_unet
from hub_fixtures import hub_server  # noqa: F401  (the fixture)

from hfgen import (
    AutoPipeline, ConditionalPipeline, DDPMPipeline, Discriminator, GANPipeline, Generator, VAEModel, VAEPipeline)
from hfgen.cli import main as cli
from hfgen.training import train_ddpm, train_gan, train_vae
from hfgen.training.trainer import LOCK_FILE, NonFiniteError

VAE = ["--hidden_dims", "16", "--latent_dim", "4", "--eval_importance_samples", "1", "--feature_extractor", "none"]


def vae_args(output_dir, *extra):
    return quick_training_args(output_dir, *VAE, *extra)


# ----- 1. non-finite numbers never end up saved ----------------------------------------------------------------


def test_an_absurd_learning_rate_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    args = vae_args(tmp_path, "--learning_rate", "1e3", "--train_batch_size", "100")
    train_vae.main([*args, "--max_train_steps", "2", "--checkpointing_steps", "1"])  # two finite steps, checkpointed
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "checkpoints" / "checkpoint-2", kept)
    shutil.rmtree(tmp_path / "vae")
    os.remove(tmp_path / "model_index.json")
    # the loss reaches nan at step 9 (seen); no checkpoint is due before step 50
    line = cli_error(capsys, ["train", "vae", *args, "--max_train_steps", "100", "--checkpointing_steps", "50",
                              "--resume_from_checkpoint", "latest"])
    assert "the vae loss is nan" in line or "gradient norm of vae is" in line
    assert "--learning_rate 1000" in line and "checkpoint-2) is kept" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    for name in os.listdir(kept):  # bit-identical to what it was
        assert (kept / name).read_bytes() == (tmp_path / "checkpoints" / "checkpoint-2" / name).read_bytes(), name
    assert not (tmp_path / "model_index.json").exists() and not (tmp_path / "vae").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    trainer = train_vae.VAETrainer(train_vae.parse_args(vae_args(tmp_path, "--max_train_steps", "1")))
    with torch.no_grad():
        next(trainer.unwrap("vae").parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="the weights of 'vae' hold non-finite values"):
        trainer.save_checkpoint()
    with pytest.raises(NonFiniteError, match="the final pipeline"):
        trainer.save_output()
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
    assert not (tmp_path / "model_index.json").exists()


@pytest.mark.parametrize("call", ["vae_forward", "vae_encode", "pipeline_encode", "discriminator"])
def test_nan_images_are_refused_by_models_and_pipelines(call):
    images = torch.rand(2, 1, 28, 28)
    images[1, 0, 3, 3] = float("nan")
    vae = VAEModel(hidden_dims=[8], latent_dim=2)
    calls = {"vae_forward": lambda: vae(images), "vae_encode": lambda: vae.encode(images),
             "pipeline_encode": lambda: VAEPipeline(vae).encode(images),
             "discriminator": lambda: Discriminator(base_channels=8)(images * 2 - 1)}
    with pytest.raises(ValueError, match="`sample` holds non-finite values"):
        calls[call]()


# ----- 2. every flag is checked before any work ----------------------------------------------------------------


@pytest.mark.parametrize("flags, match", [
    (["--learning_rate", "inf"], "`--learning_rate` must be a finite number > 0, got inf"),
    (["--learning_rate", "nan"], "`--learning_rate` must be a finite number > 0, got nan"),
    (["--max_grad_norm", "-1"], "`--max_grad_norm` must be a finite number > 0, got -1.0"),
    (["--adam_beta1", "1"], "`--adam_beta1` must be a number in \\[0, 1\\)"),
    (["--mixed_precision", "fp16"], "`--mixed_precision fp16` needs a GPU"),
    (["--max_train_samples", "0"], "`--max_train_samples` must be a positive integer"),
    (["--beta", "-0.5"], "`--beta` must be a finite number >= 0"),
    (["--push_to_hub"], "`--push_to_hub` needs `--hub_model_id`"),
])
def test_bad_flags_are_refused_before_any_work(flags, match, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(train_vae.VAETrainer, "load_data", lambda self: loaded.append(1))
    with pytest.raises(ValueError, match=match):
        train_vae.main(vae_args(tmp_path / "out", *flags))
    assert not loaded and not (tmp_path / "out").exists()


def test_an_unknown_lr_scheduler_and_an_empty_output_dir_are_one_line_errors(tmp_path, capsys):
    line = cli_error(capsys, ["train", "vae", "--output_dir", str(tmp_path), "--lr_scheduler", "warmup_cosine"])
    assert "--lr_scheduler" in line and "invalid choice" in line
    assert "`--output_dir` must name a folder, got ''" in cli_error(capsys, ["train", "vae", "--output_dir", ""])


def test_a_push_without_a_token_and_an_unwritable_output_dir_are_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr("hfgen.training.config.get_token", lambda: None)
    with pytest.raises(ValueError, match="`--push_to_hub` needs a Hub token"):
        train_vae.main(vae_args(tmp_path, "--push_to_hub", "--hub_model_id", "user/model"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="`--output_dir` .*a-file/out.* cannot be written"):
        train_vae.main(vae_args(tmp_path / "a-file" / "out"))


def test_sample_output_options_are_checked_before_loading(tmp_path, capsys):
    line = cli_error(capsys, ["sample", str(tmp_path / "no-such-folder"), "--output", str(tmp_path / "grid.txt")])
    assert "`--output`" in line and "'.txt'" in line
    line = cli_error(capsys, ["sample", str(tmp_path), "--output", str(tmp_path / "missing" / "grid.png")])
    assert "`--output`" in line and "is not a writable folder" in line


# ----- 3. an output folder is never silently mixed with another run --------------------------------------------


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(trained_vae_dir, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(trained_vae_dir, folder)
    gan = ["--base_channels", "8", "--latent_dim", "8", "--max_train_steps", "2", "--feature_extractor", "none"]
    with pytest.raises(ValueError, match="already holds a run .*--overwrite_output_dir"):
        train_gan.main(quick_training_args(folder, *gan))
    train_gan.main(quick_training_args(folder, *gan, "--overwrite_output_dir"))
    assert isinstance(AutoPipeline.from_pretrained(folder), GANPipeline)
    assert not (folder / "vae").exists() and (folder / "generator").is_dir()
    with pytest.raises(ValueError, match="pass one of them"):
        train_gan.main(quick_training_args(folder, *gan, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"))


def test_a_checkpoint_of_another_family_or_config_says_so(tmp_path):
    train_vae.main(vae_args(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    with pytest.raises(ValueError, match=r"written with another model config \(vae.latent_dim: 4 -> 8"):
        train_vae.main([*vae_args(tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"),
                        "--latent_dim", "8"])
    with pytest.raises(ValueError, match="written by a 'vae' trainer, not 'gan'"):
        train_gan.main(quick_training_args(tmp_path, "--base_channels", "8", "--max_train_steps", "4",
                                           "--resume_from_checkpoint", "latest"))


# ----- 4. resume is exact at the boundaries; a killed save never looks finished; one live run per folder --------


def test_a_save_killed_midway_leaves_no_finished_looking_folder(tmp_path, monkeypatch):
    args = vae_args(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    train_vae.main(args)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hfgen.training.trainer.write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        train_vae.main([*args, "--resume_from_checkpoint", "latest"])
    assert not (tmp_path / "model_index.json").exists()
    with pytest.raises(ValueError, match="holds no model_index.json"):
        VAEPipeline.from_pretrained(tmp_path)
    monkeypatch.undo()
    train_vae.main([*args, "--resume_from_checkpoint", "latest"])  # completes the output, trains nothing
    assert isinstance(VAEPipeline.from_pretrained(tmp_path), VAEPipeline)


def test_a_second_live_run_into_the_same_folder_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(ValueError, match=f"being written by another live run \\(process {holder.pid}"):
            train_vae.main(vae_args(tmp_path, "--max_train_steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    train_vae.main(vae_args(tmp_path, "--max_train_steps", "1"))  # a stale lock is taken over
    assert not (tmp_path / LOCK_FILE).exists()  # and released at the end


# ----- 5. loading says what is wrong and what would work -------------------------------------------------------


def test_loading_errors_name_the_folder_and_what_would_load_it(tmp_path):
    GANPipeline(Generator(latent_dim=4, base_channels=8)).save_pretrained(tmp_path / "gan")
    with pytest.raises(ValueError, match=r"holds a GANPipeline \(components discriminator, generator\), not a VAEPipeline: load it "
                                         r"with GANPipeline.from_pretrained or hfgen.AutoPipeline"):
        VAEPipeline.from_pretrained(tmp_path / "gan")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "gan", broken)
    (broken / "model_index.json").write_text('{"_class_name": "GANPipeline", ')
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON"):
        AutoPipeline.from_pretrained(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path / "gan", foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["generator"] = ["transformers", "CLIPTextModel"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names 'CLIPTextModel' from 'transformers' for the component 'generator'"):
        GANPipeline.from_pretrained(foreign)


@pytest.mark.parametrize("name, match", [
    ("no-such-user/no-such-model", "'no-such-user/no-such-model' is not a local folder, and downloading it from the Hub failed"),
    ("./missing-folder", "'./missing-folder' is not a folder, and not a Hub repo id"),
    ("a/b/c", "'a/b/c' is not a folder, and not a Hub repo id"),
])
def test_missing_folders_and_repos_are_named(name, match):
    with pytest.raises(ValueError, match=match):
        AutoPipeline.from_pretrained(name)


# ----- 6. pipeline calls take what Python users pass -----------------------------------------------------------


@pytest.fixture
def cvae_pipe():
    torch.manual_seed(0)
    return ConditionalPipeline(VAEModel(hidden_dims=[8], latent_dim=2, num_classes=3))


def test_generator_lists_must_hold_one_generator_per_image(cvae_pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match="`generator` is a list of 3 generators: it must hold one per image \\(2\\)"):
        cvae_pipe(class_labels=[0, 1], generator=generators)
    assert len(cvae_pipe(class_labels=[0, 1, 2], generator=generators).images) == 3


def test_numpy_labels_and_latents_work_and_floats_are_refused(cvae_pipe):
    expected = cvae_pipe(class_labels=[2, 2], generator=torch.manual_seed(0), output_type="np").images
    for labels in (np.int64(2), np.array([2, 2]), 2):
        got = cvae_pipe(2, class_labels=labels, generator=torch.manual_seed(0), output_type="np").images
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(TypeError, match="`class_labels` must be integers"):
        cvae_pipe(2, class_labels=1.5)
    latents = np.random.default_rng(0).standard_normal((2, 2)).astype(np.float32)
    from_numpy = cvae_pipe(class_labels=[0, 1], latents=latents, output_type="np").images
    from_torch = cvae_pipe(class_labels=[0, 1], latents=torch.from_numpy(latents), output_type="np").images
    np.testing.assert_array_equal(from_numpy, from_torch)
    with pytest.raises(TypeError, match="`latents` must be a torch.Tensor or numpy array"):
        cvae_pipe(class_labels=[0, 1], latents=[[0.0, 0.0], [0.0, 0.0]])


def test_a_batch_too_large_for_memory_is_refused_before_allocating(cvae_pipe):
    with pytest.raises(ValueError, match="`batch_size` 100000000000 does not fit in memory"):
        DDPMPipeline(tiny_unet(), DDPMScheduler(num_train_timesteps=10))(100_000_000_000, num_inference_steps=1)


# ----- 7. small data, and more processes than batches ----------------------------------------------------------


def test_a_folder_with_a_single_image_trains_or_says_why_not(tmp_path):
    from helpers import write_image_folder

    write_image_folder(tmp_path / "one", classes=("only",), per_class=1, size=28, mode="L")
    args = vae_args(tmp_path / "out", "--train_data_dir", tmp_path / "one", "--max_train_steps", "2",
                    "--eval_num_samples", "1")
    with pytest.raises(ValueError, match="`--train_batch_size` 100 exceeds the 1 training images"):
        train_vae.main(args)
    train_vae.main([*args, "--train_batch_size", "1"])
    assert isinstance(VAEPipeline.from_pretrained(tmp_path / "out"), VAEPipeline)


def test_more_processes_than_batches_is_a_clear_error(tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 64))
    with pytest.raises(ValueError, match="40 batches of `--train_batch_size` 100 cannot feed 64 processes"):
        train_vae.VAETrainer(train_vae.parse_args(vae_args(tmp_path)))


# ----- 8. the command line speaks in one line ------------------------------------------------------------------


@pytest.mark.slow
def test_the_console_script_prints_one_line_and_a_traceback_only_when_asked(tmp_path):
    command = ["hfgen", "train", "vae", "--output_dir", str(tmp_path), "--learning_rate", "-1"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "hfgen: error: `--learning_rate` must be a finite number > 0, got -1.0"
    with pytest.raises(ValueError, match="`--learning_rate` must be"):  # --debug: the exception, with its traceback
        cli([*command[1:], "--debug"])


def test_hfgen_debug_asks_for_the_traceback_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HFGEN_DEBUG", "1")
    with pytest.raises(ValueError, match="`--learning_rate` must be"):
        cli(["train", "vae", "--output_dir", str(tmp_path), "--learning_rate", "-1"])


def test_a_corrupt_image_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys):
    from helpers import write_image_folder

    write_image_folder(tmp_path / "data", per_class=4, size=28, mode="L")
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"not a png")
    line = cli_error(capsys, ["train", "vae", *vae_args(tmp_path / "out", "--train_data_dir", tmp_path / "data",
                                                        "--train_batch_size", "9", "--dataloader_num_workers", "1")])
    assert "broken.png" in line and "--skip_corrupt_images" in line


# ----- 9. guidance needs what it relies on ---------------------------------------------------------------------


def test_guidance_is_refused_for_a_denoiser_never_trained_on_the_null_class(tmp_path):
    args = quick_training_args(tmp_path, "--dataset_name", "hfgen:digits", "--resolution", "8", "--conditional",
                               "--label_dropout", "0", "--block_out_channels", "8", "16", "--max_train_steps", "1",
                               "--feature_extractor", "none", "--eval_vlb_num_images", "0", "--num_inference_steps", "2")
    train_ddpm.main(args)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert pipe.config.label_dropout == 0
    assert len(pipe(class_labels=[1, 2], num_inference_steps=2).images) == 2
    with pytest.raises(ValueError, match="trained with label_dropout 0, so its null class was never trained"):
        pipe(class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=2)


# ----- 10. the last inputs that failed deep (issue 30) ---------------------------------------------------------


@pytest.fixture
def vae_folder(tmp_path):
    torch.manual_seed(0)
    VAEPipeline(VAEModel(hidden_dims=[8], latent_dim=2)).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.mark.parametrize("flags", [["--prompt", "a thick seven"], ["--negative_prompt", "blurry"],
                                   ["--guidance_scale", "3"], ["--class_labels", "7"], ["--num_inference_steps", "5"]])
def test_sample_refuses_a_flag_the_pipeline_does_not_take(vae_folder, tmp_path, capsys, flags):
    line = cli_error(capsys, ["sample", str(vae_folder), *flags, "--output", str(tmp_path / "grid.png")])
    assert f"`{flags[0]}` does not apply to" in line and "a VAEPipeline" in line, line
    assert not (tmp_path / "grid.png").exists()


def test_sample_reads_what_a_pipeline_takes_through_its_base_class(tmp_path, capsys):
    torch.manual_seed(0)  # ConditionalPipeline.__call__ passes **kwargs on to GenerativePipeline.__call__
    ConditionalPipeline(VAEModel(hidden_dims=[8], latent_dim=2, num_classes=3)).save_pretrained(tmp_path / "cvae")
    line = cli_error(capsys, ["sample", str(tmp_path / "cvae"), "--class_labels", "1", "--guidance_scale", "2",
                              "--output", str(tmp_path / "grid.png")])
    assert "`--guidance_scale` does not apply to" in line and "a ConditionalPipeline" in line
    assert line.endswith("it takes --class_labels"), line


@pytest.mark.parametrize("family", ["vae", "gan", "ddpm", "ldm"])
def test_a_bad_hub_model_id_is_refused_before_any_work(family, tmp_path, capsys):
    line = cli_error(capsys, ["train", family, "--output_dir", str(tmp_path / "out"), "--push_to_hub",
                              "--hub_model_id", "bad id with spaces"])
    assert "`--hub_model_id` must be a Hub repo id such as user/my-model, got 'bad id with spaces'" in line
    assert not (tmp_path / "out").exists()


def test_push_to_hub_and_push_folder_refuse_a_bad_repo_id_before_any_request(vae_folder, monkeypatch):
    from hfgen.hub_utils import push_folder

    monkeypatch.setattr("hfgen.hub_utils.create_repo", lambda *a, **k: pytest.fail("a request was made"))
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repo id such as user/my-model, got 'a/b/c'"):
        VAEPipeline.from_pretrained(vae_folder).push_to_hub("a/b/c")
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repo id .* got 'bad id'"):
        push_folder(str(vae_folder), "bad id")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="the device is present")
@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:1"])
@pytest.mark.parametrize("command", ["sample", "evaluate", "demo"])
def test_an_absent_device_is_one_line_naming_the_devices_there_are(vae_folder, tmp_path, capsys, command, device):
    extra = ["--output", str(tmp_path / "grid.png")] if command == "sample" else []
    line = cli_error(capsys, [command, str(vae_folder), "--device", device, *extra])
    assert line == f"hfgen: error: `--device` must be a device this machine has, got {device!r}; available here: cpu"


@pytest.mark.parametrize("rank", [0, 1])
def test_launched_processes_that_cannot_join_say_so_once(monkeypatch, capsys, rank):
    """What `accelerate launch --multi_gpu --num_processes 2` without GPUs nor ACCELERATE_USE_CPU=1 starts: two
    processes that each find themselves alone. Rank 0 says it in one line; the other rank exits quietly. (The
    launcher's environment is not set in this process: accelerate would try to join the others.)"""
    from types import SimpleNamespace

    from hfgen.training.trainer import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr("hfgen.training.trainer.time.sleep", lambda seconds: None)
    alone = SimpleNamespace(num_processes=1)
    if rank == 0:
        with pytest.raises(ValueError) as error:
            check_launch(alone)
        message = str(error.value)
        assert "\n" not in message and "the launcher started 2 processes, but they could not join one run" in message
        assert "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`" in message
    else:
        with pytest.raises(SystemExit) as exit_info:
            check_launch(alone)
        assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    check_launch(SimpleNamespace(num_processes=2))  # joined: nothing to say
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(alone)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="processes on GPUs join one run")
def test_accelerate_launch_multi_gpu_on_cpus_prints_one_hfgen_line(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "ACCELERATE_USE_CPU"}
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hfgen.training.train_vae",
               *vae_args(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("hfgen train: error:")]
    assert len(lines) == 1 and "ACCELERATE_USE_CPU=1" in lines[0], result.stderr


def test_a_failed_push_says_the_folder_is_complete_and_how_to_push_it_later(hub_server, tmp_path, capsys):
    endpoint = hub_server.url
    hub_server.stop()  # the endpoint is down: nothing listens on its port any more
    out = tmp_path / "out"
    line = cli_error(capsys, ["train", "vae", *vae_args(out, "--max_train_steps", "1", "--push_to_hub",
                                                        "--hub_model_id", "user/tiny-vae")])
    assert f"the push to 'user/tiny-vae' at {endpoint} failed" in line and "Connection refused" in line, line
    assert f"the trained folder {out} is complete: push it later with `hf upload user/tiny-vae {out} . " \
           "--exclude 'checkpoints/*'" in line
    assert isinstance(VAEPipeline.from_pretrained(out), VAEPipeline)
