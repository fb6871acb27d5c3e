"""Every data file of the package is declared in pyproject.toml's package-data.

A file that is not Python (SQL, py.typed) reaches the wheel only through a pattern in
``[tool.setuptools.package-data]``: a new one under a new folder would pass every test
run from the source tree and be missing for users. (CI also builds the wheel and
compares its file list with git's: .ci/check-package.)
"""

from __future__ import annotations

import tomllib

from ..helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "cio_logging"


class TestPackageData:
    """pyproject.toml declares every file the package needs at run time."""

    def test_every_data_file_matches_a_package_data_pattern(self) -> None:
        config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        patterns = config["tool"]["setuptools"]["package-data"]["cio_logging"]
        data_files = [
            path.relative_to(PACKAGE).as_posix()
            for path in PACKAGE.rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc")
        ]
        assert "py.typed" in data_files
        # The patterns are globs from the package's folder, as setuptools reads them.
        declared = {
            path.relative_to(PACKAGE).as_posix()
            for pattern in patterns
            for path in PACKAGE.glob(pattern)
        }
        undeclared = [name for name in data_files if name not in declared]
        assert undeclared == [], f"add a package-data pattern for {undeclared}"
