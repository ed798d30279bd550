"""What the side-by-side benchmarks (bench_vae.py, bench_gan.py) share.

Each benchmark trains the same model with hfgen's trainer ("hfgen") and with a plain PyTorch loop written
in the benchmark ("plain"), alternately, and writes one marked section of BENCHMARKS.md:

  - `run_alternately`: the runs in the order plain, hfgen, hfgen, plain, ... (a linear drift of the
    machine's speed cancels over each pair of rounds), the same `torch.set_num_threads` for both, the
    per-epoch times with each run's first (warm-up) epoch dropped, and an evaluation of each seed's first
    round;
  - `timing_summary`, `timing_cells`, `ratio_sentence`: medians, fastest epochs and the hfgen / plain ratio;
  - `environment_lines`: the command, date, torch version, thread count, CPU and load average;
  - `write_section`: replaces the text between `<!-- key:start -->` and `<!-- key:end -->` (or appends it).
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
TARGET_RATIO = 1.10
TRAINERS = ("plain", "hfgen")


def benchmark_parser(description: str, rounds: int = 2) -> argparse.ArgumentParser:
    """The flags every benchmark shares: --rounds, --threads, --write; each script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds, help="Timed runs of each trainer (alternating).")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for everything.")
    parser.add_argument("--write", action="store_true", help=f"Write the results into {os.path.basename(BENCHMARKS_MD)}.")
    return parser


def check_positive(args, names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")


def start_clock(threads: int | None = None) -> tuple[float, float]:
    """A benchmark's start: (time.perf_counter(), the load average before it); sets torch's threads when given."""
    if threads is not None:
        torch.set_num_threads(threads)
    return time.perf_counter(), load_average()


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str, dpi: int = 80) -> None:
    """Writes `figure` to `path` (making its folder) and frees it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def load_average() -> float:
    """The 1-minute load average (other processes share the cores)."""
    return os.getloadavg()[0]


def timed_epochs(epoch_seconds: list[float]) -> list[float]:
    """All epochs but the first (warm-up), or the only one."""
    return epoch_seconds[1:] or epoch_seconds


def run_alternately(train, evaluate, *, seeds: int, rounds: int, epochs: int, threads: int):
    """Trains with both trainers, alternately, and evaluates each seed's first model of each.

    train: {"plain": f, "hfgen": f}, f(seed, output_dir) -> (model, per-epoch seconds of `epochs` epochs);
        output_dir is an empty temporary folder, removed after the run (load what it holds before returning).
    evaluate: f(name, model, seed) -> metrics, for round 0 of each seed.

    Returns (seconds, run_medians, metrics), each {name: list}: the timed epochs of every run (first epoch
    dropped), the median of each run, and the metrics of each seed.
    """
    seconds = {name: [] for name in TRAINERS}
    run_medians = {name: [] for name in TRAINERS}
    metrics = {name: [] for name in TRAINERS}
    for seed in range(seeds):
        for round_index in range(rounds):
            order = TRAINERS if (seed * rounds + round_index) % 2 == 0 else TRAINERS[::-1]
            for name in order:
                torch.set_num_threads(threads)
                with tempfile.TemporaryDirectory() as output_dir:
                    model, epoch_seconds = train[name](seed, output_dir)
                if torch.get_num_threads() != threads:
                    raise RuntimeError(f"{name} changed torch's thread count to {torch.get_num_threads()}")
                if len(epoch_seconds) != epochs:
                    raise RuntimeError(f"{name} ran {len(epoch_seconds)} epochs, not {epochs}")
                timed = timed_epochs(epoch_seconds)
                seconds[name] += timed
                run_medians[name].append(statistics.median(timed))
                print(f"seed {seed} round {round_index} {name}: median {run_medians[name][-1]:.4f} s/epoch "
                      f"(epochs: {', '.join(f'{s:.3f}' for s in epoch_seconds)})", file=sys.stderr, flush=True)
                if round_index == 0:
                    start = time.perf_counter()
                    metrics[name].append(evaluate(name, model, seed))
                    print(f"  {name} seed {seed}: {metrics[name][-1]} ({time.perf_counter() - start:.0f} s)",
                          file=sys.stderr, flush=True)
    return seconds, run_medians, metrics


def timing_summary(seconds: dict, run_medians: dict) -> dict:
    """Medians and fastest epochs of both trainers, and the hfgen / plain ratios of each."""
    median = {name: statistics.median(times) for name, times in seconds.items()}
    fastest = {name: min(times) for name, times in seconds.items()}
    return {
        "median": median,
        "fastest": fastest,
        "run_medians": run_medians,
        "ratio": median["hfgen"] / median["plain"],
        "fastest_ratio": fastest["hfgen"] / fastest["plain"],
    }


TIMING_HEADER = "median s/epoch | per-run medians (s) | fastest epoch (s)"


def timing_cells(timing: dict, name: str, digits: int = 4) -> str:
    """The three timing cells of a table row, matching TIMING_HEADER."""
    runs = ", ".join(f"{s:.{digits}f}" for s in timing["run_medians"][name])
    return f"{timing['median'][name]:.{digits}f} | {runs} | {timing['fastest'][name]:.{digits}f}"


def ratio_sentence(timing: dict) -> str:
    ratio = timing["ratio"]
    return (
        f"**hfgen / plain seconds per epoch: {ratio:.3f}** (target ≤ {TARGET_RATIO:.2f}: "
        f"{'met' if ratio <= TARGET_RATIO else 'not met'}). Fastest epochs: {timing['fastest_ratio']:.3f}."
    )


def mean_sd(values, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment_lines(script: str, threads: int, load_before: float, load_after: float) -> list[str]:
    """The command, the software and machine, and the load average, as markdown bullets."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    cpu = cpu_model()
    return [
        f"- command: `{command.strip()}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"`torch.set_num_threads({threads})`; {cpu} ({os.cpu_count()} cores); Python {platform.python_version()}",
        f"- 1-minute load average before / after the run: {load_before:.2f} / {load_after:.2f} "
        "(other processes share these cores: compare the per-run medians and the fastest epochs)",
    ]


def markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def write_section(key: str, text: str, path: str = BENCHMARKS_MD) -> None:
    """Replaces the section between the markers of `key` in `path`, or appends it; `text` includes the markers."""
    start, end = markers(key)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            content = file.read()
    else:
        content = "# hfgen benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(content):
        content = pattern.sub(lambda _: text, content)
    else:
        content = content.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w", encoding="utf-8") as file:
        file.write(content)


def finish(key: str, text: str, write: bool, started: float) -> None:
    """Prints the section, and writes it into BENCHMARKS.md with --write."""
    print(text)
    print(f"(whole benchmark: {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if write:
        write_section(key, text)
        print(f"wrote {BENCHMARKS_MD}", file=sys.stderr)
