import os
import pathlib
import re
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch

from hfgen.cli import main

ROOT = pathlib.Path(__file__).parent.parent


def test_sample_writes_a_png_grid(trained_vae_dir, tmp_path):
    output = tmp_path / "grid.png"
    main(["sample", str(trained_vae_dir), "--num_images", "9", "--output", str(output)])
    assert PIL.Image.open(output).size == (3 * 28, 3 * 28)


def test_sample_with_class_names(trained_cvae_dir, tmp_path):
    output = tmp_path / "grid.png"
    main(["sample", str(trained_cvae_dir), "--num_images", "4", "--class_labels", "7", "--output", str(output)])
    assert PIL.Image.open(output).size == (2 * 28, 2 * 28)


def test_train_runs_the_module_entry_point(tmp_path):
    main(["train", "vae", "--output_dir", str(tmp_path), "--max_train_steps", "3", "--hidden_dims", "16",
          "--logger", "none", "--save_images_epochs", "0", "--eval_importance_samples", "1"])
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "README.md").is_file()


def test_version_is_kept_in_one_place(capsys):
    import importlib.metadata

    import hfgen

    main(["--version"])
    assert capsys.readouterr().out == f"hfgen {hfgen.__version__}\n"
    setup_py = pathlib.Path(__file__).parent.parent / "setup.py"
    # setup.py reads the version from hfgen/__init__.py rather than writing its own
    assert '__version__' in setup_py.read_text() and not re.search(r'version="\d', setup_py.read_text())
    assert importlib.metadata.version("hfgen") == hfgen.__version__  # what pip installed says the same


def test_unknown_commands_and_families_are_one_line_errors(capsys):
    for argv, message in ((["train", "flow"], "`hfgen train` needs a family, one of ['autoencoder', 'ddpm', 'gan', 'ldm', 'vae']"),
                          (["fit"], "unknown command 'fit'; usage: hfgen train")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"hfgen: error: {message}")


@pytest.mark.slow
def test_console_script_is_installed():
    script = shutil.which("hfgen", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert script, "pip install -e . installs the `hfgen` command"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "hfgen train" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, flags=re.S)
    assert len(commands) >= 2, "the README opens with two commands"
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()


def readme_training_commands() -> list[tuple[str, str]]:
    """(family, flags) of every `hfgen train` line in the README, continued lines joined, comments dropped."""
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return re.findall(r"^(?:.*&& )?hfgen train (\w+) (.*?)(?:\s+#.*)?$", readme, flags=re.M)


def test_every_readme_training_command_parses():
    import importlib
    import shlex

    from hfgen.cli import TRAINERS

    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    lines = readme_training_commands()
    assert {family for family, _ in lines} == set(TRAINERS), "the README shows a command for every family"
    launched = re.findall(r"^(?:\w+=\S+ )*accelerate launch .*?-m hfgen\.training\.train_(\w+) (.*?)(?:\s+#.*)?$", readme, flags=re.M)
    assert len(launched) >= 4
    for family, flags in lines + launched:
        args = importlib.import_module(TRAINERS[family]).parse_args(shlex.split(flags))
        assert args.output_dir


def bench_quality():
    """benchmarks/bench_quality.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_longer_budget_scales_only_each_recipes_schedule():
    """bench_quality's --epochs_scale: every recipe's --num_epochs times the factor, every other flag (a latent
    recipe's first-stage epochs included) as the recipe has it."""
    import importlib

    from hfgen.cli import TRAINERS

    module = bench_quality()
    for data in module.DATA.values():
        for family, flags in data.recipes.values():
            parse = importlib.import_module(TRAINERS[family]).parse_args
            recipe = parse(["--output_dir", "x", *flags.split()]).to_flags()
            longer = parse(["--output_dir", "x", *module.scale_epochs(flags.split(), 2)]).to_flags()
            assert longer.pop("num_epochs") == 2 * recipe.pop("num_epochs")
            assert longer == recipe


def test_ranking_check_reads_each_rows_pixel_kid():
    """bench_quality's ranking check needs no saved samples once the worker kept each run's pixel KID in its last row:
    the Spearman correlation of the two rankings, over the contenders whose run reached its final N."""
    module = bench_quality()

    def run(fd, kid, num_samples=1000):
        return [{"fd": fd, "num_samples": num_samples, "pixel_kid": kid, "pixel_kid_std": 0.001, "train_seconds": 1200}]

    runs = {"hfgen-gan": run(3.3, 0.006), "plain-dcgan": run(6.4, 0.012), "hfgen-vae": run(5.0, 0.02),
            "plain-vae": run(30.0, 0.001, num_samples=500)}  # stopped before its final mark: left out
    lines = module.ranking_check(runs, module.EMOJI, None, 1000)
    assert "0.50 over 3 contenders" in lines[0]  # FD ranks 1, 3, 2; KID 1, 2, 3
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| hfgen-gan", "| hfgen-vae", "| plain-dcgan"]
    assert module.ranking_check({"hfgen-gan": runs["hfgen-gan"]}, module.EMOJI, None, 1000) == []


def test_ranking_check_gives_each_grids_memorisation_share(tmp_path):
    """With `grids`, the ranking table gives each contender's grid its memorisation share in the data's features: 1 for
    a grid of training images, 0 for one of white images, far from every (uniform random) training image, '–' without
    a grid."""
    from types import SimpleNamespace

    from hfgen.image_processing import image_grid, postprocess

    module = bench_quality()
    generator = torch.Generator().manual_seed(0)
    train, test = torch.rand(200, 3, 8, 8, generator=generator), torch.rand(100, 3, 8, 8, generator=generator)
    extractor = torch.nn.Flatten()
    extractor.num_features = 3 * 8 * 8  # what hfgen.frechet.batch_features asks of a feature extractor
    data = SimpleNamespace(resolution=8, feature_extractor=lambda: extractor,
                           images=lambda split: {"train": train, "test": test}[split])
    image_grid(postprocess(train[:64])).save(tmp_path / "hfgen-gan-20.0min.png")
    image_grid(postprocess(torch.ones(64, 3, 8, 8))).save(tmp_path / "hfgen-vae-20.0min.png")
    runs = {name: [{"fd": fd, "num_samples": 1000, "pixel_kid": fd / 1000, "pixel_kid_std": 0.001}]
            for name, fd in [("hfgen-gan", 3.0), ("hfgen-vae", 5.0), ("plain-dcgan", 6.0)]}
    table = module.ranking_check(runs, data, str(tmp_path), 1000)[4:]
    assert [line.rsplit(" | ", 1)[1] for line in table] == ["1.00 |", "0.00 |", "– |"]


def test_benchmarked_recipes_are_the_readme_commands():
    """bench_quality.py measures the README's commands: each recipe (digits and colour) parses to the same arguments as
    one README line."""
    import importlib
    import shlex

    from hfgen.cli import TRAINERS

    def parsed(family, flags):  # the training arguments, without where they go and the grids' sampling steps
        args = importlib.import_module(TRAINERS[family]).parse_args(["--output_dir", "x", *shlex.split(flags)]).to_flags()
        return {key: value for key, value in args.items() if key not in ("output_dir", "num_inference_steps")}

    readme_args = [parsed(family, flags) for family, flags in readme_training_commands()]
    for data in bench_quality().DATA.values():  # the digits' recipes and the colour ones (with their data flags)
        for name in data.recipes:
            family, flags = data.command(name).split(" ", 3)[2:]
            assert parsed(family, flags) in readme_args, f"{data.name} {name}'s recipe `{flags}` is not a README command"
