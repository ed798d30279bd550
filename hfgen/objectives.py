"""Diffusion objectives: what a denoiser is trained for, one class each (docs/maths.md §6, §6.9, §6.10).

An objective owns everything that differs between them: the scheduler it trains with and saves, how clean data x0 is
corrupted and what the denoiser regresses onto, the loss weighting, how an output converts to x0, whether a
likelihood bound exists, the samplers that fit it, its model-card tags, and its own flags. Trainers, evaluation, the
demo and the pipelines ask the objective (`OBJECTIVES[name]`, or `objective_of(scheduler)` for a folder saved
without the name) and never compare its name. A new objective is one class here and one entry in `OBJECTIVES`.

Shapes: x0, noise (B, C, H, W); the denoiser's timesteps (B,).
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
from diffusers.training_utils import compute_snr

from .diffusion import (
    PREDICTION_TYPES, WEIGHTING_SCHEMES, broadcast_per_example, flow_predict_x0, flow_sample, flow_velocity,
    predict_x0, sample_flow_sigmas, training_target)
from .utils import check_choice, check_non_negative_int, check_positive_int, check_positive_number

# The pipelines an objective's denoiser can sit in; each objective names its model-card tag for each.
PIPELINE_KINDS = ("pixels", "latents", "text", "latent_text")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One of an objective's own trainer flags: `--name`, its default, type and help (the parser adds it with default
    None, so that a flag given to another objective can be refused by name)."""
    default: Any
    type: Callable = str
    help: str = ""
    choices: tuple | None = None
    check: Callable | None = None  # check(flag_name, value), e.g. hfgen.utils.check_positive_number


def swapped(cls) -> Callable:
    """saved scheduler -> a `cls` on its config (the noise levels the denoiser was trained with)."""
    return lambda saved: cls.from_config(saved.config)


class DiffusionObjective:
    """The interface; see the module docstring. Instances hold the flag values of one run (`flags`)."""

    name: ClassVar[str]
    title: ClassVar[str]  # for cards and messages: "DDPM", "flow-matching model"
    a_title: ClassVar[str]  # the same with its article: "a DDPM", "an EDM model"
    tags: ClassVar[dict[str, str]]  # PIPELINE_KINDS -> the model card's tag
    flags: ClassVar[dict[str, Flag]] = {}
    has_likelihood_bound: ClassVar[bool] = False  # the DDPM variational bound (bits/dim) applies
    clip_sample: ClassVar[bool] = False  # whether its pixel sampler clips x0 to [-1, 1]

    def __init__(self, **values):
        unknown = set(values) - set(self.flags)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no flag(s) {sorted(unknown)}; its flags: {sorted(self.flags)}")
        self.values = {name: flag.default for name, flag in self.flags.items()}
        self.values.update({name: value for name, value in values.items() if value is not None})
        for name, flag in self.flags.items():
            if self.values[name] is None:
                continue
            if flag.choices:
                check_choice(f"--{name}", self.values[name], flag.choices)
            if flag.check:
                flag.check(f"--{name}", self.values[name])

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ----- what a scheduler says about the objective ---------------------------------------------------------

    @classmethod
    def samples_with(cls, scheduler) -> bool:
        """Whether `scheduler` samples a denoiser trained with this objective."""
        raise NotImplementedError

    samplers: ClassVar[dict[str, tuple[type, Callable]]] = {}  # demo name -> (class, saved scheduler -> it)
    scheduler_kind: ClassVar[str]  # for messages: which schedulers sample it

    @classmethod
    def fast_sampler(cls, scheduler):
        """The few-step sampler on the trained `scheduler`'s noise levels (20 steps sample well)."""
        raise NotImplementedError

    @classmethod
    def set_timesteps(cls, scheduler, num_steps: int, device=None) -> None:
        """Sets `scheduler`'s sampling timesteps for `num_steps` steps (its own spacing)."""
        scheduler.set_timesteps(num_steps, device=device)

    # ----- training ------------------------------------------------------------------------------------------

    def scheduler(self, num_train_timesteps: int, clip_sample: bool = True):
        """The scheduler training draws noise levels from; a fresh copy of it is saved with the pipeline.
        `clip_sample`: whether a pixel DDPM's sampler clips x0 to [-1, 1] (the others ignore it)."""
        raise NotImplementedError

    def needs_data(self) -> bool:
        """Whether `fit` must see training data before `scheduler` can be made."""
        return False

    def fit(self, clean_samples: torch.Tensor) -> None:
        """Takes statistics from the training data (x0 of a few batches) before the scheduler is made."""

    def corrupt(self, x0: torch.Tensor, noise: torch.Tensor, scheduler) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor, torch.Tensor | None]:
        """(denoiser input, denoiser timesteps (B,), regression target, per-example loss weights (B,) or None)."""
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The mean squared error, each example's weighted by `weights`."""
        if weights is None:
            return F.mse_loss(prediction.float(), target.float())
        errors = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (errors * weights).mean()

    # ----- for people ----------------------------------------------------------------------------------------

    def describe(self) -> str:
        """What the denoiser learns, for the model card."""
        raise NotImplementedError

    likelihood_note: ClassVar[str] = ""  # what the card says where no likelihood is reported


class DDPMObjective(DiffusionObjective):
    """The DDPM forward process q(x_t | x0) on a beta schedule; the denoiser predicts eps, x0 or v (§6)."""

    name, title, a_title = "ddpm", "DDPM", "a DDPM"
    tags = {"pixels": "ddpm", "latents": "ldm", "text": "text-to-image", "latent_text": "text-to-image-ldm"}
    flags = {
        "prediction_type": Flag("epsilon", str, "DDPM only: epsilon (noise, the default), sample (x0, docs/maths.md "
                                "§6.3) or v_prediction.", PREDICTION_TYPES),
        "beta_schedule": Flag("linear", str, "DDPM only (default linear).",
                              ("linear", "scaled_linear", "squaredcos_cap_v2")),
        "snr_gamma": Flag(None, float, "DDPM only: min-SNR loss weighting with this gamma (5 is common).",
                          check=check_positive_number),
        "eval_vlb_num_images": Flag(100, int, "DDPM only: test images of the variational bound in bits/dim (default "
                                    "100; it does not apply to the other objectives).", check=check_non_negative_int),
        "eval_vlb_num_timesteps": Flag(None, int, "DDPM only: sampled KL terms of the bound (default: all T, exact "
                                       "but T denoiser calls per image).", check=check_positive_int),
    }
    has_likelihood_bound = True
    clip_sample = True
    scheduler_kind = "a DDPM-family scheduler (DDPM, DDIM, DPM-Solver++, ...)"

    @classmethod
    def samples_with(cls, scheduler) -> bool:
        return not (FlowMatchingObjective.samples_with(scheduler) or EDMObjective.samples_with(scheduler))

    samplers = {"DDPM": (DDPMScheduler, swapped(DDPMScheduler)), "DDIM": (DDIMScheduler, swapped(DDIMScheduler)),
                "DPM-Solver++": (DPMSolverMultistepScheduler, lambda saved: DDPMObjective.fast_sampler(saved))}

    @classmethod
    def fast_sampler(cls, scheduler) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ (2nd-order multistep) on the DDPM's noise schedule."""
        return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")

    def scheduler(self, num_train_timesteps: int, clip_sample: bool = True) -> DDPMScheduler:
        # betas explicit: diffusers' from_config gives another scheduler class its own defaults for values a config
        # left at the default (e.g. HeunDiscreteScheduler's 0.00085 / 0.012), until the config is saved and reloaded
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                             beta_schedule=self.beta_schedule, prediction_type=self.prediction_type,
                             clip_sample=clip_sample)

    def corrupt(self, x0, noise, scheduler):
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, timesteps)  # q(x_t | x0) in closed form
        target = training_target(x0, noise, timesteps, self.prediction_type, scheduler.alphas_cumprod.to(x0.device))
        if self.snr_gamma is None:
            return x_t, timesteps, target, None
        # min-SNR-gamma weighting (Hang et al., 2023), per the prediction type
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=self.snr_gamma)
        weights = {"epsilon": weights / snr, "v_prediction": weights / (snr + 1)}.get(self.prediction_type, weights)
        return x_t, timesteps, target, weights

    def predict_x0(self, x_t, timesteps, output, scheduler) -> torch.Tensor:
        return predict_x0(x_t, timesteps, output, self.prediction_type, scheduler.alphas_cumprod.to(x_t.device))

    def describe(self) -> str:
        return f"{self.prediction_type} prediction"


class FlowMatchingObjective(DiffusionObjective):
    """The straight path x_sigma = (1 - sigma) x0 + sigma eps; the denoiser predicts the velocity eps - x0 (§6.9)."""

    name, title, a_title = "flow_matching", "flow-matching model", "a flow-matching model"
    tags = {"pixels": "flow-matching", "latents": "latent-flow-matching", "text": "text-to-image-flow-matching",
            "latent_text": "text-to-image-latent-flow-matching"}
    flags = {
        "weighting_scheme": Flag("uniform", str, "Flow matching only: how the training noise levels are drawn, uniform "
                                 "(the default) or logit_normal (as Stable Diffusion 3).", WEIGHTING_SCHEMES),
        "logit_mean": Flag(None, float, "With --weighting_scheme logit_normal (default 0)."),
        "logit_std": Flag(None, float, "With --weighting_scheme logit_normal (default 1).",
                          check=check_positive_number),
        "flow_shift": Flag(1.0, float, "Flow matching only: the noise levels' shift, sigma -> shift sigma / (1 + "
                           "(shift - 1) sigma) (default 1: none; Stable Diffusion 3 uses 3 at 1024 px); the saved "
                           "scheduler has the same one.", check=check_positive_number),
    }
    likelihood_note = (" Likelihood: not applicable; the DDPM variational bound (bits/dim) does not apply to flow "
                       "matching (docs/maths.md §6.9), so none is reported.")
    scheduler_kind = "a flow scheduler (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)"

    def __init__(self, **values):
        super().__init__(**values)
        if self.weighting_scheme != "logit_normal" and (self.logit_mean is not None or self.logit_std is not None):
            raise ValueError(f"`--logit_mean` and `--logit_std` shape `--weighting_scheme logit_normal`, but it is "
                             f"{self.weighting_scheme!r}")
        if self.weighting_scheme == "logit_normal":
            self.values["logit_mean"] = 0.0 if self.logit_mean is None else self.logit_mean
            self.values["logit_std"] = 1.0 if self.logit_std is None else self.logit_std

    @classmethod
    def samples_with(cls, scheduler) -> bool:
        """diffusers' flow schedulers have `scale_noise` instead of `add_noise`; multistep solvers set up for flows
        (`use_flow_sigmas`) have prediction_type "flow_prediction"."""
        return hasattr(scheduler, "scale_noise") or scheduler.config.get("prediction_type") == "flow_prediction"

    samplers = {"FlowMatchEuler": (FlowMatchEulerDiscreteScheduler, swapped(FlowMatchEulerDiscreteScheduler)),
                "FlowMatchHeun": (FlowMatchHeunDiscreteScheduler, swapped(FlowMatchHeunDiscreteScheduler)),
                "DPM-Solver++": (DPMSolverMultistepScheduler, lambda saved: FlowMatchingObjective.fast_sampler(saved))}

    @classmethod
    def set_timesteps(cls, scheduler, num_steps: int, device=None) -> None:
        """Euler's noise levels as diffusers' flow pipelines (SD3, Flux) set them: sigma = 1, 1 - 1/N, ..., 1/N (then
        0), equal steps, shifted by the scheduler; the scheduler's own spacing ends at its smallest training level,
        which wastes a step of few (2 steps were 1 and 0.001)."""
        if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters and hasattr(scheduler, "scale_noise"):
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), device=device)
        else:
            scheduler.set_timesteps(num_steps, device=device)

    @classmethod
    def fast_sampler(cls, scheduler) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ integrating the same flow: use_flow_sigmas, the velocity as prediction, the flow scheduler's
        shift; at 20 steps it beats Euler's FD by about 12% (BENCHMARKS.md)."""
        config = dict(scheduler.config)
        if "shift" in config:  # a flow scheduler's shift is the multistep solver's flow_shift
            config["flow_shift"] = config.pop("shift")
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", use_flow_sigmas=True,
                                                       prediction_type="flow_prediction")

    def scheduler(self, num_train_timesteps: int, clip_sample: bool = True) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=self.flow_shift)

    def corrupt(self, x0, noise, scheduler):
        sigmas = sample_flow_sigmas(scheduler.sigmas, x0.shape[0], self.weighting_scheme, self.logit_mean,
                                    self.logit_std, device=x0.device)
        # the flow schedulers call the denoiser at sigma * T
        timesteps = sigmas * scheduler.config.num_train_timesteps
        return flow_sample(x0, noise, sigmas), timesteps, flow_velocity(x0, noise), None

    def predict_x0(self, x_t, timesteps, output, scheduler) -> torch.Tensor:
        return flow_predict_x0(x_t, timesteps / scheduler.config.num_train_timesteps, output)

    def describe(self) -> str:
        levels = self.weighting_scheme.replace("_", "-") + (
            f" (mean {self.logit_mean:g}, std {self.logit_std:g})" if self.weighting_scheme == "logit_normal" else "")
        return (f"flow matching: velocity prediction on the straight path, {levels} noise levels, shift "
                f"{self.flow_shift:g}; sampled with FlowMatchEulerDiscreteScheduler")


# ----- EDM (Karras et al., 2022; docs/maths.md §6.10) ------------------------------------------------------------
# x_sigma = x0 + sigma n; the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with
#   c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
#   c_noise = ln(sigma) / 4        (sd = sigma_data, the data's standard deviation).
# Training draws ln sigma ~ N(P_mean, P_std^2) and minimises lambda(sigma) |D - x0|^2, lambda = 1 / c_out^2; that
# equals the unweighted |F - (x0 - c_skip x_sigma) / c_out|^2, which is what `corrupt` returns as its target.


def edm_preconditioning(sigmas: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise), each shaped like `sigmas`."""
    total = sigmas ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigmas * sigma_data / total.sqrt(), 1 / total.sqrt(), sigmas.log() / 4


class EDMObjective(DiffusionObjective):
    """Karras et al. (2022): preconditioned denoising at log-normal noise levels, sampled with diffusers' EDM
    schedulers (EDMEulerScheduler saved; EDMDPMSolverMultistepScheduler offered)."""

    name, title, a_title = "edm", "EDM model", "an EDM model"
    tags = {"pixels": "edm", "latents": "latent-edm", "text": "text-to-image-edm", "latent_text": "text-to-image-latent-edm"}
    flags = {
        "p_mean": Flag(-1.2, float, "EDM only: mean of ln(sigma) in training (Karras et al.: -1.2)."),
        "p_std": Flag(1.2, float, "EDM only: std of ln(sigma) in training (Karras et al.: 1.2).",
                      check=check_positive_number),
        "sigma_data": Flag(None, float, "EDM only: the data's standard deviation in the preconditioning (default: "
                           "measured on the training data at the start).", check=check_positive_number),
    }
    likelihood_note = (" Likelihood: not reported; the DDPM variational bound (bits/dim) assumes the DDPM forward "
                       "process, not EDM's (docs/maths.md §6.10).")
    sigma_min, sigma_max = 0.002, 80.0  # the sampler's range (Karras et al.)
    scheduler_kind = "an EDM scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler)"

    @classmethod
    def samples_with(cls, scheduler) -> bool:
        return hasattr(scheduler, "precondition_outputs")

    samplers = {"EDMEuler": (EDMEulerScheduler, swapped(EDMEulerScheduler)),
                "EDM DPM-Solver++": (EDMDPMSolverMultistepScheduler, lambda saved: EDMObjective.fast_sampler(saved))}

    @classmethod
    def fast_sampler(cls, scheduler) -> EDMDPMSolverMultistepScheduler:
        """EDM's DPM-Solver++ (2nd-order multistep) on the same sigma range, sigma_data and Karras spacing."""
        return EDMDPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")

    def needs_data(self) -> bool:
        return self.sigma_data is None

    def fit(self, clean_samples: torch.Tensor) -> None:
        """sigma_data: the standard deviation of the clean samples (pixels in [-1, 1], or scaled latents)."""
        self.values["sigma_data"] = float(clean_samples.float().std())

    def scheduler(self, num_train_timesteps: int, clip_sample: bool = True) -> EDMEulerScheduler:
        if self.sigma_data is None:
            raise ValueError("EDM's sigma_data is not known yet: give --sigma_data, or call fit(clean_samples) first")
        # diffusers' "epsilon" for EDM is F-prediction: D = c_skip x + c_out F with the c_out above
        return EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                                 num_train_timesteps=num_train_timesteps, prediction_type="epsilon")

    def corrupt(self, x0, noise, scheduler):
        log_sigmas = self.p_mean + self.p_std * torch.randn(x0.shape[0], device=x0.device)
        sigmas = log_sigmas.exp()
        c_skip, c_out, c_in, c_noise = (broadcast_per_example(c, x0.dim())
                                        for c in edm_preconditioning(sigmas, self.sigma_data))
        x_sigma = x0 + broadcast_per_example(sigmas, x0.dim()) * noise
        return c_in * x_sigma, c_noise.flatten(), (x0 - c_skip * x_sigma) / c_out, None

    def predict_x0(self, x_t, timesteps, output, scheduler) -> torch.Tensor:
        """D(x; sigma) from the network's F at the denoiser timesteps c_noise = ln(sigma) / 4 (x_t unscaled)."""
        sigmas = (4 * timesteps).exp()
        c_skip, c_out, _, _ = (broadcast_per_example(c, x_t.dim())
                               for c in edm_preconditioning(sigmas, self.sigma_data))
        return c_skip * x_t + c_out * output

    def describe(self) -> str:
        return (f"EDM: preconditioned denoiser (sigma_data {self.sigma_data:.3g}), ln sigma ~ N({self.p_mean:g}, "
                f"{self.p_std:g}^2) in training, lambda(sigma) = 1 / c_out^2; sampled with EDMEulerScheduler")


OBJECTIVES: dict[str, type[DiffusionObjective]] = {
    cls.name: cls for cls in (DDPMObjective, FlowMatchingObjective, EDMObjective)}


def objective_class(name: str) -> type[DiffusionObjective]:
    if name not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def objective_of(scheduler) -> type[DiffusionObjective]:
    """The objective a scheduler samples (for folders saved without the objective's name)."""
    return next(cls for cls in OBJECTIVES.values() if cls.samples_with(scheduler))


def dpm_solver(scheduler):
    """The fast sampler (DPM-Solver++, 2nd order) of whichever objective `scheduler` samples, on its noise levels."""
    return objective_of(scheduler).fast_sampler(scheduler)


def objective_flags() -> dict[str, tuple[str, Flag]]:
    """Every objective's own flag: name -> (the objective's name, Flag)."""
    return {flag_name: (name, flag) for name, cls in OBJECTIVES.items() for flag_name, flag in cls.flags.items()}


def objective_from_args(args) -> DiffusionObjective:
    """The run's objective from parsed flags (objective flags default to None): refuses another objective's flags,
    naming them, and fills in this one's defaults."""
    cls = objective_class(args.objective)
    given = [name for name, (owner, _) in objective_flags().items()
             if owner != cls.name and getattr(args, name, None) is not None]
    if given:
        owner = objective_flags()[given[0]][0]
        flags = ", ".join(f"`--{name}`" for name in given)
        raise ValueError(f"{flags} {'is an option' if len(given) == 1 else 'are options'} of "
                         f"`--objective {owner}`, but this run trains with `--objective {cls.name}`: leave "
                         f"{'it' if len(given) == 1 else 'them'} out")
    return cls(**{name: getattr(args, name, None) for name in cls.flags})

