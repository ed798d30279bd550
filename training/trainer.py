"""The training skeleton every family shares: config, accelerator, data, loop, checkpoints, output.

A family subclasses `Trainer` and supplies its config (training/config.py), its models, its objective and its
pipeline:

    class VAETrainer(Trainer):
        family = "vae"
        config_class = VAETrainingConfig
        def build_models(self): return {"vae": VAEModel(...)}
        def training_step(self, images, labels): loss = ...; self.optimize("vae", loss); return {"loss": loss}
        def build_pipeline(self): return VAEPipeline(self.sampling_model("vae"))
        def evaluation_options(self): return {"num_importance_samples": self.config.eval_importance_samples}

`Trainer(config).train()` then runs on one process or many (`accelerate launch`), resumes from checkpoints,
and writes `output_dir` as a loadable, pushable pipeline folder with a model card and a sample grid.
"""

import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from hfgen.data import (
    StreamingImageDataset, dataset_length, default_num_workers, hub_datasets, open_image_source, parse_color,
    training_dataloader)
from hfgen.hub_utils import SAMPLE_GRID, hub_id, push_output_folder, write_model_card
from hfgen.image_processing import image_grid
from hfgen.evaluation import EvaluationConfig, evaluate
from hfgen.features import describe_feature_space, load_feature_space
from hfgen.training.allocator import keep_freed_memory_for_reuse
from hfgen.training.config import FINISHED_MARK, TrainingConfig, list_checkpoints
from hfgen.training.disk_space import SaveError, folder_bytes, save_failure, space_shortage, state_bytes
from hfgen.training.preemption import (
    PREEMPTED_EXIT_CODE, IgnoreStopSignals, StopSignals, TrainingStopped, resume_command, signal_to_a_process)

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
LOCK_FILE = ".hfgen-run.lock"  # held by the live run writing the folder
STAGING = ".output.incomplete"  # the final output is written here, then moved into place, model_index.json last


class NonFiniteError(ValueError):
    """Training produced nan or inf: stopped before anything non-finite is saved."""


NEAREST_K = 3  # k of the k-NN balls of precision, recall, density and coverage
PLAIN_STEP_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def check_launch(accelerator: Accelerator) -> None:
    """Processes started by `accelerate launch` (or torchrun) that could not join one run, as with `--multi_gpu` on
    a machine without GPUs and without ACCELERATE_USE_CPU=1, would each train alone into the same folder: rank 0
    says so in one line, the other ranks exit quietly."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched <= 1 or accelerator.num_processes == launched:
        return
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(3)  # rank 0's line first: the launcher stops every process once one has exited
        raise SystemExit(2)
    raise ValueError(f"the launcher started {launched} processes, but they could not join one run (accelerate "
                     f"found {accelerator.num_processes} process): `--multi_gpu` needs GPUs; on CPUs launch with "
                     f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} ...`")


def clear_run(folder: str) -> None:
    """Removes what a run writes into `folder` (for --overwrite_output_dir); other files stay."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        written = name in ("checkpoints", "logs", "samples", SAMPLE_GRID, "metrics.json", "README.md", FINISHED_MARK,
                           STAGING) or os.path.isfile(os.path.join(path, "config.json"))
        if written:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


class OutputLock:
    """A lock file naming the live process that writes an output folder: a second run into it is refused."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        os.makedirs(folder, exist_ok=True)
        holder = self._holder()
        if holder and holder != os.getpid():
            raise ValueError(f"`--output_dir` {folder!r} is being written by another live run (process {holder}, "
                             f"see {self.path}): wait for it, stop it, or choose another folder")
        with open(self.path, "w") as file:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, file)

    def _holder(self) -> int | None:
        """The pid of a live process on this machine holding the lock, else None (no lock, or a stale one)."""
        try:
            with open(self.path) as file:
                lock = json.load(file)
            pid = int(lock["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if lock.get("host") != socket.gethostname():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return pid

    def release(self) -> None:
        if self._holder() == os.getpid():
            os.remove(self.path)


def publish(staging: str, folder: str) -> None:
    """Moves everything from `staging` into `folder`, replacing what is there, model_index.json last."""
    names = sorted(os.listdir(staging), key=lambda name: name == FINISHED_MARK)
    for name in names:
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def check_finite_weights(models: dict, what: str) -> None:
    """Refuses to save models with nan or inf weights."""
    for name, model in models.items():
        bad = [key for key, value in model.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteError(f"{what}: the weights of {name!r} hold non-finite values ({', '.join(bad[:3])}"
                                 f"{', ...' if len(bad) > 3 else ''}); nothing was saved")


class Trainer:
    """The shared training loop; see the module docstring for what a family supplies."""

    family: str = ""
    config_class = TrainingConfig  # the family's config (training/config.py)
    pipeline_task = "unconditional-image-generation"
    ema_model_names: tuple[str, ...] = ()  # the models whose weights --use_ema averages (the samplers)

    def __init__(self, config: TrainingConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"`config` must be a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        # the run records what it chooses (e.g. the data loader's workers) in its own copy
        self.config = args = copy.deepcopy(config)
        keep_freed_memory_for_reuse()  # each step's activations reuse the last step's pages, whatever the data path
        self.global_step = 0
        self.checkpoint_dir = os.path.join(args.output_dir, "checkpoints")
        self.start_time = time.time()
        self.accelerator = self.build_accelerator()
        self.lock = self.claim_output_dir()
        self.load_data()
        if args.dataloader_num_workers is None:  # chosen for the images: the value is then recorded with the run
            args.dataloader_num_workers = default_num_workers(self.train_dataset, self.accelerator.num_processes)
        self.feature_extractor = self.load_feature_extractor()
        self.models = self.build_models()
        self.optimizers = self.build_optimizers()
        self.train_dataloader = training_dataloader(
            self.training_data(), args.train_batch_size, args.seed, args.dataloader_num_workers)
        self.plan_steps()
        self.lr_schedulers = {
            name: get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                num_training_steps=self.max_train_steps)
            for name, optimizer in self.optimizers.items()
        }
        self.prepare()
        self.ema_models = self.build_ema_models()
        # Models were initialised alike on every process; from here each process draws its own noise (latents,
        # timesteps, dropped labels), as the batches differ too. One process keeps the plain seed.
        set_seed(args.seed, device_specific=True)

    # ----- set-up, in the order __init__ runs it ------------------------------------------------------------

    def build_accelerator(self) -> Accelerator:
        args = self.config
        # accelerate keeps one state per process; each Trainer (a second run in a notebook or a test, maybe with
        # another precision) starts from a fresh one. The process-level distributed set-up (PartialState) stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=self._tracker(args.logger),
            project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                logging_dir=os.path.join(args.output_dir, "logs")),
            # Seeded sampling + set_epoch make a resumed run see the same batches as an uninterrupted one.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # One lr-schedule step per optimizer step, whatever the number of processes: a checkpoint's schedule
            # position then means the same to any number of processes resuming it.
            step_scheduler_with_optimizer=False,
        )
        check_launch(accelerator)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        set_seed(args.seed)
        return accelerator

    def claim_output_dir(self) -> "OutputLock | None":
        """The main process locks --output_dir (and, with --overwrite_output_dir, clears the old run from it)."""
        if not self.accelerator.is_main_process:
            return None
        lock = OutputLock(self.config.output_dir)
        if self.config.overwrite_output_dir:
            clear_run(self.config.output_dir)
        return lock

    def load_data(self) -> None:
        """The training split (augmented) and the split FD compares with (the test split, else the training
        images), decoded lazily; what the family's models condition on."""
        args = self.config
        self.source = open_image_source(
            args.dataset_name, args.train_data_dir, dataset_config_name=args.dataset_config_name,
            image_column=args.image_column, caption_column=args.caption_column, streaming=args.streaming,
            validation_split=args.validation_split, max_train_samples=args.max_train_samples, cache_dir=args.cache_dir,
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes,
            skip_corrupt_images=args.skip_corrupt_images)
        self.train_dataset = self.load_split("train", augment=True)
        self.test_dataset = self.load_split(self.source.test_split)
        if args.conditional and self.train_dataset.num_classes < 2:
            raise ValueError("`--conditional` needs a labelled dataset with at least 2 classes")
        # what a family passes to its models: the classes under --conditional, none otherwise
        self.num_classes = self.train_dataset.num_classes if args.conditional else 0
        self.id2label = self.train_dataset.id2label if args.conditional else None

    def plan_steps(self) -> None:
        """max_train_steps, from the number of batches each process will see."""
        args = self.config
        self.steps_per_epoch = self.num_epochs = None  # known once the dataloader is prepared, unless streamed
        if dataset_length(self.train_dataloader.dataset) is None:  # streamed: --max_train_steps is required
            self.max_train_steps = args.max_train_steps
            return
        if len(self.train_dataloader) == 0:
            raise ValueError(f"`--train_batch_size` {args.train_batch_size} exceeds the "
                             f"{len(self.train_dataloader.dataset)} training images")
        num_processes = self.accelerator.num_processes
        if len(self.train_dataloader) < num_processes:
            raise ValueError(f"{len(self.train_dataloader)} batches of `--train_batch_size` {args.train_batch_size} "
                             f"cannot feed {num_processes} processes: lower the batch size or the number of processes")
        # each process sees 1/num_processes of the batches
        batches_per_process = math.ceil(len(self.train_dataloader) / num_processes)
        self.max_train_steps = args.max_train_steps or args.num_epochs * math.ceil(
            batches_per_process / args.gradient_accumulation_steps)

    def prepare(self) -> None:
        """Models, optimizers, schedules and (unless streamed, where each process reads its own shard) the
        dataloader through accelerate."""
        names, optimizer_names = list(self.models), list(self.optimizers)
        streamed = dataset_length(self.train_dataloader.dataset) is None
        objects = [*self.models.values(), *self.optimizers.values(), *self.lr_schedulers.values()]
        prepared = self.accelerator.prepare(*objects, *([] if streamed else [self.train_dataloader]))
        self.models = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(optimizer_names, prepared[len(names): len(names) + len(optimizer_names)]))
        self.lr_schedulers = dict(zip(self.lr_schedulers, prepared[len(names) + len(optimizer_names): len(objects)]))
        if not streamed:
            self.train_dataloader = prepared[-1]
            self.steps_per_epoch = math.ceil(len(self.train_dataloader) / self.config.gradient_accumulation_steps)
            self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)

    def build_ema_models(self) -> dict:
        """An EMA of each of `ema_model_names` under --use_ema, checkpointed with the run."""
        args, ema_models = self.config, {}
        for name in self.ema_model_names if args.use_ema else ():
            model = self.unwrap(name)
            ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                           inv_gamma=args.ema_inv_gamma, power=args.ema_power,
                           model_cls=type(model), model_config=model.config)
            ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(ema)  # saved and resumed with the checkpoints
            ema_models[name] = ema
        return ema_models

    # ----- what a family supplies -------------------------------------------------------------------------

    def build_models(self) -> dict:
        """name -> ModelMixin, built from self.config and the data (self.train_dataset)."""
        raise NotImplementedError

    def training_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One batch (labels None unless --conditional): compute the objective, call `self.optimize`, return
        detached scalars to log."""
        raise NotImplementedError

    def build_pipeline(self):
        """The pipeline to save, from the unwrapped models."""
        raise NotImplementedError

    @property
    def conditions_on_batches(self) -> bool:
        """Whether `training_step` gets the batches' second element: the class labels under --conditional (a
        family with its own conditioning, e.g. captions' token ids, extends this)."""
        return self.config.conditional

    def training_data(self):
        """The `ImageDataset` the training batches come from (after `build_models`): the training images, or
        what a family derives from them once (latent diffusion: the images' latents)."""
        return self.train_dataset

    def evaluation_options(self) -> dict:
        """This family's fields of the evaluation's `hfgen.evaluation.EvaluationConfig` (e.g. a VAE's K)."""
        return {}

    def pipeline_kwargs(self) -> dict:
        """Extra arguments of the pipeline's call for sample grids and FD (e.g. fewer denoising steps)."""
        return {}

    def evaluate(self, pipeline, full: bool = True) -> dict[str, float]:
        """Test-split metrics by `hfgen.evaluation.evaluate`, as `hfgen evaluate` computes them: the final evaluation
        (FD of --eval_num_samples samples, KID, precision/recall, density/coverage, class accuracy, the memorisation
        check, the family's likelihood bounds and extras), or with `full=False` the periodic one (FD of
        --eval_fd_num_samples samples)."""
        args = self.config
        available = dataset_length(self.test_dataset)  # None: streamed, its first num_samples images
        num_samples = args.eval_num_samples if full else args.eval_fd_num_samples
        config = EvaluationConfig(
            num_samples=min(num_samples, available or num_samples), full=full,
            feature_extractor=self.feature_extractor or "none", seed=args.seed, batch_size=args.eval_batch_size,
            num_workers=args.dataloader_num_workers, pipeline_kwargs=self.pipeline_kwargs(), nearest_k=NEAREST_K,
            # the memorisation check compares with all the training images: a test split apart from them, not streamed
            memorisation=self.source.test_split != "train" and not args.streaming, **self.evaluation_options())
        train_dataset = self.load_split("train") if config.reads_train_dataset(self.feature_extractor) else None
        return evaluate(pipeline, self.test_dataset, config, train_dataset)

    def model_card_description(self) -> str:
        return ""

    def base_models(self) -> list[str]:
        """What this model was built on (a pretrained first stage or text encoder): the card's `base_model` where
        they are Hub ids."""
        return []

    def evaluation_note(self) -> str:
        """Which images the metrics compare with, for the card."""
        if self.source.test_split == "train":
            note = ("The source has no test split, so FD compares samples with training images (pass "
                    "`--validation_split` to hold some out).")
        else:
            note = f"FD compares samples with the {self.source.test_split} split."
        if self.feature_extractor is not None:
            note += f" FD and the sample metrics are in {describe_feature_space(self.feature_extractor)}."
        return note

    def build_optimizers(self) -> dict:
        """One AdamW per model by default; families with other needs override."""
        args = self.config
        return {name: self.adamw(model, args.learning_rate, (args.adam_beta1, args.adam_beta2))
                for name, model in self.models.items()}

    def adamw(self, model, learning_rate: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        # fused=True: one kernel for all parameters, ~3x faster steps than torch's default on CPU too
        return torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas,
                                 weight_decay=self.config.adam_weight_decay, fused=True)

    # ----- helpers for families --------------------------------------------------------------------------

    def load_split(self, split: str, augment: bool = False):
        """A split of the source with this run's transform; `augment`: random crops and flips, seeded per sample."""
        args = self.config
        return self.source.dataset(split, args.resolution, args.num_channels, resize=not args.no_resize,
                                   center_crop=args.center_crop, random_flip=args.random_flip, augment=augment,
                                   seed=args.seed, skip_corrupt_images=args.skip_corrupt_images,
                                   background_color=parse_color(args.background_color),
                                   pixel_cache_memory_gb=None if args.no_pixel_cache else args.pixel_cache_memory_gb)

    def load_feature_extractor(self):
        """The FD features for --feature_extractor, or None (with a warning under "auto") when none fits the data."""
        with self.accelerator.main_process_first():  # the main process trains and caches a classifier once
            extractor = load_feature_space(self.config.feature_extractor, self.train_dataset.image_shape,
                                           required=False, dataset=self.train_dataset, dataset_name=self.source.name)
        return None if extractor is None else extractor.to(self.accelerator.device)

    def unwrap(self, name: str):
        return self.accelerator.unwrap_model(self.models[name])

    def sampling_model(self, name: str):
        """The model to sample and save with: a copy holding the EMA weights under --use_ema, else the model."""
        model = self.unwrap(name)
        if name not in self.ema_models:
            return model
        averaged = copy.deepcopy(model)
        self.ema_models[name].copy_to(averaged.parameters())
        return averaged

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backward, then (once gradients are accumulated) clipping and one step of optimizer and lr schedule `name`."""
        accelerator = self.accelerator
        guarded = accelerator.scaler is None  # fp16 loss scaling skips non-finite steps itself
        if guarded and not torch.isfinite(loss.detach()).all():
            self.stop_non_finite(f"the {name} loss is {loss.detach().float().mean().item()}")
        accelerator.backward(loss)
        if not accelerator.sync_gradients:
            return  # accumulating: the update comes with the last micro-batch
        # what optimizer `name` steps: its model's parameters, or more (a text encoder trained with a denoiser)
        parameters = [parameter for group in self.optimizers[name].param_groups for parameter in group["params"]]
        if self.config.max_grad_norm:
            norm = accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if guarded and not torch.isfinite(norm):
            self.stop_non_finite(f"the gradient norm of {name} is {norm.item()} (the loss was {loss.item():.4g})")
        optimizer = self.optimizers[name]
        # accelerate's optimizer wrapper adds fp16 loss scaling (and XLA/DeepSpeed handling) around the torch
        # optimizer, and costs ~0.3 ms per step in package lookups (benchmarks/bench_vae.py): where it adds
        # nothing, step the torch optimizer itself.
        if accelerator.scaler is None and accelerator.distributed_type in PLAIN_STEP_TYPES:
            optimizer = optimizer.optimizer
        optimizer.step()
        self.lr_schedulers[name].step()
        optimizer.zero_grad(set_to_none=True)

    def model_configs(self) -> dict:
        """name -> the JSON form of each model's config (diffusers' private `_` entries left out), as checkpoints
        record it."""
        def as_dict(config):  # diffusers' FrozenDict, or a transformers PretrainedConfig
            return config.to_dict() if hasattr(config, "to_dict") else dict(config)

        configs = {name: {key: value for key, value in as_dict(self.unwrap(name).config).items()
                          if not key.startswith("_")} for name in self.models}
        return json.loads(json.dumps(configs, default=str))

    def stop_non_finite(self, what: str) -> None:
        """Stops the run before a non-finite update reaches the weights; the last checkpoint stays as it was."""
        args = self.config
        checkpoints = list_checkpoints(self.checkpoint_dir)
        kept = f"the last checkpoint ({checkpoints[-1]}) is kept as it was" if checkpoints else "no checkpoint was written"
        raise NonFiniteError(
            f"step {self.global_step + 1}: {what}; training stopped before the update, {kept}. Likely causes: a "
            f"learning rate too large (--learning_rate {args.learning_rate:g}), too little precision "
            f"(--mixed_precision {args.mixed_precision}), or non-finite data")

    # ----- the loop -------------------------------------------------------------------------------------

    @staticmethod
    def _tracker(choice: str):
        if choice == "auto":
            return "tensorboard" if importlib.util.find_spec("tensorboard") else None
        return None if choice == "none" else choice

    def train(self) -> str:
        """Runs the whole job and returns the output folder. SIGTERM, SIGINT or SIGUSR1 stop it after the current
        step with a checkpoint at that step (`TrainingStopped`: exit status PREEMPTED_EXIT_CODE)."""
        try:
            with StopSignals(log=self.accelerator.is_main_process) as self.stop_signals:
                return self._train()
        finally:
            if getattr(self, "progress", None) is not None:
                self.progress.close()  # ends the bar's line before any error message
            if self.lock:
                try:
                    self.lock.release()
                except OSError:
                    pass  # a read-only disk: the error that stopped the run says so; the next run takes over the lock

    def _train(self) -> str:
        args, accelerator = self.config, self.accelerator
        if accelerator.log_with:
            # trackers take scalars only: lists become strings, unset flags are left out
            config = {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in args.to_flags().items()
                      if v is not None and k != "hub_token"}
            accelerator.init_trackers(self.family, config=config)
        epoch, skip_batches = self.resume()
        loader = getattr(self.train_dataloader, "base_dataloader", self.train_dataloader)  # accelerate's wraps one
        if loader.num_workers and not isinstance(loader.worker_init_fn, IgnoreStopSignals):
            loader.worker_init_fn = IgnoreStopSignals(loader.worker_init_fn)  # the training process stops, not they
        num_images = dataset_length(self.train_dataset)
        logger.info(
            "%s: %s training images, %d processes, %d steps of %d images",
            self.family, "streamed" if num_images is None else num_images, accelerator.num_processes,
            self.max_train_steps, args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        )
        self.progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="steps",
                             disable=not accelerator.is_local_main_process)
        self.epoch_seconds = []  # wall time of each epoch's training steps (sample grids excluded)
        while self.global_step < self.max_train_steps:
            self.train_epoch(epoch, skip_batches)
            epoch, skip_batches = epoch + 1, 0
        progress = self.progress
        progress.close()
        self.stop_signals.then = "the output being written is finished first"
        accelerator.wait_for_everyone()
        error = None
        if accelerator.is_main_process:
            try:
                self.save_output()
            except Exception as caught:
                error = caught
        if not self.all_succeeded(error):
            raise error or SaveError(f"the main process could not save the output in {args.output_dir!r} (its "
                                     "error is in its log)")
        if self.stop_signals.received:
            logger.warning("the output is complete (%s was received while it was written): nothing is left to resume",
                           self.stop_signals.received.name)
        self.end_collectives()
        return args.output_dir

    def stop_requested(self) -> str | None:
        """The stop signal that reached a process (named with the process when there are several), else None.
        Every process asks after every step and gets the same answer, so all stop at the same step, with one
        checkpoint."""
        signals = getattr(self, "stop_signals", None)  # None: train_epoch called outside train()
        received = signals.received if signals else None
        if self.accelerator.num_processes == 1:
            return received.name if received else None
        return signal_to_a_process([number for number, in self.from_every_process([int(received or 0)])])

    def stop_on_signal(self, received: str, saved: bool) -> None:
        """Saves a checkpoint at this step (unless `saved` already), logs it with the command that resumes, and
        raises TrainingStopped."""
        args, accelerator = self.config, self.accelerator
        checkpoint = os.path.join(self.checkpoint_dir, f"checkpoint-{self.global_step}")
        if not saved:
            self.stop_signals.then = f"saving {checkpoint}, then exiting"
            self.save_checkpoint()
        self.stop_signals.then = f"{checkpoint} is saved, exiting"
        self.progress.close()
        if accelerator.is_main_process:
            logger.warning("%s: stopped at step %d of %d with %s (exit status %d); resume with: %s", received,
                           self.global_step, self.max_train_steps, checkpoint, PREEMPTED_EXIT_CODE,
                           resume_command(args.output_dir, self.family))
        self.end_collectives()
        raise TrainingStopped(checkpoint, received)

    def all_succeeded(self, error: BaseException | None) -> bool:
        """Whether no process failed, each passing its own `error` or None. With several processes a collective
        (and so a barrier): a process that fails stops them all, instead of leaving them waiting for it forever."""
        return not any(failed for failed, in self.from_every_process([int(error is not None)]))

    def from_every_process(self, values: list[int]) -> list[list[int]]:
        """`values` of each process, in every process (as accelerate's gather): one all-reduce of a table holding each
        process's values in its row."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return [list(values)]
        table = torch.zeros((accelerator.num_processes, len(values)), dtype=torch.int64, device=accelerator.device)
        table[accelerator.process_index] = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(table)
        return table.tolist()

    def end_collectives(self) -> None:
        """Ends the run's collectives (and its trackers) before the process exits.

        Gloo's worker threads keep their last collective until they run the next one, and a barrier keeps those it
        waited for; at exit, DDP's teardown joins these threads while holding the GIL, and freeing a tensor Python
        has seen takes the GIL: a deadlock (1 two-process run in 6 hung after its last all-reduce, torch 2.13). Three
        barriers, with the GIL released between them, leave the threads holding only barriers.
        """
        if self.accelerator.num_processes > 1:
            for _ in range(3):
                time.sleep(0.01)
                torch.distributed.barrier()
        self.accelerator.end_training()

    def epoch_batches(self, epoch: int, skip_batches: int):
        """This epoch's batches (its augmentation and order), after the first `skip_batches` when resuming."""
        loader = self.train_dataloader
        dataset = loader.dataset
        dataset.set_epoch(epoch)  # the per-sample augmentation
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)  # the order of a prepared loader
        if isinstance(dataset, StreamingImageDataset):  # skipped before decoding, in each worker
            dataset.skip_batches(skip_batches, self.config.train_batch_size)
            batches = iter(loader)  # the workers start now, with this skip
            dataset.skip_batches(0, self.config.train_batch_size)
            return batches
        return self.accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader

    def train_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Training steps over one pass of the data, until the pass ends or the run reaches max_train_steps."""
        args, accelerator = self.config, self.accelerator
        epoch_start = time.perf_counter()
        models = list(self.models.values())
        for model in models:
            model.train()
        self.epoch, self.batches_into_epoch = epoch, skip_batches
        num_skipped_images = num_batches = 0
        for images, labels in self.epoch_batches(epoch, skip_batches):
            # the stop check comes before the step: a run resumed at its end trains nothing more
            if self.global_step >= self.max_train_steps:
                break
            if self.global_step == 0 and self.batches_into_epoch == 0:
                logger.info("first training step %.1f s after the start", time.time() - self.start_time)
            self.batches_into_epoch += 1
            num_batches += 1
            num_skipped_images += args.train_batch_size - len(images)
            images, labels = images.to(accelerator.device), labels.to(accelerator.device)
            labels = labels if self.conditions_on_batches else None
            with accelerator.accumulate(*models):
                logs = self.training_step(images, labels)
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            self.progress.update(1)
            for name, ema in self.ema_models.items():
                ema.step(self.models[name].parameters())
            if self.global_step % args.logging_steps == 0:
                values = {name: float(value) for name, value in logs.items()}
                values["lr"] = next(iter(self.lr_schedulers.values())).get_last_lr()[0]
                self.progress.set_postfix(**{k: f"{v:.4g}" for k, v in values.items()})
                if accelerator.log_with:
                    accelerator.log(values, step=self.global_step)
            if args.eval_fd_steps and self.global_step % args.eval_fd_steps == 0:
                self.log_fd()
            saved = self.global_step % args.checkpointing_steps == 0
            if saved:
                self.save_checkpoint()
            received = self.stop_requested()
            if received:
                self.stop_on_signal(received, saved)
        if num_batches == 0 and skip_batches == 0 and self.global_step < self.max_train_steps:
            raise ValueError(f"the training data gave no full batch of `--train_batch_size` {args.train_batch_size} "
                             f"on process {accelerator.process_index}")
        if num_skipped_images:
            logger.warning("epoch %d: skipped %d corrupt images", epoch, num_skipped_images)
        self.epoch_seconds.append(time.perf_counter() - epoch_start)
        if accelerator.log_with:
            accelerator.log({"epoch_seconds": self.epoch_seconds[-1]}, step=self.global_step)
        if args.save_images_epochs and ((epoch + 1) % args.save_images_epochs == 0
                                        or self.global_step >= self.max_train_steps):
            self.save_sample_grid(os.path.join(args.output_dir, "samples", f"step-{self.global_step:06d}.png"))

    # ----- samples and output ---------------------------------------------------------------------------------

    def sample_images(self, pipeline, num_images: int):
        """A fixed seed, so grids from different steps show the same noise decoded by a better model."""
        generator = torch.Generator(pipeline.device).manual_seed(self.config.seed)
        num_classes = pipeline.num_classes
        labels = [i % num_classes for i in range(num_images)] if num_classes else None
        return pipeline(num_images, class_labels=labels, generator=generator, **self.pipeline_kwargs()).images

    def save_sample_grid(self, path: str) -> None:
        """Writes a grid of samples (and logs it to TensorBoard), on the main process."""
        if not self.accelerator.is_main_process:
            return
        for model in self.models.values():
            model.eval()
        grid = image_grid(self.sample_images(self.build_pipeline(), self.config.num_validation_images))
        for model in self.models.values():
            model.train()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        if "tensorboard" in [tracker.name for tracker in self.accelerator.trackers]:
            writer = self.accelerator.get_tracker("tensorboard").writer
            writer.add_image("samples", np.asarray(grid.convert("RGB")), self.global_step, dataformats="HWC")

    def log_fd(self) -> None:
        """A cheap FD (--eval_fd_num_samples samples) logged during training, on the main process."""
        if not self.accelerator.is_main_process or self.feature_extractor is None:
            return
        for model in self.models.values():
            model.eval()
        fd = self.evaluate(self.build_pipeline(), full=False)["fd"]
        for model in self.models.values():
            model.train()
        logger.info("step %d: FD %.2f (%d samples)", self.global_step, fd, self.config.eval_fd_num_samples)
        if self.accelerator.log_with:
            self.accelerator.log({"fd": fd}, step=self.global_step)

    def save_output(self) -> None:
        """Pipeline folder + sample grid + evaluation + model card (+ push), on the main process.

        All of it is written into a staging folder, then moved into place with model_index.json last: a run killed
        while saving never leaves a folder that loads as if it were finished. The free space is checked first; a
        write that fails on a full or read-only disk stops with one line (`SaveError`), the staging folder removed
        and an earlier output as it was.
        """
        args = self.config
        pipeline = self.build_pipeline()
        modules = {name: component for name, component in pipeline.components.items()
                   if isinstance(component, torch.nn.Module)}
        check_finite_weights(modules, "the final pipeline")
        kept = self.kept_note(output=True)
        shortage = space_shortage(args.output_dir, state_bytes([module.state_dict() for module in modules.values()]),
                                  "the final pipeline", kept)
        if shortage:
            raise shortage
        finished = os.path.join(args.output_dir, FINISHED_MARK)
        staging = os.path.join(args.output_dir, STAGING)
        earlier_mark = None  # an earlier output's model_index.json, put back when the disk fails
        try:
            if os.path.isfile(finished):
                with open(finished, "rb") as file:
                    earlier_mark = file.read()
                os.remove(finished)  # an older output is not finished again until the new one is complete
            shutil.rmtree(staging, ignore_errors=True)
            self.write_output(pipeline, staging)
            publish(staging, args.output_dir)
        except Exception as error:
            failure = save_failure(error, args.output_dir, "the final pipeline", kept)
            if failure is error:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            if earlier_mark is not None and not os.path.exists(finished):
                try:
                    with open(finished, "wb") as file:
                        file.write(earlier_mark)
                except OSError:
                    pass  # the failure below says what happened
            raise failure from error
        self.push_output()

    def write_output(self, pipeline, staging: str) -> None:
        """The pipeline folder, sample grid, metrics and model card, written into `staging`."""
        args = self.config
        pipeline.save_pretrained(staging)
        self.save_sample_grid(os.path.join(staging, SAMPLE_GRID))  # leaves the models in train mode
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # evaluated as it is loaded: batch norm on its running statistics
        metrics = self.evaluate(pipeline)
        logger.info("test metrics: %s", metrics)
        with open(os.path.join(staging, "metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        model = pipeline.generative_model
        dataset = args.train_data_dir if args.train_data_dir else args.dataset_name
        training_config = {key: value for key, value in args.to_flags().items()
                           if key not in ("hub_token", "output_dir") and value is not None}
        training_config["global_step"] = self.global_step
        write_model_card(
            staging,
            title=f"hfgen {self.family} on {dataset}",
            description=f"{self.model_card_description()} {self.evaluation_note()}".strip(),
            pipeline_class=type(pipeline).__name__,
            tags=[self.family],
            dataset_name=dataset,
            metrics=metrics,
            model_config=dict(model.config),
            training_config=training_config,
            task_type=self.pipeline_task,
            split=self.source.test_split,
            num_classes=pipeline.num_classes,
            license=args.license,
            datasets=hub_datasets(args.dataset_name, args.train_data_dir),
            base_model=[model for model in map(hub_id, self.base_models()) if model],
        )

    def push_output(self) -> None:
        """Under --push_to_hub (and --push_demo), uploads the finished output folder."""
        args = self.config
        if args.push_to_hub:
            url = push_output_folder(args.output_dir, args.hub_model_id, token=args.hub_token,
                                     private=args.hub_private_repo or None)
            logger.info("pushed to %s", url)
        if args.push_demo:
            from hfgen.demo import push_demo

            url = push_demo(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None)
            logger.info("pushed the demo Space to %s", url)

    # ----- checkpoints --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Writes checkpoint-<step> atomically: into a temporary folder first, renamed once complete.

        A process killed mid-write leaves only `checkpoint-<step>.incomplete`, which is never resumed from (and is
        removed by the next save). The free space is checked first, against the last checkpoint's size; a write
        that fails on a full or read-only disk stops every process with one line (`SaveError`), the partial folder
        removed and the earlier checkpoints untouched.
        """
        accelerator = self.accelerator
        check_finite_weights({name: self.unwrap(name) for name in self.models}, f"checkpoint at step {self.global_step}")
        name = f"checkpoint-{self.global_step}"
        final = os.path.join(self.checkpoint_dir, name)
        partial = final + ".incomplete"
        kept = self.kept_note()
        error = None
        if accelerator.is_main_process and os.path.isdir(self.checkpoint_dir):
            for stale in os.listdir(self.checkpoint_dir):  # of saves that were killed (one live run per folder)
                if stale.endswith(".incomplete"):
                    shutil.rmtree(os.path.join(self.checkpoint_dir, stale), ignore_errors=True)
            error = space_shortage(self.checkpoint_dir, self.checkpoint_bytes(), name, kept)
        if not self.all_succeeded(error):  # also a barrier: the folder is cleared before any process writes into it
            raise error or SaveError(f"not enough space to save {name} in {self.checkpoint_dir!r} (the main "
                                     "process's error says how much)")
        # where each process is in its data: a streamed run resumes from there (its processes' passes may differ)
        data_positions = self.from_every_process([self.epoch, self.batches_into_epoch])
        try:
            accelerator.save_state(partial)
            if accelerator.is_main_process:
                with open(os.path.join(partial, TRAINER_STATE), "w") as file:
                    json.dump({"global_step": self.global_step, "family": self.family,
                               "data_positions": data_positions, "model_configs": self.model_configs()}, file)
        except Exception as caught:
            error = caught
        if not self.all_succeeded(error):
            failure = save_failure(error, self.checkpoint_dir, name, kept)  # before the removal: the free space then
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise failure
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            limit = self.config.checkpoints_total_limit
            if limit:
                for old in list_checkpoints(self.checkpoint_dir)[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def checkpoint_bytes(self) -> int:
        """The size of the last complete checkpoint, else an estimate: the bytes of the models', optimizers' and
        EMAs' tensors."""
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if checkpoints:
            return folder_bytes(checkpoints[-1])
        return state_bytes([*(self.unwrap(name).state_dict() for name in self.models),
                            *(optimizer.state_dict() for optimizer in self.optimizers.values()),
                            *(ema.shadow_params for ema in self.ema_models.values())])

    def kept_note(self, output: bool = False) -> str:
        """What a failed save leaves as it was: the last complete checkpoint (and, for the `output`, an earlier one)."""
        checkpoints = list_checkpoints(self.checkpoint_dir)
        kept = [f"the last checkpoint ({checkpoints[-1]})"] if checkpoints else []
        kept += ["an earlier output"] if output else []
        if not kept:
            return "no checkpoint was saved yet"
        return f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} untouched"

    def resume(self) -> tuple[int, int]:
        """Loads the checkpoint named by --resume_from_checkpoint; returns (first epoch, batches to skip)."""
        choice = self.config.resume_from_checkpoint
        if not choice:
            return 0, 0
        if choice == "latest":
            checkpoints = list_checkpoints(self.checkpoint_dir)
            if not checkpoints:
                logger.info("no checkpoint in %s yet: starting a new run", self.checkpoint_dir)
                return 0, 0
            path = checkpoints[-1]
        else:
            path = choice
        state_file = os.path.join(path, TRAINER_STATE)
        if not os.path.isdir(path):
            raise ValueError(f"`--resume_from_checkpoint` {path!r} is not a folder (give a checkpoint folder or 'latest')")
        if not os.path.isfile(state_file):
            raise ValueError(f"`--resume_from_checkpoint` {path!r} is not a complete checkpoint: it has no {TRAINER_STATE}")
        try:
            with open(state_file) as file:
                state = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(f"`--resume_from_checkpoint` {path!r}: its {TRAINER_STATE} cannot be read: {error}") from error
        if state.get("family") != self.family:
            raise ValueError(f"`--resume_from_checkpoint` {path!r} was written by a {state.get('family')!r} trainer, not {self.family!r}")
        saved_configs = state.get("model_configs")  # absent in checkpoints of older versions
        if saved_configs is not None and saved_configs != self.model_configs():
            current = self.model_configs()
            changes = sorted(f"{name}.{key}: {saved_configs[name].get(key)!r} -> {current[name].get(key)!r}"
                             for name in current for key in set(current[name]) | set(saved_configs.get(name, {}))
                             if saved_configs.get(name, {}).get(key) != current[name].get(key))
            raise ValueError(f"`--resume_from_checkpoint` {path!r} was written with another model config "
                             f"({'; '.join(changes[:5])}): resume with the flags of that run")
        try:
            self.accelerator.load_state(path)
        except Exception as error:
            raise ValueError(f"`--resume_from_checkpoint` {path!r} could not be loaded (corrupt checkpoint?): {error}") from error
        self.global_step = int(state["global_step"])
        logger.info("resumed from %s at step %d", path, self.global_step)
        if self.steps_per_epoch is None:  # streamed: each process continues its own pass of the data
            positions = state.get("data_positions") or []
            if len(positions) != self.accelerator.num_processes:
                raise ValueError(f"`--resume_from_checkpoint` {path!r} was written by {len(positions)} processes: a "
                                 f"streamed run resumes with as many, not {self.accelerator.num_processes}")
            epoch, batches = positions[self.accelerator.process_index]
            return int(epoch), int(batches)
        first_epoch = self.global_step // self.steps_per_epoch
        skip = (self.global_step % self.steps_per_epoch) * self.config.gradient_accumulation_steps
        return first_epoch, skip
