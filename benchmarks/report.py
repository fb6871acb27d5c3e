"""The markdown the suite prints: machine description, tables, and the targets' verdicts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass, field


@dataclass
class Check:
    """One target: a measured figure (mostly a ratio to an anchor) against its limit."""

    target: str
    measured: str
    ratio: float | None
    limit: float
    at_most: bool = True  # False: the ratio must be at least the limit

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        passed = self.ratio <= self.limit if self.at_most else self.ratio >= self.limit
        return "PASS" if passed else "MISS"


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join(" --- " for _ in header) + "|")
        self.lines.extend("| " + " | ".join(row) + " |" for row in rows)
        self.lines.append("")

    def note(self, text: str) -> None:
        self.lines.append(text)
        self.lines.append("")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(peer_versions: dict[str, str]) -> Section:
    section = Section("Machine")
    packages = {
        name: version(name)
        for name in ("cio-logging", "customerio", "diskcache", "requests", "urllib3")
    }
    packages.update(peer_versions)
    rows = [
        ["CPUs (os.cpu_count)", str(os.cpu_count())],
        ["CPU model", cpu_model()],
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
        ["OS", f"{platform.system()} {platform.release()}"],
        *[[f"package {name}", value] for name, value in packages.items()],
    ]
    section.table(["", ""], rows)
    return section


def number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def render(command: str, started: str, sections: list[Section]) -> str:
    lines = [
        "# cio_logging benchmarks",
        "",
        f"Produced by `{command}` on {started}. Every figure below was measured in this run.",
        "",
    ]
    checks = [check for section in sections for check in section.checks]
    if checks:
        lines += ["## Targets", ""]
        lines.append("| target | measured | ratio | limit | verdict |")
        lines.append("| --- | --- | --- | --- | --- |")
        for check in checks:
            bound = ("<= " if check.at_most else ">= ") + f"{check.limit:g}"
            lines.append(
                f"| {check.target} | {check.measured} | {number(check.ratio, 2)} | {bound} "
                f"| {check.verdict} |"
            )
        lines.append("")
    for section in sections:
        lines += [f"## {section.title}", "", *section.lines]
    return "\n".join(lines).rstrip() + "\n"
