"""Model cards and Hub uploads for pipeline folders (huggingface_hub does the work)."""

import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, get_token, upload_folder

# Training by-products that stay local when a pipeline folder is pushed.
PUSH_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "samples/*", "*.incomplete/*"]
SAMPLE_GRID = "samples.png"


def write_model_card(
    folder: str,
    *,
    title: str,
    description: str,
    pipeline_class: str,
    tags: list[str],
    dataset_name: str,
    metrics: dict[str, float],
    model_config: dict,
    training_config: dict,
    task_type: str = "unconditional-image-generation",
) -> ModelCard:
    """Writes folder/README.md: metadata (library, tags, metrics as model-index), usage, config, sample grid."""
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type=name,
            metric_name=name,
            metric_value=round(float(value), 4),
        )
        for name, value in metrics.items()
    ]
    card_data = ModelCardData(
        library_name="hfgen",
        pipeline_tag=task_type,
        tags=["hfgen", *tags],
        model_name=title,
        eval_results=eval_results or None,
    )
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in metrics.items())
    config_lines = "\n".join(f"- `{key}`: `{value}`" for key, value in model_config.items() if not key.startswith("_"))
    training_lines = "\n".join(f"- `{key}`: `{value}`" for key, value in training_config.items())
    grid = f"![samples]({SAMPLE_GRID})\n\n" if os.path.isfile(os.path.join(folder, SAMPLE_GRID)) else ""
    content = f"""---
{card_data.to_yaml()}
---

# {title}

{description}

{grid}## Usage

```python
import torch
from hfgen import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("path/or/repo-id")
images = pipe(16, generator=torch.manual_seed(0)).images
```

## Evaluation on the test split of `{dataset_name}`

| metric | value |
| --- | --- |
{rows}

## Model configuration

{config_lines}

## Training

{training_lines}
"""
    card = ModelCard(content)
    card.save(os.path.join(folder, "README.md"))
    return card


def push_folder(folder: str, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload hfgen pipeline") -> str:
    """Uploads a saved pipeline folder (without checkpoints and logs) to `repo_id`; returns the commit URL."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{folder!r} holds no model_index.json: only a complete saved pipeline can be pushed")
    token = token or get_token()
    if not token:
        raise ValueError("pushing needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass `token` (`--hub_token`)")
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        token=token,
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )
    return str(commit)
