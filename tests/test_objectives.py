"""The diffusion objectives as objects (hfgen/objectives.py): each is complete, recognises its own schedulers, and
nothing outside the module compares an objective's name."""

import pathlib
import re

import pytest
import torch

from hfgen.objectives import OBJECTIVES, PIPELINE_KINDS, EDMObjective, objective_class, objective_flags, objective_of

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_is_complete_and_recognises_its_schedulers(name):
    cls = OBJECTIVES[name]
    assert set(cls.tags) == set(PIPELINE_KINDS) and cls.name == name
    objective = cls(sigma_data=0.5) if cls is EDMObjective else cls()
    scheduler = objective.scheduler(1000)
    assert objective_of(scheduler) is cls and objective_of(cls.fast_sampler(scheduler)) is cls
    for scheduler_class, make in cls.samplers.values():  # the demo's choices: each samples this objective
        made = make(scheduler)
        assert type(made) is scheduler_class and objective_of(made) is cls, scheduler_class
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    model_input, timesteps, target, weights = objective.corrupt(x0, noise, scheduler)
    assert model_input.shape == target.shape == x0.shape and timesteps.shape == (4,)
    assert weights is None or weights.shape == (4,)
    # the regression target, taken as the prediction, gives back x0 from the noisy sample (EDM's input is scaled by
    # c_in, so its unscaled x0 + sigma n, with c_noise = ln(sigma) / 4 as the timestep)
    noisy = x0 + (4 * timesteps).exp().reshape(-1, 1, 1, 1) * noise if cls is EDMObjective else model_input
    torch.testing.assert_close(objective.predict_x0(noisy, timesteps, target, scheduler), x0, atol=1e-3, rtol=1e-3)
    assert objective.describe()


def test_flag_names_belong_to_one_objective_each():
    owners = {}
    for name, cls in OBJECTIVES.items():
        for flag in cls.flags:
            assert flag not in owners, f"--{flag} belongs to {owners[flag]} and {name}"
            owners[flag] = name
    assert {name: owner for name, (owner, _) in objective_flags().items()} == owners


def test_unknown_objectives_are_refused_by_name():
    with pytest.raises(ValueError, match=r"`objective` must be one of \('ddpm', 'flow_matching', 'edm'\), got 'score'"):
        objective_class("score")


def test_no_code_outside_the_objectives_module_compares_an_objective_name():
    comparison = re.compile(r"""objective\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*["'](ddpm|flow_matching|edm)["']|"""
                            r"""\bFLOW_MATCHING\b""")
    found = []
    for folder in ("hfgen", "training", "pipelines"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "objectives.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if comparison.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
