"""Guards for the code's structure: who may import whom, and who knows the checkpoint format."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fundamentallm"


def test_readers_do_not_import_the_trainer() -> None:
    """evaluate, generate and bench load checkpoints and models; they need no training loop, signal handling or
    DDP set-up (so that export and serving commands stay light, too)."""
    code = ("import sys, fundamentallm.evaluate, fundamentallm.generate, fundamentallm.bench; "
            "print(sorted(m for m in sys.modules if m.startswith('fundamentallm')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for trainer in ("fundamentallm.train", "fundamentallm.run", "fundamentallm.optim", "fundamentallm.lr_finder"):
        assert f"'{trainer}'" not in loaded, loaded
    assert "'fundamentallm.checkpoint'" in loaded  # the check above would pass vacuously if nothing loaded


def test_status_and_plot_do_not_import_torch() -> None:
    code = "import sys, fundamentallm.status, fundamentallm.runfiles; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_only_the_checkpoint_module_knows_the_keys_of_a_checkpoint_file() -> None:
    keys = ("training_state", "progress", "format_version", "checksum", "sampler", "scaler", "rng")
    pattern = re.compile(r"""\[\s*["'](""" + "|".join(keys) + r""")["']\s*\]""")
    offenders = [f"{path.name}: {line.strip()}" for path in SRC.rglob("*.py") if path.name != "checkpoint.py"
                 for line in path.read_text().splitlines() if pattern.search(line)]
    assert not offenders, offenders


def test_run_file_names_are_spelled_once() -> None:
    names = ("config.yaml", "metrics.jsonl", "training.png", "best_model.pt", "final_model.pt", "interrupted.pt")
    offenders = [f"{path.name}: {name}" for path in SRC.rglob("*.py") if path.name != "runfiles.py"
                 for name in names if re.search(rf"""["']{re.escape(name)}["']""", path.read_text())]
    assert not offenders, offenders


def _imports(path: Path) -> set[str]:
    """The fundamentallm modules a file imports at run time (imports under `if TYPE_CHECKING:` excluded)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                 and ast.unparse(stmt.test) == "TYPE_CHECKING" for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fundamentallm"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fundamentallm.")}
    return found


def test_architecture_md_layers_hold() -> None:
    """docs/architecture.md lists the modules in layers; every module imports only modules of lower layers."""
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("```")[1]
    layers = [re.findall(r"(\w+)\.py", line) for line in block.splitlines()]
    layer_of = {name: len(layers) - i for i, names in enumerate(layers) for name in names}
    modules = {p.stem for p in SRC.glob("*.py") if not p.stem.startswith("__")}
    assert modules - {"__init__", "__main__"} <= layer_of.keys(), modules - layer_of.keys()
    for name in sorted(modules):
        if name == "cli":
            continue  # the top: imports every command's module
        upward = [m for m in _imports(SRC / f"{name}.py") if m in layer_of and layer_of[m] >= layer_of[name]
                  and m != name]
        assert not upward, f"{name}.py imports {upward}, which are not below it in docs/architecture.md"
