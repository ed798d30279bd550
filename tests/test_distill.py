"""Few-step students by reflow (training/train_distill.py, docs/maths.md §6.13): the pairs are the teacher's own ODE
samples, a short distillation beats its teacher at the student's step count, the folder and its card, bad input."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import Identity, cli_error, quick_training_args
from huggingface_hub import ModelCard

from hfgen import AutoPipeline, DDPMPipeline
from hfgen.data import load_image_dataset
from hfgen.evaluation import evaluate_pipeline
from hfgen.objectives import objective_of
from hfgen.training import train_ddpm
from hfgen.training.train_distill import DistillTrainer, main, parse_args

DIGITS = ["--dataset_name", "hfgen:digits", "--resolution", "8", "--feature_extractor", "none"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A flow-matching teacher on the 8x8 digits, class-conditional with label dropout (150 steps, ~15 s)."""
    output_dir = tmp_path_factory.mktemp("teacher") / "out"
    train_ddpm.main(quick_training_args(output_dir, *DIGITS, "--objective", "flow_matching", "--conditional",
                                        "--label_dropout", "0.2", "--block_out_channels", "16", "32",
                                        "--max_train_steps", "150", "--train_batch_size", "128",
                                        "--num_inference_steps", "10"))
    return output_dir


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("student") / "out"
    main(quick_training_args(output_dir, *DIGITS, "--teacher", str(teacher_dir), "--num_steps", "2",
                             "--num_pairs", "1000", "--teacher_steps", "10", "--max_train_steps", "300",
                             "--train_batch_size", "64", "--learning_rate", "5e-4"))
    return output_dir


def pixel_fd(pipe, steps: int) -> float:
    """FD in pixel space of 200 samples with `steps` steps against the 8x8 test digits, their own labels for a
    class-conditional model (no feature extractor is trained for the 8x8 digits)."""
    digits_test = load_image_dataset("hfgen:digits", "test", resolution=8)
    return evaluate_pipeline(pipe, digits_test, num_samples=200, feature_extractor=Identity(64),
                             pipeline_kwargs={"num_inference_steps": steps}, likelihood=False)["fd"]


def test_the_student_beats_its_teacher_at_one_and_two_steps_and_loads_as_a_two_step_model(teacher_dir, student_dir):
    teacher, student = DDPMPipeline.from_pretrained(teacher_dir), AutoPipeline.from_pretrained(student_dir)
    assert type(student) is DDPMPipeline and isinstance(student.scheduler, FlowMatchEulerDiscreteScheduler)
    assert student.config.sampling_steps == 2 and student.check_num_inference_steps(None) == 2
    assert student.num_classes == teacher.num_classes and student.config.label_dropout == 0.2
    # seen: 1 step 0.68 against the teacher's 1.21, 2 steps 0.64 against 0.81 (the teacher's 4: 0.62, 10: 0.59)
    for steps, share in ((1, 0.7), (2, 0.9)):
        student_fd, teacher_fd = pixel_fd(student, steps), pixel_fd(teacher, steps)
        assert student_fd < share * teacher_fd, (steps, student_fd, teacher_fd)
    card = ModelCard.load(student_dir / "README.md")
    assert "2-step flow-matching student distilled by reflow" in card.text and str(teacher_dir) in card.text
    assert card.data.base_model is None  # a local teacher is no Hub id: the text names it
    images = student(class_labels=[3, 7], generator=torch.manual_seed(0), guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 8, 8, 1)  # guidance: the null class was distilled too


def test_the_pairs_are_the_teachers_deterministic_samples_of_their_noise(teacher_dir, tmp_path):
    config = parse_args(quick_training_args(tmp_path / "s", *DIGITS, "--teacher", str(teacher_dir), "--num_pairs",
                                            "6", "--teacher_steps", "4", "--max_train_steps", "1",
                                            "--train_batch_size", "2"))
    trainer = DistillTrainer(config)
    assert trainer.pairs.shape == (6, 2, 8, 8) and trainer.pair_labels.shape == (6,)
    x0, noise = trainer.clean_and_noise(trainer.pairs)
    teacher = DDPMPipeline.from_pretrained(teacher_dir)
    teacher.scheduler = objective_of(teacher.scheduler).fast_sampler(teacher.scheduler)
    again = teacher.reverse_process(noise.clone(), trainer.pair_labels, 1.0, 4, None)
    torch.testing.assert_close(again, x0, atol=1e-5, rtol=0)
    assert trainer.config.num_train_timesteps == teacher.scheduler.config.num_train_timesteps


def test_bad_input_is_refused_before_any_work(teacher_dir, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert "needs the teacher first" in cli_error(capsys, ["distill", "--output_dir", out])
    assert "`--block_out_channels`: the student is the teacher's network" in cli_error(
        capsys, ["distill", str(teacher_dir), "--output_dir", out, "--block_out_channels", "8", "8"])
    assert "argument --num_steps: invalid choice: 3 (choose from 1, 2, 4)" in cli_error(
        capsys, ["distill", str(teacher_dir), "--output_dir", out, "--num_steps", "3"])
    assert "a reflow student is a flow-matching model" in cli_error(
        capsys, ["distill", str(teacher_dir), "--output_dir", out, "--objective", "ddpm"])
    vae = tmp_path / "vae"
    from hfgen import VAEModel, VAEPipeline
    VAEPipeline(VAEModel(latent_dim=4, hidden_dims=[16])).save_pretrained(vae)
    assert "reflow distills a DDPMPipeline or LatentDiffusionPipeline" in cli_error(
        capsys, ["distill", str(vae), "--output_dir", out])
    assert not (tmp_path / "s").exists()
