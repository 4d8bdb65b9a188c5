"""The repo's promises: the dev container's files exist, has_cuda.py, requirements."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_devcontainer_parses_and_every_file_it_references_exists() -> None:
    folder = ROOT / ".devcontainer"
    config = json.loads((folder / "devcontainer.json").read_text())
    build = config["build"]
    dockerfile = folder / build["dockerfile"]
    context = (folder / build["context"]).resolve()
    assert dockerfile.is_file()
    assert context == ROOT
    script = config["postCreateCommand"].split()[-1]
    assert (ROOT / script).is_file()
    text = dockerfile.read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (context / source).is_file(), source


def test_has_cuda_reports_the_device() -> None:
    result = subprocess.run(
        [sys.executable, "has_cuda.py"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert lines["has_cuda"] == str(torch.cuda.is_available())
    assert lines["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert int(lines["n_gpu"]) == torch.cuda.device_count()


def test_every_third_party_import_is_a_requirement() -> None:
    wanted = {
        line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for name in ("requirements.txt", "requirements-dev.txt")
        for line in (ROOT / name).read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-r"))
    }
    module_to_package = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}
    wanted.add("wandb")  # optional, not installed by make: only train.py --wandb, which says how
    local = {
        "models",
        "utils",
        "tests",
        "train",
        "eval",
        "bench",
        "visualize",
        "conftest",
        "export",
        "predict",
        "sweep",
        "fewshot",
        "analyze",
        "tools",
    }
    local |= {"export", "predict"}
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in (name.split(".")[0] for name in modules):
                if module not in stdlib and module not in local and module != "__future__":
                    found.add(module_to_package.get(module, module).lower())
    assert found <= wanted, f"imported but not in requirements: {sorted(found - wanted)}"


def _imports(path: Path) -> set[str]:
    """The modules of this repo (and others) that `path` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # `from utils.evals import analysis` names the module `utils.evals.analysis`
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


# Which rooms of utils/ each room may import: plumbing (infra) at the bottom, data and the
# recipe above it and beside each other, the evaluations on top.
ROOMS_BELOW = {
    "infra": {"infra"},
    "data": {"infra", "data"},
    "recipe": {"infra", "recipe"},
    "evals": {"infra", "data", "recipe", "evals"},
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "utils" and parts[1] in ROOMS_BELOW else None


def test_the_layers_only_import_downwards() -> None:
    wrong = []
    for room, allowed in ROOMS_BELOW.items():
        for path in sorted((ROOT / "utils" / room).glob("*.py")):
            for module in _imports(path):
                below = _room(module)
                if module.startswith("utils.") and below is None and module != "utils":
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}, outside the rooms")
                elif below is not None and below not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    for path in sorted((ROOT / "models").glob("*.py")):
        wrong += [
            f"{path.relative_to(ROOT)} imports {m}"
            for m in _imports(path)
            if m == "utils" or m.startswith("utils.")
        ]
    assert not wrong, "\n".join(wrong)


def test_no_script_imports_another_but_the_sweep_its_trainer() -> None:
    scripts = {path.stem for path in ROOT.glob("*.py")} - {"conftest"}
    assert {"train", "eval", "sweep", "predict"} <= scripts
    imported = {
        (path.relative_to(ROOT).as_posix(), module)
        for folder in (".", "tools", "utils", "utils/*", "models")
        for path in ROOT.glob(f"{folder}/*.py")
        for module in _imports(path)
        if module in scripts
    }
    assert imported == {("sweep.py", "train")}


def test_no_module_imports_itself_through_others() -> None:
    """The modules of models/ and utils/ form no import cycle (deferred imports count): each
    room's files can be read from the bottom up."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path
        for folder in ("models", "utils", "utils/*")
        for path in ROOT.glob(f"{folder}/*.py")
        if path.name != "__init__.py"
    }
    graph = {name: sorted(_imports(path) & modules.keys()) for name, path in modules.items()}
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        for other in graph[name]:
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert len(modules) > 30
    assert any(graph.values())
    assert not cycles, "\n".join(cycles)
