"""The shape of the code: one home for each thing, no import circle, model.py the plain network."""
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
    assert graph["common"] == set() and graph["quality"] == set() and graph["model"] == set()
    assert graph["decoding"] == {"model"} and graph["checkpoint"] == {"common", "decoding", "model"}
    assert graph["train"] == {"checkpoint", "common", "decoding", "model", "quality"}
    assert graph["evaluate"] == {"checkpoint", "common", "decoding", "deploy", "quality", "train"}
    assert graph["generate"] == {"checkpoint", "common", "decoding", "model"} and graph["export"] == {"checkpoint", "common"}
    assert graph["deploy"] == {"checkpoint", "common", "decoding", "model", "train"} and graph["compress"] == {"common"}


def test_model_py_is_the_network_in_plain_pytorch():
    """What a researcher changes reads as math: no compiler, no device-specific path, no thread count;
    decoding's fast forms and the checkpoints live beside it (decoding.py, checkpoint.py)."""
    source = open(os.path.join(ROOT, "model.py")).read()
    for word in ("torch._inductor", "torch.compiler", "torch.compile", "set_num_threads", '== "cpu"', "is_compiling",
                 "torch.load", "safetensors", "transformers"):
        assert word not in source, word


def test_every_model_setting_has_one_default():
    """deploy.py's settings block keeps the model settings a user edits, with ModelConfig's defaults."""
    import deploy
    import model as M
    defaults = M.ModelConfig()
    assert {name: getattr(deploy, name) for name in M.MODEL_SETTINGS} == {name: getattr(defaults, name) for name in M.MODEL_SETTINGS}
