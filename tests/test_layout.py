"""Project-shape rules that reviewers check first (STYLE.md 2, 6a, 7, 9): model code knows nothing about
distribution and never unpickles; imports point down the layers, sit at the top of their module and
form no circle; the loop fits on a screen; only the composition root and the commands see the whole
run config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_pipeline", "eval")
MODEL_DIRS = ["trainer/models", "trainer/diffusion", "trainer/sampling"]
FORBIDDEN_IMPORTS = ("torch.distributed", "deepspeed")

# Layers, bottom first: a module may import its own layer and the ones below (the circle test keeps each
# layer's own imports a DAG). The first matching prefix decides a module's layer.
LAYERS = [
    ("library", ("trainer", "data_pipeline", "eval")),  # the packages' own __init__ (exact names only)
    ("library", ("trainer.checks", "trainer.flops", "trainer.images", "trainer.models", "trainer.diffusion", "trainer.sampling",
                 "trainer.convert", "trainer.zero_memory", "trainer.autoencoder_loss", "trainer.interchange")),
    ("runtime", ("trainer.runtime",)),
    ("commands", ("trainer.train", "trainer.sample", "trainer.export", "trainer.submit", "trainer.plan",
                  "trainer.inference", "trainer.cli", "trainer.autoencoder_overrides", "data_pipeline.precompute",
                  "data_pipeline.inspect", "eval.run", "eval.reconstruction")),
    ("data and evaluation", ("data_pipeline", "eval")),
    ("tasks", ("trainer.tasks",)),
    ("loop", ("trainer.loop",)),
    ("config", ("trainer.config",)),
]
# The order in which layers stack (LAYERS lists "commands" early only so that its prefixes match first).
STACK = ["library", "runtime", "data and evaluation", "tasks", "loop", "config", "commands"]
# Third-party libraries a function may import lazily (heavy, or read the environment at import), each
# with a comment saying why.
LAZY_ALLOWED = ("deepspeed", "lpips", "open_clip", "diffusers", "wandb", "sklearn", "threadpoolctl", "transformers")
# The run config's groups: a function reading two of them from one argument was handed the whole config.
CONFIG_GROUPS = {"model", "diffusion", "data", "optim", "deepspeed", "ema", "checkpoint", "logging", "eval", "train",
                 "slurm", "precompute", "loss"}
# The composition root and the commands: the functions that may take the whole run config.
WHOLE_CONFIG_ALLOWED = {
    "trainer.train": {"build_task", "_latent_cache_check", "_cached_text", "train", "run", "main"},
    "trainer.config": {"*"},
    "trainer.inference": {"load_for_inference", "train_config_of"},
    "trainer.submit": {"main", "of"},
    "data_pipeline.precompute": {"run_precompute", "main"},
    "eval.run": {"__init__", "evaluate", "_run"},
}


def _python_files(rel_dir: str):
    return sorted((ROOT / rel_dir).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in _python_files(package)}


def _imports(tree: ast.AST, module: str, modules: dict[str, Path]):
    """(imported project module, line, inside a function?) for every import of the module, anywhere."""
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name:
                    found.append((name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph():
    modules = _project_modules()
    edges = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges[module] = [(target, line, lazy) for target, line, lazy in _imports(tree, module, modules)
                         if target != module]
    return modules, edges


def _layer(module: str) -> str:
    if module in PACKAGES:
        return "library"
    for name, prefixes in LAYERS[1:]:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py: add it to LAYERS")


def _cycles(edges: dict[str, list]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in edges.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_circles() -> None:
    _, edges = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import circles (module level and inside functions alike):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers() -> None:
    _, edges = _graph()
    offenders = []
    for module, targets in edges.items():
        level = STACK.index(_layer(module))
        for target, line, _ in targets:
            if STACK.index(_layer(target)) > level:
                offenders.append(f"{module}:{line} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("importer, forbidden", [
    (("trainer.models", "trainer.diffusion", "trainer.sampling"),
     ("trainer.convert", "trainer.runtime", "trainer.tasks", "trainer.loop", "trainer.train", "trainer.interchange")),
    (("data_pipeline", "eval"), ("trainer.loop", "trainer.tasks", "trainer.train")),
])
def test_forbidden_imports(importer, forbidden) -> None:
    _, edges = _graph()
    offenders = [f"{module}:{line} imports {target}" for module, targets in edges.items()
                 if module.startswith(importer) for target, line, _ in targets if target.startswith(forbidden)]
    assert not offenders, "\n".join(offenders)


def test_imports_at_module_top() -> None:
    """Project modules are imported at the top; a function imports only a heavy optional library lazily,
    with a comment saying why."""
    offenders = []
    modules, edges = _graph()
    for module, targets in edges.items():
        offenders += [f"{module}:{line} imports {target} inside a function" for target, line, lazy in targets if lazy]
    for module, path in modules.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and not getattr(inner, "level", 0):
                    name = inner.names[0].name if isinstance(inner, ast.Import) else inner.module
                    top = name.split(".")[0]
                    if top in PACKAGES:
                        continue  # reported above
                    context = "\n".join(lines[max(0, inner.lineno - 4): inner.lineno])
                    if top not in LAZY_ALLOWED:
                        offenders.append(f"{module}:{inner.lineno} imports {name} inside a function")
                    elif "#" not in context:
                        offenders.append(f"{module}:{inner.lineno} imports {name} lazily without a comment saying why")
    assert not offenders, "\n".join(offenders)


def test_training_loop_fits_on_a_screen() -> None:
    tree = ast.parse((ROOT / "trainer" / "loop.py").read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "TrainLoop")
    train = next(n for n in loop.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60


def test_only_the_composition_root_and_commands_take_the_whole_config() -> None:
    offenders = []
    for module, path in _project_modules().items():
        allowed = WHOLE_CONFIG_ALLOWED.get(module, set())
        if "*" in allowed:
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in allowed:
                continue
            # A parameter typed as another config (a command's own, a component's) is not the run config.
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")
                      and (a.annotation is None or "TrainConfig" in ast.unparse(a.annotation))}
            annotated = [a.arg for a in fn.args.args + fn.args.kwonlyargs
                         if a.annotation is not None and "TrainConfig" in ast.unparse(a.annotation)]
            called = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
            groups: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and id(node) not in called and isinstance(node.value, ast.Name) \
                        and node.value.id in params and node.attr in CONFIG_GROUPS:
                    groups.setdefault(node.value.id, set()).add(node.attr)
            wide = [f"{p} ({', '.join(sorted(g))})" for p, g in groups.items() if len(g) >= 2]
            if annotated or wide:
                offenders.append(f"{module}.{fn.name}:{fn.lineno} takes the whole run config: {annotated or wide}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("rel_dir", MODEL_DIRS)
def test_model_code_does_not_import_distribution(rel_dir):
    files = _python_files(rel_dir)
    assert files, f"{rel_dir} holds no Python files"
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith(FORBIDDEN_IMPORTS) or name == "torch.distributed":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
            if isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} uses torch.distributed")
    assert not offenders, "\n".join(offenders)


def test_no_unsafe_torch_load_anywhere():
    offenders = []
    for rel in ("trainer", "data_pipeline", "eval"):
        for path in _python_files(rel):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not safe:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
                if isinstance(node, ast.Name) and node.id == "pickle":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} uses pickle")
    assert not offenders, "\n".join(offenders)
