"""Model cards and Hub uploads for pipeline folders (huggingface_hub does the work)."""

import json
import os
import re
import shlex

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants, create_repo, get_token, upload_folder
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

# Training by-products that stay local when a pipeline folder is pushed (a latent diffusion folder already
# holds its first stage as vae/).
PUSH_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "samples/*", "*.incomplete/*", "first_stage/*"]
SAMPLE_GRID = "samples.png"
METRICS_FILE = "metrics.json"
METRICS_TABLE_HEADER = "| metric | value |\n| --- | --- |\n"


def _eval_results(metrics: dict[str, float], dataset_name: str, split: str, task_type: str,
                  metric_args: dict[str, dict] | None = None) -> list[EvalResult]:
    """One model-index result per metric; `metric_args` may describe how a metric was computed."""
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=name,
            metric_name=name,
            metric_value=round(float(value), 4),
            metric_args=(metric_args or {}).get(name),
        )
        for name, value in metrics.items()
    ]


def _evaluation_heading(dataset_name: str, split: str) -> str:
    return f"## Evaluation on the {split} split of `{dataset_name}`"


def _metric_rows(metrics: dict[str, float]) -> str:
    return "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())


def usage_call(num_classes: int = 0) -> str:
    """The sampling line of a card's usage snippet: 16 images, of every class in turn for a conditional model."""
    if num_classes:
        return ("images = pipe(class_labels=[i % {0} for i in range(16)], generator=torch.manual_seed(0)).images"
                "  # {0} classes").format(num_classes)
    return "images = pipe(16, generator=torch.manual_seed(0)).images"


LIBRARY_NAME = "diffusers"  # a saved folder loads with plain diffusers (hfgen.remote_code): README, "On the Hub"
NO_LICENSE_NOTE = ("No license was given when this card was written (`--license`; `hfgen push --license` sets one): "
                   "ask the author before reusing the weights.\n\n")
LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # the form of the Hub's license ids: apache-2.0, mit, other, ...


def check_license(name: str, value) -> None:
    if value is not None and not (isinstance(value, str) and LICENSE.match(value)):
        raise ValueError(f"`{name}` must be a license id as the Hub writes them (e.g. apache-2.0, mit, cc-by-4.0, or "
                         f"other), got {value!r}")


def usage_snippet(pipeline_class: str, num_classes: int = 0, repo_id: str = "path/or/repo-id") -> str:
    """How to load and sample a saved folder or repo: with plain diffusers, and with hfgen."""
    return f"""```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)  # the code saved in the repo
{usage_call(num_classes)}
```

With hfgen installed, `from hfgen import {pipeline_class}` and `{pipeline_class}.from_pretrained("{repo_id}")` load the
same pipeline with hfgen's own classes (no `trust_remote_code`)."""


def write_model_card(
    folder: str,
    *,
    title: str,
    description: str,
    pipeline_class: str,
    tags: list[str],
    model_config: dict,
    dataset_name: str | None = None,
    metrics: dict[str, float] | None = None,
    training_config: dict | None = None,
    task_type: str = "unconditional-image-generation",
    split: str = "test",
    num_classes: int = 0,
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: list[str] | None = None,
) -> ModelCard:
    """Writes folder/README.md: metadata (library, license, Hub `datasets` and `base_model` ids, tags, pipeline tag,
    metrics on the `split` split of `dataset_name` as model-index), usage, config, training config and sample
    grid; sections without content are left out."""
    check_license("license", license)
    metrics = metrics or {}
    eval_results = _eval_results(metrics, dataset_name, split, task_type)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        datasets=datasets or None,
        base_model=base_model or None,
        pipeline_tag=task_type,
        tags=["hfgen", *tags],
        model_name=title,
        eval_results=eval_results or None,
    )
    config_lines = "\n".join(f"- `{key}`: `{value}`" for key, value in model_config.items() if not key.startswith("_"))
    evaluation = (f"{_evaluation_heading(dataset_name, split)}\n\n{METRICS_TABLE_HEADER}{_metric_rows(metrics)}\n\n"
                  if metrics else "")
    training = "## Training\n\n" + "\n".join(f"- `{key}`: `{value}`" for key, value in training_config.items()) + "\n" \
        if training_config else ""
    grid = f"![samples]({SAMPLE_GRID})\n\n" if os.path.isfile(os.path.join(folder, SAMPLE_GRID)) else ""
    license_note = "" if license else NO_LICENSE_NOTE
    content = f"""---
{card_data.to_yaml()}
---

# {title}

{description}

{license_note}{grid}## Usage

{usage_snippet(pipeline_class, num_classes)}

{evaluation}## Model configuration

{config_lines}

{training}"""
    card = ModelCard(content)
    card.save(os.path.join(folder, "README.md"))
    return card


def set_card_license(folder: str, license: str) -> ModelCard:
    """Sets the `license` of folder/README.md (a folder without a card gets a minimal one)."""
    check_license("license", license)
    path = os.path.join(folder, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else \
        ModelCard(f"---\n{ModelCardData(library_name=LIBRARY_NAME).to_yaml()}\n---\n")
    card.data.license = license
    card.text = card.text.replace(NO_LICENSE_NOTE, "")
    card.save(path)
    return card


def update_model_card_metrics(
    folder: str,
    metrics: dict[str, float],
    *,
    dataset_name: str,
    split: str = "test",
    metric_args: dict[str, dict] | None = None,
) -> ModelCard:
    """Merges `metrics` into folder/README.md and folder/metrics.json; other metrics and text stay as they are.

    In the card's metadata a result for the same metric, dataset and split is replaced, others are kept; in the
    text the metric table under "## Evaluation on the <split> split of `<dataset>`" gets the new rows (the section
    is appended when the card has none). A folder without a README.md gets a minimal card. `metric_args`
    ({metric: {arg: value}}) records how a metric was computed, e.g. the FD's feature extractor.
    """
    path = os.path.join(folder, "README.md")
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name=LIBRARY_NAME).to_yaml()}\n---\n")
    data = card.data
    task_type = data.eval_results[0].task_type if data.eval_results else data.pipeline_tag
    task_type = task_type or "unconditional-image-generation"
    new_results = _eval_results(metrics, dataset_name, split, task_type, metric_args)
    replaced = {(result.metric_type, result.dataset_name, result.dataset_split) for result in new_results}
    kept = [result for result in data.eval_results or []
            if (result.metric_type, result.dataset_name, result.dataset_split) not in replaced]
    data.model_name = data.model_name or os.path.basename(os.path.abspath(folder))  # model-index needs a name
    data.eval_results = kept + new_results

    heading = _evaluation_heading(dataset_name, split)
    table = re.search(re.escape(f"{heading}\n\n{METRICS_TABLE_HEADER}") + r"((?:\|.*\|(?:\n|$))*)", card.text)
    if table:
        rows = dict(re.match(r"\| (.*?) \| (.*) \|", line).groups() for line in table.group(1).splitlines())
        rows.update({name: f"{value:.4f}" for name, value in metrics.items()})
        new_rows = "".join(f"| {name} | {value} |\n" for name, value in rows.items())
        card.text = card.text[:table.start(1)] + new_rows + card.text[table.end(1):]
    else:
        card.text = f"{card.text.rstrip()}\n\n{heading}\n\n{METRICS_TABLE_HEADER}{_metric_rows(metrics)}\n"
    card.save(path)

    metrics_path = os.path.join(folder, METRICS_FILE)
    merged = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as file:
            merged = json.load(file)
    merged.update({name: float(value) for name, value in metrics.items()})
    with open(metrics_path, "w", encoding="utf-8") as file:
        json.dump(merged, file, indent=2)
    return card


def check_repo_id(name: str, repo_id) -> None:
    """A Hub repo id (`name` or `user/name`) as huggingface_hub's `validate_repo_id` accepts it."""
    if not isinstance(repo_id, str):
        raise TypeError(f"`{name}` must be a Hub repo id such as user/my-model, got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`{name}` must be a Hub repo id such as user/my-model, got {repo_id!r}: {error}") from None


def hub_id(path) -> str | None:
    """`path` when it names a Hub repo (user/name, and no local file or folder of that name), else None."""
    if not isinstance(path, str) or path.count("/") != 1 or os.path.exists(os.path.expanduser(path)):
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


def push_token(token: str | None = None) -> str:
    """`token`, or the one the user logged in with: refused before any request when there is none."""
    token = token or get_token()
    if not token:
        raise ValueError("pushing needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass `token` (`--hub_token`)")
    return token


def push_folder(folder: str, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload hfgen pipeline") -> str:
    """Uploads a saved pipeline folder (without checkpoints and logs) to `repo_id`; returns the commit URL."""
    check_repo_id("repo_id", repo_id)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{folder!r} holds no model_index.json: only a complete saved pipeline can be pushed")
    token = push_token(token)
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        token=token,
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )
    return str(commit)


def push_space(folder: str, repo_id: str, token: str | None = None, private: bool | None = None,
               commit_message: str = "Upload hfgen demo") -> str:
    """Uploads a folder written by `hfgen.demo.write_space` as the Gradio Space `repo_id`; returns the commit URL."""
    check_repo_id("repo_id", repo_id)
    token = push_token(token)
    repo = create_repo(repo_id, token=token, private=private, repo_type="space", space_sdk="gradio", exist_ok=True)
    commit = upload_folder(repo_id=repo.repo_id, repo_type="space", folder_path=folder, token=token,
                           commit_message=commit_message)
    return str(commit)


class PushError(OSError):
    """A push of a trained folder that did not reach the Hub; the folder itself is complete."""


def upload_command(folder: str, repo_id: str, private: bool | None = None) -> str:
    """The command line that uploads `folder` to `repo_id` as `push_folder` does (huggingface_hub's `hf` CLI)."""
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in PUSH_IGNORE_PATTERNS)
    return (f"hf upload {shlex.quote(repo_id)} {shlex.quote(folder)} . {excludes}"
            f"{' --private' if private else ''}")


def push_output_folder(folder: str, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """`push_folder` for a training run's output folder: when the upload fails (the Hub unreachable, or refusing
    it), raises a one-line PushError naming the endpoint and the error, saying that the folder is complete, and
    giving the command that pushes it later."""
    try:
        return push_folder(folder, repo_id, token=token, private=private)
    except (OSError, HTTPError) as error:  # connection errors, and the Hub's HTTP errors (HfHubHTTPError)
        cause = " ".join(str(error).split()) or type(error).__name__
        raise PushError(f"the push to {repo_id!r} at {constants.ENDPOINT} failed ({type(error).__name__}: {cause}); "
                        f"the trained folder {folder} is complete: push it later with "
                        f"`{upload_command(folder, repo_id, private)}`") from error
