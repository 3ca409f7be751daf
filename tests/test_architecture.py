"""The package's layering, checked on its source: no import cycle, the engine imports no concrete stage kind,
the lower layers import neither the engine nor the kinds, no module over 500 lines, and loading an experiment
config imports no JAX.

Imports are read from the source (`ast`), both module-level and inside functions: a lazy import still couples
two modules, so it counts (imports under `if TYPE_CHECKING:` are annotations only and do not). The graph is over modules of `llama_jax`; `import llama_jax.a.b` and
`from llama_jax.a import b` (b a module) both make an edge to `llama_jax.a.b`, and a package's `__init__` is a
module of its own.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llama_jax"
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """The llama_jax modules `path` imports (anywhere in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import llama_jax.a.b.c` where c is a name
                target = target.rpartition(".")[0]
            if target.startswith("llama_jax") and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        graph.setdefault(_package_of(module), set()).update(
            _package_of(t) for t in targets if _package_of(t) != _package_of(module))
    assert _cycles(graph) == []


@pytest.mark.parametrize("lower,forbidden", [
    ("llama_jax.train", ("llama_jax.stages", "llama_jax.posttrain", "llama_jax.scaling")),
    ("llama_jax.model", ("llama_jax.train", "llama_jax.stages")),
    ("llama_jax.data", ("llama_jax.train", "llama_jax.stages")),
    ("llama_jax.sharding", ("llama_jax.train", "llama_jax.stages")),
    ("llama_jax.experiment", ("llama_jax.train", "llama_jax.stages")),
    ("llama_jax.workdir", ("llama_jax.train", "llama_jax.stages", "llama_jax.interop", "llama_jax.model")),
])
def test_layers_import_nothing_above_them(lower, forbidden):
    bad = sorted((module, target) for module, targets in _graph().items()
                 if module == lower or module.startswith(lower + ".")
                 for target in targets if target.startswith(forbidden))
    assert bad == [], f"{lower} must not import {forbidden}: {bad}"


def test_the_engine_knows_no_concrete_kind():
    """Kinds are passed in (`run_experiment(..., kinds)`); no engine module names one."""
    kinds = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "options", "common", "preference"}
    for path in (PACKAGE / "train").rglob("*.py"):
        source = path.read_text()
        for kind in ("Pretrain", "LongContext", "Anneal", "SFT", "Reward", "RejectionSampling", "DPO", "Average"):
            assert f"class {kind}(" not in source and f" {kind}()" not in source, (path, kind)
    assert kinds >= {"pretrain", "long_context", "anneal", "sft", "reward", "rejection", "dpo", "average"}


def test_no_module_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_kind_table_is_the_stage_modules():
    from llama_jax.stages import KINDS
    from llama_jax.train import kind as kind_lib
    kind_lib.check_table(KINDS)
    assert sorted(KINDS) == sorted(["pretrain", "long_context", "anneal", "sft", "reward", "rejection_sampling",
                                    "preference_annotation", "dpo", "average"])
    assert {k for k, v in KINDS.items() if not v.trains} == {"rejection_sampling", "preference_annotation", "average"}


def test_loading_an_experiment_config_imports_no_jax_and_writes_nothing(tmp_path):
    code = ("import sys, importlib.util\n"
            "spec = importlib.util.spec_from_file_location('e', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.get_config(sys.argv[2])\n"
            "print(sorted(k for k in sys.modules if k == 'jax' or k.startswith(('jax.', 'optax', 'orbax'))))\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for experiment, variant in (("pretrain", "tiny"), ("pretrain", "llama3.1-405b"), ("long_context", "tiny"),
                                ("scaling_laws", "cpu"), ("herd", "cpu"), ("posttrain", f"cpu,init={tmp_path}/run")):
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "experiments" / f"{experiment}.py"), variant],
                             capture_output=True, text=True, cwd=scratch,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "[]", (experiment, variant, out.stdout)
        assert list(scratch.iterdir()) == [], (experiment, variant, "wrote", list(scratch.iterdir()))
