"""The layout the design promises: one core, three sides that never import each other, one name."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nextword.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("server", "clients", "export")
CORE = ROOT / "nextword"
MAX_FUNCTION_LINES = 60

# What loading each side in a fresh interpreter must not bring in.
FORBIDDEN = {
    "server": ("torch", "onnx", "nextword.export", "nextword.clients"),
    "clients": ("torch", "onnxruntime", "nextword.server", "nextword.export"),
    "export": ("nextword.server", "nextword.clients"),
}

_LOADED = """
import json, pkgutil, importlib, sys
import nextword.{side} as side
names = [m.name for m in pkgutil.walk_packages(side.__path__, side.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"imported": names, "loaded": sorted(sys.modules)}}))
"""


@pytest.mark.parametrize("side", SIDES)
def test_each_side_loads_the_core_and_nothing_of_the_others(side: str) -> None:
    # Every module of the side, imported in a fresh interpreter, then everything that came with them.
    proc = subprocess.run(
        [sys.executable, "-c", _LOADED.format(side=side)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["imported"]) >= 4, report["imported"]
    loaded = report["loaded"]
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[side])]
    assert bad == [], f"nextword.{side} loaded {bad}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every import in ``path`` (at any depth, lazy ones too) as (level, module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


@pytest.mark.parametrize("side", SIDES)
def test_no_side_names_another_in_its_source(side: str) -> None:
    # The import test above sees what loads; this sees imports inside functions too. A side
    # reaches itself with relative imports that stay inside it, and the core as nextword.*.
    offending = []
    for path in sorted((ROOT / side).rglob("*.py")):
        depth = len(path.relative_to(ROOT / side).parts) - 1  # 0 for a module at the side's top
        for level, module in _imports(path):
            parts = module.split(".")
            if level == 0:
                bad = parts[0] in (*SIDES, "benchmarks", "tests") or (
                    parts[0] == "nextword" and len(parts) > 1 and parts[1] in SIDES and parts[1] != side
                )
            else:
                bad = level > depth + 1  # climbs out of the side into the package above it
            if bad:
                offending.append(f"{path.relative_to(ROOT)}: {'.' * level}{module}")
    assert offending == []


def test_the_core_imports_no_side() -> None:
    offending = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted(CORE.glob("*.py"))
        for level, module in _imports(path)
        if module.split(".")[:2] in (["nextword", s] for s in SIDES) or module.split(".")[0] in SIDES
    ]
    assert offending == []


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_functions_are_short() -> None:
    files = [p for side in SIDES for p in (ROOT / side).rglob("*.py")] + list(CORE.glob("*.py"))
    long = [
        f"{path.relative_to(ROOT)}:{name} ({lines} lines)"
        for path in files
        for name, lines in _functions(path)
        if lines > MAX_FUNCTION_LINES
    ]
    assert long == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_described_with_its_default(name: str) -> None:
    parser = build_parser(name)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[name]
    options = [a for a in sub._actions if a.dest != "help"]
    assert options, f"nextword {name} declares no options"
    assert [a.dest for a in options if not a.help] == []
    text = sub.format_help()
    for action in options:
        default = action.default
        shown = not (default is None or isinstance(default, bool) or default == "")
        if action.option_strings and not action.required and shown:
            assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nextword.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    from nextword import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"nextword {__version__}"


_WITHOUT = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None  # as if not installed: find_spec says None, import raises
from nextword.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    ("argv", "hidden", "extra"),
    [
        (["train", "--data", "corpus", "--out", "runs/x"], ["torch", "onnx"], "train"),
        (["export", "runs/x", "--out", "models/x"], ["torch"], "train"),
        (["diagnose", "--cells", "rnn"], ["torch"], "train"),
        (["quantize", "models/demo", "--out", "q", "--data", "d"], ["onnx"], "quantize"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(
    argv: list[str], hidden: list[str], extra: str, tmp_path: Path
) -> None:
    code = _WITHOUT.format(hidden=hidden, argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"pip install 'nextword[{extra}]'" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made

    helped = subprocess.run(
        [sys.executable, "-c", _WITHOUT.format(hidden=hidden, argv=[argv[0], "--help"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and f"nextword[{extra}]" in " ".join(helped.stdout.split())


@pytest.mark.slow
def test_the_wheel_installs_one_name_with_the_demo_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("nextword-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nextword"}
    for needed in (
        "nextword/demo/manifest.json",
        "nextword/demo/weights.bin",
        "nextword/server/app.py",
        "nextword/clients/loadtest/__init__.py",
        "nextword/export/train.py",
        "nextword/v1/nextword_pb2.py",
    ):
        assert needed in names
    demo = json.loads(zipfile.ZipFile(wheel).read("nextword/demo/manifest.json"))
    assert set(demo["files"]) <= {n.removeprefix("nextword/demo/") for n in names}
