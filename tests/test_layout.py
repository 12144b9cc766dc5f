"""The project's layout rules, checked on the tree: one job per file, files a reader finishes, lines a
laptop shows whole, imports from scripts down to library modules, no cycle, only declared packages."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
LIBRARY = {"resnet", "unet", "checkpoints", "metadata", "weights", "byol", "augment", "normalisation", "acdc", "slices",
           "phantom", "metrics", "inference", "pictures", "files", "training", "distributed", "precision", "progress",
           "run_folder", "grid", "results"}
SCRIPTS = {"train_pretrain", "train_segment", "evaluate", "predict", "study", "bench"}
ENTRY = {"hubconf"}  # torch.hub's entry points: neither library nor script, it imports library modules only
ALLOWED = {"torch", "torchvision", "numpy", "nibabel", "tqdm"}


def local_imports(name):
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_every_file_is_known_and_short():
    modules = {f[:-3] for f in FILES}
    assert modules <= LIBRARY | SCRIPTS | ENTRY, f"a file of no known kind: {modules - LIBRARY - SCRIPTS - ENTRY}"
    for f in FILES:
        lines = open(os.path.join(ROOT, f)).read().split("\n")
        assert len(lines) <= 401, f"{f}: {len(lines)} lines (at most 400)"
        long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
        assert not long, f"{f}: lines over 120 characters: {long}"


@pytest.mark.parametrize("f", FILES)
def test_first_docstring_line_states_one_job(f):
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, f)).read()))
    assert doc, f"{f}: no module docstring"
    first = doc.split("\n")[0]
    assert first.endswith(".") and " and " not in first.split("(")[0], f"{f}: {first!r}"


def test_imports_go_from_scripts_down_to_modules_without_cycles():
    modules = {f[:-3] for f in FILES}
    graph = {m: local_imports(m) & modules for m in modules}
    for m in modules:
        outside = {i for i in local_imports(m) - modules
                   if i not in ALLOWED and i not in __import__("sys").stdlib_module_names}
        assert not outside, f"{m}.py imports {outside}, outside the declared dependencies"
    for m in modules & (LIBRARY | ENTRY):
        assert not graph[m] & SCRIPTS, f"library module {m}.py imports a script: {graph[m] & SCRIPTS}"
    for m in modules & SCRIPTS - {"bench", "study"}:  # only those two run other scripts
        assert not graph[m] & SCRIPTS, f"script {m}.py imports another script: {graph[m] & SCRIPTS}"

    def visit(m, path):
        assert m not in path, "import cycle: " + " -> ".join(path + [m])
        for n in graph[m]:
            visit(n, path + [m])
    for m in modules:
        visit(m, [])
