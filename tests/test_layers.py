"""The source tree's layering, read from every module's imports.

foundation -> model -> planning -> storage -> runtime -> pipeline -> cli: a module imports
only from its own layer or the ones before it, and never another package's private names.
"""

import ast
from pathlib import Path

import pytest

import devicemap

PACKAGE = Path(devicemap.__file__).parent
LAYERS = ("foundation", "model", "planning", "storage", "runtime", "pipeline", "cli")
# Modules at the top of the package: the foundation, the public API, and the command line.
TOP_LEVEL = {
    "errors": "foundation",
    "units": "foundation",
    "workload": "foundation",
    "devices": "foundation",
    "__init__": "pipeline",  # the public API re-exports from every layer below the CLI
    "cli": "cli",
    "__main__": "cli",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str, is_package: bool) -> str:
    """The package a module belongs to: its subpackage, or "devicemap" for the top level."""
    parts = module.split(".")
    return module if is_package else ".".join(parts[:-1])


def layer_of(module: str) -> str:
    """The layer of a module of devicemap, by its place in the tree.

    >>> layer_of("devicemap.planning.ledger"), layer_of("devicemap.units"), layer_of("devicemap")
    ('planning', 'foundation', 'pipeline')
    """
    parts = module.split(".")[1:]
    if not parts:
        return TOP_LEVEL["__init__"]
    if parts[0] in LAYERS:
        return parts[0]
    return TOP_LEVEL[parts[0]]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of devicemap in the file."""
    module = _module_name(path)
    package = _package_of(module, path.name == "__init__.py")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "devicemap" or target.startswith("devicemap."):
                found.append((target, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("devicemap")]
    return found


def _resolve(target: str, name: str) -> str:
    """``from target import name`` names a submodule when one exists, else something in ``target``."""
    candidate = f"{target}.{name}"
    relative = Path(*candidate.split(".")[1:])
    if (PACKAGE / relative).is_dir() or (PACKAGE / relative).with_suffix(".py").is_file():
        return candidate
    return target


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_imports_from_a_higher_layer(path: Path):
    module = _module_name(path)
    own = LAYERS.index(layer_of(module))
    upward = [
        f"line {line}: {_resolve(target, name)} ({layer_of(_resolve(target, name))})"
        for target, names, line in _imports(path)
        for name in names or [""]
        if LAYERS.index(layer_of(_resolve(target, name) if name else target)) > own
    ]
    assert not upward, f"{module} ({layer_of(module)}) imports from higher layers: {'; '.join(upward)}"


def _package_of_target(target: str) -> str:
    """The package that ``from target import ...`` reads from: ``target`` itself, or the package of that module."""
    return target if (PACKAGE / Path(*target.split(".")[1:])).is_dir() else target.rpartition(".")[0]


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_imports_another_packages_private_names(path: Path):
    package = _package_of(_module_name(path), path.name == "__init__.py")
    private = [
        f"line {line}: {name} from {target}"
        for target, names, line in _imports(path)
        for name in names
        if name.startswith("_") and _resolve(target, name) == target and _package_of_target(target) != package
    ]
    assert not private, f"{_module_name(path)} imports private names of other packages: {'; '.join(private)}"


def test_every_layer_is_a_package_and_every_top_level_module_has_a_layer():
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert packages == set(LAYERS) - {"foundation", "cli"}
    top_level = {path.stem for path in PACKAGE.glob("*.py")}
    assert top_level == set(TOP_LEVEL)


def test_devicemap_plan_is_the_function_and_no_module_shadows_it():
    assert callable(devicemap.plan)
    assert not (PACKAGE / "plan.py").exists() and not (PACKAGE / "plan").exists()


def _module_map() -> str:
    readme = (PACKAGE.parent.parent / "README.md").read_text()
    section = readme[readme.index("## What is where") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_the_readme_module_map_names_every_module_and_package_of_the_tree():
    named = set(_module_map().split())
    modules = {path.name for path in PACKAGE.rglob("*.py") if path.parent.name != "__pycache__"}
    packages = {f"{path.name}/" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert sorted((modules - {"__init__.py"}) - named) == []
    assert sorted(packages - named) == []


def test_the_readme_module_map_names_nothing_the_tree_lacks():
    files = {path.name for path in PACKAGE.rglob("*.py")}
    mentioned = {word for word in _module_map().split() if word.endswith(".py")}
    assert sorted(mentioned - files) == []
