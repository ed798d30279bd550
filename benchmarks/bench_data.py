"""The data path on image folders of 4k-64k files: hfgen's streamed folders vs a diffusers-example loader vs the
old in-memory path.

It writes its own folders of synthetic 64 px RGB PNGs (smooth random gradients and blobs with a little noise,
about 6 KB a file, as small photos compress; 4 class sub-folders) into --work_dir, reused when present (the
first run writes the 64k files, 1.5-2.5 min on 2 shared cores, and hard-links the smaller folders to them).
Then, for each --sizes N, in one run:

  1. Start-up, one fresh process per measurement, timed from the moment it is launched:
     - hfgen: the real CLI, `hfgen train ddpm --train_data_dir DIR --resolution 64 --random_flip
       --dataloader_num_workers 2 --max_train_steps 1 --logger none --save_images_epochs 0 --feature_extractor none
       --eval_vlb_num_images 0 --checkpointing_steps 1000000`; the first step begins when the trainer logs
       "first training step ... after the start", and ends when its progress bar shows 1/1 (the process is
       then killed: what follows is the final sample grid and the saved folder);
     - reference: a script in the style of diffusers' examples/unconditional_image_generation/
       train_unconditional.py: `datasets.load_dataset("imagefolder", data_dir=DIR, split="train")`,
       `with_transform` of Resize(64) + RandomCrop(64) + RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5])
       (written with PIL and numpy: torchvision is not installed), `DataLoader(shuffle=True, num_workers=2)`,
       Accelerator.prepare, then the same UNet2DModel, one step. Run twice: with an empty `datasets` cache
       (the first run on a folder builds its Arrow cache; stopped when its first step begins) and again with
       that cache (the number compared);
     - hfgen before (only at --old_sizes): the in-memory path of f307595, copied below (its
       `load_image_dataset` on a folder: `load_dataset("imagefolder")`, then every image of the train and of the
       held-out test split decoded into one float32 tensor, both up front as the old trainer did), then the same
       model and step.
     Memory: the launched process's VmHWM (its exact peak RSS, from /proc), the peak of the summed RSS of the
     process and its DataLoader workers (polled every 50 ms; it counts pages the forked workers share with
     the process once per process, so it overstates), and the peak of their summed PSS (polled every 1 s;
     shared pages split between the processes: what they take from the machine). Each also at the moment
     the first step begins (the data path and the model, before the step's activations).
  2. Loader alone (no model), images/s with 0 and 2 workers: 2 batches of 64 of warm-up (worker start), then
     --batches batches timed, for hfgen (`open_image_source(None, train_data_dir=DIR).dataset("train", 64,
     augment=True, random_flip=True)` + `training_dataloader`) and for the reference loader above, twice in the
     order hfgen, reference, reference, hfgen. Each dataset is made once per size in this process (its seconds
     are recorded: hfgen's listing vs load_dataset with a warm cache) and every loader is a new DataLoader on it.
  3. DDPM training steps fed by each loader (0 and 2 workers) against the same step on in-memory tensors
     (a pool of 4 decoded batches, indexed by a random permutation each step): train_ddpm.py's default U-Net
     (widths 32 64 64, 1 layer per block, DownBlock2D / UpBlock2D, 8 groups), batch 64, epsilon prediction,
     DDPMScheduler(1000), fused AdamW lr 1e-3, one model for all. The five feeds (in memory, hfgen with 0 and
     2 workers, the reference with 0 and 2) are opened together, each loader's first batch taken (worker start),
     then --steps rounds of one step from each feed in turn, the order reversed every other round: the shared
     machine's changing speed falls on all five alike. A worker that hands over a batch decodes the next one
     during the following step, so the workers compete with the step as in training. A step is timed from
     asking for the batch to the end of the optimizer step; the wait for the batch and the workers' CPU seconds
     (psutil) are recorded too; ratio: each step / the in-memory step of its round, median.

Targets (reported as met or not, with the measured numbers): the run's peak RSS grows by at most 10% from 4k to
64k images; at most 15 s from process start to the first step at 64k; a loader-fed step takes at most 1.05x the
in-memory step. Recorded: whether a 64 px RGB run on 64k images fits in 4 GiB (process + workers).

    python benchmarks/bench_data.py --quick           # 4k images only, 1 round of steps: 2-4 min, writes nothing
    python benchmarks/bench_data.py --write           # the recorded run (~21 min with the folders already written):
                                                      # the data section of BENCHMARKS.md,
                                                      # benchmarks/figures/data_path.png and data_path.json
    python benchmarks/bench_data.py --report_only --write   # the same from WORK_DIR/bench_data.json, no measuring

Runs with `torch.set_num_threads(1)` by default (--threads; the CLI and the child processes get
OMP_NUM_THREADS): on 2 shared cores two threads wait for each other (see the ddpm section). Progress goes to
stderr, the section to stdout; the raw results always go to WORK_DIR/bench_data.json.
"""

import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURE = os.path.join(HERE, "figures", "data_path.png")
FIGURE_LINK = "benchmarks/figures/data_path.png"  # relative to BENCHMARKS.md
RESULTS_JSON = os.path.join(HERE, "figures", "data_path.json")
SMALL_RESULTS_JSON = os.path.join(HERE, "figures", "data_small_folders.json")
KEY = "data"  # the section <!-- data:start --> ... <!-- data:end --> of BENCHMARKS.md
SIZES = (4000, 16000, 64000)
RESOLUTION, BATCH_SIZE, WIDTHS, LAYERS, TIMESTEPS, LEARNING_RATE = 64, 64, (32, 64, 64), 1, 1000, 1e-3
NUM_CLASSES = 4
STARTUP_WORKERS = 2
GIB = 1024 ** 3
MB = 1e6
TARGET_RSS_GROWTH, TARGET_FIRST_STEP_S, TARGET_STEP_RATIO, FIT_BYTES = 0.10, 15.0, 1.05, 4 * GIB
FIRST_STEP_LINE = b"first training step"  # hfgen's trainer log line; the child scripts print the same words
STEP_DONE = {"hfgen": b"| 1/1 [", "reference": b"first step done", "old": b"first step done"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- synthetic image folders ----------------------------------------------------------------------------------


def make_image(index: int):
    """A 64 px RGB image: a random two-colour gradient under 2-5 soft coloured blobs, plus a little noise."""
    import numpy as np

    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) / (RESOLUTION - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = low + (high - low) * t[..., None]
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(0, 1, 2)
        width = rng.uniform(0.05, 0.3)
        weight = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width * width))[..., None]
        image = image * (1 - weight) + rng.uniform(0, 255, 3) * weight
    image += rng.normal(0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def image_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"class_{index % NUM_CLASSES}", f"{index:06d}.png")


def _write_images(task):
    import PIL.Image

    folder, start, stop = task
    for index in range(start, stop):
        PIL.Image.fromarray(make_image(index)).save(image_path(folder, index))
    return stop - start


def write_folder(work_dir: str, size: int, source: str | None) -> str:
    """WORK_DIR/images-N (images 0..N-1; hard links to a larger folder's files where possible), reused if present."""
    folder = os.path.join(work_dir, f"images-{size}")
    if os.path.isdir(folder):
        return folder
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for k in range(NUM_CLASSES):
        os.makedirs(os.path.join(partial, f"class_{k}"))
    start = time.perf_counter()
    linked = False
    if source is not None:  # image i is the same file in every folder
        try:
            for index in range(size):
                os.link(image_path(source, index), image_path(partial, index))
            linked = True
        except OSError:
            shutil.rmtree(partial)
            for k in range(NUM_CLASSES):
                os.makedirs(os.path.join(partial, f"class_{k}"))
    if not linked:
        import multiprocessing

        chunk = 1000
        tasks = [(partial, s, min(s + chunk, size)) for s in range(0, size, chunk)]
        with multiprocessing.get_context("fork").Pool(max(1, min(2, os.cpu_count() or 1))) as pool:
            for _ in pool.imap_unordered(_write_images, tasks):
                pass
    os.rename(partial, folder)  # complete folders only
    seconds = time.perf_counter() - start
    with open(folder + ".json", "w") as file:  # how it was written, for the report of a later run reusing it
        json.dump({"seconds": seconds, "hard_links": linked, "load": os.getloadavg()[0]}, file)
    log(f"wrote {folder} ({'hard links' if linked else 'PNG files'}, {seconds:.0f} s)")
    return folder


def folder_bytes(folder: str) -> int:
    return sum(entry.stat().st_size for sub in os.scandir(folder) for entry in os.scandir(sub.path))


# ----- the model and one training step (shared by every measurement) ---------------------------------------------


def build_unet(seed: int = 0):
    """The UNet2DModel of train_ddpm.py's defaults for 3x64x64 images."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=WIDTHS, layers_per_block=LAYERS,
        down_block_types=("DownBlock2D",) * len(WIDTHS), up_block_types=("UpBlock2D",) * len(WIDTHS),
        norm_num_groups=min(8, WIDTHS[0]),
    )


def ddpm_step(model, optimizer, scheduler, clean_images) -> None:
    """One epsilon-prediction step on images in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(0, TIMESTEPS, (clean_images.shape[0],), device=clean_images.device)
    noisy_images = scheduler.add_noise(clean_images, noise, timesteps)
    loss = F.mse_loss(model(noisy_images, timesteps).sample.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----- the reference loader, after diffusers' train_unconditional.py -----------------------------------------------


class DiffusersStyleTransform:
    """torchvision's Compose([Resize(r, BILINEAR), RandomCrop(r), RandomHorizontalFlip(), ToTensor(),
    Normalize([0.5], [0.5])]) on `examples["image"]`, written with PIL and numpy; returns {"input": [tensors]}."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def augment(self, image):
        import numpy as np
        import PIL.Image
        import torch

        size = self.resolution
        image = image.convert("RGB")
        width, height = image.size
        if min(width, height) != size:  # Resize(int): the shorter side becomes `size`
            scale = size / min(width, height)
            new = (size, int(height * scale)) if width <= height else (int(width * scale), size)
            image = image.resize(new, resample=PIL.Image.BILINEAR)
        width, height = image.size
        left, top = np.random.randint(0, width - size + 1), np.random.randint(0, height - size + 1)  # RandomCrop
        if (width, height) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            array = array[:, ::-1]
        pixels = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div(255)  # ToTensor
        return (pixels - 0.5) / 0.5  # Normalize([0.5], [0.5])

    def __call__(self, examples):
        return {"input": [self.augment(image) for image in examples["image"]]}


def reference_dataset(folder: str, cache_dir: str | None = None):
    """The dataset of diffusers' unconditional example: imagefolder + with_transform."""
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=folder, split="train", cache_dir=cache_dir)
    return dataset.with_transform(DiffusersStyleTransform(RESOLUTION))


def reference_dataloader(dataset, num_workers: int, seed: int = 0):
    """The example's loader: a shuffled DataLoader over the dataset (default collate: {"input": (B, 3, H, W)})."""
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed))


def hfgen_dataset(folder: str, seed: int = 0):
    """hfgen's training dataset of a folder: listed, not decoded; random crop and flip seeded per sample."""
    from hfgen.data import open_image_source

    source = open_image_source(None, train_data_dir=folder)
    dataset = source.dataset("train", RESOLUTION, augment=True, random_flip=True, seed=seed)
    dataset.set_epoch(0)
    return dataset


def hfgen_dataloader(dataset, num_workers: int, seed: int = 0):
    from hfgen.data import training_dataloader

    return training_dataloader(dataset, BATCH_SIZE, seed, num_workers)


def batch_images(name: str, batch):
    """A loader's batch -> images in [-1, 1]."""
    return batch["input"] if name == "reference" else batch[0] * 2 - 1


# ----- the old in-memory path, as hfgen.data.load_image_dataset was at f307595 -----------------------------------


def old_load_folder(train_data_dir: str, split: str, resolution: int):
    """f307595's `_load_hf` for a folder: imagefolder, a 20% held-out test split, every image decoded into one
    float32 (N, C, H, W) tensor in [0, 1]. Returns (images, labels)."""
    import datasets
    import numpy as np
    import torch

    splits = datasets.load_dataset("imagefolder", data_dir=train_data_dir)
    if "test" in splits:
        data = splits[split]
    else:
        data = splits["train"].train_test_split(test_size=0.2, seed=0)[split]
    num_channels = 1 if data[0]["image"].mode in ("L", "1", "I", "I;16") else 3
    mode = {1: "L", 3: "RGB"}[num_channels]

    def to_array(image):
        image = image.convert(mode).resize((resolution, resolution), resample=2)  # bilinear
        return np.asarray(image, dtype=np.float32).reshape(resolution, resolution, num_channels)

    images = torch.from_numpy(np.stack([to_array(im) for im in data["image"]]) / 255.0).permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(data["label"], dtype=torch.long)


class _OldWholeBatches:
    """f307595's whole-batch view of the in-memory images for the DataLoader."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        import torch

        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _already_collated(batch):
    return batch


# ----- child processes: the reference script and the old path, each set up and stepped once ---------------------


def child_main(argv) -> None:
    """`bench_data.py child reference|old FOLDER WORKERS THREADS [CACHE_DIR]`: set up, announce the first step on
    stderr, take it, announce its end, then wait to be stopped (the parent reads the memory before stopping it)."""
    mode, folder, workers, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    cache_dir = argv[4] if len(argv) > 4 else None
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    torch.set_num_threads(threads)
    accelerator = Accelerator()
    if mode == "reference":
        loader = reference_dataloader(reference_dataset(folder, cache_dir), workers)
        model = build_unet()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)  # as the example: torch's default
    else:
        train_images, train_labels = old_load_folder(folder, "train", RESOLUTION)
        old_load_folder(folder, "test", RESOLUTION)  # the old trainer decoded its test split up front too
        loader = torch.utils.data.DataLoader(
            _OldWholeBatches(train_images, train_labels), batch_size=BATCH_SIZE, shuffle=True, drop_last=True,
            collate_fn=_already_collated, num_workers=workers, generator=torch.Generator().manual_seed(0))
        model = build_unet()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)  # as hfgen's trainer
    scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        print("first training step", file=sys.stderr, flush=True)
        images = batch["input"] if mode == "reference" else batch[0] * 2 - 1
        ddpm_step(model, optimizer, scheduler, images)
        print("first step done", file=sys.stderr, flush=True)
        break
    time.sleep(600)


# ----- measuring a launched process: time to the first step, peak memory -----------------------------------------


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pss_uss_bytes(pid: int) -> tuple[int, int]:
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1]) * 1024
    return values.get("Pss", 0), values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by the process, and by it plus its live children."""
    import psutil

    try:
        main = psutil.Process(pid)
        own = sum(main.cpu_times()[:2])
        children = 0.0
        for child in main.children(recursive=True):
            try:
                children += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return own, own + children
    except psutil.Error:
        return float("nan"), float("nan")


def measure_process(command, done_pattern: bytes | None, env: dict, timeout_s: float, log_path: str) -> dict:
    """Launches `command`, returns seconds from the launch to the first-step line (and to `done_pattern`), the peak
    memory figures, and the same at the first step. `done_pattern` None: stopped when the first step begins."""
    import psutil

    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    events = {}
    finished = threading.Event()
    output = bytearray()

    def read():
        while True:
            chunk = os.read(process.stderr.fileno(), 65536)
            now = time.time()
            if not chunk:
                break
            tail = bytes(output[-200:]) + chunk
            output.extend(chunk)
            if "first" not in events and FIRST_STEP_LINE in tail:
                events["first"] = now
                events["vmhwm_first"] = _status_kb(process.pid, "VmHWM") * 1024
                events["cpu_first"] = _cpu_seconds(process.pid)
                if done_pattern is None:
                    finished.set()
            if done_pattern is not None and "done" not in events and done_pattern in tail:
                events["done"] = now
                finished.set()
        finished.set()

    peaks = {"tree_rss": 0, "tree_pss": 0, "tree_rss_first": None, "tree_pss_first": None, "workers_uss": {}}

    def poll():
        last_pss = 0.0
        while not finished.is_set():
            try:
                main = psutil.Process(process.pid)
                procs = [main, *main.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
                peaks["tree_rss"] = max(peaks["tree_rss"], rss)
                if "first" not in events:
                    peaks["tree_rss_first"] = max(peaks["tree_rss_first"] or 0, rss)
                if time.time() - last_pss >= 1.0:
                    last_pss = time.time()
                    pss = 0
                    for p in procs:
                        p_pss, p_uss = _pss_uss_bytes(p.pid)
                        pss += p_pss
                        if p.pid != process.pid:
                            peaks["workers_uss"][p.pid] = max(peaks["workers_uss"].get(p.pid, 0), p_uss)
                    peaks["tree_pss"] = max(peaks["tree_pss"], pss)
                    if "first" not in events:
                        peaks["tree_pss_first"] = max(peaks["tree_pss_first"] or 0, pss)
            except (psutil.Error, OSError):
                pass
            finished.wait(0.05)

    reader, poller = threading.Thread(target=read, daemon=True), threading.Thread(target=poll, daemon=True)
    reader.start()
    poller.start()
    finished.wait(timeout_s)
    result = {"command": " ".join(map(str, command))}
    try:
        result["vmhwm"] = _status_kb(process.pid, "VmHWM") * 1024  # the exact peak RSS of the launched process
        children = psutil.Process(process.pid).children(recursive=True)
        result["num_children"] = len(children)
        result["children_vmhwm"] = [_status_kb(c.pid, "VmHWM") * 1024 for c in children]
    except (psutil.Error, OSError):
        result["vmhwm"] = None
    finished.set()
    poller.join()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the process and its workers (their own process group)
    except ProcessLookupError:
        pass
    process.wait()
    reader.join(timeout=5)
    with open(log_path, "wb") as file:
        file.write(bytes(output))
    if "first" not in events:
        tail = bytes(output[-3000:]).decode(errors="replace")
        raise RuntimeError(f"no first step within {timeout_s:.0f} s (exit {process.returncode}): {command}\n{tail}")
    if done_pattern is not None and "done" not in events:
        raise RuntimeError(f"the first step did not end within {timeout_s:.0f} s: {command}")
    result.update(
        first_step_s=events["first"] - started,
        step_end_s=events["done"] - started if "done" in events else None,
        vmhwm_first=events["vmhwm_first"],
        cpu_first_s=events["cpu_first"][0], tree_cpu_first_s=events["cpu_first"][1],
        tree_rss=peaks["tree_rss"], tree_rss_first=peaks["tree_rss_first"],
        tree_pss=peaks["tree_pss"], tree_pss_first=peaks["tree_pss_first"],
        workers_uss=sorted(peaks["workers_uss"].values()),
    )
    result["workers_bound"] = (result["vmhwm"] or 0) + sum(result["workers_uss"])  # RSS + workers' own pages
    text = bytes(output).decode(errors="replace")
    reported = re.search(r"first training step ([0-9.]+) s after the start", text)
    if reported:  # hfgen's own count, from the Trainer's construction
        result["trainer_reported_s"] = float(reported.group(1))
    return result


def hfgen_executable() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "hfgen")  # the entry-point script, not a pyenv shim
    return [beside] if os.path.isfile(beside) else [shutil.which("hfgen") or "hfgen"]


def startup_runs(args, folder: str, size: int, env: dict) -> dict:
    runs_dir = os.path.join(args.work_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    results = {}
    output_dir = os.path.join(runs_dir, f"hfgen-{size}")
    shutil.rmtree(output_dir, ignore_errors=True)
    hfgen_command = [
        *hfgen_executable(), "train", "ddpm", "--train_data_dir", folder, "--resolution", str(RESOLUTION),
        "--random_flip", "--dataloader_num_workers", str(STARTUP_WORKERS), "--output_dir", output_dir,
        "--max_train_steps", "1", "--logger", "none", "--save_images_epochs", "0", "--feature_extractor", "none",
        "--eval_vlb_num_images", "0", "--checkpointing_steps", "1000000", "--seed", "0"]
    cache_dir = os.path.join(args.work_dir, "hf-datasets-cache", f"n{size}")
    me = [sys.executable, os.path.abspath(__file__), "child"]
    plan = [("reference_cold", "reference", None), ("hfgen", "hfgen", STEP_DONE["hfgen"]),
            ("reference", "reference", STEP_DONE["reference"])]
    for round_index in range(1, args.rounds):
        plan += [(f"hfgen#{round_index + 1}", "hfgen", STEP_DONE["hfgen"]),
                 (f"reference#{round_index + 1}", "reference", STEP_DONE["reference"])]
    if size in args.old_sizes:
        plan.append(("old", "old", STEP_DONE["old"]))
    for label, kind, done in plan:
        if kind == "hfgen":
            command = hfgen_command
        elif kind == "reference":
            if label == "reference_cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            command = [*me, "reference", folder, str(STARTUP_WORKERS), str(args.threads), cache_dir]
        else:
            command = [*me, "old", folder, str(STARTUP_WORKERS), str(args.threads)]
        run_env = dict(env)
        if kind == "old":  # the old path reads datasets' default cache: the reference's, warm by now
            run_env["HF_DATASETS_CACHE"] = cache_dir
        load = os.getloadavg()[0]
        result = measure_process(command, done, run_env, args.timeout, os.path.join(runs_dir, f"{label}-{size}.log"))
        result["load_before"] = load
        results[label] = result
        log(f"  N={size} {label}: first step {result['first_step_s']:.1f} s ({result['cpu_first_s']:.1f} CPU s)"
            + (f", step ends {result['step_end_s']:.1f} s" if result["step_end_s"] else "")
            + f"; peak RSS {result['vmhwm'] / MB:.0f} MB (at the first step {result['vmhwm_first'] / MB:.0f}), "
              f"+ workers RSS {result['tree_rss'] / MB:.0f} / PSS {result['tree_pss'] / MB:.0f} MB (load {load:.2f})")
        if kind == "hfgen":
            shutil.rmtree(output_dir, ignore_errors=True)
    return results


# ----- in-process: loader throughput and loader-fed training steps ------------------------------------------------


def make_loader(name: str, dataset, workers: int):
    return hfgen_dataloader(dataset, workers) if name == "hfgen" else reference_dataloader(dataset, workers)


def open_datasets(folder: str, cache_dir: str) -> tuple[dict, dict]:
    """Each loader's dataset of the folder, made once per size (the loaders below reuse it), and the seconds it
    took in this already started process: hfgen's listing vs load_dataset("imagefolder") with a warm cache."""
    import datasets  # noqa: F401  (imported before the clocks start: only the opening is timed)
    import hfgen.data  # noqa: F401

    opened, seconds = {}, {}
    makers = {"hfgen": lambda: hfgen_dataset(folder), "reference": lambda: reference_dataset(folder, cache_dir)}
    for name, make in makers.items():
        start = time.perf_counter()
        opened[name] = make()
        seconds[name] = time.perf_counter() - start
    return opened, seconds


def loader_throughput(name: str, dataset, workers: int, batches: int) -> dict:
    loader = make_loader(name, dataset, workers)
    iterator = iter(loader)
    for _ in range(2):  # warm-up: worker start, first batches
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += len(batch_images(name, next(iterator)))
    seconds = time.perf_counter() - start
    del iterator
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds}


FETCHES = ("hfgen", "reference", "reference_per_item")


def fetch_breakdown(opened: dict, size: int, rounds: int = 4, batches: int = 10, seed: int = 0) -> dict:
    """Milliseconds to build one batch of 64 in this process, no DataLoader: hfgen's 64 `dataset[i]` +
    `collate_images` (what its DataLoader does per batch), the reference's one `dataset.__getitems__(64 indices)`
    + `default_collate` (torch's fetcher uses `__getitems__` when a dataset has it, as `datasets.Dataset` does),
    and the reference item by item. `rounds` rounds of `batches` batches each, in ABC / CBA order."""
    import numpy as np
    from torch.utils.data._utils.collate import default_collate

    from hfgen.data import collate_images

    hfgen, reference = opened["hfgen"], opened["reference"]
    cases = {"hfgen": lambda ix: collate_images([hfgen[i] for i in ix]),
             "reference": lambda ix: default_collate(reference.__getitems__(ix)),
             "reference_per_item": lambda ix: default_collate([reference[i] for i in ix])}
    rng = np.random.default_rng(seed)
    results = {name: [] for name in cases}
    for round_index in range(rounds):
        for name in (FETCHES if round_index % 2 == 0 else FETCHES[::-1]):
            indices = [rng.permutation(size)[:BATCH_SIZE].tolist() for _ in range(batches)]
            start = time.perf_counter()
            for batch in indices:
                cases[name](batch)
            results[name].append(1000 * (time.perf_counter() - start) / batches)
    return {name: {"median_ms": statistics.median(v), "rounds_ms": v} for name, v in results.items()}


def worker_cpu_seconds(pids) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


STEP_CONFIGS = ("memory", "hfgen-0", "hfgen-2", "reference-0", "reference-2")


class StepFeed:
    """One configuration of the step measurement: its batches, and the CPU time of its DataLoader workers."""

    def __init__(self, config: str, opened: dict, pool, seed: int = 0):
        import psutil
        import torch

        self.config = config
        me = psutil.Process()
        before = {p.pid for p in me.children()}
        if config == "memory":
            generator = torch.Generator().manual_seed(seed)

            def batches():
                while True:
                    yield pool[torch.randperm(len(pool), generator=generator)[:BATCH_SIZE]]
            self.name, self.iterator = "memory", batches()
        else:
            self.name, workers = config.rsplit("-", 1)
            self.iterator = iter(make_loader(self.name, opened[self.name], int(workers)))
            next(self.iterator)  # warm-up: the workers start and fill their queue; every later batch is timed
        self.workers = [p.pid for p in me.children() if p.pid not in before]

    def next_images(self):
        batch = next(self.iterator)
        return batch if self.name == "memory" else batch_images(self.name, batch)

    def close(self):
        del self.iterator


def step_measurements(model, optimizer, scheduler, steps: int, opened: dict, pool, reverse: bool) -> dict:
    """`steps` rounds; in each, one training step fed by every configuration in turn (the order reversed every
    other round), so that the shared machine's changing speed falls on all of them alike. Every batch after
    the first (taken before the timing starts, while the workers start) is timed."""
    feeds = [StepFeed(config, opened, pool) for config in STEP_CONFIGS]
    results = {c: {"seconds": [], "waits": [], "worker_cpu": [], "rounds": []} for c in STEP_CONFIGS}
    for round_index in range(steps):
        order = feeds if (round_index % 2 == 0) != reverse else feeds[::-1]
        for feed in order:
            cpu = worker_cpu_seconds(feed.workers)
            start = time.perf_counter()
            images = feed.next_images()
            got = time.perf_counter()
            ddpm_step(model, optimizer, scheduler, images)
            result = results[feed.config]
            result["seconds"].append(time.perf_counter() - start)
            result["waits"].append(got - start)
            result["worker_cpu"].append(worker_cpu_seconds(feed.workers) - cpu)
            result["rounds"].append(round_index)
    for feed in feeds:
        feed.close()
    memory = results["memory"]["seconds"]
    for config, result in results.items():
        result["median"] = statistics.median(result["seconds"])
        result["median_wait"] = statistics.median(result["waits"])
        result["worker_cpu_per_step"] = statistics.mean(result["worker_cpu"])
        # each step against the in-memory step of the same round (minutes apart at most)
        result["paired_ratios"] = [s / m for s, m in zip(result["seconds"], memory)]
        result["median_paired_ratio"] = statistics.median(result["paired_ratios"])
    results["load_after"] = os.getloadavg()[0]
    return results


def in_process_measurements(args, folders: dict) -> tuple[dict, dict]:
    import torch
    from diffusers import DDPMScheduler

    torch.set_num_threads(args.threads)
    throughput, opened = {}, {}
    for size, folder in folders.items():
        cache_dir = os.path.join(args.work_dir, "hf-datasets-cache", f"n{size}")
        opened[size], seconds = open_datasets(folder, cache_dir)
        throughput[f"{size}/setup_s"] = seconds
        log(f"  N={size} datasets opened in this process: hfgen {seconds['hfgen']:.1f} s, "
            f"load_dataset(\"imagefolder\") {seconds['reference']:.1f} s")
        throughput[f"{size}/load"] = os.getloadavg()[0]
        fetch = fetch_breakdown(opened[size], size)
        throughput[f"{size}/fetch"] = fetch
        log(f"  N={size} one batch of 64 in this process: "
            + ", ".join(f"{name} {fetch[name]['median_ms']:.1f} ms" for name in FETCHES))
        for workers in (0, 2):
            runs = {"hfgen": [], "reference": []}
            for name in ("hfgen", "reference", "reference", "hfgen"):  # ABBA: a drift of the load cancels
                runs[name].append(loader_throughput(name, opened[size][name], workers, args.batches)["images_per_s"])
            for name, values in runs.items():
                throughput[f"{size}/{name}-{workers}"] = {"images_per_s": max(values), "runs": values}
                log(f"  N={size} {name} loader, {workers} workers: "
                    f"{', '.join(f'{v:.0f}' for v in values)} images/s")
    model = build_unet().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
    scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS)
    first = next(iter(folders))
    loader = hfgen_dataloader(opened[first]["hfgen"], 0)
    pool = torch.cat([batch_images("hfgen", batch) for _, batch in zip(range(4), loader)])  # 256 decoded images
    ddpm_step(model, optimizer, scheduler, pool[:BATCH_SIZE])  # warm-up of the model and optimizer, not timed
    steps = {}
    for position, size in enumerate(folders):
        load = os.getloadavg()[0]
        result = step_measurements(model, optimizer, scheduler, args.steps, opened[size], pool,
                                   reverse=position % 2 == 1)
        if torch.get_num_threads() != args.threads:
            raise RuntimeError(f"torch's thread count changed to {torch.get_num_threads()}")
        for config in STEP_CONFIGS:
            r = result[config]
            steps[f"{size}/{config}"] = r
            log(f"  N={size} steps fed by {config}: median {r['median']:.2f} s (steps: "
                f"{', '.join(f'{s:.2f}' for s in r['seconds'])}; / in-memory, paired: "
                f"{r['median_paired_ratio']:.3f}; wait {r['median_wait']:.3f} s; workers' CPU "
                f"{r['worker_cpu_per_step']:.2f} s/step)")
        steps[f"{size}/load"] = {"before": load, "after": result["load_after"]}
    return throughput, steps


# ----- report ----------------------------------------------------------------------------------------------------


def mb(value) -> str:
    return "–" if value is None else f"{value / MB:,.0f}"


def growth(small, large) -> float:
    return large / small - 1


def draw_figure(sizes, startup, path) -> None:
    import matplotlib.ticker
    from common import pyplot, save_figure

    plt = pyplot()

    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    styles = {"hfgen": ("hfgen (streamed folder)", "C0", "o"), "reference": ("diffusers-example loader", "C1", "s"),
              "old": ("hfgen before (in memory, f307595)", "C3", "^")}
    for name, (label, colour, marker) in styles.items():
        points = [(n, startup[n][name]) for n in sizes if name in startup[n]]
        if not points:
            continue
        ns = [n for n, _ in points]
        memory.plot(ns, [r["vmhwm"] / GIB for _, r in points], marker=marker, color=colour, label=label)
        memory.plot(ns, [r["vmhwm_first"] / GIB for _, r in points], marker=marker, color=colour, linestyle=":",
                    alpha=0.7)
        seconds.plot(ns, [r["first_step_s"] for _, r in points], marker=marker, color=colour, label=label)
        if name == "old" and len(points) >= 2 and ns[-1] < sizes[-1]:  # straight lines through the measured points
            (n0, r0), (n1, r1) = points[0], points[-1]
            slope = (r1["first_step_s"] - r0["first_step_s"]) / (n1 - n0)
            seconds.plot([n1, sizes[-1]], [r1["first_step_s"], r1["first_step_s"] + slope * (sizes[-1] - n1)],
                         color=colour, linestyle="--", alpha=0.6)
            extrapolated, _ = old_line(sizes, startup, sizes[-1])
            memory.plot([n1, sizes[-1]], [r1["vmhwm"] / GIB, extrapolated / GIB], color=colour, linestyle="--",
                        alpha=0.6)
    memory.axhline(FIT_BYTES / GIB, color="grey", linewidth=0.8)
    memory.text(sizes[0], FIT_BYTES / GIB * 1.02, "4 GiB", color="grey", fontsize=8)
    seconds.axhline(TARGET_FIRST_STEP_S, color="grey", linewidth=0.8)
    seconds.text(sizes[-1], TARGET_FIRST_STEP_S + 3, "15 s target", color="grey", fontsize=8, ha="right")
    for axis in (memory, seconds):
        axis.set_ylim(bottom=0)
        axis.set_xscale("log")
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(sizes, [f"{n // 1000}k" for n in sizes])
        axis.set_xlabel("images in the folder (64 px RGB PNG)")
        axis.grid(alpha=0.3)
    memory.set_ylabel("peak RSS of the training process (GiB)")
    memory.set_title("peak RSS through step 1 (solid) / before it (dotted); dashed: extrapolated", fontsize=9)
    seconds.set_ylabel("seconds from process start to the first step")
    seconds.set_title("time to the first training step; dashed: extrapolated", fontsize=9)
    seconds.legend(fontsize=8)
    save_figure(figure, path)


def startup_label(key: str) -> str:
    base, _, round_index = key.partition("#")
    label = {"hfgen": "hfgen (streamed folder)", "reference": "diffusers-example loader, warm cache",
             "reference_cold": "diffusers-example loader, first run (builds its cache)",
             "old": "hfgen before (in memory, f307595)"}[base]
    return f"{label} (round {round_index})" if round_index else label


def step_ratios(sizes, steps):
    """Pooled over sizes: every timed step, the medians, and the median of the paired ratios (each step / the
    in-memory step of the same round)."""
    pooled = {c: [s for n in sizes for s in steps[f"{n}/{c}"]["seconds"]] for c in STEP_CONFIGS}
    median = {c: statistics.median(v) for c, v in pooled.items()}
    paired = {c: statistics.median(r for n in sizes for r in steps[f"{n}/{c}"]["paired_ratios"]) for c in STEP_CONFIGS}
    return pooled, median, paired


def old_line(sizes, startup, large):
    """The old path's measured points and, when it was not run at the largest N, straight lines through them."""
    olds = [n for n in sizes if "old" in startup[n]]
    if not olds:
        return None, ""
    points = ", ".join(f"{mb(startup[n]['old']['vmhwm'])} MB and {startup[n]['old']['first_step_s']:.1f} s at "
                       f"{n // 1000}k" for n in olds)
    if len(olds) < 2 or olds[-1] == large:
        return None, f"The old path, measured: {points}."
    o0, o1 = startup[olds[0]]["old"], startup[olds[-1]]["old"]
    span, ahead = olds[-1] - olds[0], large - olds[-1]
    slope = {key: (o1[key] - o0[key]) / span for key in ("vmhwm", "vmhwm_first", "first_step_s")}
    # the run's peak is at least the peak before step 1, which grows faster: extrapolate both, keep the larger
    memory = max(o1[key] + slope[key] * ahead for key in ("vmhwm", "vmhwm_first"))
    seconds = o1["first_step_s"] + slope["first_step_s"] * ahead
    return memory, (f"The old path, measured: {points}; its high-water mark before step 1 grows "
                    f"{slope['vmhwm_first'] / 1000:.0f} KB per image (the decoded arrays, their stack and its "
                    f"scaled copy exist at once), its start-up {1000 * slope['first_step_s']:.1f} ms per image; "
                    f"on those lines it would need at least {memory / GIB:.1f} GiB and {seconds / 60:.1f} min to "
                    f"the first step at {large // 1000}k (extrapolated, not run).")


def report(args, sizes, folders_info, startup, throughput, steps, environment, wall_s) -> str:
    from common import environment_lines, markers

    small, large = sizes[0], sizes[-1]
    lines = []
    add = lines.append
    start, end = markers(KEY)
    add(start)
    add("## Data path: streamed folders at 4k-64k images (`benchmarks/bench_data.py`)")
    add("")
    add("What is measured: `hfgen train ddpm --train_data_dir DIR --resolution 64` on folders of N synthetic 64 px "
        "RGB PNGs (smooth random gradients and blobs with a little noise, "
        f"{folders_info[large]['bytes'] / folders_info[large]['files'] / 1000:.1f} KB a file, 4 class "
        "sub-folders; written by the benchmark, so in the page cache) against a loader in the style of diffusers' "
        "`examples/unconditional_image_generation/train_unconditional.py` (`load_dataset(\"imagefolder\")`, "
        "`with_transform` of Resize / RandomCrop / RandomHorizontalFlip / ToTensor / Normalize written with PIL and "
        "numpy, `DataLoader(shuffle=True)`, `Accelerator.prepare`), and against hfgen's previous in-memory path "
        "(f307595: every image of the train and held-out test split decoded into one float32 tensor before "
        "training). The model everywhere: train_ddpm.py's default U-Net (widths 32 64 64, 1 layer per block, "
        "8 groups; 3x64x64), batch 64, AdamW. The script's docstring gives every detail.")
    add("")
    add("Start-up: one fresh process per row, timed from its launch, 2 DataLoader workers. hfgen is the real CLI "
        "(`--dataloader_num_workers 2 --random_flip --max_train_steps 1 --logger none --save_images_epochs 0 "
        "--feature_extractor none --eval_vlb_num_images 0 --checkpointing_steps 1000000`), stopped once step 1 "
        "has ended; the reference and old-path rows are small scripts with the same model and step. CPU s: the "
        "process's own CPU time up to step 1 (on an idle machine the start-up is about this long: it runs on one "
        "core). Peak RSS: the process's own high-water mark (VmHWM, exact), through step 1 and at the moment step 1 "
        "begins (data path + model, before the step's activations). Process + workers: the peak of their summed "
        "RSS (polled every 50 ms; counts the pages the forked workers share with the process once per process, "
        "so it overstates) and of their summed PSS (polled every second; shared pages split between them). The "
        "reference's second run on a folder (warm `datasets` cache) is the one compared; its first run, which "
        "builds the Arrow cache, is the cold row (stopped when step 1 begins).")
    add("")
    add("| N images | loader | s to step 1 | CPU s to step 1 | step 1 ends (s) | peak RSS, process (MB) | "
        "at step 1 start (MB) | process + 2 workers: RSS sum / PSS sum (MB) | load at launch |")
    add("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for base in ("hfgen", "reference", "reference_cold", "old"):
            for key in [k for k in startup[n] if k.partition("#")[0] == base]:
                r = startup[n][key]
                full = r["step_end_s"] is not None
                add(f"| {n:,} | {startup_label(key)} | {r['first_step_s']:.1f} | {r['cpu_first_s']:.1f} | "
                    f"{r['step_end_s']:.1f} | {mb(r['vmhwm'])} | " if full else
                    f"| {n:,} | {startup_label(key)} | {r['first_step_s']:.1f} | {r['cpu_first_s']:.1f} | – | – | ")
                lines[-1] += (f"{mb(r['vmhwm_first'])} | "
                              + (f"{mb(r['tree_rss'])} / {mb(r['tree_pss'])} |" if full else "– |")
                              + f" {r['load_before']:.2f} |")
    add("")
    # ----- targets
    h_small, h_large = startup[small]["hfgen"], startup[large]["hfgen"]
    pooled, pooled_median, ratios = step_ratios(sizes, steps)
    add("Targets:")
    add("")
    if large > small:
        g_run = growth(h_small["vmhwm"], h_large["vmhwm"])
        g_first = growth(h_small["vmhwm_first"], h_large["vmhwm_first"])
        g_tree = growth(h_small["tree_pss"], h_large["tree_pss"])
        per_image = (h_large["vmhwm_first"] - h_small["vmhwm_first"]) / (large - small)
        old_memory, old_text = old_line(sizes, startup, large)
        add(f"- **Peak RSS from {small // 1000}k to {large // 1000}k images, hfgen: {100 * g_run:+.1f}%** "
            f"({mb(h_small['vmhwm'])} → {mb(h_large['vmhwm'])} MB, the process through step 1; target ≤ +10%: "
            f"{'met' if g_run <= TARGET_RSS_GROWTH else 'not met'}). Before the step's activations (at step 1 "
            f"start): {100 * g_first:+.1f}% ({mb(h_small['vmhwm_first'])} → {mb(h_large['vmhwm_first'])} MB, "
            f"{per_image / 1000:.2f} KB per extra image: the listing). Process + 2 workers (PSS, sampled once a "
            f"second): {100 * g_tree:+.1f}%. {old_text}")
    first_large = h_large["first_step_s"]
    cpu_large = h_large["cpu_first_s"]
    ref = startup[large]["reference"]
    add(f"- **Process start to step 1 at {large // 1000}k images, hfgen: {first_large:.1f} s** (target ≤ "
        f"{TARGET_FIRST_STEP_S:.0f} s on 2 cores: {'met' if first_large <= TARGET_FIRST_STEP_S else 'not met'}; "
        f"{cpu_large:.1f} s of CPU time, {h_large['load_before']:.2f} load average when launched); "
        f"{h_small['first_step_s']:.1f} s at {small // 1000}k. The trainer itself counts "
        f"{h_large.get('trainer_reported_s', float('nan')):.1f} s at {large // 1000}k and "
        f"{h_small.get('trainer_reported_s', float('nan')):.1f} s at {small // 1000}k from its construction to "
        "step 1; the rest is starting Python and the imports (torch, diffusers, accelerate, datasets, hfgen). "
        f"The diffusers-example loader at {large // 1000}k: {ref['first_step_s']:.1f} s ({ref['cpu_first_s']:.1f} "
        f"CPU s) with a warm cache, {startup[large]['reference_cold']['first_step_s']:.1f} s on its first run "
        "over the folder. What grows with N, timed inside an already started process: hfgen's listing "
        + ", ".join(f"{throughput[f'{n}/setup_s']['hfgen']:.2f}" for n in sizes)
        + " s, `load_dataset(\"imagefolder\")` with a warm cache "
        + ", ".join(f"{throughput[f'{n}/setup_s']['reference']:.1f}" for n in sizes)
        + f" s at {', '.join(f'{n // 1000}k' for n in sizes)} (on every run, cache or not, it resolves its "
        "data-file patterns by globbing the folder: in datasets 5.2, 66 patterns and about 65 `stat` calls per file).")
    worst = max(("hfgen-0", "hfgen-2"), key=lambda c: ratios[c])
    add(f"- **A step fed by hfgen's loader / the in-memory step: {ratios['hfgen-0']:.3f} with 0 workers, "
        f"{ratios['hfgen-2']:.3f} with 2** (the median over all sizes of each step / the in-memory step of the same "
        f"round, {len(pooled['memory'])} pairs each; target ≤ {TARGET_STEP_RATIO:.2f}: "
        f"{'met' if ratios[worst] <= TARGET_STEP_RATIO else 'not met'}; ratio of the medians: "
        f"{pooled_median['hfgen-0'] / pooled_median['memory']:.3f} / "
        f"{pooled_median['hfgen-2'] / pooled_median['memory']:.3f}). "
        f"The diffusers-example loader: {ratios['reference-0']:.3f} / {ratios['reference-2']:.3f}. Per size below.")
    fit = h_large["tree_rss"]
    add(f"- A 64 px RGB DDPM run on {large // 1000}k images {'fits' if fit <= FIT_BYTES else 'does not fit'} in "
        f"4 GiB with hfgen: peak {fit / GIB:.2f} GiB summed RSS of the process and its 2 workers (an overcount; "
        f"{h_large['tree_pss'] / GIB:.2f} GiB PSS), the process alone {h_large['vmhwm'] / GIB:.2f} GiB."
        + (f" The old path would not ({old_memory / GIB:.1f} GiB for the process alone, extrapolated)."
           if large > small and old_memory and old_memory > FIT_BYTES else ""))
    add("")
    # ----- loader alone
    add(f"Loader alone (no model), images/s: {args.batches} batches of 64 after 2 of warm-up (worker start), "
        "measured twice in the order hfgen, reference, reference, hfgen; the better of the two, then both:")
    add("")
    add("| N images | hfgen, 0 workers | hfgen, 2 workers | diffusers-example loader, 0 workers | "
        "diffusers-example loader, 2 workers |")
    add("|---|---|---|---|---|")
    for n in sizes:
        cells = []
        for c in ("hfgen-0", "hfgen-2", "reference-0", "reference-2"):
            r = throughput[f"{n}/{c}"]
            cells.append(f"{r['images_per_s']:,.0f} ({', '.join(f'{v:,.0f}' for v in r['runs'])})")
        add(f"| {n:,} | " + " | ".join(cells) + " |")
    add("")
    add("One batch of 64 built in the process without a DataLoader (ms, median of 4 rounds of 10 batches, in turn): "
        "hfgen's 64 `dataset[i]` + `collate_images`, which its DataLoader runs per batch; the reference's one "
        "`dataset.__getitems__(64 indices)` + `default_collate`, which torch's DataLoader runs per batch because "
        "`datasets.Dataset` has `__getitems__` (one Arrow query and one call of the transform per batch); and the "
        "reference item by item:")
    add("")
    add("| N images | hfgen | diffusers-example loader (batched rows) | diffusers-example loader, item by item |")
    add("|---|---|---|---|")
    for n in sizes:
        fetch = throughput[f"{n}/fetch"]
        add(f"| {n:,} | " + " | ".join(f"{fetch[name]['median_ms']:.1f}" for name in FETCHES) + " |")
    add("")
    # ----- steps
    add(f"Training steps: {args.steps} round(s) per size; in each round one step fed by each of the five "
        "configurations in turn (the order reversed every other round and size), so that the shared cores' "
        "changing speed falls on all five alike; one model throughout. Each loader is created and its first batch "
        "taken (worker start) before the timing starts. A step is timed from asking for the batch to the end of the "
        "optimizer step; wait: the part spent waiting for the batch; workers' CPU: the 2 workers' CPU seconds "
        "during the step (they decode the batch that replaces the one taken); / in-memory: the median of each "
        "step / the in-memory step of the same round.")
    add("")
    add("| N images | fed by | median s/step | every step (s) | / in-memory (paired) | median wait (s) | "
        "workers' CPU s/step |")
    add("|---|---|---|---|---|---|---|")
    labels = {"memory": "in-memory tensors", "hfgen-0": "hfgen, 0 workers", "hfgen-2": "hfgen, 2 workers",
              "reference-0": "diffusers-example loader, 0 workers",
              "reference-2": "diffusers-example loader, 2 workers"}
    for n in sizes:
        for c in STEP_CONFIGS:
            r = steps[f"{n}/{c}"]
            ratio = "1" if c == "memory" else f"{r['median_paired_ratio']:.3f}"
            cpu = "–" if c.endswith("-0") or c == "memory" else f"{r['worker_cpu_per_step']:.2f}"
            add(f"| {n:,} | {labels[c]} | {r['median']:.2f} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | "
                f"{ratio} | {r['median_wait']:.3f} | {cpu} |")
    for c in STEP_CONFIGS:
        add(f"| all | {labels[c]} | {pooled_median[c]:.2f} | ({len(pooled[c])} steps) | "
            f"{'1' if c == 'memory' else f'{ratios[c]:.3f}'} | | |")
    add("")
    if args.write:
        add(f"![peak RSS and time to step 1 vs N: hfgen, the diffusers-example loader, the old path]({FIGURE_LINK})")
        add("")
    add(reading_text(sizes, startup, steps, throughput, ratios, pooled_median))
    add("")
    add("- command: `python benchmarks/bench_data.py " + " ".join(sys.argv[1:]) + "`"
        f" (whole run {wall_s / 60:.1f} min, of which {environment['folders_s']:.0f} s writing the folders"
        + (written_note(folders_info) if environment["folders_s"] < 5 else "") + ")")
    for line in environment_lines("bench_data.py", args.threads, environment["load_before"],
                                  environment["load_after"])[1:]:
        add(line.replace("compare the per-run medians and the fastest epochs",
                         "each row gives its own load at launch; the step ratios pair steps a minute apart at most"))
    add(f"- raw numbers: `{os.path.relpath(RESULTS_JSON, os.path.dirname(HERE))}`" if args.write else
        f"- raw numbers: `{os.path.join(args.work_dir, 'bench_data.json')}`")
    add(end)
    return "\n".join(lines)


def written_note(folders_info) -> str:
    """How long the reused folders took to write when they were written (the largest: PNG files, the rest links)."""
    if not folders_info:
        return ""
    largest = folders_info[max(folders_info)]
    written = largest.get("written")
    if not written or written["hard_links"]:
        return ""
    return (f"; they were written by an earlier run: {written['seconds']:.0f} s for the {largest['files']:,} PNG files "
            f"at load {written['load']:.1f}, the smaller folders hard links to them")


def reading_text(sizes, startup, steps, throughput, ratios, pooled_median) -> str:
    small, large = sizes[0], sizes[-1]
    h_small, h_large = startup[small]["hfgen"], startup[large]["hfgen"]
    step = pooled_median["memory"]
    spread = [s for n in sizes for s in steps[f"{n}/memory"]["seconds"]]

    def median_over_sizes(config, key):
        return statistics.median(steps[f"{n}/{config}"][key] for n in sizes)

    wait0, wait2 = median_over_sizes("hfgen-0", "median_wait"), median_over_sizes("hfgen-2", "median_wait")
    cpu2 = median_over_sizes("hfgen-2", "worker_cpu_per_step")
    fetch = {name: statistics.median(throughput[f"{n}/fetch"][name]["median_ms"] for n in sizes) for name in FETCHES}
    setup = {name: [throughput[f"{n}/setup_s"][name] for n in sizes] for name in ("hfgen", "reference")}
    ratio_values = [r for n in sizes for c in ("hfgen-0", "hfgen-2") for r in steps[f"{n}/{c}"]["paired_ratios"]]
    first_steps = [startup[n]["hfgen"]["first_step_s"] for n in sizes]
    parts = [
        f"What the numbers show. Memory: hfgen's run peaks at {mb(h_small['vmhwm'])} MB at {small // 1000}k and "
        f"{mb(h_large['vmhwm'])} MB at {large // 1000}k images, nearly all of it step 1's activations (at the start "
        f"of step 1 the process holds {mb(h_small['vmhwm_first'])} → {mb(h_large['vmhwm_first'])} MB; the "
        "listing of the files is what grows).",
    ]
    if large > small and any("old" in startup[n] for n in sizes):
        parts.append("The old path held every decoded image, and more while decoding, so its peak grows with N.")
    parts.append(
        f"Start-up: hfgen reaches step 1 after {', '.join(f'{s:.1f}' for s in first_steps)} s at "
        f"{', '.join(f'{n // 1000}k' for n in sizes)}, most of it starting Python and importing; the part that grows "
        f"with N, the listing, took {setup['hfgen'][0]:.2f} → {setup['hfgen'][-1]:.2f} s "
        f"(~{1e6 * (setup['hfgen'][-1] - setup['hfgen'][0]) / max(1, large - small):.0f} µs per file). The "
        f"diffusers-example script pays `load_dataset(\"imagefolder\")` on every run, cache or not: "
        f"{setup['reference'][0]:.1f} → {setup['reference'][-1]:.1f} s "
        f"(~{1e3 * (setup['reference'][-1] - setup['reference'][0]) / max(1, large - small):.1f} ms per file).")
    parts.append(
        f"Steps: counted directly, hfgen's loader makes each step (median {step:.1f} s) wait a median "
        f"{wait0:.3f} s for its batch with 0 workers ({100 * wait0 / step:.1f}% of the step); with 2 workers the "
        f"wait is {wait2:.3f} s and the workers spend {cpu2:.2f} CPU s per step decoding the next batch, which "
        f"could slow the step by at most that much ({100 * (wait2 + cpu2) / step:.1f}% together). The measured "
        f"ratios are a coarser check: the in-memory step itself ranged from {min(spread):.1f} to "
        f"{max(spread):.1f} s on these shared cores, and the paired ratios of hfgen's feeds range from "
        f"{min(ratio_values):.3f} to {max(ratio_values):.3f}; their medians are {ratios['hfgen-0']:.3f} and "
        f"{ratios['hfgen-2']:.3f}, while the direct count puts the loader's share at {100 * wait0 / step:.1f}% "
        f"(0 workers) and at most {100 * (wait2 + cpu2) / step:.1f}% (2 workers).")
    rates = {c: [throughput[f"{n}/{c}"]["images_per_s"] for n in sizes]
             for c in ("hfgen-0", "hfgen-2", "reference-0", "reference-2")}
    repeats = [max(r["runs"]) / min(r["runs"]) for n in sizes for c in rates for r in [throughput[f"{n}/{c}"]]]
    slower = sum(h < r for h, r in zip(rates["hfgen-0"], rates["reference-0"]))
    gain = statistics.median(b / a for a, b in zip(rates["hfgen-0"], rates["hfgen-2"]))
    loads = [throughput.get(f"{n}/load") for n in sizes]
    load_text = (f" (load average {min(loads):.1f}-{max(loads):.1f} during these measurements)"
                 if all(v is not None for v in loads) else "")
    fetch_ratios = [throughput[f"{n}/fetch"]["hfgen"]["median_ms"]
                    / throughput[f"{n}/fetch"]["reference"]["median_ms"] for n in sizes]
    parts.append(
        f"Loader alone: hfgen builds a batch of 64 in {min(fetch_ratios):.2f}-{max(fetch_ratios):.2f}x the time of "
        f"the example's loader at every size (median {fetch['hfgen']:.0f} against {fetch['reference']:.0f} ms; the "
        "absolute times move with the machine's load more than with N), which fetches the batch's rows with one "
        f"`__getitems__` call: item by item it takes {fetch['reference_per_item']:.0f} ms. In the images/s "
        f"table hfgen's loader is the slower at {slower} of {len(sizes)} sizes with 0 workers; those numbers "
        f"vary up to {max(repeats):.1f}x between the two repeats, and 2 workers give hfgen {gain:.2f}x the "
        f"images/s of 0 workers, as other processes share the cores{load_text}. At this model size neither "
        f"loader is near the bottleneck: a batch costs ~{fetch['hfgen']:.0f} ms of one core against a step of "
        f"{step:.1f} s; only a step about that short (a much smaller model, or a GPU) would need more workers "
        "than the cores can give.")
    return " ".join(parts)


def report_from_json(args, finish) -> None:
    """The section and figure again from the raw numbers of an earlier run (its own command line and date)."""
    import argparse

    with open(os.path.join(args.work_dir, "bench_data.json")) as file:
        results = json.load(file)
    write = args.write
    args = argparse.Namespace(**results["args"])
    args.write = write
    environment = results["environment"]
    sizes = sorted(int(n) for n in results["startup"])
    startup = {int(n): runs for n, runs in results["startup"].items()}
    info = {int(n): v for n, v in results["folders"].items()}
    sys.argv[1:] = environment.get("argv", sys.argv[1:])
    text = report(args, sizes, info, startup, results["throughput"], results["steps"], environment,
                  environment["wall_s"])
    if write:
        with open(RESULTS_JSON, "w") as file:
            json.dump(results, file, indent=1, default=str)
        draw_figure(sizes, startup, FIGURE)
        log(f"wrote {FIGURE} and {RESULTS_JSON}")
    finish(KEY, text, write, time.perf_counter())


# ----- small folders: the README's recipes on the bundled digits and on the same digits as PNG files -------

SMALL_KEY = "data-small"  # its own section of BENCHMARKS.md
SMALL_RECIPES = {"vae": ("hfgen-vae", 20), "gan": ("hfgen-gan", 6), "flow": ("hfgen-flow", 3)}  # recipe, epochs
SMALL_TARGET = 1.10


def write_digit_folder(work_dir: str) -> str:
    """The 4,000 training and 1,000 test digits of hfgen:mnist as 28 px grey PNGs in train/<digit>/ and
    test/<digit>/ (the same pixels: the bundled ones are 8-bit values / 255)."""
    import numpy as np
    import PIL.Image

    from hfgen.data.sources import BundledSource

    folder = os.path.join(work_dir, "mnist-png")
    if os.path.isdir(folder):
        return folder
    staging = folder + ".incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    source = BundledSource("hfgen:mnist")
    for split in ("train", "test"):
        data = source.dataset(split, 28)
        pixels = np.rint(data.images[:, 0].numpy() * 255).astype(np.uint8)
        for index, (image, label) in enumerate(zip(pixels, data.labels.tolist())):
            os.makedirs(os.path.join(staging, split, str(label)), exist_ok=True)
            PIL.Image.fromarray(image, "L").save(os.path.join(staging, split, str(label), f"{index:05d}.png"))
    os.replace(staging, folder)
    return folder


def small_child_main(argv) -> None:
    """One timed run: `small FAMILY_RECIPE EPOCHS DATA OUTPUT_DIR`; prints a JSON line of its set-up seconds and
    each epoch's seconds of training steps (the trainer's own clock). The final evaluation is skipped."""
    started = time.perf_counter()
    sys.path.insert(0, HERE)
    from bench_quality import RECIPES

    from hfgen.training import train_ddpm, train_gan, train_vae

    name, epochs, data, output_dir = argv[0], int(argv[1]), argv[2], argv[3]
    family, flags = RECIPES[name]
    module = {"vae": train_vae, "gan": train_gan, "ddpm": train_ddpm}[family]
    trainer_class = {"vae": train_vae.VAETrainer, "gan": train_gan.GANTrainer, "ddpm": train_ddpm.DDPMTrainer}[family]
    data_flags = ["--train_data_dir", data] if os.path.isdir(data) else ["--dataset_name", data]
    argv = ["--output_dir", output_dir, "--overwrite_output_dir", *flags.split(), "--num_epochs", str(epochs),
            *data_flags, "--logger", "none", "--save_images_epochs", "0", "--feature_extractor", "none",
            "--checkpointing_steps", str(10 ** 9)]

    class Timed(trainer_class):
        def save_output(self):
            pass

    trainer = Timed(module.parse_args(argv))
    setup_s = time.perf_counter() - started
    trainer.train()
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: set-up and every epoch
    print(json.dumps({"setup_s": setup_s, "epoch_seconds": trainer.epoch_seconds, "page_faults": usage.ru_minflt,
                      "system_s": usage.ru_stime}), flush=True)


def small_folder_runs(args, env) -> dict:
    """Each recipe on the bundled array and on the PNG folder, alternating (array, folder, folder, array, ...)."""
    folder = write_digit_folder(args.work_dir)
    runs = {recipe: {"bundled": [], "folder": []} for recipe in args.small_recipes}
    for recipe in args.small_recipes:
        name, epochs = SMALL_RECIPES[recipe]
        epochs = args.small_epochs or epochs
        for round_ in range(args.rounds):
            order = ("bundled", "folder") if round_ % 2 == 0 else ("folder", "bundled")
            for data in order:
                output_dir = os.path.join(args.work_dir, f"small-{recipe}")
                cache = os.path.join(args.work_dir, f"hfgen-cache-{recipe}-{round_}-{data}")  # a first run each time
                shutil.rmtree(cache, ignore_errors=True)
                command = [sys.executable, os.path.abspath(__file__), "small", name, str(epochs),
                           folder if data == "folder" else "hfgen:mnist", output_dir]
                result = subprocess.run(command, env=dict(env, HFGEN_CACHE=cache), capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                measured["load"] = os.getloadavg()[0]
                runs[recipe][data].append(measured)
                rest = measured["epoch_seconds"][1:]
                log(f"{recipe} on the {data}: set-up {measured['setup_s']:.1f} s, first epoch "
                    f"{measured['epoch_seconds'][0]:.2f} s, later epochs median {statistics.median(rest):.2f} s")
    return {"runs": runs, "folder": folder}


def small_folder_report(args, results, environment) -> str:
    from common import markers

    start, end = markers(SMALL_KEY)
    lines = [start, "## Data path: small folders as fast as the bundled digits (`benchmarks/bench_data.py --small_folders`)", "",
             "The README's VAE, GAN and pixel flow-matching commands (bench_quality's recipes) for a fixed number of "
             "epochs on the bundled digits (one in-memory array) and on the same 4,000 training digits written as 28 px "
             "PNG files in class folders (`--train_data_dir`), alternating (array, folder, folder, array), each run a "
             "fresh process with an empty `$HFGEN_CACHE`. Seconds are the trainer's own clock of each epoch's training "
             "steps (the first epoch of the folder decodes every PNG once into the pixel cache; later epochs read it); "
             "set-up is the process's seconds until the trainer is built (imports, listing and header scan included). "
             "Ratio: folder / bundled, median of the runs' medians of epochs 2 on; target <= "
             f"{SMALL_TARGET:.2f}. Page faults (minor) and system CPU seconds: the whole process's, per run.", "",
             "| recipe | epochs | data | set-up (s) | first epoch (s) | epochs 2+ median (s) | page faults (M) | "
             "system CPU (s) | folder / bundled, epochs 2+ | target met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for recipe, by_data in results["runs"].items():
        name, epochs = SMALL_RECIPES[recipe]
        epochs = args.small_epochs or epochs
        medians = {data: statistics.median(statistics.median(run["epoch_seconds"][1:]) for run in runs)
                   for data, runs in by_data.items()}
        ratio = medians["folder"] / medians["bundled"]
        met = ratio <= SMALL_TARGET
        verdicts.append((recipe, ratio, met))
        for data, runs in by_data.items():
            setup = ", ".join(f"{run['setup_s']:.1f}" for run in runs)
            first = ", ".join(f"{run['epoch_seconds'][0]:.2f}" for run in runs)
            rest = ", ".join(f"{statistics.median(run['epoch_seconds'][1:]):.3f}" for run in runs)
            faults = ", ".join(f"{run['page_faults'] / 1e6:.2f}" if "page_faults" in run else "-" for run in runs)
            system = ", ".join(f"{run['system_s']:.1f}" if "system_s" in run else "-" for run in runs)
            cells = (f"**{ratio:.3f}**", "yes" if met else "**no**") if data == "folder" else ("", "")
            lines.append(f"| {name} | {epochs} | {data} | {setup} | {first} | {rest} | {faults} | {system} | "
                         f"{cells[0]} | {cells[1]} |")
    lines += ["", "Target (folder at most 1.10x the array from the second epoch on): "
              + "; ".join(f"{recipe} {ratio:.3f} ({'met' if met else 'missed'})" for recipe, ratio, met in verdicts)
              + ".", ""]
    if "startup" in results:
        lines += startup_lines(results["startup"]) + [""]
    lines += environment
    lines.append(end)
    return "\n".join(lines)


def package_at(revision: str, work_dir: str) -> str:
    """A PYTHONPATH under which `import hfgen` is the package at git `revision` (hfgen/, with pipelines/ and
    training/ inside it, as setup.py installs them)."""
    commit = subprocess.run(["git", "rev-parse", revision], capture_output=True, text=True, cwd=HERE, check=True).stdout.strip()
    root = os.path.join(work_dir, f"hfgen-at-{commit[:10]}")
    if not os.path.isdir(root):
        source, staging = root + ".src", root + ".incomplete"
        for folder in (source, staging):
            shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(source)
        archive = subprocess.run(["git", "archive", commit], capture_output=True, cwd=os.path.dirname(HERE),
                                 check=True).stdout  # from the repository's root: all of it
        subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
        shutil.copytree(os.path.join(source, "hfgen"), os.path.join(staging, "hfgen"))
        for part in ("pipelines", "training"):
            shutil.copytree(os.path.join(source, part), os.path.join(staging, "hfgen", part))
        shutil.rmtree(source)
        os.replace(staging, root)
    return root


def startup_comparison(args, env) -> dict:
    """Process start to step 1 (and peak RSS) of the scale benchmark's hfgen command on its 64 px RGB folders, for
    this tree and for the package at --compare_startup_with, alternating (this, that, that, this)."""
    old_path = package_at(args.compare_startup_with, args.work_dir)
    results = {}
    for size in args.startup_sizes:
        folder = write_folder(args.work_dir, size, os.path.join(args.work_dir, f"images-{max(SIZES)}")
                              if os.path.isdir(os.path.join(args.work_dir, f"images-{max(SIZES)}")) else None)
        results[size] = {"this": [], "before": []}
        for round_ in range(args.rounds):
            for which in (("this", "before") if round_ % 2 == 0 else ("before", "this")):
                output_dir = os.path.join(args.work_dir, "runs", f"startup-{which}-{size}")
                shutil.rmtree(output_dir, ignore_errors=True)
                command = [sys.executable, "-c", "from hfgen.cli import main; main()", "train", "ddpm",
                           "--train_data_dir", folder, "--resolution", str(RESOLUTION), "--random_flip",
                           "--dataloader_num_workers", str(STARTUP_WORKERS), "--output_dir", output_dir,
                           "--max_train_steps", "1", "--logger", "none", "--save_images_epochs", "0",
                           "--feature_extractor", "none", "--eval_vlb_num_images", "0",
                           "--checkpointing_steps", "1000000", "--seed", "0"]
                run_env = dict(env, HFGEN_CACHE=os.path.join(args.work_dir, f"startup-cache-{which}-{size}-{round_}"))
                if which == "before":
                    run_env["PYTHONPATH"] = old_path
                os.makedirs(os.path.join(args.work_dir, "runs"), exist_ok=True)
                result = measure_process(command, STEP_DONE["hfgen"], run_env, args.timeout,
                                         os.path.join(args.work_dir, "runs", f"startup-{which}-{size}-{round_}.log"))
                results[size][which].append(result)
                log(f"start-up N={size} {which}: first step {result['first_step_s']:.1f} s, peak RSS "
                    f"{result['vmhwm'] / MB:.0f} MB")
                shutil.rmtree(output_dir, ignore_errors=True)
    return {"revision": args.compare_startup_with, "runs": results}


def startup_lines(startup) -> list[str]:
    lines = ["", f"Start-up of the scale benchmark's command (64 px RGB folders, 2 workers, one step), this tree against "
             f"`{startup['revision']}` (before the header scan and the pixel cache), alternating, each with an empty "
             "$HFGEN_CACHE:", "",
             "| N images | code | s to step 1 (runs) | median | peak RSS, process (MB, runs) |", "| --- | --- | --- | --- | --- |"]
    for size, by_code in startup["runs"].items():
        for which, runs in by_code.items():
            seconds = [run["first_step_s"] for run in runs]
            rss = ", ".join(f"{run['vmhwm'] / MB:,.0f}" for run in runs)
            lines.append(f"| {int(size):,} | {which} | {', '.join(f'{x:.1f}' for x in seconds)} | "
                         f"{statistics.median(seconds):.1f} | {rss} |")
    return lines


def small_folders_main(args, finish, started, load_before) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    os.makedirs(args.work_dir, exist_ok=True)
    results = small_folder_runs(args, env) if args.small_recipes else {"runs": {}}
    if args.compare_startup_with:
        results["startup"] = startup_comparison(args, env)
    sys.path.insert(0, HERE)
    from common import environment_lines, load_average

    environment = environment_lines("bench_data.py", args.threads, load_before, load_average())
    with open(os.path.join(args.work_dir, "bench_data_small.json"), "w") as file:
        json.dump({"args": vars(args), "results": results}, file, indent=1, default=str)
    text = small_folder_report(args, results, environment)
    if args.write:
        with open(SMALL_RESULTS_JSON, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=1, default=str)
    finish(SMALL_KEY, text, args.write, started)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "small":
        small_child_main(sys.argv[2:])
        return
    sys.path.insert(0, HERE)
    from common import benchmark_parser, check_positive, finish, load_average, start_clock

    parser = benchmark_parser(__doc__.split("\n\n")[0], rounds=1)
    parser.set_defaults(threads=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"Folder sizes (default {SIZES}).")
    parser.add_argument("--old_sizes", type=int, nargs="*", default=None,
                        help="Sizes at which the old in-memory path is also run (default 4000 16000; --quick: none).")
    parser.add_argument("--work_dir", default="/tmp/hfgen-bench-data", help="Image folders and run logs.")
    parser.add_argument("--steps", type=int, default=4,
                        help="Timed training steps per configuration and size (rounds of the five configurations).")
    parser.add_argument("--batches", type=int, default=30, help="Timed batches of the loader-alone measurement.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds a start-up run may take.")
    parser.add_argument("--quick", action="store_true", help="4k images, 1 round of steps, 5 batches: a smoke run.")
    parser.add_argument("--small_folders", action="store_true",
                        help="Only the small-folder part: the README's recipes on the bundled digits vs the same "
                             "digits as PNG files (its own section of BENCHMARKS.md).")
    parser.add_argument("--small_recipes", nargs="*", default=list(SMALL_RECIPES), choices=list(SMALL_RECIPES))
    parser.add_argument("--compare_startup_with", default=None,
                        help="With --small_folders: also time the scale command's start-up (--startup_sizes) for this "
                             "tree and for the package at this git revision.")
    parser.add_argument("--startup_sizes", type=int, nargs="+", default=[4000, 64000])
    parser.add_argument("--small_epochs", type=int, default=None,
                        help="Epochs of every small-folder run (default: per recipe, "
                             + ", ".join(f"{k} {v[1]}" for k, v in SMALL_RECIPES.items()) + ").")
    parser.add_argument("--report_only", action="store_true",
                        help="Rewrite the section (with --write, also the figure) from WORK_DIR/bench_data.json of "
                             "an earlier run, measuring nothing.")
    args = parser.parse_args()
    if args.small_folders:
        args.rounds = max(args.rounds, 2)
        args.threads = args.threads if "--threads" in sys.argv else 2  # the recipes' own setting (bench_quality)
        small_folders_main(args, finish, time.perf_counter(), load_average())
        return
    if args.report_only:
        report_from_json(args, finish)
        return
    if args.quick:
        args.sizes = args.sizes or [4000]
        args.steps, args.batches = min(args.steps, 1), min(args.batches, 5)
        args.old_sizes = args.old_sizes if args.old_sizes is not None else []
    args.sizes = sorted(args.sizes or SIZES)
    args.old_sizes = [4000, 16000] if args.old_sizes is None else args.old_sizes
    check_positive(args, ("threads", "steps", "batches", "rounds"))
    started, load_before = start_clock()
    os.makedirs(args.work_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_MININTERVAL="0")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    folders, info, source = {}, {}, None
    for size in sorted(args.sizes, reverse=True):  # the largest first: the others link to its files
        folders[size] = write_folder(args.work_dir, size, source)
        source = folders[size]
    folders = {n: folders[n] for n in args.sizes}
    folders_s = time.perf_counter() - started
    for n, folder in folders.items():
        files = sum(len(os.listdir(os.path.join(folder, d))) for d in os.listdir(folder))
        info[n] = {"files": files, "bytes": folder_bytes(folder)}
        if os.path.isfile(folder + ".json"):
            with open(folder + ".json") as file:
                info[n]["written"] = json.load(file)
        if files != n:
            raise RuntimeError(f"{folder} holds {files} files, not {n}")
    log(f"folders ready ({folders_s:.0f} s); load {os.getloadavg()[0]:.2f}")

    startup = {}
    for size, folder in folders.items():
        log(f"start-up runs, N={size}")
        startup[size] = startup_runs(args, folder, size, env)
    log("loader throughput and training steps")
    throughput, steps = in_process_measurements(args, folders)
    load_after = load_average()
    wall_s = time.perf_counter() - started
    environment = {"threads": args.threads, "load_before": load_before, "load_after": load_after,
                   "folders_s": folders_s, "wall_s": wall_s, "cpu_count": os.cpu_count(),
                   "git_head": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                              cwd=HERE).stdout.strip()}
    environment["argv"] = sys.argv[1:]
    environment["date"] = time.strftime("%Y-%m-%d")
    results = {"args": vars(args), "environment": environment, "folders": info, "startup": startup,
               "throughput": throughput, "steps": steps}
    with open(os.path.join(args.work_dir, "bench_data.json"), "w") as file:
        json.dump(results, file, indent=1, default=str)
    text = report(args, args.sizes, info, startup, throughput, steps, environment, wall_s)
    if args.write:
        with open(RESULTS_JSON, "w") as file:
            json.dump(results, file, indent=1, default=str)
        draw_figure(args.sizes, startup, FIGURE)
        log(f"wrote {FIGURE} and {RESULTS_JSON}")
    finish(KEY, text, args.write, started)


if __name__ == "__main__":
    main()
