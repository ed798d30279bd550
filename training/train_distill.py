"""Few-step models by reflow (Liu et al., 2023; docs/maths.md §6.13): a trained DDPM, flow-matching or EDM pipeline,
pixel or latent, unconditional or class-conditional (the teacher), draws pairs (noise z, its sample x0 = the teacher's
ODE from z), and a flow-matching student, started from the teacher's network, learns the straight path between each
pair. The student's ODE is then nearly straight, so 1, 2 or 4 Euler steps follow it.

    hfgen distill hfgen-flow-mnist --output_dir hfgen-flow-mnist-2step --num_steps 2
    accelerate launch -m hfgen.training.train_distill --teacher hfgen-flow-mnist --output_dir student

The student is an ordinary pipeline folder (the teacher's class, a FlowMatchEulerDiscreteScheduler, `sampling_steps`
= --num_steps as its calls' default); its card names the teacher as `base_model` (when it is a Hub id) and the steps.
Why reflow, of the peers' methods: it is one round of ordinary flow-matching training (hfgen's objective as it is) on
pairs the teacher draws once, and the student stays a flow model that any step count samples; progressive
distillation needs log2(teacher steps) rounds of training, and consistency distillation a target network, a skipping
ODE solver and its own loss and sampler (LCMScheduler). Its cost is the teacher's sampling of the pairs, reported.
"""

import copy
import dataclasses
import logging
import os
import time

import torch

from hfgen import AutoPipeline
from hfgen.data import ImageDataset
from hfgen.diffusion import null_class_labels
from hfgen.objectives import FlowMatchingObjective, objective_class, objective_of
from hfgen.pipelines import DDPMPipeline, LatentDiffusionPipeline
from hfgen.pipelines.pipeline_utils import read_model_index, resolve_pretrained_path
from hfgen.utils import check_positive_int

from .config import flag, redefault
from .train_ddpm import DDPMTrainer, DDPMTrainingConfig

logger = logging.getLogger(__name__)

STUDENT_PIPELINES = ("DDPMPipeline", "LatentDiffusionPipeline")  # the teachers reflow distills: same class for the student
# Flags of the diffusion trainer that the teacher decides for a student: refused when given.
TEACHERS_FLAGS = ("denoiser", "block_out_channels", "layers_per_block", "patch_size", "vit_hidden_size", "vit_layers",
                  "vit_heads", "num_train_timesteps", "conditional", "label_dropout", "num_inference_steps",
                  "caption_column")


@dataclasses.dataclass
class DistillTrainingConfig(DDPMTrainingConfig):
    """Distill a trained diffusion or flow pipeline into a 1-, 2- or 4-step flow-matching student by reflow."""

    teacher: str | None = flag(None, "The teacher: a DDPMPipeline or LatentDiffusionPipeline folder or Hub id (DDPM, "
                                     "flow matching or EDM; unconditional or class-conditional).")
    num_steps: int = flag(2, "The student's sampling steps, its calls' default (and those of its FD).",
                          choices=(1, 2, 4))
    teacher_steps: int = flag(20, "Steps of the teacher's deterministic sampler (its objective's DPM-Solver++) per "
                                  "pair.", check=check_positive_int)
    num_pairs: int = flag(4000, "Pairs (noise, teacher sample) drawn before training.", check=check_positive_int)
    objective: str = redefault(DDPMTrainingConfig, "objective", FlowMatchingObjective.name)
    num_epochs: int = redefault(DDPMTrainingConfig, "num_epochs", 10)

    def validate(self) -> None:
        super().validate()
        if self.teacher is None:
            raise ValueError("`--teacher` is required: the pipeline folder or Hub id to distill")
        index = read_model_index(os.path.join(resolve_pretrained_path(self.teacher), "model_index.json"))
        if index.get("_class_name") not in STUDENT_PIPELINES:
            raise ValueError(f"`--teacher` {self.teacher!r} holds a {index.get('_class_name')}: reflow distills a "
                             f"{' or '.join(STUDENT_PIPELINES)} (text-to-image teachers are not supported)")
        if objective_class(self.objective) is not FlowMatchingObjective:
            raise ValueError(f"`--objective` {self.objective!r}: a reflow student is a flow-matching model")
        defaults = DDPMTrainingConfig(output_dir=self.output_dir)
        given = [name for name in TEACHERS_FLAGS if getattr(self, name) != getattr(defaults, name)]
        if given:
            raise ValueError(f"`--{given[0]}`: the student is the teacher's network, classes and scheduler length "
                             f"(and samples with --num_steps), so {', '.join('--' + name for name in TEACHERS_FLAGS)} "
                             "are the teacher's")


def parse_args(argv=None) -> DistillTrainingConfig:
    return DistillTrainingConfig.from_command_line(argv)


class DistillTrainer(DDPMTrainer):
    config_class = DistillTrainingConfig

    def load_data(self):
        """The teacher, then the data (whose test split FD compares with)."""
        args = self.config
        self.teacher = AutoPipeline.from_pretrained(args.teacher).to(self.accelerator.device)  # its class: validate()
        self.teacher.set_progress_bar_config(disable=True)
        super().load_data()
        self.num_classes, self.id2label = self.teacher.num_classes, self.teacher.id2label
        args.num_train_timesteps = self.teacher.scheduler.config.num_train_timesteps  # recorded with the run

    @property
    def pipeline_kind(self) -> str:
        return "latents" if isinstance(self.teacher, LatentDiffusionPipeline) else "pixels"

    @property
    def conditions_on_batches(self) -> bool:
        return self.num_classes > 0

    def sample_shape(self):
        return self.teacher.latent_shape

    def build_models(self):
        self.noise_scheduler = self.build_noise_scheduler()
        self.pairs, self.pair_labels = self.draw_pairs()
        student = copy.deepcopy(self.teacher.unet).train().requires_grad_(True)
        return {"unet": student}

    @torch.no_grad()
    def draw_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2C, H, W): each teacher sample x0 beside the noise z it came from (as a latent cache keeps two moments
        in one tensor), and the (N,) labels: uniform classes, and the null class at the teacher's label dropout
        (its unconditional samples, for the student's guidance); zeros for an unconditional teacher. Every process
        draws the same pairs from --seed."""
        args, teacher = self.config, self.teacher
        sampler = objective_of(teacher.scheduler).fast_sampler(teacher.scheduler)  # deterministic: the teacher's ODE
        saved, teacher.scheduler = teacher.scheduler, sampler
        generator = torch.Generator(teacher.device).manual_seed(args.seed)
        started, pairs, labels = time.time(), [], []
        for first in range(0, args.num_pairs, args.eval_batch_size):
            count = min(args.eval_batch_size, args.num_pairs - first)
            noise = torch.randn((count, *teacher.latent_shape), generator=generator, device=teacher.device)
            classes = None
            if self.num_classes:
                classes = torch.randint(0, self.num_classes, (count,), generator=generator, device=teacher.device)
                dropped = torch.rand(count, generator=generator, device=teacher.device) < \
                    (teacher.config.get("label_dropout") or 0)
                classes = torch.where(dropped, null_class_labels(classes, self.num_classes), classes)
            x0 = teacher.reverse_process(noise.clone(), classes, 1.0, args.teacher_steps, generator)
            pairs.append(torch.cat([x0, noise], dim=1).cpu())
            labels.append(classes.cpu() if classes is not None else torch.zeros(count, dtype=torch.long))
        teacher.scheduler = saved
        self.pair_minutes = (time.time() - started) / 60
        logger.info("drew %d reflow pairs with %d teacher steps each in %.1f min", args.num_pairs, args.teacher_steps,
                    self.pair_minutes)
        return torch.cat(pairs), torch.cat(labels)

    def training_data(self):
        return ImageDataset(self.pairs, self.pair_labels, self.id2label, seed=self.config.seed)

    def clean_and_noise(self, batch):
        """A batch of pairs (B, 2C, H, W) -> (the teacher's samples x0, the noise each came from)."""
        return batch.chunk(2, dim=1)

    def conditioning(self, labels):
        """The pairs' own labels: the null class's pairs are drawn as such (no label dropout on top)."""
        return {"class_labels": labels} if self.num_classes else {}

    def build_pipeline(self):
        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        label_dropout = self.teacher.config.get("label_dropout") if self.num_classes else None
        teacher, unet, steps = self.teacher, self.sampling_model("unet"), self.config.num_steps
        if isinstance(teacher, LatentDiffusionPipeline):
            return LatentDiffusionPipeline(teacher.vae, unet, scheduler, teacher.config.scaling_factor, label_dropout,
                                           self.config.objective, teacher.config.get("shift_factor", 0.0), steps)
        return DDPMPipeline(unet, scheduler, label_dropout, self.config.objective, steps)

    def pipeline_kwargs(self):
        return {"num_inference_steps": self.config.num_steps}

    def base_models(self) -> list[str]:
        return [self.config.teacher]

    def model_card_description(self):
        args, teacher = self.config, self.teacher
        return (f"A {args.num_steps}-step flow-matching student distilled by reflow (docs/maths.md §6.13) from the "
                f"{objective_of(teacher.scheduler).title} `{args.teacher}` ({type(teacher).__name__}): {args.num_pairs} "
                f"pairs of noise and the teacher's {args.teacher_steps}-step sample, drawn in "
                f"{self.pair_minutes:.1f} min, then flow matching on the straight paths between them. It samples in "
                f"{args.num_steps} Euler steps by default; FD with {args.num_steps} steps.")


def main(argv=None) -> str:
    return DistillTrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen distill")
