"""The layout enforces the architecture of ../shared/DESIGN.md: every import of the project's modules,
function-level and type-only ones included, read from the source with `ast`.

- no import cycle between modules;
- lower layers never import higher ones: errors <- config <- run.{artifacts,runtime,rundir} <- data,
  tracking, training, eval <- run.orchestrate <- launch; models imports neither pipeline nor launch;
- deepspeed is imported by pipeline/training/engine.py alone, mlflow by pipeline/tracking/store.py alone,
  ray only by orchestration, runtime, the Ray Train entry and launch code;
- config imports no torch, deepspeed or ray; errors.py imports nothing of the project;
- every sub-package says in its docstring what it owns, and no module is far over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "launch", "slurm")

# Layer of each module prefix (the longest matching prefix wins); a module may import its own layer
# or lower ones.
LAYERS = {
    "pipeline.errors": 0,
    "pipeline.config": 1,
    "pipeline.run.artifacts": 2,
    "pipeline.run.runtime": 2,
    "pipeline.run.rundir": 2,
    "pipeline.data": 3,
    "pipeline.tracking": 3,
    "pipeline.training": 3,
    "pipeline.eval": 3,
    "pipeline.run.orchestrate": 4,
    "pipeline.run.branch": 4,
    "pipeline.sweep": 4,
    "launch": 5,
    "slurm": 5,
}
RAY_IMPORTERS = ("pipeline.run.", "pipeline.data.shard", "pipeline.training.ray_train", "pipeline.sweep.", "launch.")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file names: module level, in functions,
    and under `if TYPE_CHECKING:` (a type-only import is a dependency too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {dep for dep in imports_of(path) if dep in modules and dep != name} for name, path in modules.items()}


def layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_no_import_cycles():
    graph, state, stack = project_graph(), {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_nothing_imports_a_higher_layer():
    wrong = []
    for module, deps in project_graph().items():
        if module.startswith("models"):
            wrong += [f"{module} -> {dep}" for dep in deps if not dep.startswith("models")]
            continue
        if module.startswith("pipeline"):
            wrong += [f"{module} -> {dep}" for dep in deps if dep.startswith("launch")]
        own = layer(module)
        if own is None:
            continue
        wrong += [f"{module} -> {dep}" for dep in deps if (layer(dep) or 0) > own]
    assert not wrong, "imports that reach up a layer:\n" + "\n".join(sorted(wrong))


def test_heavy_libraries_have_one_importer_each():
    importers: dict[str, set[str]] = {"deepspeed": set(), "mlflow": set(), "ray": set(), "torch": set()}
    for module, path in project_modules().items():
        for name in imports_of(path):
            root = name.split(".")[0]
            if root in importers:
                importers[root].add(module)
    assert importers["deepspeed"] == {"pipeline.training.engine"}
    assert importers["mlflow"] == {"pipeline.tracking.store"}
    stray_ray = sorted(m for m in importers["ray"] if not m.startswith(RAY_IMPORTERS))
    assert not stray_ray, f"ray imported outside orchestration and launch code: {stray_ray}"
    config_heavy = sorted(m for lib in ("torch", "deepspeed", "ray") for m in importers[lib] if ".config" in m)
    assert not config_heavy, f"config modules import torch, deepspeed or ray: {config_heavy}"


def test_errors_is_a_leaf():
    deps = project_graph()["pipeline.errors"]
    assert not deps, f"pipeline/errors.py imports {deps}"


def test_every_sub_package_says_what_it_owns():
    folders = {path.parent for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    missing = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"packages without __init__.py (a wheel would leave them out): {missing}"
    for init in REPO.glob("pipeline/*/__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring and len(docstring) > 80, f"{init.relative_to(REPO)} needs a docstring saying what it owns"


def test_no_module_is_far_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in project_modules().values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420
    }
    assert not long, f"split these modules along their jobs: {long}"


def test_slurm_folder_holds_what_a_slurm_user_edits():
    assert (REPO / "slurm" / "pretrain.sbatch").is_file() and (REPO / "slurm" / "README.md").is_file()
    assert sorted(p.name for p in (REPO / "slurm" / "examples").iterdir()) == [
        "multi-node.sh",
        "site.yaml",
        "sweep-array.sh",
    ]
    assert not list((REPO / "launch" / "slurm").glob("*.sbatch")), "launch/slurm/ keeps only Python"
