"""The typed training configs (training/config.py): every flag of today is a field with the same default, and each
family trains from Python without an argv."""

import copy
import dataclasses
import json
import os
import sys
import typing

import pytest

from hfgen import AutoPipeline
from hfgen.objectives import objective_flags
from hfgen.training import (
    DDPMTrainer, DDPMTrainingConfig, GANTrainer, GANTrainingConfig, LDMTrainer, LDMTrainingConfig, VAETrainer,
    VAETrainingConfig)
from hfgen.training.config import _value_type
from hfgen.training import train_ddpm, train_gan, train_ldm, train_vae

FLAGS_BEFORE = os.path.join(os.path.dirname(__file__), "data", "training_flags.json")
FAMILIES = {"vae": (train_vae, VAETrainingConfig), "gan": (train_gan, GANTrainingConfig),
            "ddpm": (train_ddpm, DDPMTrainingConfig), "ldm": (train_ldm, LDMTrainingConfig)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_flag_maps_to_a_field_with_the_default_it_had(family):
    """tests/data/training_flags.json: each family's flags and defaults as its argparse parser gave them before the
    configs were typed, and each flag added since (written there on purpose, with its default)."""
    module, config_class = FAMILIES[family]
    with open(FLAGS_BEFORE) as file:
        before = json.load(file)[family]
    parsed = module.parse_args(["--output_dir", "x"])
    assert isinstance(parsed, config_class)
    flags = parsed.to_flags()
    assert flags.pop("output_dir") == "x"
    assert flags == before
    assert config_class(output_dir="x") == parsed  # the Python defaults are the command line's
    parser_flags = {action.dest for action in config_class.command_parser()._actions} - {"help"}
    assert parser_flags == set(before) | {"output_dir"}
    for field in dataclasses.fields(config_class):
        if "nested" not in field.metadata:
            assert field.metadata["help"] or field.name in ("adam_beta1", "adam_beta2", "ema_max_decay", "ema_power",
                                                            "lr_warmup_steps", "gradient_accumulation_steps",
                                                            "mixed_precision", "logging_steps", "seed"), field.name


def test_objective_flags_are_fields_of_their_objectives_type():
    hints = typing.get_type_hints(DDPMTrainingConfig)
    for name, (_, spec) in objective_flags().items():
        assert _value_type(hints[name]) == (spec.type, False), name
        assert DDPMTrainingConfig.__dataclass_fields__[name].default is None  # unset: another objective refuses it


def test_flag_values_parse_into_typed_fields():
    config = train_ldm.parse_args(["--output_dir", "x", "--block_out_channels", "16", "32", "--use_ema",
                                   "--objective", "flow_matching", "--flow_shift", "2", "--vae_hidden_dims", "8", "16",
                                   "--vae_num_epochs", "3", "--max_train_steps", "7"])
    assert config.block_out_channels == [16, 32] and config.use_ema is True and config.flow_shift == 2.0
    assert config.max_train_steps == 7 and config.first_stage.hidden_dims == [8, 16]
    assert config.first_stage.num_epochs == 3 and config.to_flags()["vae_num_epochs"] == 3
    assert config.center_crop is True and config.resolution == 32  # latent diffusion's own defaults
    assert GANTrainingConfig(output_dir="x").learning_rate == 2e-4 and VAETrainingConfig(output_dir="x").learning_rate == 1e-3


def test_bad_values_from_python_are_refused_by_name_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"`--latent_dim` must be a positive integer, got 0"):
        VAETrainer(VAETrainingConfig(output_dir=str(tmp_path), latent_dim=0))
    with pytest.raises(ValueError, match=r"`--loss` must be one of .*got 'wasserstein'"):
        GANTrainer(GANTrainingConfig(output_dir=str(tmp_path), loss="wasserstein"))
    with pytest.raises(ValueError, match=r"`--hidden_dims` must be a non-empty list of positive integers"):
        VAETrainer(VAETrainingConfig(output_dir=str(tmp_path), hidden_dims=[]))
    with pytest.raises(ValueError, match=r"`--p_mean` is an option of `--objective edm`"):
        DDPMTrainer(DDPMTrainingConfig(output_dir=str(tmp_path), p_mean=0.0))
    with pytest.raises(ValueError, match=r"`--prediction_type` must be one of"):
        DDPMTrainer(DDPMTrainingConfig(output_dir=str(tmp_path), prediction_type="noise"))
    with pytest.raises(TypeError, match="`config` must be a VAETrainingConfig, got GANTrainingConfig"):
        VAETrainer(GANTrainingConfig(output_dir=str(tmp_path)))
    mlp = VAETrainingConfig(output_dir="unused")
    with pytest.raises(ValueError, match="`first_stage` must be a conv VAE with a spatial latent"):
        LDMTrainer(LDMTrainingConfig(output_dir=str(tmp_path), first_stage=mlp))
    with pytest.raises(ValueError, match=r"`--vae_beta` must be a finite number >= 0, got -1.0"):
        LDMTrainer(LDMTrainingConfig(output_dir=str(tmp_path), first_stage=dataclasses.replace(
            train_ldm.default_first_stage(), beta=-1.0)))
    assert not any(tmp_path.iterdir())  # nothing was written


def pipeline_image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the samples: the bundled digits are grey."""
    return config.resolution, config.resolution, 1


QUICK = dict(logger="none", save_images_epochs=0, num_validation_images=4, feature_extractor="none",
             max_train_samples=200, max_train_steps=2, eval_num_samples=16, checkpointing_steps=10 ** 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_from_python_without_an_argv(family, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python", "--not-a-flag"])  # no argv is read
    output_dir = str(tmp_path / family)
    if family == "vae":
        config = VAETrainingConfig(output_dir=output_dir, **QUICK, hidden_dims=[32], latent_dim=4,
                                   eval_importance_samples=2)
        trainer_class = VAETrainer
    elif family == "gan":
        config = GANTrainingConfig(output_dir=output_dir, **QUICK, base_channels=8, latent_dim=8)
        trainer_class = GANTrainer
    elif family == "ddpm":
        config = DDPMTrainingConfig(output_dir=output_dir, **QUICK, block_out_channels=[8, 16], objective="edm",
                                    num_inference_steps=2, resolution=16, train_batch_size=8)
        trainer_class = DDPMTrainer
    else:
        first_stage = dataclasses.replace(train_ldm.default_first_stage(), hidden_dims=[8, 16], latent_channels=2,
                                          num_epochs=1, eval_importance_samples=1)
        config = LDMTrainingConfig(output_dir=output_dir, **QUICK, first_stage=first_stage, block_out_channels=[8, 16],
                                   num_inference_steps=2, eval_vlb_num_images=0, train_batch_size=8,
                                   latent_cache_dir=str(tmp_path / "latents"))
        trainer_class = LDMTrainer
    before = copy.deepcopy(config)
    assert trainer_class(config).train() == output_dir
    assert config == before  # the caller's config is left as it was
    pipeline = AutoPipeline.from_pretrained(output_dir)
    steps = {"num_inference_steps": 2} if family in ("ddpm", "ldm") else {}
    assert pipeline(batch_size=2, output_type="np", **steps).images.shape == (2, *pipeline_image_shape(config))
    if family == "ldm":
        assert os.path.isfile(os.path.join(output_dir, "first_stage", "model_index.json"))
