"""Packaging: every package the code imports is declared in pyproject.toml (the optional experts in their
extras), and a source build without a visible GPU compiles for the GPUs users have."""

import ast
import importlib.util
import os
import sys

import tomllib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "open_clip": "open_clip_torch",
    "ImageReward": "image-reward",
    "huggingface_hub": "huggingface-hub",
}


def imported_top_level_modules(folder):
    names = set()
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(root, name)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(alias.name.split(".")[0] for alias in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"rglcd_fast"}


def requirement_name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop)[0]
    return requirement.lower().replace("_", "-")


def test_every_imported_package_is_declared():
    """In the dependencies, except the optional experts' and data sources' packages, which their extras declare."""
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    declared |= {requirement_name(r) for name in ("hpsv2", "imagereward", "datasets") for r in extras[name]}
    imported = {
        DISTRIBUTIONS.get(name, name).lower().replace("_", "-")
        for name in imported_top_level_modules(os.path.join(ROOT, "rglcd_fast"))
    }
    assert imported - declared == set()


def test_cuda_architectures_without_a_visible_gpu_cover_current_cards():
    spec = importlib.util.spec_from_file_location("rglcd_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # not __main__: defines, does not build
    assert setup.default_cuda_arch_list("13.0", gpu_visible=True) is None  # torch picks the visible GPUs'
    assert setup.default_cuda_arch_list("13.0", False) == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    assert setup.default_cuda_arch_list("12.4", False) == "7.5;8.0;8.6;8.9;9.0+PTX"  # no Blackwell before 12.8
