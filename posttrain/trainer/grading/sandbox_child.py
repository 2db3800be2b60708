"""The sandbox's inside: pid 1 of fresh network, mount and pid namespaces, run by ``sandbox.py``.

Passed as ``python -I -c <this file's text>`` (so it needs no readable file of ours and imports nothing
of the package). It reads one JSON request on stdin, walls itself in, then runs the user's
``grade(sample, item)`` on each pair and writes one JSON line per pair to the result pipe (fd given in
argv). Only the standard library: the walls go up before any user code runs.

Walls, in order: tmpfs over each hidden path (the server's data folder); every mount read-only; a
fresh size-limited tmpfs on /tmp, /var/tmp, /dev/shm and /run (no other tenant's temp files, nothing
left behind, and none of the unix sockets that live there: a network namespace does not cut a socket
reached by its path); the interpreter's install bound back, read-only, where a wall covered it or an
unprivileged user could not reach it; resource limits; privileges dropped for good (real root: uid/gid
nobody with no groups; otherwise a nested user namespace, which leaves the user no power over these
mounts); no_new_privs; a clean environment; stdout/stderr to /dev/null.
"""

# The fixed /tmp paths are inside the sandbox's own fresh tmpfs; running (exec) the tenant's source and
# catching everything it raises is this module's job.
# ruff: noqa: S108, S102, BLE001

import ctypes
import json
import math
import os
import re
import resource
import signal
import stat
import sys
import traceback

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
# Per-mount options a read-only remount must keep (a user namespace may not clear them: EPERM).
KEPT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
O_PATH = 0o10000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {target}")


def _hide(path):
    if os.path.isdir(path) and not os.path.islink(path):
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0")
    elif os.path.exists(path):
        _mount("/dev/null", path, None, MS_BIND)


def _fresh_tmpfs(path, size):
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")


def _closed_ancestor(path):
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        folder = "/" + "/".join(parts[:depth])
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            points.append((point, fields[5].split(",")))
    return points


def _read_only(point, options):
    # MS_BIND makes it this mount's flag, in this namespace only; never the filesystem's, never the host's.
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for option in options:
        flags |= KEPT_OPTIONS.get(option, 0)
    _check(_libc.mount(None, point.encode(), None, flags, None), f"read-only remount of {point}")


def _all_read_only(strict):
    """Every mount read-only: the grader writes nowhere but the fresh tmpfs mounted after this (as a
    non-root server it runs as the server's own user, who could otherwise rewrite the server's code)."""
    for point, options in dict(_mount_points()).items():
        if "ro" in options or not os.path.exists(point):
            continue
        try:
            _read_only(point, options)
        except OSError:
            if strict:
                raise


def _keep_reachable(paths):
    """Open the interpreter's folders before the walls go up, to bind them back where a wall covered them."""
    paths = dict.fromkeys(os.path.realpath(p) for p in paths)
    return [(path, os.open(path, O_PATH | os.O_DIRECTORY), _closed_ancestor(path)) for path in paths]


def _restore(kept, cover_closed):
    """Bind each kept folder back at its path if a tmpfs now covers it, read-only. As root (running as
    nobody) a folder nobody cannot pass, such as /root, first becomes a 0755 tmpfs holding only these."""
    if cover_closed:
        for folder in dict.fromkeys(closed for _, _, closed in kept if closed is not None):
            _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for path, fd, _ in kept:
        before = os.fstat(fd)
        try:
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
                continue
        except OSError:
            pass
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _read_only(path, [])
    for _, fd, _ in kept:
        os.close(fd)


def _wall_in(request):
    as_root = os.getuid() == 0 and request["real_root"]
    kept = _keep_reachable(request["interpreter_paths"])
    for path in request["hidden_paths"]:
        _hide(path)
    _all_read_only(strict=not as_root)
    for path in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
        _fresh_tmpfs(path, request["tmpfs_bytes"])
    _restore(kept, cover_closed=as_root)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    if as_root:
        os.chown(work, NOBODY, NOBODY)
    os.chdir(work)
    limits = [
        (resource.RLIMIT_AS, request["memory_bytes"]), (resource.RLIMIT_CPU, request["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, request["file_size_bytes"]), (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, request["max_processes"]),
    ]
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))
    if as_root:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    else:
        # Root of our own user namespace could unmount the walls; a nested one owns no mount namespace.
        _check(_libc.unshare(CLONE_NEWUSER), "unshare user namespace")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=work, LANG="C.UTF-8", OMP_NUM_THREADS="1",
                      OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _result(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {"error": f"grade() returned {type(value).__name__}, not a number"}
    if not math.isfinite(value):
        return {"error": f"grade() returned {value}, not a finite number"}
    return {"score": float(value)}


def _short_traceback(error):
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<grader>"]
    where = f" (line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}"[:500] + where


def main():
    out = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    request = json.loads(sys.stdin.read())
    try:
        _wall_in(request)
    except Exception as error:  # the walls did not go up: refuse, never run open
        out.write(json.dumps({"fatal": f"the sandbox could not be built: {error}"}) + "\n")
        return
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    namespace = {"__name__": "grader"}
    try:
        exec(compile(request["source"], "<grader>", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as error:
        out.write(json.dumps({"fatal": f"the grader's source failed to load: {_short_traceback(error)}"}) + "\n")
        return
    out.write(json.dumps({"ready": True}) + "\n")
    runner = os.getpid()
    for index, pair in enumerate(request["pairs"]):
        try:
            line = _result(grade(pair["sample"], pair["item"]))
        except BaseException as error:
            line = {"error": _short_traceback(error)}
        if os.getpid() != runner:  # a process the grader forked came back here: it has no result to give
            os._exit(0)
        line["i"] = index
        out.write(json.dumps(line) + "\n")


main()
