"""The code saved beside every pipeline, so that plain diffusers loads it: one self-contained module.

`DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` loads a pipeline whose
model_index.json names `[module, class]` for its own class and for each component that is not a diffusers or
transformers class, with `module.py` at the root (the pipeline) and in each such component's folder (diffusers
downloads only that file there, so it must not import siblings). hfgen writes one module, `hfgen_<digest>.py`,
to all of those places: the pipeline class, the component classes and everything they use, copied from
hfgen's own source (never kept by hand), with the imports between hfgen's modules resolved.

diffusers executes the module again for each component it loads from it; the module keeps the classes of its
first execution, so that the pipeline and its components share them (hfgen checks components with isinstance).
hfgen itself reads such a folder as its own classes (`as_hfgen_index`): it needs no trust_remote_code.
"""

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import types

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CODE_MODULE = re.compile(r"^hfgen_[0-9a-f]{10}$")  # the module name model_index.json gives the saved code
PACKAGE = "hfgen"
MODELS_MODULE = "hfgen.models"  # where every hfgen component class is recorded (hfgen/models/__init__.py)

# Methods that exist for hfgen's own loading and saving (reading folders of older layouts, writing this code
# and hfgen's model card). In the saved code a pipeline loads and saves as diffusers' custom pipelines do.
HFGEN_ONLY_METHODS = {
    "GenerativePipeline": ("from_pretrained", "load_config", "save_pretrained", "push_to_hub"),
}


class RemoteCodeError(RuntimeError):
    """hfgen's source uses a construct the bundler cannot copy faithfully (a bug in hfgen, found by its tests)."""


class _Module:
    """One hfgen module's top-level statements: what it defines, and what its imports bind."""

    def __init__(self, name: str):
        self.name = name
        module = importlib.import_module(name)
        self.path = module.__file__
        self.package = module.__package__
        with open(self.path, encoding="utf-8") as file:
            self.source = file.read()
        self.lines = self.source.splitlines(keepends=True)
        self.tree = ast.parse(self.source)
        self.definitions: dict[str, ast.stmt] = {}  # top-level name -> the statement that binds it
        self.internal: dict[str, tuple[str, str | None]] = {}  # name -> (hfgen module, attribute or None)
        self.external: dict[str, set[str]] = {}  # name -> the import statements that bind it
        for statement in self.tree.body:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                self._read_import(statement)
            elif isinstance(statement, ast.Try) and all(isinstance(node, (ast.Import, ast.ImportFrom))
                                                        for node in statement.body):
                for node in statement.body:  # `try: import gradio ... except ImportError: raise ...`
                    self._read_import(node)
            else:
                for name in _bound_names(statement):
                    self.definitions[name] = statement

    def resolve(self, relative: str, level: int) -> str:
        return importlib.util.resolve_name("." * level + relative, self.package) if level else relative

    def module_alias(self, node: ast.AST) -> str | None:
        """The hfgen module a name node stands for (`latent_tools` after `from hfgen import latent_tools`)."""
        if isinstance(node, ast.Name) and node.id in self.internal and self.internal[node.id][1] is None:
            return self.internal[node.id][0]
        return None

    def imports_hfgen(self, node: ast.ImportFrom) -> bool:
        return self.resolve(node.module or "", node.level).split(".")[0] == PACKAGE

    def _read_import(self, statement) -> None:
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.name.split(".")[0] == PACKAGE:
                    raise RemoteCodeError(f"{self.path}:{statement.lineno}: `import {alias.name}`: import names from "
                                          "hfgen modules instead")
                bound = alias.asname or alias.name.split(".")[0]
                self.external.setdefault(bound, set()).add(
                    f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
            return
        module = self.resolve(statement.module or "", statement.level)
        for alias in statement.names:
            bound = alias.asname or alias.name
            if module.split(".")[0] == PACKAGE:
                self.internal[bound] = _internal_target(module, alias.name)
                if alias.asname and alias.asname != alias.name:
                    raise RemoteCodeError(f"{self.path}:{statement.lineno}: `{alias.name} as {alias.asname}`: the "
                                          "bundler keeps hfgen names as they are defined")
            else:
                self.external.setdefault(bound, set()).add(
                    f"from {module} import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))


def _internal_target(module: str, name: str) -> tuple[str, str | None]:
    """`from module import name` -> (module, name), or (module.name, None) when the name is a submodule."""
    value = getattr(importlib.import_module(module), name, None)
    if isinstance(value, types.ModuleType) or value is None and importlib.util.find_spec(f"{module}.{name}"):
        return f"{module}.{name}", None
    return module, name


def _bound_names(statement: ast.stmt) -> list[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    targets = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign):
        targets = [statement.target]
    return [node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)]


def _is_package_import(statement: str, name: str) -> bool:
    """`import PIL.Image` and `import PIL.ImageOps` both bind `PIL`, to the same package."""
    return statement == f"import {name}" or statement.startswith(f"import {name}.") and " as " not in statement


def _first_line(statement: ast.stmt) -> int:
    decorators = getattr(statement, "decorator_list", [])
    return min([statement.lineno] + [decorator.lineno for decorator in decorators])


def _omitted_methods(statement: ast.stmt) -> list[ast.stmt]:
    names = HFGEN_ONLY_METHODS.get(getattr(statement, "name", None), ())
    return [node for node in getattr(statement, "body", []) if getattr(node, "name", None) in names
            and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


class _Bundle:
    """The definitions that some hfgen objects need, collected across hfgen's modules."""

    def __init__(self):
        self.modules: dict[str, _Module] = {}
        self.needed: dict[tuple[str, str], None] = {}  # (module, name), in the order found
        self.owner: dict[str, tuple[str, str]] = {}  # emitted name -> (module, name)
        self.imports: dict[str, set[str]] = {}  # bound name -> the import statements that bind it

    def module(self, name: str) -> _Module:
        if name not in self.modules:
            self.modules[name] = _Module(name)
        return self.modules[name]

    def define(self, module_name: str, name: str) -> None:
        """Finds where `name`, as seen from `module_name`, is defined, and collects it with what it uses (or the
        import that binds it, for a name hfgen takes from another library)."""
        module = self.module(module_name)
        while name not in module.definitions:
            if name in module.external:
                self._import(module, name)
                return
            if name not in module.internal or module.internal[name][1] is None:
                raise RemoteCodeError(f"{module.path}: {name!r} is neither defined nor imported from an hfgen module")
            target_module, name = module.internal[name]
            module = self.module(target_module)
        key = (module.name, name)
        if key in self.needed:
            return
        if name in self.owner and self.owner[name] != key and self._same_text(self.owner[name], key):
            return  # e.g. `logger = logging.getLogger(__name__)`, in several modules
        if name in self.owner and self.owner[name] != key or name in self.imports:
            other = self.owner.get(name, "an import")
            raise RemoteCodeError(f"{module.path}: {name!r} is also defined in {other}: the saved code is one "
                                  "module, so hfgen's names must be unique across the modules it copies")
        self.owner[name] = key
        self.needed[key] = None
        statement = module.definitions[name]
        omitted = _omitted_methods(statement)
        skip = {id(node) for method in omitted for node in ast.walk(method)}
        for node in ast.walk(statement):
            if id(node) not in skip:
                self._use(module, node)

    def _same_text(self, key_a: tuple[str, str], key_b: tuple[str, str]) -> bool:
        (module_a, name_a), (module_b, name_b) = key_a, key_b
        a, b = self.module(module_a), self.module(module_b)
        return ast.get_source_segment(a.source, a.definitions[name_a]) == \
            ast.get_source_segment(b.source, b.definitions[name_b])

    def _import(self, module: _Module, name: str) -> None:
        statements = self.imports.setdefault(name, set())
        statements |= module.external[name]
        if len(statements) > 1 and not all(_is_package_import(statement, name) for statement in statements):
            raise RemoteCodeError(f"{module.path}: {name!r} is bound by different imports: {sorted(statements)}")
        if name in self.owner:
            raise RemoteCodeError(f"{module.path}: the import {name!r} clashes with hfgen's definition in "
                                  f"{self.owner[name][0]}")

    def _use(self, module: _Module, node: ast.AST) -> None:
        """Collects what a node of a needed definition refers to: a name, `module.name`, or `from hfgen... import`."""
        if isinstance(node, ast.Attribute) and module.module_alias(node.value):
            self.define(module.module_alias(node.value), node.attr)  # `latent_tools.interpolate`
        elif isinstance(node, ast.ImportFrom) and module.imports_hfgen(node):
            for alias in node.names:  # an import inside a function: the saved module defines the name itself
                self.define(module.resolve(node.module or "", node.level), alias.name)
        elif isinstance(node, ast.Name):
            name = node.id
            if name in module.definitions or name in module.internal and module.internal[name][1] is not None:
                self.define(module.name, name)
            elif name in module.external:
                self._import(module, name)

    def module_order(self) -> list[str]:
        """The modules holding needed definitions, each after the hfgen modules it imports (as Python ran them)."""
        needed_modules = {module for module, _ in self.needed}
        order, seen = [], set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for dependency, _ in self.module(name).internal.values():
                visit(dependency)
            if name in needed_modules:
                order.append(name)

        for name in sorted(needed_modules):
            visit(name)
        return order

    def source_of(self, module: _Module, statement: ast.stmt) -> str:
        """A definition's lines as hfgen has them, less hfgen-only methods, module references and inner imports
        of hfgen names rewritten for one module."""
        first, last = _first_line(statement), statement.end_lineno
        edits = []  # (line, start byte, end byte, replacement), lines 1-based
        for method in _omitted_methods(statement):
            edits.append((_first_line(method), None, method.end_lineno, ""))
        skip = {id(node) for method in _omitted_methods(statement) for node in ast.walk(method)}
        for node in ast.walk(statement):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Attribute) and module.module_alias(node.value):
                if node.lineno != node.end_lineno:
                    raise RemoteCodeError(f"{module.path}:{node.lineno}: a module attribute split over lines")
                edits.append((node.lineno, node.col_offset, node.end_col_offset, node.attr))
            elif isinstance(node, ast.ImportFrom) and module.imports_hfgen(node):
                edits.append((node.lineno, None, node.end_lineno, ""))
        lines = [line.encode("utf-8") for line in module.lines[first - 1:last]]
        removed = set()
        for line, start, end, replacement in sorted(edits, key=lambda edit: (edit[0], edit[1] or 0), reverse=True):
            if start is None:  # whole lines, `line` to `end`
                removed.update(range(line, end + 1))
                continue
            index = line - first
            lines[index] = lines[index][:start] + replacement.encode("utf-8") + lines[index][end:]
        kept = [text.decode("utf-8") for number, text in enumerate(lines, first) if number not in removed]
        return "".join(kept).rstrip() + "\n"


def bundle_source(objects) -> str:
    """The source of one module that defines `objects` (hfgen classes or functions) and all they use from hfgen.

    Definitions keep hfgen's text, grouped by the module they come from, in the order Python imports them.
    """
    bundle = _Bundle()
    for obj in objects:
        bundle.define(obj.__module__, obj.__name__)
    root = os.path.dirname(os.path.dirname(importlib.import_module(PACKAGE).__file__))
    parts = []
    for name in bundle.module_order():
        module = bundle.module(name)
        statements = {id(module.definitions[n]): module.definitions[n] for m, n in bundle.needed if m == name}
        parts.append(f"# --- {name} ({os.path.relpath(module.path, root)}) ---\n\n" + "\n\n".join(
            bundle.source_of(module, statement) + "\n" for statement in sorted(statements.values(), key=_first_line)))
    imports = _grouped(set().union(*bundle.imports.values()))
    names = sorted({name for _, name in bundle.needed})
    keep_first = (
        "# diffusers executes this module once for the pipeline and again for each component it loads from it:\n"
        "# the objects of the first execution are kept, so that all of them share one class per name.\n"
        f"_DEFINITIONS = {{name: globals()[name] for name in {names!r}}}\n"
        'globals().update(globals().setdefault("_FIRST_DEFINITIONS", _DEFINITIONS))\n')
    return imports + "\n\n\n" + "\n\n\n".join(parts) + "\n\n\n" + keep_first


def _grouped(statements: set[str]) -> str:
    """Import statements, one `from module import a, b` per module, plain imports first, each group sorted."""
    plain = sorted(statement for statement in statements if statement.startswith("import "))
    names: dict[str, list[str]] = {}
    for statement in statements - set(plain):
        module, name = statement[len("from "):].split(" import ")
        names.setdefault(module, []).append(name)
    return "\n".join(plain + [f"from {module} import {', '.join(sorted(names[module]))}" for module in sorted(names)])


def _is_hfgen_entry(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0].split(".")[0] == PACKAGE


def module_text(description: str, objects) -> str:
    """A module of its own: a docstring (`description`, then how it was made) and `bundle_source(objects)`."""
    from hfgen import __version__  # imported late: hfgen imports this module

    return (f'"""{description}\n\n'
            f"Written by hfgen {__version__} from its source (do not edit: hfgen writes it anew each time).\n"
            '"""\n\n' + bundle_source(objects))


def write_remote_code(pipeline, folder: str) -> str:
    """Writes the module for `pipeline` (saved in `folder`) at the root and in each hfgen component's folder, and
    names it in model_index.json; returns the module's name."""
    index_file = os.path.join(folder, "model_index.json")
    with open(index_file, encoding="utf-8") as file:
        index = json.load(file)
    components = [name for name, entry in index.items() if not name.startswith("_") and _is_hfgen_entry(entry)]
    pipeline_class = type(pipeline)
    text = module_text(
        f"hfgen's {pipeline_class.__name__} and its components, for diffusers: load the folder or repo with\n"
        "`diffusers.DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`. (hfgen itself loads it\n"
        "with its own classes, without trust_remote_code.)",
        [pipeline_class, *(type(getattr(pipeline, name)) for name in components)])
    module = "hfgen_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    for subfolder in ["", *components]:
        with open(os.path.join(folder, subfolder, module + ".py"), "w", encoding="utf-8") as file:
            file.write(text)
    index.pop("_name_or_path", None)  # where a loaded pipeline came from: a local path means nothing in a repo
    index["_class_name"] = [module, pipeline_class.__name__]
    for name in components:
        index[name] = [module, index[name][1]]
    with open(index_file, "w", encoding="utf-8") as file:
        file.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return module


def _saved_module(folder: str) -> str | None:
    """The name of the module saved in a pipeline folder, or None for a folder saved before hfgen wrote one."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as file:
        class_name = json.load(file).get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2 and CODE_MODULE.match(str(class_name[0])) and \
            os.path.isfile(os.path.join(folder, class_name[0] + ".py")):
        return class_name[0]
    return None


def has_saved_code(folder: str) -> bool:
    return _saved_module(folder) is not None


def saved_code_module(folder: str) -> str:
    """The text of the code saved in a pipeline folder (`write_remote_code`)."""
    module = _saved_module(folder)
    if module is None:
        raise ValueError(f"{folder!r} holds no code for plain diffusers (it was saved by an hfgen older than 0.2): "
                         "load it with hfgen and save it again, or push it with `hfgen push`, which adds the code")
    with open(os.path.join(folder, module + ".py"), encoding="utf-8") as file:
        return file.read()


def code_requirements(source: str) -> list[str]:
    """The pip requirements of a module's imports: the distributions that provide them, with the version range
    hfgen itself requires where it requires them (its package metadata: setup.py is the one place)."""
    tree = ast.parse(source)
    names = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and not node.level}
    distributions = importlib.metadata.packages_distributions()
    ranges = {}
    for requirement in importlib.metadata.requires(PACKAGE) or []:
        parsed = Requirement(requirement.split(";")[0])
        ranges[canonicalize_name(parsed.name)] = str(parsed)
    requirements = set()
    for name in names - set(sys.stdlib_module_names):
        distribution = distributions.get(name, [name])[0]
        requirements.add(ranges.get(canonicalize_name(distribution), distribution))
    return sorted(requirements)


def as_hfgen_index(index: dict) -> dict:
    """model_index.json as hfgen reads it: the saved code's entries become hfgen's own classes (the pipeline's
    name, and hfgen.models for components); folders saved before the code was written are already so."""
    index = dict(index)
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and CODE_MODULE.match(entry[0]):
            index[name] = entry[1] if name == "_class_name" else [MODELS_MODULE, entry[1]]
    return index
