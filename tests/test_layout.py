"""The code as a textbook: one concept per module, short functions, no import circle, every
runtime import declared. These read the source; they fail naming the file and the line."""
import ast
import glob
import os
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(HERE, "*.py"))}


def project_imports(path):
    """Project modules that `path` imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_import_circle():
    deps = {m: project_imports(f) & set(MODULES) - {m} for m, f in MODULES.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in deps[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    circles = sorted(m for m in deps if m in reach(m))
    assert not circles, f"modules that import themselves through others: {circles} ({deps})"


def test_kvcache_imports_nothing_from_the_project():
    assert not project_imports(MODULES["kvcache"]) & set(MODULES)


def test_modules_under_400_lines():
    long = {m: n for m, f in MODULES.items() if (n := len(open(f).read().splitlines())) > 400}
    assert not long, f"modules over 400 lines (two concepts?): {long}"


def test_functions_under_60_lines():
    long = []
    for m, f in MODULES.items():
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{m}.py:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_module_opens_with_a_docstring():
    missing = [m for m, f in MODULES.items() if not ast.get_docstring(ast.parse(open(f).read()))]
    assert not missing, missing


def test_every_runtime_import_is_in_requirements():
    """Third-party modules imported by the project's modules (not the tests) are declared in
    requirements.txt; bench.py's reference contenders are test requirements."""
    lines = [line.split("#")[0] for line in open(os.path.join(HERE, "requirements.txt"))]  # pip's comments
    declared = {line.split("==")[0].split(">")[0].split("[")[0].strip().lower().replace("-", "_")
                for line in lines if line.strip()}
    module_of = {"yaml": "pyyaml"}  # module name -> package name where they differ
    std = set(sys.stdlib_module_names)
    test_only = {"transformers", "pytest", "openai", "gguf", "accelerate",
                 "llama_cpp"}  # bench_llamacpp.py's optional contender (requirements-test.txt says why)
    missing = {}
    for m, f in MODULES.items():
        for mod in project_imports(f) - set(MODULES) - std - test_only:
            if module_of.get(mod, mod).lower() not in declared:
                missing.setdefault(mod, []).append(m)
    assert not missing, f"imported but not in requirements.txt: {missing}"
