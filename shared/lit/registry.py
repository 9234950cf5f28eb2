"""The project registry: each `conf/project/<name>.yaml` declares one project by its `project:` block.

Listing projects reads those small YAML files only (no project code is imported), so the CLI can say which
projects exist in milliseconds and a project's package is imported only when it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

# Command-line flags that make Hydra print something and exit instead of running a job.
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version", "--shell-completion", "-sc")


@dataclass(frozen=True)
class ProjectInfo:
    name: str
    description: str


def available_projects(*conf_dirs: Path) -> dict[str, ProjectInfo]:
    """All projects declared under `<conf_dir>/project` (default: the repository's conf/), by name."""
    projects = {}
    for conf_dir in conf_dirs or (CONF_DIR,):
        for path in sorted((conf_dir / "project").glob("*.yaml")):
            block = (yaml.safe_load(path.read_text()) or {}).get("project", {})
            projects[path.stem] = ProjectInfo(path.stem, str(block.get("description", "")).strip())
    return projects


def project_listing(*conf_dirs: Path) -> str:
    """One line naming every project with its one-line description."""
    items = [f"{p.name} ({p.description})" for p in available_projects(*conf_dirs).values()]
    return "available projects: " + "; ".join(items)


def _search_path_dirs(argv: list[str]) -> list[Path]:
    """Config directories added on the command line with `hydra.searchpath=[file://...]` (projects kept
    outside the repository, or the tests' own)."""
    dirs = []
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra.searchpath":
            dirs += [Path(v.strip()[len("file://"):]) for v in value.strip("[]").split(",") if v.strip().startswith("file://")]
    return dirs


def project_error(argv: list[str]) -> str | None:
    """The one-line error for a command line that names no known project, or None when it is fine.

    `project=a,b` (a sweep over projects) is checked item by item; `experiment=<project>/<name>` implies its project.
    """
    if any(arg.split("=")[0] in _INFO_FLAGS for arg in argv):
        return None
    conf_dirs = [CONF_DIR, *_search_path_dirs(argv)]
    known = available_projects(*conf_dirs)
    chosen: list[str] = []
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "project":
            chosen += [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        elif key == "experiment" and "/" in value:
            chosen += [v.split("/")[0].strip() for v in value.strip("[]").split(",")]
    if not chosen:
        return f"error: no project given (python train.py project=<name>); {project_listing(*conf_dirs)}"
    unknown = [name for name in chosen if name not in known]
    if unknown:
        return f"error: unknown project '{unknown[0]}'; {project_listing(*conf_dirs)}"
    return None
