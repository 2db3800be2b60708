"""Keeping request-supplied paths inside the folders the operator configured."""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import InvalidRequest, PathOutsideRoots

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


def resolve_inside(raw: str, *, roots: list[Path], field: str) -> Path:
    """Resolve ``raw`` (following symlinks) and require it to lie inside one of ``roots``.

    Relative paths are refused outright: they would depend on the server's working folder.
    """
    if not raw or "\x00" in raw:
        raise PathOutsideRoots(f"{field}: an absolute path is required")
    check_path_lengths(raw, field=field)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise PathOutsideRoots(f"{field}: '{raw}' is not an absolute path")
    resolved = path.resolve()
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise PathOutsideRoots(f"{field}: '{raw}' is outside the folders this server may use ({allowed})")
