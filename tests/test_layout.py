"""The shape of the code: one home for each thing, no import circle, functions a reader takes in at once."""
import ast
import glob
import os

from conftest import ROOT

SCRIPTS = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}


def imports(path):
    """The project modules a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(SCRIPTS)


def test_the_scripts_import_no_circle():
    graph = {name: imports(path) for name, path in SCRIPTS.items()}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph[start])
    circles = [name for name in graph if reaches(name, name)]
    assert circles == [], f"import circles through {circles}: {graph}"
    # the layering README states: common ← model ← the scripts; deploy starts train; generate needs no other script
    assert graph["common"] == set() and graph["quality"] == set()
    assert graph["model"] == {"common"}
    assert graph["train"] == {"common", "model", "quality"}
    assert graph["evaluate"] == {"common", "model", "deploy", "train"}
    assert graph["generate"] <= {"common", "model"} and graph["export"] <= {"common", "model"}
    assert graph["deploy"] == {"common", "model", "train"} and graph["compress"] == {"common"}


def test_every_function_fits_on_a_screen():
    lengths = sorted(((node.end_lineno - node.lineno + 1, f"{name}.py:{node.name}")
                      for name, path in SCRIPTS.items()
                      for node in ast.walk(ast.parse(open(path).read()))
                      if isinstance(node, ast.FunctionDef)), reverse=True)
    assert lengths[0][0] < 80, f"longest functions: {lengths[:3]}"
