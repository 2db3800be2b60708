"""Keeping request-supplied paths inside the folders the operator configured."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from posttrain.domain.pins import PathPin, PinRole, pin_folder, pin_problem
from posttrain.errors import InvalidRequest, PathOutsideRoots
from posttrain.settings import Settings

#: Linux's limits (NAME_MAX, PATH_MAX), in bytes: past them every file call fails with
#: ENAMETOOLONG, which is the client's mistake, not the server's.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
#: What the server and the trainer add below a job's output folder (the job's id, ``epoch_N.tmp/
#: merged/…``, TensorBoard's event file names): a checkpoint_dir leaves this much of PATH_MAX free.
OUTPUT_HEADROOM_BYTES = 512


def check_path_lengths(raw: str, *, field: str, max_bytes: int = MAX_PATH_BYTES) -> None:
    """Refuse a path (or a model id such as ``org/name``) no file system could hold: a component
    over 255 bytes or the whole over ``max_bytes``, in UTF-8. Checked before any file call, so such
    a path is a 400 naming its field instead of a 500, or a job accepted only to fail later."""
    encoded = raw.encode("utf-8", "surrogatepass")
    if len(encoded) > max_bytes:
        raise InvalidRequest(f"{field}: the path is {len(encoded)} bytes long; at most {max_bytes} are allowed")
    for part in raw.split("/"):
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_COMPONENT_BYTES:
            raise InvalidRequest(f"{field}: a path component is {size} bytes long (it starts "
                                 f"{part[:20].encode('utf-8', 'backslashreplace').decode()!r}); "
                                 f"at most {MAX_COMPONENT_BYTES} are allowed")


def resolve_inside(raw: str, *, roots: list[Path], field: str, areas: FileAreas | None = None) -> Path:
    """Resolve ``raw`` (following symlinks) and require it to lie inside one of ``roots``, and,
    given the tenant's ``areas``, never inside another tenant's file area (a root may overlap the
    file roots). Every refusal reads the same, whatever is or is not there.

    Relative paths are refused outright: they would depend on the server's working folder.
    """
    path = resolve_syntax(raw, field=field)
    resolved = real_path(path)
    if resolved is not None and _inside(resolved, roots) and not (areas and areas.foreign(resolved)):
        return resolved
    raise PathOutsideRoots(f"{field}: '{raw}' is outside the folders this server may use ({shown(roots)})")


#: A tenant name that can be one folder name. Any other tenant (``a/b``, ``..``) has no file area
#: of its own: every path it names is refused, never mapped onto another folder.
_AREA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")


@dataclass(frozen=True)
class FileAreas:
    """The parts of the file roots one tenant may use.

    ``own``: read and written by this tenant only (``<root>/<tenant>/`` for each file root, or the
    roots themselves on a server without API keys, whose one tenant is ``default``). ``shared``:
    the operator's read-only folders (``POSTTRAIN_SHARED_FILE_ROOTS``), read by every tenant and
    never written. ``file_roots``: every file root, to tell "another tenant's area" from "a folder
    the file roots do not cover" (a model root may overlap the file roots).
    """

    own: tuple[Path, ...]
    shared: tuple[Path, ...]
    file_roots: tuple[Path, ...]

    @property
    def readable(self) -> tuple[Path, ...]:
        return self.own + self.shared

    def may_read(self, resolved: Path) -> bool:
        return _inside(resolved, self.readable)

    def may_write(self, resolved: Path) -> bool:
        return _inside(resolved, self.own) and not _inside(resolved, self.shared)

    def foreign(self, resolved: Path) -> bool:
        """Inside the file roots but outside what this tenant may read: another tenant's area
        (or a root's top level, which is no tenant's)."""
        return _inside(resolved, self.file_roots) and not self.may_read(resolved)


def file_areas(*, tenant: str, file_roots: list[Path], shared_roots: list[Path], per_tenant: bool) -> FileAreas:
    """The tenant's areas. ``per_tenant`` (a server with API keys): ``<root>/<tenant>/`` for each
    root; without keys the single tenant's area is each root, as before tenants had areas."""
    if per_tenant:
        own = tuple(root / tenant for root in file_roots) if _AREA_NAME.match(tenant) and tenant not in (".", "..") else ()
    else:
        own = tuple(file_roots)
    return FileAreas(own=own, shared=tuple(shared_roots), file_roots=tuple(file_roots))


def areas_of(settings: Settings, tenant: str) -> FileAreas:
    """The tenant's file areas under this server's settings (areas per tenant when API keys are on)."""
    return file_areas(tenant=tenant, file_roots=settings.allowed_file_roots,
                      shared_roots=settings.allowed_shared_file_roots, per_tenant=settings.api_keys_file is not None)


def _inside(resolved: Path, roots: tuple[Path, ...] | list[Path]) -> bool:
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


def shown(roots: tuple[Path, ...] | list[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def resolve_syntax(raw: str, *, field: str) -> Path:
    """The absolute path a request names (``~`` expanded), symlinks not yet followed; refuses what
    is no absolute path at all. Says nothing about the file system."""
    if not raw or "\x00" in raw:
        raise PathOutsideRoots(f"{field}: an absolute path is required")
    check_path_lengths(raw, field=field)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise PathOutsideRoots(f"{field}: '{raw}' is not an absolute path")
    return path


def real_path(path: Path) -> Path | None:
    """``path`` with every symlink followed, or None when that cannot be done (a symlink loop,
    a folder that may not be searched): for the caller, the same as a path outside."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def resolve_writable(raw: str, *, areas: FileAreas, field: str) -> Path:
    """A folder the tenant may write into (its own area, never a shared root), symlinks followed.
    Anything else gets one message, whether it exists or not and whoever's it is."""
    resolved = real_path(resolve_syntax(raw, field=field))
    if resolved is None or not areas.may_write(resolved):
        raise _not_writable(raw, areas, field)
    return resolved


def _not_writable(raw: str, areas: FileAreas, field: str) -> PathOutsideRoots:
    return PathOutsideRoots(f"{field}: '{raw}' is outside the folders this tenant may write "
                            f"({shown(areas.own)}; shared folders are read-only)")


def create_output_folder(path: Path, *, areas: FileAreas | None, field: str, raw: str = "") -> Path:
    """Create a job's output folder (named by the job's id, so new) at ``path``, a real path the
    caller checked, and confirm it landed there: a link swapped in meanwhile is refused as if the
    request had named it. The folder is then pinned, and the trainer writes into it only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    if real_path(path) != path or (areas is not None and not areas.may_write(path)):
        raise _not_writable(raw or str(path), areas or FileAreas((), (), ()), field)
    return path


def pin_checked(folder: Path, *, role: PinRole, within: list[Path], areas: FileAreas | None, field: str) -> PathPin:
    """Pin a folder just checked (see ``domain.pins``): its entries may lead into ``within``, never
    into another tenant's area. Refused now when an entry already leads elsewhere."""
    pin = pin_folder(folder, role=role, within=tuple(str(p) for p in within),
                     not_within=tuple(str(p) for p in areas.file_roots) if areas else (),
                     but_within=tuple(str(p) for p in areas.readable) if areas else ())
    problem = pin_problem(pin)
    if problem is not None:
        raise InvalidRequest(f"{field}: {problem}")
    return pin
