"""Few-step students by reflow (training/train_distill.py): FD of the student at 1, 2 and 4 Euler steps against its
teacher's at the same steps, at 20 Euler steps and with the recipe's DPM-Solver++ at 20, and the distillation's
minutes (drawing the pairs, then training).

The teacher is the README's flow-matching recipe (bench_quality's `hfgen-flow`, trained here unless --teacher names a
folder), on the 4,000 training digits; FD of 1,000 samples in the features of `hfgen:digit-classifier` against the
1,000 test digits, as bench_quality computes it (2 torch threads).

    python benchmarks/bench_distill.py --work /tmp/distill --write
    python benchmarks/bench_distill.py --teacher /tmp/distill/teacher --distill_flags "--num_epochs 20" --write
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import DATA, DIGITS, FD_SOLVER_STEPS, Data, Evaluator, pipeline_sampler, sample_in_batches  # noqa: E402
from common import environment_lines, load_average, markers, start_clock, write_section  # noqa: E402

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")
STEPS = (1, 2, 4)
TEACHER = "hfgen-flow"
# the distillation: 8,000 pairs of the teacher's 20-step DPM-Solver++ samples, then flow matching on them at uniform
# noise levels (screens in figures/distill_screens.json: 4,000 pairs with logit-normal levels for 12 epochs gave 60.9
# at 2 steps, uniform levels for 24 epochs 42.5)
DISTILL_FLAGS = ("--num_steps 2 --num_pairs 8000 --teacher_steps 20 --num_epochs 24 --train_batch_size 32 "
                 "--learning_rate 2e-4 --lr_scheduler cosine --lr_warmup_steps 50 --use_ema --weighting_scheme uniform")
TARGET_RATIO = 1.5  # the student at 2 steps within this factor of the teacher's 20-step FD


def quiet_flags(output_dir: str) -> list[str]:
    return ["--output_dir", output_dir, "--logger", "none", "--save_images_epochs", "0", "--feature_extractor", "none",
            "--checkpointing_steps", str(10 ** 9), "--eval_num_samples", "100"]


def suffix(data: Data) -> str:
    """The data's part of file names and the section key: none for the digits."""
    return "" if data is DIGITS else f"_{data.name}"


def train_teacher(folder: str, data: Data) -> float:
    """The section's flow recipe (bench_quality's, on its data) into `folder`; its minutes."""
    from hfgen.training import train_ddpm

    started = time.time()
    train_ddpm.main([*quiet_flags(folder), *data.flags(TEACHER), *data.recipes[TEACHER][1].split()])
    return (time.time() - started) / 60


def distill(teacher: str, folder: str, flags: str, data: Data) -> dict:
    from hfgen.training.train_distill import DistillTrainer, parse_args

    started = time.time()
    trainer = DistillTrainer(parse_args([*quiet_flags(folder), *data.flags(TEACHER), "--teacher", teacher,
                                         *flags.split()]))
    trainer.train()
    return {"distill_minutes": round((time.time() - started) / 60, 2), "pair_minutes": round(trainer.pair_minutes, 2)}


FIGURE_ROWS = (("teacher", 2), ("student", 2), ("teacher", 20))  # what the figure shows, a row of 12 samples each


def fds(pipeline, evaluator: Evaluator, steps, num_samples: int, solver=None, shown: dict | None = None) -> dict:
    """FD at each step count, with the pipeline's own scheduler (or `solver(scheduler)`); the first samples of
    each count go into `shown`."""
    from hfgen.objectives import dpm_solver

    results = {}
    for count in steps:
        if solver is not None:
            pipeline.scheduler = dpm_solver(pipeline.scheduler)
        samples = sample_in_batches(pipeline_sampler(pipeline, num_inference_steps=count), num_samples)
        results[str(count)] = round(evaluator.fd(samples), 2)
        if shown is not None:
            shown[count] = samples[:12]
    return results


def save_figure(shown: dict, path: str) -> None:
    """Rows of samples (the same seeds): the teacher and the student at 2 Euler steps, the teacher at 20."""
    from diffusers.utils import make_image_grid

    from hfgen.image_processing import postprocess

    images = [image for name, count in FIGURE_ROWS
              for image in postprocess(shown[name][count], "pil", "unit")]
    grid = make_image_grid([image.resize((56, 56)) for image in images], rows=len(FIGURE_ROWS), cols=12)
    grid.save(path)


def measure(teacher_dir: str, student_dir: str, num_samples: int, data: Data) -> dict:
    from hfgen import DDPMPipeline

    evaluator = Evaluator(data)
    teacher, student = (DDPMPipeline.from_pretrained(folder).to("cpu") for folder in (teacher_dir, student_dir))
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    shown = {"teacher": {}, "student": {}}
    row = {"teacher_euler": fds(teacher, evaluator, (*STEPS, 20), num_samples, shown=shown["teacher"]),
           "student_euler": fds(student, evaluator, (*STEPS, 20), num_samples, shown=shown["student"])}
    save_figure(shown, os.path.join(FIGURES, f"distill_samples{suffix(data)}.png"))
    row["teacher_dpm_solver_20"] = fds(DDPMPipeline.from_pretrained(teacher_dir), evaluator, (FD_SOLVER_STEPS,),
                                       num_samples, solver=True)[str(FD_SOLVER_STEPS)]
    return row


def section(row: dict, environment: list[str], data: Data = DIGITS) -> str:
    teacher, student = row["teacher_euler"], row["student_euler"]
    reference = row["teacher_euler"]["20"]
    ratio = student["2"] / reference
    trained = f", trained in {row['teacher_minutes']} min" if row["teacher_minutes"] else ""
    start, end = markers(f"distill{suffix(data)}")
    what = "" if data is DIGITS else f", on the {data.name}: `--data {data.name}`"
    lines = [
        start,
        "## Few-step students (reflow)" + ("" if data is DIGITS else f": {data.name}"),
        "",
        f"`python benchmarks/bench_distill.py`: the flow-matching recipe (`{TEACHER}`{trained}{what}) distilled "
        f"by `hfgen distill` ({row['flags']}): {row['distill_minutes']} min, of which {row['pair_minutes']} drawing "
        f"the pairs. FD of {row['num_samples']} samples in {data.features} against the test split, Euler steps of "
        "the saved FlowMatchEulerDiscreteScheduler; one run.",
        "",
        "| sampler steps | 1 | 2 | 4 | 20 |",
        "| --- | --- | --- | --- | --- |",
        "| teacher | " + " | ".join(str(teacher[str(count)]) for count in (*STEPS, 20)) + " |",
        "| student | " + " | ".join(str(student[str(count)]) for count in (*STEPS, 20)) + " |",
        "",
        f"The teacher with DPM-Solver++ at 20 steps: FD {row['teacher_dpm_solver_20']}. Target: the student at 2 steps "
        f"within {TARGET_RATIO}x of the teacher's 20-step FD ({reference}): {student['2']}, {ratio:.3f}x, "
        f"{'met' if ratio <= TARGET_RATIO else 'missed'}.",
        "",
        "![teacher at 2 Euler steps, student at 2, teacher at 20 (rows; the same seeds)](benchmarks/figures/"
        f"distill_samples{suffix(data)}.png)",
        "",
        *environment,
        end,
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/hfgen-distill", help="Where the teacher and the student are written.")
    parser.add_argument("--teacher", default=None, help="A trained teacher folder (default: train the recipe).")
    parser.add_argument("--distill_flags", default=DISTILL_FLAGS)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", choices=sorted(DATA), default="digits", help="bench_quality's data section.")
    parser.add_argument("--results", default=None, help="default: figures/distill.json (distill_<data>.json)")
    parser.add_argument("--write", action="store_true", help="Write the BENCHMARKS.md section.")
    parser.add_argument("--remeasure", action="store_true", help="Measure the teacher and student of --work again "
                        "(after a sampler change), keeping the last run's training minutes from --results.")
    args = parser.parse_args(argv)
    data = DATA[args.data]
    args.results = args.results or os.path.join(FIGURES, f"distill{suffix(data)}.json")
    _, load_before = start_clock(args.threads)
    teacher_dir, teacher_minutes = args.teacher, None
    student_dir = os.path.join(args.work, "student")
    if args.remeasure:
        with open(args.results, encoding="utf-8") as file:
            last = json.loads(file.read().splitlines()[-1])
        teacher_dir = teacher_dir or os.path.join(args.work, "teacher")
        row = {key: last[key] for key in ("teacher_minutes", "flags", "distill_minutes", "pair_minutes")}
        row["num_samples"] = args.num_samples
    else:
        if teacher_dir is None:
            teacher_dir = os.path.join(args.work, "teacher")
            teacher_minutes = round(train_teacher(teacher_dir, data), 2)
        row = {"teacher_minutes": teacher_minutes, "flags": args.distill_flags, "num_samples": args.num_samples,
               **distill(teacher_dir, student_dir, args.distill_flags, data)}
    row.update(measure(teacher_dir, student_dir, args.num_samples, data))
    print(json.dumps(row), flush=True)
    with open(args.results, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")
    text = section(row, environment_lines("bench_distill.py", args.threads, load_before, load_average()), data)
    print(text)
    if args.write:
        write_section(f"distill{suffix(data)}", text)


if __name__ == "__main__":
    main()
