"""Keeping request-supplied paths inside the folders the operator configured."""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import PathOutsideRoots


def resolve_inside(raw: str, *, roots: list[Path], field: str) -> Path:
    """Resolve ``raw`` (following symlinks) and require it to lie inside one of ``roots``.

    Relative paths are refused outright: they would depend on the server's working folder.
    """
    if not raw or "\x00" in raw:
        raise PathOutsideRoots(f"{field}: an absolute path is required")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise PathOutsideRoots(f"{field}: '{raw}' is not an absolute path")
    resolved = path.resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise PathOutsideRoots(f"{field}: '{raw}' is outside the folders this server may use ({allowed})")
