"""The kill test (issue 30, item 5): a short VAE run killed at random moments with SIGKILL and SIGTERM, in its
training steps, in its checkpoint saves and in its final save, and resumed after every kill with the same command.

1. The reference: the command once, uninterrupted, keeping every checkpoint.
2. The faulted run: the same command with `--resume_from_checkpoint latest` (which starts a new run in an empty
   folder), started again after each fault. --kills faults, drawn from --seed:
     - the signal: SIGKILL (no chance to save; half the faults), SIGTERM (the trainer saves a checkpoint at its step
       and exits with status 75), or SIGTERM twice, the second as soon as the stop's save has begun (it must not
       disturb it); every (signal, moment) in each block of 8 faults;
     - the moment: a training step (once the process's progress bar reaches a random 10-150 steps past where it
       started) or a checkpoint save (as soon as its `checkpoint-N.incomplete` folder appears, plus 0-10 ms).
   Then a SIGKILL in the final save (as soon as `.output.incomplete` appears), and a SIGTERM in the final save of
   the process that resumes after it (which must finish the output and exit 0).
3. After each process: did it resume from the newest complete checkpoint (its log names it; never a partial
   folder) and end without an error of its own; and is every checkpoint it wrote at a step the reference also
   saved bit-identical to the reference's (weights, optimizer state, EMA)? At the end: are the final weights
   bit-identical to the reference's?

Writes the table to benchmarks/figures/faults.md (and with --write into BENCHMARKS.md). About 3 minutes for 20
kills on 2 shared cores (each process spends ~10 s starting): `python benchmarks/bench_faults.py --kills 20`.
"""

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from common import environment_lines, finish, load_average, start_clock
from safetensors.torch import load_file

from hfgen.training.preemption import PREEMPTED_EXIT_CODE
from hfgen.training.trainer import STAGING, TRAINER_STATE, list_checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "figures", "faults.md")
STEPS, EVERY = 1000, 50
# 512-wide layers: 9 MB checkpoints, whose saves last long enough to be hit
FLAGS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none", "--hidden_dims", "512",
         "512", "--latent_dim", "4", "--train_batch_size", "32", "--use_ema", "--eval_importance_samples", "1",
         "--eval_num_samples", "20", "--num_validation_images", "4", "--save_images_epochs", "0", "--logger", "none",
         "--max_train_steps", str(STEPS), "--checkpointing_steps", str(EVERY)]
PROGRESS = re.compile(rf"(\d+)/{STEPS} ")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


def command(output_dir: str, resume: bool) -> list[str]:
    return [sys.executable, "-m", "hfgen.training.train_vae", "--output_dir", output_dir, *FLAGS,
            *(["--resume_from_checkpoint", "latest"] if resume else [])]


def start(argv: list[str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def read(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


def progress(log: str) -> int:
    steps = PROGRESS.findall(log)
    return int(steps[-1]) if steps else -1


def partial_folders(output_dir: str) -> list[str]:
    checkpoints = os.path.join(output_dir, "checkpoints")
    found = [name for name in os.listdir(checkpoints) if name.endswith(".incomplete")] if os.path.isdir(
        checkpoints) else []
    return found + ([STAGING] if os.path.isdir(os.path.join(output_dir, STAGING)) else [])


def step_of(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[1])


def newest_step(output_dir: str) -> int | None:
    checkpoints = list_checkpoints(os.path.join(output_dir, "checkpoints"))
    return step_of(checkpoints[-1]) if checkpoints else None


def wait_until(condition, process: subprocess.Popen, poll: float = 0.001) -> bool:
    """Polls `condition` until it holds (True) or the process exits (False)."""
    while process.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def written_since(path: str, since: float) -> bool:
    """Whether the folder `path` exists and was written by the process launched at `since` (not left by a kill)."""
    try:
        return os.stat(path).st_mtime >= since
    except FileNotFoundError:
        return False


def inject(process: subprocess.Popen, fault: tuple[str, str], output_dir: str, log_path: str, launched: float,
           rng) -> str:
    """Waits for the fault's moment and sends its signal(s); returns what happened ("step N", "saving ...")."""
    kind, moment = fault
    if moment == "step":
        started = {"step": None}

        def reached():
            step = progress(read(log_path))
            if started["step"] is None and step >= 0:
                started["step"] = step
                started["target"] = step + rng.randint(10, 150)
            return started["step"] is not None and step >= min(started["target"], STEPS)

        hit = wait_until(reached, process, poll=0.005)
        where = f"step {progress(read(log_path))}" if hit else None
    elif moment == "checkpoint save":
        checkpoints = os.path.join(output_dir, "checkpoints")
        hit = wait_until(lambda: os.path.isdir(checkpoints) and any(
            name.endswith(".incomplete") and written_since(os.path.join(checkpoints, name), launched)
            for name in os.listdir(checkpoints)), process)
        where = f"saving {', '.join(partial_folders(output_dir))}" if hit else None
        time.sleep(rng.uniform(0, 0.01))
    else:  # the final save
        hit = wait_until(lambda: written_since(os.path.join(output_dir, STAGING), launched), process)
        where = "in the final save" if hit else None
    if not hit:
        return "exited before the fault"
    process.send_signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
    if kind == "SIGTERM x2":  # the second one while the stop's checkpoint is being written (if it needs one)
        wait_until(lambda: partial_folders(output_dir) or "stopped at step" in read(log_path), process)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    return where


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def same_checkpoint(folder: str, reference: str) -> bool:
    """Weights, optimizer state and EMA bit-identical (the files' tensors, not their bytes)."""
    if not same_tensors(load_file(os.path.join(folder, "model.safetensors")),
                        load_file(os.path.join(reference, "model.safetensors"))):
        return False
    return all(same_tensors(torch.load(os.path.join(folder, name), weights_only=False),
                            torch.load(os.path.join(reference, name), weights_only=False))
               for name in ("optimizer.bin", "custom_checkpoint_0.pkl"))


def same_final_weights(output_dir: str, reference_dir: str) -> bool:
    path = os.path.join("vae", "diffusion_pytorch_model.safetensors")
    return same_tensors(load_file(os.path.join(output_dir, path)), load_file(os.path.join(reference_dir, path)))


def checkpoints_written_since(output_dir: str, since: float) -> list[str]:
    return [path for path in list_checkpoints(os.path.join(output_dir, "checkpoints"))
            if os.path.getmtime(os.path.join(path, TRAINER_STATE)) >= since]


def expected_status(fault, where: str) -> int:
    """SIGKILL: killed (-9); SIGTERM: 75 after its checkpoint, or 0 in the final save, which it lets finish."""
    if fault is None or where == "exited before the fault" or fault[1] == "final save" and fault[0] != "SIGKILL":
        return 0
    return -signal.SIGKILL if fault[0] == "SIGKILL" else PREEMPTED_EXIT_CODE


def faults(kills: int, rng) -> list[tuple[str, str]]:
    """Shuffled blocks of every (signal, moment), SIGKILL twice as often; then the two faults of the final save."""
    combinations = [(kind, moment) for kind in ("SIGKILL", "SIGKILL", "SIGTERM", "SIGTERM x2")
                    for moment in ("step", "checkpoint save")]
    drawn = []
    while len(drawn) < kills - 2:
        drawn += rng.sample(combinations, len(combinations))
    return [*drawn[:kills - 2], ("SIGKILL", "final save"), ("SIGTERM", "final save")]


def run(args) -> str:
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="bench-faults-")
    reference_dir, output_dir = os.path.join(work, "reference"), os.path.join(work, "faulted")
    began = time.perf_counter()
    reference = start(command(reference_dir, resume=False), os.path.join(work, "reference.log"))
    if reference.wait() != 0:
        raise SystemExit(f"the reference run failed:\n{read(os.path.join(work, 'reference.log'))[-3000:]}")
    reference_seconds = time.perf_counter() - began
    reference_steps = {step_of(path): path for path in list_checkpoints(os.path.join(reference_dir, "checkpoints"))}

    rows, schedule = [], faults(args.kills, rng)
    for index in range(len(schedule) + 1):
        fault = schedule[index] if index < len(schedule) else None
        newest = newest_step(output_dir)
        log_path = os.path.join(work, f"process-{index}.log")
        launched = time.time()
        process = start(command(output_dir, resume=True), log_path)
        where = inject(process, fault, output_dir, log_path, launched, rng) if fault else "no fault"
        status = process.wait()
        log = read(log_path)
        # the resume: from the newest complete checkpoint (or a new run without one), and no error of its own
        resumed = RESUMED.search(log)
        resumed_step = int(resumed.group(2)) if resumed else None
        resume_ok = resumed_step == newest and "Traceback" not in log
        compared = [path for path in checkpoints_written_since(output_dir, launched)
                    if step_of(path) in reference_steps]
        identical = [same_checkpoint(path, reference_steps[step_of(path)]) for path in compared]
        rows.append({
            "fault": f"{fault[0]} in {'a ' if fault[1] != 'final save' else 'the '}{fault[1]}" if fault else "none",
            "where": where, "status": status, "expected": expected_status(fault, where),
            "newest": newest_step(output_dir), "partial": partial_folders(output_dir),
            "resumed": "new run" if resumed_step is None and newest is None else resumed_step, "resume_ok": resume_ok,
            "compared": len(compared), "identical": all(identical) if identical else None,
        })
        print(f"{index}: {rows[-1]}", file=sys.stderr)
        if status == 0:
            break
    final_identical = os.path.isfile(os.path.join(output_dir, "model_index.json")) and same_final_weights(
        output_dir, reference_dir)
    shutil.rmtree(work, ignore_errors=True)
    return report(rows, final_identical, reference_seconds, time.perf_counter() - began)


def report(rows, final_identical: bool, reference_seconds: float, seconds: float) -> str:
    kills = [row for row in rows if row["fault"] != "none" and row["where"] != "exited before the fault"]
    resumes = rows[1:]  # every process after the first resumed
    checked = [row for row in resumes if row["identical"] is not None]
    lines = [
        "| process | fault | when it landed | exit status (expected) | newest checkpoint after | partial folder left | "
        "resumed from step | resume ok | its checkpoints vs the reference's |",
        "| ---: | --- | --- | --- | ---: | --- | ---: | --- | --- |",
    ]
    for index, row in enumerate(rows):
        compared = (f"{row['compared']} bit-identical" if row["identical"] else
                    f"{row['compared']} compared, DIFFERENT" if row["identical"] is False else "none written")
        status = f"{row['status']}" + ("" if row["status"] == row["expected"] else f" (NOT {row['expected']})")
        lines.append(f"| {index} | {row['fault']} | {row['where']} | {status} | {row['newest']} | "
                     f"{', '.join(row['partial']) or 'none'} | {row['resumed'] if index else 'new run'} | "
                     f"{'yes' if row['resume_ok'] else 'NO'} | {compared} |")
    summary = (f"{len(kills)} faults ({sum('SIGKILL' in row['fault'] for row in kills)} SIGKILL, "
               f"{sum('SIGTERM' in row['fault'] for row in kills)} SIGTERM; "
               f"{sum('save' in row['fault'] for row in kills)} of them in a save); "
               f"exit statuses as expected: {sum(row['status'] == row['expected'] for row in rows)} of {len(rows)}; "
               f"resumes that succeeded: {sum(row['resume_ok'] for row in resumes)} of {len(resumes)}; "
               f"resumes whose checkpoints were bit-identical to the reference's: "
               f"{sum(bool(row['identical']) for row in checked)} of {len(checked)} that wrote one at a reference "
               "step; "
               f"final weights bit-identical to the uninterrupted run's: {'yes' if final_identical else 'NO'}. "
               f"Reference run {reference_seconds:.0f} s; whole benchmark {seconds:.0f} s.")
    return "\n".join([*lines, "", summary])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="Faults injected (the last two in the final save).")
    parser.add_argument("--seed", type=int, default=0, help="Draws the faults and their moments.")
    parser.add_argument("--write", action="store_true", help="Also write the section into BENCHMARKS.md.")
    args = parser.parse_args()
    if args.kills < 3:
        raise SystemExit("--kills must be >= 3 (the last two are in the final save)")
    started, load_before = start_clock()
    table = run(args)
    text = "\n".join([
        "<!-- faults:start -->",
        "## Killed and resumed (issue 30: preemption and the kill test)",
        "",
        f"A {STEPS}-step VAE run on the 8 px digits (`{' '.join(FLAGS)}`) killed again and again, and resumed after "
        "each kill with the same command and `--resume_from_checkpoint latest` (benchmarks/bench_faults.py). A process "
        "\"resume ok\" started from the newest complete checkpoint and ended without an error of its own; its "
        "checkpoints are compared with the uninterrupted run's at the same step (weights, AdamW state, EMA).",
        "",
        table,
        "",
        *environment_lines("bench_faults.py", 1, load_before, load_average()),  # OMP_NUM_THREADS=1 in each run
        "<!-- faults:end -->",
    ])
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as file:
        file.write(text + "\n")
    finish("faults", text, args.write, started)


if __name__ == "__main__":
    main()
