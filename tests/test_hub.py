"""Hub round trips for every family against the loopback Hub in tests/hub_server.py (no network)."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

import hfgen
from hfgen.hub_utils import push_folder, write_model_card

from hub_fixtures import hub_server  # noqa: F401  (the fixture)


def tiny_pipeline(seed: int = 0) -> hfgen.VAEPipeline:
    torch.manual_seed(seed)
    return hfgen.VAEPipeline(hfgen.VAEModel(latent_dim=4, hidden_dims=[16]))


def sample(pipe) -> np.ndarray:
    return pipe(2, generator=torch.manual_seed(0), output_type="np").images


def saved_folder(path, pipe=None) -> str:
    """A saved pipeline folder plus training by-products that must stay local."""
    folder = str(path)
    (pipe or tiny_pipeline()).save_pretrained(folder)
    os.makedirs(os.path.join(folder, "checkpoints", "step-10"), exist_ok=True)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    with open(os.path.join(folder, "checkpoints", "step-10", "optimizer.bin"), "wb") as f:
        f.write(b"\0" * 64)
    with open(os.path.join(folder, "logs", "events.txt"), "w") as f:
        f.write("step 10 loss 1.0\n")
    return folder


def local_files(folder: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_push_to_hub_then_from_pretrained_gives_the_same_images(hub_server):
    pipe = tiny_pipeline()
    pipe.push_to_hub("user/tiny-vae")

    files = hub_server.files("user/tiny-vae")
    assert {"model_index.json", "vae/config.json", "README.md"} <= set(files)
    assert any(path.startswith("vae/") and path.endswith(".safetensors") for path in files)

    loaded = hfgen.VAEPipeline.from_pretrained("user/tiny-vae")
    assert isinstance(loaded.vae, hfgen.VAEModel)
    np.testing.assert_allclose(sample(loaded), sample(pipe), rtol=0, atol=1e-6)
    assert hub_server.unknown_requests == []


def test_push_folder_uploads_the_pipeline_only_and_updates_the_repo(hub_server, tmp_path):
    folder = saved_folder(tmp_path / "pipe")
    commit_url = push_folder(folder, "user/tiny-vae-folder")

    files = hub_server.files("user/tiny-vae-folder")
    expected = {path for path in local_files(folder) if not path.startswith(("checkpoints/", "logs/"))}
    assert set(files) == expected
    assert hub_server.shas["user/tiny-vae-folder"][-1] in commit_url
    first = hfgen.VAEPipeline.from_pretrained("user/tiny-vae-folder")
    np.testing.assert_allclose(sample(first), sample(tiny_pipeline()), rtol=0, atol=1e-6)

    # Push other weights to the same repo: a new commit, and that is what gets downloaded.
    retrained = tiny_pipeline(seed=1)
    retrained.save_pretrained(folder)
    before = list(hub_server.shas["user/tiny-vae-folder"])
    push_folder(folder, "user/tiny-vae-folder", commit_message="Retrain")
    shas = hub_server.shas["user/tiny-vae-folder"]
    assert shas[:-1] == before and hub_server.messages["user/tiny-vae-folder"][-1] == "Retrain"
    changed = {path for path in files if hub_server.files("user/tiny-vae-folder")[path] != files[path]}
    assert any(path.endswith(".safetensors") for path in changed)

    second = hfgen.VAEPipeline.from_pretrained("user/tiny-vae-folder")
    np.testing.assert_allclose(sample(second), sample(retrained), rtol=0, atol=1e-6)
    assert not np.allclose(sample(second), sample(first))
    # The old commit is still there and can be pinned.
    pinned = hfgen.VAEPipeline.from_pretrained("user/tiny-vae-folder", revision=before[-1])
    np.testing.assert_allclose(sample(pinned), sample(first), rtol=0, atol=1e-6)
    assert hub_server.unknown_requests == []


def test_push_folder_without_model_index_raises(hub_server, tmp_path):
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not-a-pipeline"):
        push_folder(str(folder), "user/broken")
    assert hub_server.requests == [] and hub_server.repos == {}


def test_push_without_token_is_refused_before_any_request(hub_server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    folder = saved_folder(tmp_path / "pipe")
    with pytest.raises(ValueError, match="pushing needs a Hub token"):
        push_folder(folder, "user/tiny-vae")
    with pytest.raises(ValueError, match="pushing needs a Hub token"):
        tiny_pipeline().push_to_hub("user/tiny-vae")
    assert hub_server.requests == []


def test_the_hub_itself_refuses_a_push_without_token(hub_server, tmp_path, monkeypatch):
    """What a push that bypasses hfgen's check meets: the Hub's 401."""
    from huggingface_hub import create_repo

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as info:
        create_repo("user/tiny-vae")
    assert info.value.response.status_code == 401
    assert hub_server.repos.get("user/tiny-vae") is None


# family -> (training module, pipeline class, tag on the card, flags for a tiny run of a few steps)
FAMILIES = {
    "vae": ("train_vae", hfgen.VAEPipeline, "vae", ["--hidden_dims", "16", "--latent_dim", "4",
                                                     "--eval_importance_samples", "1"]),
    "cvae": ("train_vae", hfgen.ConditionalPipeline, "vae", ["--hidden_dims", "16", "--latent_dim", "4",
                                                             "--eval_importance_samples", "1", "--conditional"]),
    "gan": ("train_gan", hfgen.GANPipeline, "gan", ["--base_channels", "8", "--latent_dim", "8"]),
    "cgan": ("train_gan", hfgen.ConditionalPipeline, "gan", ["--base_channels", "8", "--latent_dim", "8",
                                                             "--conditional"]),
    "ddpm": ("train_ddpm", hfgen.DDPMPipeline, "ddpm", ["--block_out_channels", "8", "16", "--num_inference_steps", "2",
                                                        "--num_train_timesteps", "20", "--eval_vlb_num_images", "4"]),
    "cddpm": ("train_ddpm", hfgen.DDPMPipeline, "ddpm", ["--block_out_channels", "8", "16", "--num_inference_steps", "2",
                                                         "--num_train_timesteps", "20", "--eval_vlb_num_images", "4",
                                                         "--conditional"]),
    "flow": ("train_ddpm", hfgen.DDPMPipeline, "flow-matching", ["--block_out_channels", "8", "16", "--num_inference_steps", "2",
                                                        "--objective", "flow_matching"]),
    "ldm": ("train_ldm", hfgen.LatentDiffusionPipeline, "ldm", ["--vae_num_epochs", "1", "--vae_eval_importance_samples", "2", "--vae_hidden_dims", "8", "16",
                                                               "--block_out_channels", "8", "16", "--num_inference_steps",
                                                               "2", "--num_train_timesteps", "20"]),
}


def family_call(pipe) -> dict:
    """The arguments of two images from a pipeline of any family (JSON: a plain diffusers Python takes them too)."""
    call = {"batch_size": 2, "num_inference_steps": 2} if isinstance(pipe, hfgen.DDPMPipeline) else {"batch_size": 2}
    return {**call, "class_labels": [3, 7]} if pipe.num_classes else call


def family_sample(pipe) -> np.ndarray:
    """Two images from a fixed generator, from a pipeline of any family."""
    return pipe(**family_call(pipe), generator=torch.manual_seed(0), output_type="np").images


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_folder_round_trips_through_the_hub(hub_server, tmp_path, family):
    """A trainer run pushes; the class and AutoPipeline download what it saved; plain diffusers loads the folder and
    the repo where hfgen cannot be imported (trust_remote_code); a loaded pipeline pushes again."""
    from helpers import plain_diffusers_images, quick_training_args

    module, pipeline_class, tag, flags = FAMILIES[family]
    main = importlib.import_module(f"hfgen.training.{module}").main
    output_dir = tmp_path / "out"
    repo_id = f"user/{family}"
    main(quick_training_args(output_dir, *flags, "--max_train_steps", "2", "--train_batch_size", "32",
                             "--eval_num_samples", "20", "--checkpointing_steps", "1",
                             "--push_to_hub", "--hub_model_id", repo_id))

    files = set(hub_server.files(repo_id))
    assert {"model_index.json", "README.md", "samples.png", "metrics.json"} <= files
    assert not any(path.startswith(("checkpoints/", "logs/", "samples/", "first_stage/")) for path in files)
    local = pipeline_class.from_pretrained(output_dir)
    assert all(any(path.startswith(f"{name}/") for path in files) for name, part in local.components.items() if part)
    expected = family_sample(local)
    for loaded in (pipeline_class.from_pretrained(repo_id), hfgen.AutoPipeline.from_pretrained(repo_id)):
        assert type(loaded) is pipeline_class
        np.testing.assert_allclose(family_sample(loaded), expected, rtol=0, atol=1e-6)
    for images in plain_diffusers_images(tmp_path, [output_dir, repo_id], **family_call(local)):
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)

    card = ModelCard.load(repo_id)
    assert card.data.library_name == "diffusers" and {"hfgen", tag} <= set(card.data.tags)
    assert f"{pipeline_class.__name__}.from_pretrained" in card.text
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert "fd" in metrics  # every family is evaluated here, so its metrics must reach the card
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == \
        {name: round(value, 4) for name, value in metrics.items()}
    assert {(result.dataset_name, result.dataset_split) for result in card.data.eval_results} == {("hfgen:mnist", "test")}

    local.push_to_hub(f"{repo_id}-2")  # a new repo: the pipeline writes an hfgen card itself
    np.testing.assert_allclose(family_sample(pipeline_class.from_pretrained(f"{repo_id}-2")), expected, rtol=0, atol=1e-6)
    new_card = ModelCard.load(f"{repo_id}-2")
    assert new_card.data.library_name == "diffusers" and {"hfgen", tag} <= set(new_card.data.tags)
    local.push_to_hub(repo_id)  # an existing repo keeps the card training wrote, metrics included
    assert ModelCard.load(repo_id).data.eval_results == card.data.eval_results
    assert hub_server.unknown_requests == []


def test_push_with_a_wrong_token_is_refused(hub_server, tmp_path):
    with pytest.raises(HfHubHTTPError, match="Invalid credentials"):
        push_folder(saved_folder(tmp_path / "pipe"), "user/tiny-vae", token="hf_wrong")
    assert hub_server.repos == {}


def test_model_card_metadata_arrives(hub_server, tmp_path):
    pipe = tiny_pipeline()
    folder = saved_folder(tmp_path / "pipe", pipe)
    write_model_card(
        folder,
        title="Tiny VAE",
        description="A VAE small enough for tests.",
        pipeline_class="VAEPipeline",
        tags=["vae", "mnist"],
        dataset_name="mnist",
        metrics={"fid": 12.345678, "nll": 0.5},
        model_config=dict(pipe.vae.config),
        training_config={"epochs": 1, "lr": 1e-3},
    )
    push_folder(folder, "user/tiny-vae-card")

    card = ModelCard.load("user/tiny-vae-card")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"hfgen", "vae", "mnist"} <= set(card.data.tags)
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == {"fid": 12.3457, "nll": 0.5}
    assert {result.dataset_name for result in results.values()} == {"mnist"}
    assert {result.dataset_split for result in results.values()} == {"test"}
    assert card.data.model_name == "Tiny VAE"
    assert "# Tiny VAE" in card.text and "VAEPipeline.from_pretrained" in card.text
    assert hub_server.unknown_requests == []


def test_server_lists_trees_deletes_files_and_rejects_unknown_routes(hub_server):
    """The server's other answers, through the client: tree listings, deletions, 404s."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import get_session

    api = HfApi()
    hub_server.create_repo("user/tree", {"a.txt": b"a", "vae/config.json": b"{}", "vae/sub/w.bin": b"w"})
    listing = lambda **kwargs: sorted(entry.path for entry in api.list_repo_tree("user/tree", **kwargs))  # noqa: E731
    assert listing() == ["a.txt", "vae"]
    assert listing(path_in_repo="vae") == ["vae/config.json", "vae/sub"]
    assert listing(recursive=True) == ["a.txt", "vae", "vae/config.json", "vae/sub", "vae/sub/w.bin"]

    api.delete_file("a.txt", "user/tree")
    api.delete_folder("vae/sub", "user/tree")
    assert api.list_repo_files("user/tree") == ["vae/config.json"]
    assert len(hub_server.shas["user/tree"]) == 3
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download("user/tree", "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")

    response = get_session().get(f"{hub_server.url}/api/whoami-v2")
    assert response.status_code == 404 and "no route" in response.json()["error"]
    assert hub_server.unknown_requests == [("GET", "/api/whoami-v2")]


@pytest.mark.parametrize("model_index, message", [
    ({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"},
     "'user/not-hfgen' holds a 'StableDiffusionPipeline' pipeline; hfgen pipelines are \\['AutoencoderPipeline', 'ConditionalPipeline'"),
    ({"_diffusers_version": "0.42.1"}, "'user/not-hfgen' holds no `_class_name` in its model_index.json"),
])
def test_auto_pipeline_names_a_hub_repo_that_holds_no_hfgen_pipeline(hub_server, model_index, message):
    hub_server.create_repo("user/not-hfgen", {"model_index.json": json.dumps(model_index).encode()})
    with pytest.raises(ValueError, match=message):
        hfgen.AutoPipeline.from_pretrained("user/not-hfgen")


def test_card_metadata_names_license_datasets_and_base_model(hub_server, tmp_path):
    """A latent model on a first stage from the Hub, trained on the bundled MNIST digits with --license: its card's
    metadata, read back with huggingface_hub's classes, names them as the Hub expects."""
    from huggingface_hub import EvalResult, ModelCardData
    from huggingface_hub.utils import validate_repo_id

    from helpers import quick_training_args
    from hfgen.training.train_ldm import main

    torch.manual_seed(0)
    first_stage = hfgen.VAEModel(sample_size=8, architecture="conv", hidden_dims=(8,), latent_channels=4)
    hfgen.VAEPipeline(first_stage).push_to_hub("user/first-stage")
    main(quick_training_args(tmp_path / "ldm", "--dataset_name", "hfgen:mnist", "--resolution", "8", "--vae_path",
                             "user/first-stage", "--block_out_channels", "8", "16", "--max_train_steps", "2",
                             "--num_inference_steps", "2", "--eval_num_samples", "20", "--feature_extractor", "none",
                             "--license", "mit", "--push_to_hub", "--hub_model_id", "user/ldm"))
    data = ModelCard.load("user/ldm").data
    assert isinstance(data, ModelCardData) and ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    assert (data.library_name, data.license, data.pipeline_tag) == ("diffusers", "mit", "unconditional-image-generation")
    assert data.datasets == ["ylecun/mnist"] and data.base_model == ["user/first-stage"]
    for repo_id in (*data.datasets, *data.base_model):
        validate_repo_id(repo_id)
    assert {"hfgen", "ldm"} <= set(data.tags)
    assert data.eval_results and all(isinstance(result, EvalResult) and result.task_type == data.pipeline_tag
                                     for result in data.eval_results)

    hfgen.VAEPipeline(first_stage).save_pretrained(tmp_path / "vae")  # no license given: the card says so
    write_model_card(str(tmp_path / "vae"), title="vae", description="", pipeline_class="VAEPipeline", tags=["vae"],
                     model_config={})
    card = ModelCard.load(tmp_path / "vae" / "README.md")
    assert card.data.license is None and "No license was given" in card.text
    assert 'DiffusionPipeline.from_pretrained("path/or/repo-id", trust_remote_code=True)' in card.text
    with pytest.raises(ValueError, match="`license` must be a license id"):
        write_model_card(str(tmp_path / "vae"), title="vae", description="", pipeline_class="VAEPipeline",
                         tags=["vae"], model_config={}, license="MIT License")


def test_hfgen_push_pushes_a_finished_folder_with_its_card_and_code(hub_server, tmp_path, capsys):
    import shutil

    from helpers import cli_error
    from hfgen.cli import main

    folder = saved_folder(tmp_path / "pipe")
    write_model_card(folder, title="tiny", description="", pipeline_class="VAEPipeline", tags=["vae"], model_config={})
    main(["push", folder, "user/pushed", "--license", "apache-2.0"])
    files = set(hub_server.files("user/pushed"))
    module = json.loads(open(os.path.join(folder, "model_index.json")).read())["_class_name"][0]
    assert {"model_index.json", "README.md", f"{module}.py", f"vae/{module}.py"} <= files
    assert not any(path.startswith(("checkpoints/", "logs/")) for path in files)
    card = ModelCard.load("user/pushed")
    assert card.data.license == "apache-2.0" and "No license was given" not in card.text
    np.testing.assert_allclose(sample(hfgen.VAEPipeline.from_pretrained("user/pushed")), sample(tiny_pipeline()),
                               rtol=0, atol=1e-6)

    old = tmp_path / "old"  # saved by hfgen 0.1.0: pushed with the code that plain diffusers needs
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "vae-pipeline-0.1.0"), old)
    main(["push", str(old), "user/old"])
    index = json.loads((old / "model_index.json").read_text())
    assert f"{index['_class_name'][0]}.py" in hub_server.files("user/old")
    np.testing.assert_allclose(sample(hfgen.VAEPipeline.from_pretrained("user/old")),
                               np.load(old / "expected_samples_seed0.npy"), rtol=0, atol=1e-6)

    assert "`folder` " in cli_error(capsys, ["push", str(tmp_path / "missing"), "user/x"])
    assert "`repo_id` must be a Hub repo id" in cli_error(capsys, ["push", folder, "not a repo"])
    assert "`--license` must be a license id" in cli_error(capsys, ["push", folder, "user/x", "--license", "MIT License"])
    assert hub_server.unknown_requests == []
