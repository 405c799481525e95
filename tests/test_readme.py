"""The README runs as written: every Python block executes on CPU, every shell line names a make
target, console script or module that exists, every relative link points at a file."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [line for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]


def test_readme_is_short_and_has_the_sections_in_order():
    assert len(README.splitlines()) <= 250
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings[:5] == ["Results", "Install", "The two commands", "Quick start", "Documentation"]
    assert "make test" in README and "make bench" in README


def test_readme_has_no_commit_hashes_in_prose():
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    assert not re.findall(r"\b[0-9a-f]{7,40}\b", prose)


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"block{i}")
def test_python_block_runs_on_cpu(index):
    """Each block in a fresh interpreter, the way a reader pastes it (no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", PYTHON[index]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{PYTHON[index]}\n{done.stderr[-3000:]}"


def test_the_patch_block_patches_something():
    block = next(code for code in PYTHON if "mmkernels.patch(model)" in code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patched" in done.stdout and "timm_latent" in done.stdout, done.stdout


def _commands():
    for line in SHELL:
        command = line.split("#", 1)[0].strip()
        if command:
            yield command


def test_shell_lines_name_what_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = set(re.findall(r"^(\w+) = \[", pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0],
                            flags=re.M))
    scripts = set(re.findall(r'^([\w-]+) = "', pyproject.split("[project.scripts]")[1], flags=re.M))
    seen = set()
    for command in _commands():
        words = shlex.split(command)
        if words[0] == "make":
            assert words[1] in targets, command
            seen.add("make " + words[1])
        elif words[0] in ("pip", "MMKERNELS_BUILD_CUDA=1"):
            for word in words:
                match = re.match(r"\.\[(\w+)\]$", word)
                if match:
                    assert match.group(1) in extras, command
        elif words[0] in scripts:
            seen.add(words[0])
        else:
            raise AssertionError(f"README shell line not understood by this test: {command}")
    assert {"make test", "make bench", "make python", "make shell"} <= seen


def test_modules_named_in_the_readme_answer_help():
    modules = set(re.findall(r"python -m ([\w.]+)", README))
    assert modules
    for module in modules:
        done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (module, done.stderr[-2000:])


def test_console_scripts_answer_help():
    for module in ("mmkernels.bench.cli", "mmkernels.models.train"):
        done = subprocess.run([sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(['--help']))"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]


def test_relative_links_point_at_files():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link
