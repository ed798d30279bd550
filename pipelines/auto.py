"""Loading any hfgen pipeline folder without naming its class."""

import os

from .pipeline_utils import GenerativePipeline, read_model_index, resolve_pretrained_path


class AutoPipeline:
    """`AutoPipeline.from_pretrained(folder or repo id)` returns the hfgen pipeline named in model_index.json."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> GenerativePipeline:
        from . import PIPELINES

        hub_kwargs = {key: kwargs.pop(key) for key in ("revision", "cache_dir", "token") if key in kwargs}
        path = resolve_pretrained_path(pretrained_model_name_or_path, **hub_kwargs)
        class_name = read_model_index(os.path.join(path, "model_index.json")).get("_class_name")
        if class_name not in PIPELINES:
            # the name the caller gave: for a Hub repo id, `path` is a snapshot deep in the cache
            found = f"a {class_name!r} pipeline" if class_name else "no `_class_name` in its model_index.json"
            raise ValueError(f"{str(pretrained_model_name_or_path)!r} holds {found}; hfgen pipelines are {sorted(PIPELINES)}")
        return PIPELINES[class_name].from_pretrained(path, **kwargs)
