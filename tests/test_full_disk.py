"""A full, over-quota or read-only disk stops a run with one line naming the folder and the cause (or the bytes
needed and free, checked before a save); the partial folder is removed, and the last checkpoint and an earlier
output stay as they were. On a real small filesystem (tmpfs, where this machine lets the tests mount one) and with an
injected OSError at each save."""

import errno
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import cli_error, quick_training_args

from hfgen.cli import main as cli
from hfgen.training.trainer import LOCK_FILE, STAGING

# the digits at 8 px with 256-wide layers: a checkpoint of about 2 MB, an output of about 0.7 MB
FLAGS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none", "--hidden_dims", "256",
         "256", "--latent_dim", "4", "--train_batch_size", "32", "--eval_importance_samples", "1",
         "--eval_num_samples", "20", "--num_validation_images", "4", "--checkpointing_steps", "2"]
DISK_SIZE = "12m"


def args(output_dir, *extra) -> list[str]:
    return quick_training_args(output_dir, *FLAGS, *extra)


def train(output_dir, steps: int, *extra) -> list[str]:
    return ["train", "vae", *args(output_dir, "--max_train_steps", str(steps), *extra)]


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a run's folder (but the live run's lock) -> its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name != LOCK_FILE:
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    files[os.path.relpath(path, folder)] = file.read()
    return files


def finished_run(output_dir, *extra) -> dict[str, bytes]:
    """A finished 2-step run (checkpoint-2 and the output) in `output_dir`; returns its snapshot."""
    cli([*train(output_dir, 2), *extra])
    assert (output_dir / "model_index.json").is_file()
    return snapshot(output_dir)


def assert_untouched(output_dir, before: dict[str, bytes]) -> None:
    assert snapshot(output_dir) == before  # no partial folder, no file changed
    assert not [name for name in os.listdir(output_dir / "checkpoints") if name.endswith(".incomplete")]
    assert not (output_dir / STAGING).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MiB filesystem (tmpfs), unmounted afterwards; skipped where this machine refuses to mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here: the injected-OSError tests cover the same paths")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'refused'}): the injected-OSError "
                    "tests cover the same paths")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> None:
    """Fills `disk` until `leave` bytes are free."""
    with open(disk / "filler", "wb") as file:
        file.write(bytes(max(shutil.disk_usage(disk).free - leave, 0)))
    assert abs(shutil.disk_usage(disk).free - leave) < 64 << 10


def checkpoint_size(output_dir) -> int:
    folder = output_dir / "checkpoints" / "checkpoint-2"
    return sum(os.path.getsize(folder / name) for name in os.listdir(folder))


# ----- a real small filesystem ------------------------------------------------------------------------------


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(small_disk, capsys):
    output_dir = small_disk / "out"
    before = finished_run(output_dir)
    fill(small_disk, leave=checkpoint_size(output_dir) // 2)
    line = cli_error(capsys, [*train(output_dir, 4), "--resume_from_checkpoint", "latest"])
    found = re.search(r"not enough space to save checkpoint-4 in '(.*)': it needs about ([\d,]+) bytes and "
                      r"([\d,]+) are free; the last checkpoint \(.*checkpoint-2\) is untouched", line)
    assert found and found.group(1) == str(output_dir / "checkpoints"), line
    needed, free = (int(found.group(group).replace(",", "")) for group in (2, 3))
    assert needed > checkpoint_size(output_dir) > free
    assert "--resume_from_checkpoint latest" in line
    assert_untouched(output_dir, before)


@pytest.mark.parametrize("room", [
    0.1,  # the weights (safetensors) do not fit
    0.5,  # the weights fit, the optimizer state (torch's writer, which loses the OSError) does not
])
def test_a_disk_that_fills_during_a_checkpoint_is_named_and_the_partial_checkpoint_removed(
        small_disk, capsys, monkeypatch, room):
    output_dir = small_disk / "out"
    before = finished_run(output_dir)
    fill(small_disk, leave=int(checkpoint_size(output_dir) * room))
    monkeypatch.setattr("hfgen.training.trainer.space_shortage", lambda *args: None)  # as if the estimate were wrong
    line = cli_error(capsys, [*train(output_dir, 4), "--resume_from_checkpoint", "latest"])
    assert f"could not save checkpoint-4 in {str(output_dir / 'checkpoints')!r}: " in line, line
    assert ("No space left on device" in line) if room == 0.1 else ("the disk or your quota is probably full" in line)
    assert "partial files were removed and the last checkpoint" in line and "checkpoint-2) is untouched" in line
    assert_untouched(output_dir, before)


@pytest.mark.parametrize("checked", [True, False])
def test_a_final_save_on_a_full_disk_keeps_the_earlier_output(small_disk, capsys, monkeypatch, checked):
    output_dir = small_disk / "out"
    before = finished_run(output_dir)
    fill(small_disk, leave=100 << 10)
    if not checked:
        monkeypatch.setattr("hfgen.training.trainer.space_shortage", lambda *args: None)
    line = cli_error(capsys, [*train(output_dir, 3), "--resume_from_checkpoint", "latest"])  # no checkpoint at 3
    if checked:
        assert f"not enough space to save the final pipeline in {str(output_dir)!r}: it needs about" in line, line
    else:
        assert f"could not save the final pipeline in {str(output_dir)!r}: No space left on device" in line, line
    assert "checkpoint-2) and an earlier output are untouched" in line
    assert_untouched(output_dir, before)


def test_a_read_only_disk_is_named(small_disk, capsys, monkeypatch):
    output_dir = small_disk / "out"
    before = finished_run(output_dir)
    # the run starts (its lock is written), then the disk turns read-only before the checkpoint at step 4
    from hfgen.training.trainer import Trainer

    original = Trainer.save_checkpoint

    def save_checkpoint(self):
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        return original(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    line = cli_error(capsys, [*train(output_dir, 4), "--resume_from_checkpoint", "latest"])
    assert f"could not save checkpoint-4 in {str(output_dir / 'checkpoints')!r}: Read-only file system" in line, line
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert_untouched(output_dir, before)


# ----- an injected OSError at each save, on any machine ----------------------------------------------------


def failing(error_number: int):
    def fail(*args, **kwargs):
        raise OSError(error_number, os.strerror(error_number))
    return fail


@pytest.mark.parametrize("target, error_number, what", [
    ("accelerate.checkpointing.save", errno.ENOSPC, "checkpoint-4"),  # the weights (first)
    ("torch.save", errno.EDQUOT, "checkpoint-4"),  # the optimizer state (first)
    ("accelerate.accelerator.save_custom_state", errno.EROFS, "checkpoint-4"),  # the EMA
    ("diffusers.ModelMixin.save_pretrained", errno.EROFS, "the final pipeline"),
    ("hfgen.training.trainer.Trainer.save_sample_grid", errno.ENOSPC, "the final pipeline"),
    ("hfgen.training.trainer.write_model_card", errno.EDQUOT, "the final pipeline"),
])
def test_an_oserror_during_a_save_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch, target, error_number,
                                                                  what):
    output_dir = tmp_path / "out"
    before = finished_run(output_dir, "--use_ema")
    monkeypatch.setattr(target, failing(error_number))
    steps = 4 if what.startswith("checkpoint") else 3
    line = cli_error(capsys, [*train(output_dir, steps), "--resume_from_checkpoint", "latest", "--use_ema"])
    folder = output_dir / "checkpoints" if what.startswith("checkpoint") else output_dir
    assert f"could not save {what} in {str(folder)!r}: {os.strerror(error_number)}" in line, line
    assert_untouched(output_dir, before)


# ----- two processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_stop_together_when_a_checkpoint_does_not_fit(small_disk):
    """Only the main process measures the disk; both stop at once, instead of one waiting for the other forever."""
    from test_multiprocess import launch

    output_dir = small_disk / "out"
    fill(small_disk, leave=4 << 20)  # room for checkpoint-2 (2 MB + 1 MiB of slack), not for checkpoint-4 as well
    returncode, log = launch("train_vae", args(output_dir, "--max_train_steps", "6"), timeout=240)
    assert returncode != 0
    lines = [line for line in log.splitlines() if "hfgen train: error: not enough space" in line]
    assert len(lines) == 2, log[-5000:]  # one line from each process
    assert any("checkpoint-4 in" in line and "bytes and" in line for line in lines), lines
    assert os.listdir(output_dir / "checkpoints") == ["checkpoint-2"]
    kept = set(os.listdir(output_dir / "checkpoints" / "checkpoint-2"))
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= kept



@pytest.mark.slow
def test_when_one_process_fails_to_write_its_part_no_process_publishes_the_checkpoint(tmp_path):
    """Process 1's random states fail: without agreeing, process 0 would rename a checkpoint that lacks them."""
    from test_multiprocess import free_port

    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               os.path.join(os.path.dirname(__file__), "fixtures", "rank1_disk_full.py"),
               *args(output_dir, "--max_train_steps", "6", "--hidden_dims", "16")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("hfgen train: error: could not save checkpoint-4")]
    assert len(errors) == 2, log[-5000:]
    assert any("another process failed to write its part" in line and "checkpoint-2) is untouched" in line
               for line in errors), errors  # process 0
    assert any("No space left on device" in line and "partial files were removed" in line for line in errors), errors
    assert os.listdir(output_dir / "checkpoints") == ["checkpoint-2"]
