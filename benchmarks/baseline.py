"""An earlier release of cio_logging in its own virtual environment, measured beside this one.

The release is taken from this repository's history (``git archive`` of one commit) and
installed, not editable, into ``~/.cache/cio-logging-bench/venvs/baseline-<commit>``
(one environment per commit, so sections comparing against different releases in one
run do not reinstall each other's). Its cases run with a working
directory and ``PYTHONPATH`` holding only this checkout's ``benchmarks`` package (a
symbolic link), so ``import cio_logging`` finds the installed release, never this
checkout's package.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import venv
from dataclasses import dataclass
from pathlib import Path

from .processes import PROJECT_ROOT, VENV_ROOT, BenchmarkError


@dataclass(frozen=True)
class Baseline:
    """An installed release: its commit, interpreter, and the directory to run cases from."""

    commit: str
    python: Path
    root: Path
    package_dir: Path


def git(*arguments: str) -> list[str]:
    """A git command line on this checkout."""
    found = shutil.which("git")
    if found is None:
        raise BenchmarkError("git is not installed: the baseline comes from this repository")
    return [found, "-C", str(PROJECT_ROOT), *arguments]


def _full_commit(commit: str) -> str:
    return subprocess.run(
        git("rev-parse", "--verify", f"{commit}^{{commit}}"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _export(commit: str, destination: Path) -> None:
    archive = subprocess.run(
        git("archive", "--format=tar", commit),
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")


def environment_dir(full_commit: str) -> Path:
    """Where the release at ``full_commit`` is installed."""
    return VENV_ROOT / f"baseline-{full_commit[:12]}"


def baseline(commit: str) -> Baseline:
    """The release at ``commit``, installing it in its own environment on first use."""
    full = _full_commit(commit)
    directory = environment_dir(full)
    python = directory / "bin" / "python"
    marker = directory / ".installed"
    if not marker.exists() or marker.read_text(encoding="utf-8").strip() != full:
        print(f"  installing cio_logging at {full[:12]} in {directory}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(directory)
        source = directory / "source"
        _export(full, source)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", str(source)],
            check=True,
        )
        marker.write_text(full + "\n", encoding="utf-8")
    root = directory / "runner"
    link = root / "benchmarks"
    root.mkdir(exist_ok=True)
    if not link.is_symlink() or link.resolve() != (PROJECT_ROOT / "benchmarks").resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(PROJECT_ROOT / "benchmarks", target_is_directory=True)
    package_dir = Path(
        subprocess.run(
            [str(python), "-c", "import cio_logging; print(cio_logging.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        ).stdout.strip()
    ).parent
    return Baseline(full, python, root, package_dir)
