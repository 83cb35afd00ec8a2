"""The layers, read from the source with ast: each module imports only the layers below it.

    core         nanorlhf/*.py        imports only the core
    tasks        nanorlhf/tasks/      imports the core
    fast         nanorlhf/fast/       imports the core
    scripts      *.py at the root     import the core, tasks and fast (fast only inside a function,
                                      where its flag is read; nanorlhf.run anywhere), never
                                      another script
    tools/, experiments/, data/       import the core, tasks and fast, never a script
    bench/, tests/                    may import anything, scripts included

Both module-level and function-level imports are read (`import a.b`, `from a import b`, relative
imports, and importlib.import_module / __import__ with a literal name). A second rule keeps lines
short: in every file at most 5% of the lines are over 100 characters.

The checks are pure functions of (path, source), so the last tests plant violations and check
that each one is caught.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("nanorlhf", "tools", "experiments", "bench", "tests", "data")  # and the root's scripts
MAX_CHARS, MAX_LONG_SHARE = 100, 0.05

# importer's layer -> {a layer it must not import: the reason its error gives}
NOTHING_ABOVE = {"tools": "tools/ is above it", "experiments": "experiments/ is above it",
                 "script": "only tests and bench import a script", "bench": "bench/ is above it",
                 "tests": "nothing imports the tests"}
FORBIDDEN = {
    "core": {"tasks": "the core imports only nanorlhf/*.py",
             "fast": "the core imports only nanorlhf/*.py", **NOTHING_ABOVE},
    "tasks": {"fast": "a task imports the core only, never the fast layer", **NOTHING_ABOVE},
    "fast": {"tasks": "the fast layer imports the core only, never a task", **NOTHING_ABOVE},
    "script": {**NOTHING_ABOVE,
               "script": "a script never imports another script: move the shared code down"},
    "tools": {"script": "only tests and bench import a script",
              "tests": "nothing imports the tests"},
    "experiments": {"script": "only tests and bench import a script (run it as a subprocess)",
                    "tests": "nothing imports the tests"},
    "data": {"script": "only tests and bench import a script",
             "tests": "nothing imports the tests"},
    "bench": {},
    "tests": {},
}


def layer_of_file(path: str) -> str:
    """'nanorlhf/fast/decode.py' -> 'fast'; `path` is relative to the repository root."""
    parts = path.split("/")
    if len(parts) == 1:
        return "script"
    if parts[0] == "nanorlhf":
        if len(parts) == 2:
            return "core"
        return parts[1] if parts[1] in ("tasks", "fast") else "unknown"
    return parts[0] if parts[0] in FORBIDDEN else "unknown"


def layer_of_module(name: str, scripts: set[str]) -> str | None:
    """'nanorlhf.fast.packed' -> 'fast', 'train_dpo' -> 'script'; None outside the project."""
    parts = name.split(".")
    if parts[0] == "nanorlhf":
        return parts[1] if len(parts) > 1 and parts[1] in ("tasks", "fast") else "core"
    if parts[0] in ("tools", "experiments", "bench", "tests"):
        return parts[0]
    return "script" if parts[0] in scripts else None


def imports(path: str, source: str) -> list[tuple[int, str, bool]]:
    """Every import in `source` -> (line, module, inside a function?). `from a import b` imports
    a.b (b may be a module); a relative import is resolved against the file's own package."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:  # from .x import y: `level` - 1 packages up from the file's own
                package = path.removesuffix(".py").split("/")[:-1]
                base = package[:len(package) - node.level + 1] + base
            for alias in node.names:
                name = ".".join(base + ([] if alias.name == "*" else [alias.name]))
                found.append((node.lineno, name, in_function))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                             "__import__")):
            found.append((node.lineno, node.args[0].value, in_function))
        function = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, function))

    visit(ast.parse(source, filename=path), False)
    return found


def layering_violations(path: str, source: str, scripts: set[str]) -> list[str]:
    """The imports of one file (`path` relative to the root) that break a rule, one line each:
    'path:line: who imports what: the rule'."""
    layer = layer_of_file(path)
    if layer == "unknown":
        return [f"{path}:1: a folder the layers do not name: give it a layer in FORBIDDEN"]
    itself = path.removesuffix(".py") if layer == "script" else None
    errors = []
    for line, module, in_function in imports(path, source):
        target = layer_of_module(module, scripts)
        if target is None or module.split(".")[0] == itself:
            continue
        if target in FORBIDDEN[layer]:
            errors.append(f"{path}:{line}: {layer} imports {target} ({module}): "
                          f"{FORBIDDEN[layer][target]}")
        elif (layer == "script" and target == "fast" and not in_function
              and not (module + ".").startswith("nanorlhf.run.")):
            errors.append(f"{path}:{line}: script imports {module} at module level: import the "
                          f"fast layer inside the function that reads its flag (only "
                          f"nanorlhf.run is exempt)")
    return errors


def long_line_violations(path: str, source: str) -> list[str]:
    """One line if more than 5% of the file's lines are over 100 characters, naming the first."""
    lines = source.splitlines()
    long = [i for i, line in enumerate(lines, 1) if len(line) > MAX_CHARS]
    if len(long) <= MAX_LONG_SHARE * len(lines):
        return []
    shown = ", ".join(map(str, long[:5])) + (", ..." if len(long) > 5 else "")
    return [f"{path}:{long[0]}: {len(long)} of {len(lines)} lines ({len(long) / len(lines):.0%}) "
            f"are over {MAX_CHARS} characters, more than {MAX_LONG_SHARE:.0%} (lines {shown})"]


def project_files(root: Path) -> list[str]:
    """Every project .py file, relative to the root: the scripts at the root and FOLDERS' files."""
    files = list(root.glob("*.py")) + [p for f in FOLDERS for p in (root / f).rglob("*.py")]
    return sorted(p.relative_to(root).as_posix() for p in files if "__pycache__" not in p.parts)


def repo_violations(root: Path) -> tuple[list[str], list[str]]:
    """-> (layering violations, long-line violations) of every project file under `root`."""
    scripts = {p.stem for p in root.glob("*.py")}
    layering, lengths = [], []
    for path in project_files(root):
        source = (root / path).read_text(encoding="utf-8")
        layering += layering_violations(path, source, scripts)
        lengths += long_line_violations(path, source)
    return layering, lengths


def test_layers():
    layering, _ = repo_violations(ROOT)
    assert not layering, "layering violations:\n" + "\n".join(layering)


def test_lines_at_most_5_percent_over_100_characters():
    _, lengths = repo_violations(ROOT)
    assert not lengths, "files with too many long lines:\n" + "\n".join(lengths)


SCRIPTS = {"train_dpo", "train_ppo", "rest_loop"}
FAST_AT_MODULE_LEVEL = "script imports {} at module level"


@pytest.mark.parametrize("path, source, line, rule", [
    ("nanorlhf/model.py", "from nanorlhf.tasks import pink\n", 1, "core imports tasks"),
    ("nanorlhf/sampling.py", "def f():\n    from nanorlhf.fast import packed\n", 2,
     "core imports fast"),
    ("nanorlhf/sampling.py", "import nanorlhf.fast.stream as stream\n", 1, "core imports fast"),
    ("nanorlhf/model.py", "from .fast.packed import pack_linears\n", 1, "core imports fast"),
    ("nanorlhf/data.py", "from tools import convert\n", 1, "core imports tools"),
    ("nanorlhf/run.py", "import importlib\nimportlib.import_module('train_dpo')\n", 2,
     "core imports script"),
    ("nanorlhf/tasks/pink.py", "from nanorlhf.fast.decode import generate_streamed\n", 1,
     "tasks imports fast"),
    ("nanorlhf/tasks/pink.py", "from ..fast import stream\n", 1, "tasks imports fast"),
    ("nanorlhf/tasks/pink.py", "from experiments import frontier\n", 1,
     "tasks imports experiments"),
    ("nanorlhf/fast/decode.py", "from nanorlhf.tasks.pink import judge\n", 1,
     "fast imports tasks"),
    ("nanorlhf/fast/decode.py", "from nanorlhf import tasks\n", 1, "fast imports tasks"),
    ("nanorlhf/fast/decode.py", "import rest_loop\n", 1, "fast imports script"),
    ("train_ppo.py", "from train_dpo import dpo_loss\n", 1, "script imports script"),
    ("train_ppo.py", "def main():\n    import rest_loop\n", 2, "script imports script"),
    ("train_ppo.py", "from tools.seeds import mean_se\n", 1, "script imports tools"),
    ("tools/chat.py", "import train_dpo\n", 1, "tools imports script"),
    ("experiments/frontier.py", "def f():\n    import rest_loop\n", 2,
     "experiments imports script"),
    ("data/build_pink_data.py", "from train_dpo import dpo_loss\n", 1, "data imports script"),
    ("train_dpo.py", "from nanorlhf.fast.packed import pack_linears\n", 1,
     FAST_AT_MODULE_LEVEL.format("nanorlhf.fast.packed.pack_linears")),
    ("train_dpo.py", "from nanorlhf import fast\n", 1,
     FAST_AT_MODULE_LEVEL.format("nanorlhf.fast")),
    ("train_dpo.py", "if __name__ == '__main__':\n    import nanorlhf.fast.fsdp\n", 2,
     FAST_AT_MODULE_LEVEL.format("nanorlhf.fast.fsdp")),
    ("nanorlhf/newpkg/x.py", "import torch\n", 1, "a folder the layers do not name"),
])
def test_a_planted_layering_violation_is_caught(path, source, line, rule):
    errors = layering_violations(path, source, SCRIPTS)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:{line}: {rule}"), errors


@pytest.mark.parametrize("path, source", [
    ("nanorlhf/tasks/pink.py", "from nanorlhf import run\nfrom nanorlhf.sampling import Ids\n"),
    ("nanorlhf/fast/decode.py", "from nanorlhf import sampling\nfrom . import packed\n"),
    ("train_dpo.py", "from nanorlhf.run import THREADS_HELP, choose_threads\n"),
    ("train_dpo.py", "from nanorlhf import run as threads\nimport nanorlhf.run\n"),
    ("train_dpo.py", "def main():\n    from nanorlhf.fast.packed import pack_linears\n"),
    ("train_dpo.py", "import train_dpo\n"),  # itself (e.g. to pickle by name), not another script
    ("tools/pink_eval.py", "from nanorlhf.fast.decode import generate_streamed\n"),
    ("experiments/frontier.py", "import subprocess\nsubprocess.run(['python', 'rest_loop.py'])\n"),
    ("bench/bench_dpo.py", "import train_dpo\nfrom tools import convert\n"),
    ("tests/test_x.py", "import train_dpo\nfrom conftest import crash_at_step\n"),
    ("tests/test_y.py", "from experiments import frontier\nimport torch\n"),
])
def test_allowed_imports_pass(path, source):
    assert layering_violations(path, source, SCRIPTS) == []


def test_long_lines_at_most_5_percent():
    # 100 lines of which 5 are 101 characters: exactly 5%, allowed; one more is 6%, refused
    five = "\n".join(["x" * 101] * 5 + ["y" * 100] * 95) + "\n"
    six = "\n".join(["x" * 101] * 6 + ["y" * 100] * 94) + "\n"
    assert long_line_violations("a.py", five) == []
    assert long_line_violations("a.py", six) == [
        "a.py:1: 6 of 100 lines (6%) are over 100 characters, more than 5% "
        "(lines 1, 2, 3, 4, 5, ...)"]
    assert long_line_violations("empty.py", "") == []


def test_a_planted_repository_is_checked_file_by_file(tmp_path):
    # a tiny repository: clean files, and one violation of each kind in a file of its own
    files = {
        "train_a.py": "from nanorlhf import run\n",
        "train_b.py": "import torch\n\nfrom train_a import loss\n",
        "nanorlhf/model.py": "import torch\n",
        "nanorlhf/sampling.py": "from nanorlhf import model\nfrom nanorlhf.fast import packed\n",
        "nanorlhf/fast/packed.py": "from nanorlhf.model import Transformer\n",
        "tools/chat.py": ("# " + "z" * 99 + "\n") * 2 + "from nanorlhf.sampling import generate\n",
        "tests/test_a.py": "import train_a\n",
    }
    for path, source in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    (tmp_path / "out" / "run").mkdir(parents=True)  # outside FOLDERS: not read
    (tmp_path / "out" / "run" / "x.py").write_text("import train_a\n")
    assert project_files(tmp_path) == sorted(files)
    layering, lengths = repo_violations(tmp_path)
    assert layering == [
        "nanorlhf/sampling.py:2: core imports fast (nanorlhf.fast.packed): "
        "the core imports only nanorlhf/*.py",
        "train_b.py:3: script imports script (train_a.loss): "
        "a script never imports another script: move the shared code down",
    ]
    assert lengths == ["tools/chat.py:1: 2 of 3 lines (67%) are over 100 characters, more than 5% "
                       "(lines 1, 2)"]
