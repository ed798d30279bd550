"""The code saved beside every pipeline (hfgen/remote_code.py): hfgen's own definitions, and nothing else.

That plain diffusers loads every family from it and gives hfgen's images is tested per family in test_hub.py and
test_text_to_image.py; here, that the saved module is hfgen's source and that hfgen reads the layout it writes.
"""

import ast
import importlib
import json
import re

import torch

import hfgen
from hfgen.models import GaussianMixtureSampler
from hfgen.remote_code import CODE_MODULE, HFGEN_ONLY_METHODS, as_hfgen_index

SECTION = re.compile(r"^# --- ([\w.]+) \([^)]*\) ---$", re.MULTILINE)
KEEP_FIRST = "# diffusers executes this module once"  # the epilogue: not hfgen's source


class AsSaved(ast.NodeTransformer):
    """hfgen's definition as the saved module should hold it: without the hfgen-only methods, with `module.name`
    read as `name` and no imports of hfgen names (the saved module defines them)."""

    def __init__(self, module):
        self.module_aliases = {name for name, value in vars(module).items()
                               if getattr(value, "__name__", "").startswith("hfgen") and type(value) is type(module)}

    def visit_ClassDef(self, node):
        omitted = HFGEN_ONLY_METHODS.get(node.name, ())
        node.body = [item for item in node.body if getattr(item, "name", None) not in omitted]
        return self.generic_visit(node)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases:
            return ast.copy_location(ast.Name(node.attr, node.ctx), node)
        return self.generic_visit(node)

    def visit_ImportFrom(self, node):
        return None if node.level or (node.module or "").split(".")[0] == "hfgen" else node


def saved_code(folder) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    module, class_name = index["_class_name"]
    assert CODE_MODULE.match(module) and class_name == "VAEPipeline"
    assert index["vae"] == [module, "VAEModel"] and index["latent_sampler"] == [module, "GaussianMixtureSampler"]
    code = (folder / f"{module}.py").read_text()
    for component in ("vae", "latent_sampler"):  # diffusers downloads only this file in a component's folder
        assert (folder / component / f"{module}.py").read_text() == code
    return code


def test_the_saved_module_holds_hfgens_definitions_as_written(tmp_path):
    torch.manual_seed(0)
    vae = hfgen.VAEModel(latent_dim=4, hidden_dims=[16])
    sampler = GaussianMixtureSampler(latent_dim=4, num_components=2).fit(torch.randn(64, 4))
    hfgen.VAEPipeline(vae, sampler).save_pretrained(tmp_path)
    code = saved_code(tmp_path)
    assert "import hfgen" not in code and not re.search(r"^from hfgen", code, re.MULTILINE)

    definitions, epilogue = code.split(KEEP_FIRST)
    assert "_FIRST_DEFINITIONS" in epilogue
    sections = SECTION.split(definitions)[1:]  # module name, its definitions, module name, ...
    compared = set()
    for module_name, text in zip(sections[::2], sections[1::2]):
        module = importlib.import_module(module_name)
        source = ast.parse(open(module.__file__, encoding="utf-8").read())
        defined = {getattr(node, "name", None) or ast.unparse(node.targets[0] if hasattr(node, "targets") else node.target):
                   node for node in source.body if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))}
        for node in ast.parse(text).body:
            name = getattr(node, "name", None) or ast.unparse(node.targets[0] if hasattr(node, "targets") else node.target)
            expected = AsSaved(module).visit(ast.parse(ast.unparse(defined[name])).body[0])
            assert ast.dump(node) == ast.dump(expected), f"{module_name}.{name} differs from hfgen's source"
            compared.add(name)
    assert {"VAEPipeline", "GenerativePipeline", "VAEModel", "GaussianMixtureSampler", "postprocess"} <= compared
    assert not {"save_pretrained", "push_to_hub"} & {node.name for node in ast.walk(ast.parse(code))
                                                   if isinstance(node, ast.FunctionDef)}


def test_hfgen_reads_the_saved_layout_as_its_own_classes(tmp_path):
    pipe = hfgen.VAEPipeline(hfgen.VAEModel(latent_dim=4, hidden_dims=[16]))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert as_hfgen_index(index)["_class_name"] == "VAEPipeline"
    assert as_hfgen_index(index)["vae"] == ["hfgen.models", "VAEModel"]
    for loaded in (hfgen.VAEPipeline.from_pretrained(tmp_path), hfgen.AutoPipeline.from_pretrained(tmp_path)):
        assert type(loaded) is hfgen.VAEPipeline and type(loaded.vae) is hfgen.VAEModel
        loaded.save_pretrained(tmp_path / "again")  # saving a loaded pipeline writes the same layout
    assert json.loads((tmp_path / "again" / "model_index.json").read_text()) == index
