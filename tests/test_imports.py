"""The package's import structure: every module imports on its own, the module graph built from the
code's own import statements (function-level ones included) has no cycle, and the core library
(nanochat/ outside nanochat/research/) never imports the research package."""

import ast
import os
import subprocess
import sys
import textwrap


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nanochat", "scripts", "tasks")


def module_files(root=ROOT, packages=PACKAGES):
    """{module name: file path} of every .py file under the packages."""
    out = {}
    for package in packages:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def _known(name, modules):
    """The longest prefix of the dotted `name` that is one of `modules` (None if none is)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def imports_of(module, path, modules):
    """The package modules `module` imports anywhere in its file (top level, functions, classes)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else names of module a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph(root=ROOT, packages=PACKAGES):
    modules = module_files(root, packages)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "nanochat.direction" in graph and "nanochat.research.analysis" in graph  # the walk sees the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _in_research(name):
    return name == "nanochat.research" or name.startswith("nanochat.research.")


def research_importers(graph):
    """[(module, research module it imports)] for the modules of nanochat/ outside nanochat/research."""
    return sorted((m, t) for m, targets in graph.items() if m.split(".")[0] == "nanochat" and not _in_research(m)
                  for t in targets if _in_research(t))


def test_core_library_does_not_import_research():
    offenders = research_importers(import_graph())
    assert offenders == [], f"nanochat/ outside nanochat/research imports it: {offenders}"


def test_conversation_rendering_has_its_own_module():
    """direction asks conversation for the chat template; neither conversation nor direction asks the tokenizer."""
    graph = import_graph()
    assert "nanochat.conversation" in graph["nanochat.direction"]
    assert "nanochat.tokenizer" not in graph["nanochat.direction"]
    assert graph["nanochat.conversation"] <= {"nanochat.common"}
    assert graph["nanochat.common"] == set()


def test_the_checks_can_fail(tmp_path):
    """A synthetic package with a cycle through a function-level and a relative import is caught."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    synthetic = {"nanochat.gpt": {"nanochat.research.plots"}, "scripts.report": {"nanochat.research"},
                 "nanochat.research.plots": {"nanochat.gpt"}}
    assert research_importers(synthetic) == [("nanochat.gpt", "nanochat.research.plots")]
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("from pkg.sub.b import f\nimport pkg.a as alias\n")
    graph = import_graph(str(tmp_path), ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub.b", "pkg.a"}
    assert find_cycle(graph) in (["pkg.a", "pkg.sub.b", "pkg.a"], ["pkg.sub.b", "pkg.a", "pkg.sub.b"])


# Each module imported after every package module was dropped from sys.modules, so it cannot lean on
# an import another module happened to make first; one fresh interpreter for all (torch loads once).
ISOLATED_IMPORTS = textwrap.dedent("""
    import importlib, sys
    failed = []
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m.split(".")[0] in ("nanochat", "scripts", "tasks")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except Exception as e:
            failed.append(f"{name}: {type(e).__name__}: {e}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_in_isolation():
    names = sorted(module_files())
    assert len(names) > 40
    result = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *names], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
