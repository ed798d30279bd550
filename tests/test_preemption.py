"""A run stopped by SIGTERM, SIGINT or SIGUSR1 finishes its step, saves a checkpoint at it through the atomic path,
logs one line with the command that resumes, exits with PREEMPTED_EXIT_CODE, and resumes bit-identically. Real
signals to real processes: one process, and two under `accelerate launch` (slow)."""

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import quick_training_args, same_weights

from hfgen.training import train_vae
from hfgen.training.preemption import PREEMPTED_EXIT_CODE, TrainingStopped, resume_command
from hfgen.training.trainer import TRAINER_STATE, list_checkpoints

# small and fast: the digits at 8 px; 256-wide layers make a save last long enough for signals to land in it
FLAGS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none", "--hidden_dims", "256",
         "256", "--latent_dim", "4", "--train_batch_size", "32", "--eval_importance_samples", "1",
         "--eval_num_samples", "20", "--num_validation_images", "4"]
STOPPED = "stopped at step"


def args(output_dir, *extra) -> list[str]:
    return quick_training_args(output_dir, *FLAGS, *extra)


def signal_at_step(monkeypatch, step: int, number=signal.SIGUSR1, times: int = 1) -> None:
    """This process sends itself `number` (`times` times) during training step `step`."""
    original, calls = train_vae.VAETrainer.training_step, {"count": 0}

    def training_step(self, images, labels):
        calls["count"] += 1
        if calls["count"] == step:
            for _ in range(times):
                os.kill(os.getpid(), number)
        return original(self, images, labels)

    monkeypatch.setattr(train_vae.VAETrainer, "training_step", training_step)


@pytest.fixture(autouse=True)
def signal_handlers():
    """Puts this process's handlers back after each test: a stopped run leaves SIGTERM and SIGUSR1 recorded."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def checkpoint_steps(output_dir) -> list[int]:
    return [int(path.rsplit("-", 1)[1]) for path in list_checkpoints(str(output_dir / "checkpoints"))]


def no_partial_folders(output_dir) -> bool:
    return not [name for name in os.listdir(output_dir / "checkpoints") if name.endswith(".incomplete")]


# ----- in this process: the signal lands at a known step -------------------------------------------------------


def test_a_signal_stops_at_the_end_of_its_step_with_a_checkpoint_and_the_run_resumes_bit_identically(
        tmp_path, monkeypatch, caplog):
    flags = ["--max_train_steps", "12", "--checkpointing_steps", "5"]
    train_vae.main(args(tmp_path / "full", *flags))

    signal_at_step(monkeypatch, 7, signal.SIGUSR1, times=2)  # the second one is only logged
    with pytest.raises(TrainingStopped) as stopped:
        train_vae.main(args(tmp_path / "cut", *flags))
    assert stopped.value.code == PREEMPTED_EXIT_CODE and stopped.value.signal_name == "SIGUSR1"
    assert checkpoint_steps(tmp_path / "cut") == [5, 7] and no_partial_folders(tmp_path / "cut")
    assert stopped.value.checkpoint == str(tmp_path / "cut" / "checkpoints" / "checkpoint-7")
    assert not (tmp_path / "cut" / "model_index.json").exists()
    lines = [record.getMessage() for record in caplog.records if STOPPED in record.getMessage()]
    assert len(lines) == 1 and "SIGUSR1: stopped at step 7 of 12 with" in lines[0]
    assert "--resume_from_checkpoint latest" in lines[0] and f"exit status {PREEMPTED_EXIT_CODE}" in lines[0]
    assert any("received again, already stopping" in record.getMessage() for record in caplog.records)
    # the handlers are put back: a signal outside training acts as before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()

    train_vae.main(args(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    assert checkpoint_steps(tmp_path / "cut") == [5, 7, 10]
    assert same_weights(tmp_path / "full", tmp_path / "cut", "vae")


def test_a_signal_during_a_periodic_save_stops_after_it_without_saving_twice(tmp_path, monkeypatch, caplog):
    from accelerate import Accelerator

    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands in the save, and is handled in it
        result = original(self, output_dir, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(TrainingStopped):
        train_vae.main(args(tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "3"))
    assert checkpoint_steps(tmp_path) == [3] and no_partial_folders(tmp_path)
    assert (tmp_path / "checkpoints" / "checkpoint-3" / TRAINER_STATE).is_file()
    assert sum(STOPPED in record.getMessage() for record in caplog.records) == 1


def test_a_signal_during_the_final_save_lets_the_output_finish(tmp_path, monkeypatch, caplog):
    original = train_vae.VAETrainer.write_output

    def write_output(self, pipeline, staging):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, pipeline, staging)

    monkeypatch.setattr(train_vae.VAETrainer, "write_output", write_output)
    assert train_vae.main(args(tmp_path, "--max_train_steps", "3")) == str(tmp_path)
    assert (tmp_path / "model_index.json").is_file()
    assert any("the output is complete (SIGTERM was received" in record.getMessage() for record in caplog.records)


def test_the_resume_command_is_the_starting_one_with_resume_from_checkpoint_latest(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "/usr/local/bin/hfgen", "train", "vae", "--output_dir",
                                           "my run", "--overwrite_output_dir", "--num_epochs", "3"])
    assert resume_command("my run", "vae") == ("hfgen train vae --output_dir 'my run' --num_epochs 3 "
                                               "--resume_from_checkpoint latest")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "hfgen.training.train_gan", "--output_dir=out",
                                           "--resume_from_checkpoint", "out/checkpoints/checkpoint-5", "--seed", "1"])
    assert resume_command("out", "gan") == ("python -m hfgen.training.train_gan --output_dir=out --seed 1 "
                                            "--resume_from_checkpoint latest")
    # called from Python: no command line to repeat
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest"])
    assert resume_command("out", "ddpm") == ("hfgen train ddpm --output_dir out <the same flags> "
                                             "--resume_from_checkpoint latest")
    # a torchrun worker: its launcher's command line
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setattr("hfgen.training.preemption.parent_command_line", lambda: [
        "/usr/bin/python3", "/usr/local/bin/accelerate", "launch", "--multi_gpu", "-m", "hfgen.training.train_vae",
        "--output_dir", "out"])
    assert resume_command("out", "vae") == ("accelerate launch --multi_gpu -m hfgen.training.train_vae "
                                            "--output_dir out --resume_from_checkpoint latest")


# ----- real processes --------------------------------------------------------------------------------------


def start(command: list[str], log_path, **env) -> subprocess.Popen:
    """A training process with its output in `log_path`; one torch thread, as this process has (the same sums)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def kill_all(process: subprocess.Popen) -> None:
    """Kills a process and its descendants (a launcher's workers run in sessions of their own)."""
    try:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
    except psutil.NoSuchProcess:
        pass
    process.kill()
    process.wait()


def wait_for(condition, process: subprocess.Popen, log_path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            kill_all(process)
            pytest.fail(f"exit code {process.poll()} before the condition was met:\n{log_path.read_text()[-5000:]}")
        time.sleep(0.02)


def finish(process: subprocess.Popen, log_path, timeout: float = 240) -> tuple[int, str]:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_all(process)
        pytest.fail(f"ran over {timeout} s:\n{log_path.read_text()[-5000:]}")
    return process.returncode, log_path.read_text()


def test_sigint_then_sigterm_and_sigusr1_during_the_save_stop_a_real_process_that_resumes_bit_identically(tmp_path):
    flags = ["--max_train_steps", "400", "--checkpointing_steps", "1000"]
    cut, log_path = tmp_path / "cut", tmp_path / "cut.log"
    command = [sys.executable, "-m", "hfgen.training.train_vae", *args(cut, *flags)]
    process = start(command, log_path)
    wait_for(lambda: "first training step" in log_path.read_text(), process, log_path)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    # more signals, every 2 ms, until the stop is logged: several land while the checkpoint is being written
    for count in itertools.count():
        if STOPPED in log_path.read_text() or process.poll() is not None:
            break
        process.send_signal((signal.SIGTERM, signal.SIGUSR1)[count % 2])
        time.sleep(0.002)
    returncode, log = finish(process, log_path)
    assert returncode == PREEMPTED_EXIT_CODE, log[-5000:]
    lines = [line for line in log.splitlines() if STOPPED in line]
    assert len(lines) == 1 and "SIGINT: stopped at step" in lines[0], log[-5000:]
    assert "received again, already stopping: saving" in log  # handled while the checkpoint was being written
    step = checkpoint_steps(cut)[-1]
    assert checkpoint_steps(cut) == [step] and 0 < step < 400 and no_partial_folders(cut)
    assert lines[0].split("resume with: ", 1)[1] == shlex.join([*command, "--resume_from_checkpoint", "latest"])

    train_vae.main(args(tmp_path / "full", *flags))  # the same run, uninterrupted (in this process)
    train_vae.main(args(cut, *flags, "--resume_from_checkpoint", "latest"))
    assert same_weights(tmp_path / "full", cut, "vae")


def test_a_sigterm_to_the_whole_process_group_stops_the_run_not_its_dataloader_workers(tmp_path):
    """`scancel` signals every process of the job: the DataLoader workers keep serving batches until the training
    process has saved its checkpoint (torch's worker handler would otherwise die of it, and the step with it)."""
    from helpers import write_mixed_folder

    for copy in range(100):  # 600 images: the first epoch, decoded by the workers, lasts a few seconds
        write_mixed_folder(tmp_path / "images" / f"part{copy}")
    flags = ["--train_data_dir", tmp_path / "images", "--resolution", "16", "--num_channels", "3",
             "--dataloader_num_workers", "2", "--architecture", "conv", "--hidden_dims", "8", "16",
             "--train_batch_size", "4", "--max_train_steps", "100000", "--checkpointing_steps", "100000"]
    log_path = tmp_path / "run.log"
    process = start([sys.executable, "-m", "hfgen.training.train_vae", *args(tmp_path / "out", *flags)], log_path)
    wait_for(lambda: "first training step" in log_path.read_text(), process, log_path)
    time.sleep(0.3)
    assert len(psutil.Process(process.pid).children()) == 2  # the workers, in the process group
    os.killpg(process.pid, signal.SIGTERM)
    returncode, log = finish(process, log_path)
    assert returncode == PREEMPTED_EXIT_CODE and "Traceback" not in log, log[-5000:]
    assert sum(STOPPED in line for line in log.splitlines()) == 1
    assert len(checkpoint_steps(tmp_path / "out")) == 1 and no_partial_folders(tmp_path / "out")


# ----- two processes ------------------------------------------------------------------------------------------

TWO_PROCESS_FLAGS = ["--max_train_steps", "300", "--checkpointing_steps", "50", "--hidden_dims", "16"]


def launch_command(output_dir, *extra) -> list[str]:
    from test_multiprocess import free_port

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "hfgen.training.train_vae",
            *args(output_dir, *TWO_PROCESS_FLAGS, *extra)]


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """rank -> worker process of a launcher (they run in sessions of their own)."""
    found = {}
    try:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            rank = child.environ().get("RANK")
            if rank is not None and "hfgen.training.train_vae" in " ".join(child.cmdline()):
                found[int(rank)] = child
    except psutil.Error:  # a process that has just exited
        pass
    return found


def run_two_processes(tmp_path, name: str, *extra, send=None) -> tuple[int, str]:
    """Launches a 2-process run into tmp_path/name; with `send`, calls `send(launcher, workers)` once the run has
    checkpoint-50. Waits for every process to exit; returns (the launcher's exit code, the log)."""
    output_dir, log_path = tmp_path / name, tmp_path / f"{name}.log"
    launcher = start(launch_command(output_dir, *extra), log_path, ACCELERATE_USE_CPU="1")
    wait_for(lambda: len(workers(launcher)) == 2, launcher, log_path)
    ranks = workers(launcher)
    if send:
        wait_for(lambda: (output_dir / "checkpoints" / "checkpoint-50").is_dir(), launcher, log_path)
        send(launcher, ranks)
    returncode, log = finish(launcher, log_path)
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=60)
    for worker in alive:
        worker.kill()
    assert not alive, f"workers still running 60 s after the launcher exited:\n{log[-5000:]}"
    return returncode, log


def assert_stopped_together(output_dir, log: str, cause: str) -> int:
    """One stop line, from rank 0, and one checkpoint written by both processes at the step they stopped at."""
    lines = [line for line in log.splitlines() if STOPPED in line]
    found = re.search(rf"{cause}: stopped at step (\d+) ", lines[0]) if len(lines) == 1 else None
    assert found, log[-5000:]
    step = int(found.group(1))
    assert checkpoint_steps(output_dir)[-1] == step and 50 <= step < 300 and no_partial_folders(output_dir)
    written = set(os.listdir(output_dir / "checkpoints" / f"checkpoint-{step}"))
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= written
    assert "accelerate.commands.launch" in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert not (output_dir / "model_index.json").exists()
    return step


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_processes_at_one_step_with_one_checkpoint(tmp_path):
    returncode, log = run_two_processes(tmp_path, "cut",
                                        send=lambda launcher, ranks: launcher.send_signal(signal.SIGTERM))
    assert returncode == 128 + signal.SIGTERM, log[-5000:]  # accelerate's status after torchrun forwarded the signal
    assert_stopped_together(tmp_path / "cut", log, "SIGTERM to process [01]")  # torchrun forwarded it to both


@pytest.mark.slow
def test_sigusr1_to_one_worker_stops_both_and_the_two_process_run_resumes_bit_identically(tmp_path):
    from test_multiprocess import assert_finished

    _, log = run_two_processes(tmp_path, "cut", send=lambda launcher, ranks: ranks[1].send_signal(signal.SIGUSR1))
    assert_stopped_together(tmp_path / "cut", log, "SIGUSR1 to process 1")

    assert_finished(run_two_processes(tmp_path, "full"), tmp_path / "full", 300)
    resumed = run_two_processes(tmp_path, "cut", "--resume_from_checkpoint", "latest")
    assert_finished(resumed, tmp_path / "cut", 300)
    assert same_weights(tmp_path / "full", tmp_path / "cut", "vae")
