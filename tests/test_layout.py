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
    # the layering README states: settings, model and quality import nothing of the project; the shared rooms below
    # the scripts; deploy starts train; evaluate scores as training does without importing it; generate and compress
    # need no other script
    assert graph["settings"] == graph["model"] == graph["quality"] == set()
    assert graph["decoding"] == {"model"} and graph["common"] == {"settings"} and graph["codec"] == {"common", "settings"}
    assert graph["audio"] == {"codec", "common", "settings"}
    assert graph["checkpoint"] == {"common", "decoding", "model", "settings"}
    assert graph["scoring"] == {"codec", "decoding", "model", "quality"}
    assert graph["watch"] == {"audio", "codec", "common", "decoding", "settings"}
    assert graph["train"] == {"checkpoint", "codec", "common", "model", "scoring", "settings", "watch"}
    assert "train" not in graph["evaluate"] and "scoring" in graph["evaluate"]
    assert graph["generate"] == {"audio", "checkpoint", "codec", "common", "decoding", "model", "settings"}
    assert graph["compress"] == {"audio", "codec", "common", "settings"} and "train" in graph["deploy"]


def test_every_script_imports_settings_first():
    """The first import of every script is settings.py, which makes Ctrl-C while the large libraries load one line."""
    for name, path in SCRIPTS.items():
        source = open(path).read()
        if "# settings: edit here" in source:
            first = next(line for line in source.splitlines() if line.startswith(("import ", "from ")) and
                         line.split()[1] not in ("os", "sys", "json", "math", "re", "csv", "glob", "io", "time", "signal",
                                                 "random", "shutil", "tempfile", "contextlib", "hashlib", "itertools", "queue",
                                                 "stat", "subprocess", "warnings", "dataclasses", "platform", "types",
                                                 "collections", "multiprocessing"))
            assert first.startswith("import settings"), (name, first)


def test_each_file_says_what_lives_in_it():
    for name, path in SCRIPTS.items():
        assert ast.get_docstring(ast.parse(open(path).read())), f"{name}.py opens with no docstring"


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
