"""Folders checked at submit, pinned so that what a trainer uses later is what was checked.

The server checks a job's model folder, adapter folder and output folder when the job is
submitted; the trainer uses them minutes or days later. A tenant who can write in its file area
could swap a checked folder for a symlink to somewhere else in between. A ``PathPin`` records
what was checked: the folder's real path, its (device, inode), and where everything below it
may lead. ``pin_problem`` re-checks all of it right before use (the launcher before it starts the
trainer, the trainer before it loads or writes); any difference fails the job with
``FailureCode.PATH_CHANGED``. Plain ``os`` calls only: the launcher and the trainer both use it.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PinRole = Literal["model", "adapter", "output_dir", "judge_model", "judge_adapter"]


class PathPin(BaseModel):
    """One checked folder. ``device`` is compared only on the host that pinned it (a network file
    system's device number differs from machine to machine; its inode does not)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: PinRole
    path: str = Field(description="the folder's real path (no symlinks) as checked")
    device: int
    inode: int
    host: str
    within: tuple[str, ...] = Field(description="folders every entry below it may resolve into ...")
    not_within: tuple[str, ...] = Field((), description="... except these (other tenants' file areas) ...")
    but_within: tuple[str, ...] = Field((), description="... unless also inside these (the tenant's own)")


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def pin_folder(path: Path, *, role: PinRole, within: tuple[str, ...], not_within: tuple[str, ...] = (),
               but_within: tuple[str, ...] = ()) -> PathPin:
    """Pin ``path``, which must be a real folder path (checked by the caller); OSError if it is gone."""
    info = os.lstat(path)
    return PathPin(role=role, path=str(path), device=info.st_dev, inode=info.st_ino, host=socket.gethostname(),
                   within=within, not_within=not_within, but_within=but_within)


def pin_problem(pin: PathPin) -> str | None:
    """Why ``pin`` no longer holds (the words for the job's error), or None when it does. Tells
    the tenant what changed, never where a link now leads."""
    what = {"model": "the model folder", "adapter": "the adapter folder", "output_dir": "the checkpoint folder",
            "judge_model": "the judge model's folder", "judge_adapter": "the judge's adapter folder"}[pin.role]
    changed = (f"{what} checked when the job was submitted ({pin.path}) was replaced, moved or made a link "
               "since; the job did not use it. Put it back, or submit the job again")
    try:
        info = os.lstat(pin.path)
        real = os.path.realpath(pin.path)
    except OSError:
        return changed
    if real != pin.path or not stat.S_ISDIR(info.st_mode) or info.st_ino != pin.inode:
        return changed
    if pin.host == socket.gethostname() and info.st_dev != pin.device:
        return changed
    escaping = _first_escaping_entry(pin)
    if escaping is not None:
        return f"{what} ({pin.path}) holds {escaping}, which leads outside the folders this job may read"
    return None


def _first_escaping_entry(pin: PathPin) -> str | None:
    """The first entry below the folder whose real path leaves where it may lead (links to
    another tenant's area, say), as a path relative to the folder."""
    for top, folders, files in os.walk(pin.path, onerror=None, followlinks=False):
        for name in (*folders, *files):
            entry = os.path.join(top, name)
            real = os.path.realpath(entry)
            allowed = _inside(real, pin.within) and not _inside(real, pin.not_within)
            if not (allowed or _inside(real, pin.but_within)):
                return os.path.relpath(entry, pin.path)
    return None
