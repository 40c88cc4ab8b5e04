"""The house's floors, as a test: the ground floor imports nothing above it, no method imports another, and inside
bench/ every room imports only downwards (cli, drivers, tools, core, outputs, tinyworld) with no two files of one name.

    bench/                       the harness (imports everything below)
    methods/  rewards/  prompts/ side by side (methods never import each other; none imports bench)
    diffalign/                   the ground floor (imports none of the above)

Every import statement of every file is read with ``ast`` (function-local ones included), so the rule holds for
what the code can reach, not only for its first lines.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABOVE_GROUND = ("bench", "methods", "rewards", "prompts")


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "methods"]
    return out


def _files(root: str, folder: str) -> list[str]:
    base = os.path.join(root, folder)
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs if f.endswith(".py"))


def violations(root: str) -> list[str]:
    """One line per import that breaks the layering rules, ``path:line: what``."""
    bad = []

    def top(mod: str) -> str:
        return mod.split(".")[0]

    for path in _files(root, "diffalign"):
        for line, mod in imported_modules(path):
            if top(mod) in ABOVE_GROUND:
                bad.append(f"{os.path.relpath(path, root)}:{line}: the ground floor imports {mod}")
    for folder in ("methods", "rewards", "prompts"):
        for path in _files(root, folder):
            for line, mod in imported_modules(path):
                if top(mod) == "bench":
                    bad.append(f"{os.path.relpath(path, root)}:{line}: {folder}/ imports the harness ({mod})")
    for path in _files(root, "methods"):
        own = os.path.splitext(os.path.basename(path))[0]
        for line, mod in imported_modules(path):
            parts = mod.split(".")
            if parts[0] == "methods" and len(parts) > 1 and parts[1] != own and own != "__init__":
                bad.append(f"{os.path.relpath(path, root)}:{line}: method {own} imports method {parts[1]}")
    for folder in ("rewards", "prompts"):
        for path in _files(root, folder):
            for line, mod in imported_modules(path):
                if top(mod) == "methods":
                    bad.append(f"{os.path.relpath(path, root)}:{line}: {folder}/ imports methods ({mod})")
    return bad


def test_the_house_keeps_its_floors():
    assert violations(ROOT) == []


def test_a_planted_upward_import_or_method_to_method_import_fails(tmp_path):
    for folder in ("diffalign", "methods", "rewards", "prompts", "bench"):
        (tmp_path / folder).mkdir()
    (tmp_path / "diffalign" / "ddim.py").write_text("import torch\n\ndef f():\n    from bench.core.run import Run\n")
    (tmp_path / "diffalign" / "store.py").write_text("from diffalign import errors\n")  # allowed
    (tmp_path / "methods" / "ddpo.py").write_text("from methods.alignprop import truncation_mask\n")
    (tmp_path / "methods" / "dpok.py").write_text("from methods import ddpo\nfrom diffalign.sampling import sample\n")
    (tmp_path / "methods" / "__init__.py").write_text("import importlib\n")
    (tmp_path / "rewards" / "tiny.py").write_text("import bench.core.evaluate\n")
    (tmp_path / "bench" / "run.py").write_text("from methods import method_module\nfrom rewards import get_reward\n")
    found = violations(str(tmp_path))
    assert found == [
        "diffalign/ddim.py:4: the ground floor imports bench.core.run",
        "rewards/tiny.py:1: rewards/ imports the harness (bench.core.evaluate)",
        "methods/ddpo.py:1: method ddpo imports method alignprop",
        "methods/dpok.py:1: method dpok imports method ddpo",
    ], found


# The harness's own rooms, top down: a file may import its own room or a room below it, never one above.
BENCH_ROOMS = ["cli", "drivers", "tools", "core", "outputs", "tinyworld"]


def bench_violations(root: str) -> list[str]:
    """Upward imports between bench/'s rooms, and file names used twice in bench/ (``path:line: what``)."""
    bad, names = [], {}
    for path in _files(root, "bench"):
        rel = os.path.relpath(path, os.path.join(root, "bench")).split(os.sep)
        room = rel[0] if len(rel) > 1 else "cli"  # bench/cli.py, __main__.py, __init__.py: the top
        if rel[-1] != "__init__.py":
            names.setdefault(rel[-1], []).append(os.path.relpath(path, root))
        for line, mod in imported_modules(path):
            parts = mod.split(".")
            if parts[0] != "bench" or len(parts) < 2 or parts[1] not in BENCH_ROOMS[1:]:
                continue
            if BENCH_ROOMS.index(parts[1]) < BENCH_ROOMS.index(room):
                bad.append(f"{os.path.relpath(path, root)}:{line}: bench/{room}/ imports the room above it ({mod})")
    bad += [f"{paths[0]}: the name {name} is used again in {', '.join(paths[1:])}"
            for name, paths in sorted(names.items()) if len(paths) > 1]
    return bad


def test_bench_rooms_import_only_downwards_and_no_two_files_share_a_name():
    assert bench_violations(ROOT) == []


def test_a_planted_upward_import_or_a_second_file_of_one_name_in_bench_fails(tmp_path):
    for room in ("core", "outputs", "tinyworld", "drivers"):
        (tmp_path / "bench" / room).mkdir(parents=True)
    (tmp_path / "bench" / "cli.py").write_text("from bench.drivers import sweep\n")               # allowed
    (tmp_path / "bench" / "core" / "run.py").write_text("from bench.outputs import plots\n")     # allowed
    (tmp_path / "bench" / "tinyworld" / "judge.py").write_text(
        "import torch\n\ndef f():\n    from bench.outputs.plots import save_grid\n")
    (tmp_path / "bench" / "core" / "quality.py").write_text("from bench.drivers.sweep import run_one\n")
    (tmp_path / "bench" / "outputs" / "quality.py").write_text("x = 1\n")
    assert bench_violations(str(tmp_path)) == [
        "bench/core/quality.py:1: bench/core/ imports the room above it (bench.drivers.sweep)",
        "bench/tinyworld/judge.py:4: bench/tinyworld/ imports the room above it (bench.outputs.plots)",
        "bench/core/quality.py: the name quality.py is used again in bench/outputs/quality.py",
    ]
