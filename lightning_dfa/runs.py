"""Run folders: each ``lightning-dfa`` launch writes into its own ``<root>/version_N``, and ``<root>/latest``
points at the newest (a symlink, or a file naming the folder where there are none).
"""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"


def new_version(root: str | Path) -> Path:
    """Create ``root/version_N``, N one past the highest existing version, and point ``root/latest`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name[len("version_") :]) for p in root.glob("version_*") if p.name[len("version_") :].isdigit()]
        folder = root / f"version_{max(taken, default=-1) + 1}"
        try:
            folder.mkdir()
        except FileExistsError:  # another launch took this number between the listing and the mkdir
            continue
        _point_latest(root, folder.name)
        return folder


def _point_latest(root: Path, name: str) -> None:
    staged = root / f".{LATEST}-{os.getpid()}"
    staged.unlink(missing_ok=True)
    try:
        staged.symlink_to(name, target_is_directory=True)
    except OSError:  # no symlinks on this file system (e.g. Windows without developer mode): name it in a file
        staged.write_text(name + "\n")
    os.replace(staged, root / LATEST)  # atomic: a reader sees the old pointer or the new one


def latest_run(root: str | Path) -> Path:
    """The folder of the newest launch under ``root`` (what ``root/latest`` points at)."""
    pointer = Path(root) / LATEST
    if pointer.is_symlink() or pointer.is_dir():
        return pointer.resolve()
    if pointer.is_file():
        return Path(root) / pointer.read_text().strip()
    raise FileNotFoundError(f"{str(pointer)!r} does not exist: no lightning-dfa run has written to {str(root)!r} yet.")


def run_files(folder: str | Path) -> list[str]:
    """Every file under ``folder`` (symlinks included, not followed), as sorted POSIX paths relative to it."""
    folder = Path(folder)
    found = []
    for parent, dirs, files in os.walk(folder):
        here = Path(parent)
        found += [here / name for name in files] + [here / name for name in dirs if (here / name).is_symlink()]
    return sorted(p.relative_to(folder).as_posix() for p in found)
