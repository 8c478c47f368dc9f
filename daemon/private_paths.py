"""The directories the daemon keeps for itself (host pool, state, sockets) and
the files in them, and the secrets it is given (read_secret).

Their default names are predictable, and the host pool's lies in /dev/shm, which
every user may write and which is wiped at boot while the state file survives. A
user who creates one of them first, or plants a file or a symlink in it, could
read or replace what the daemon keeps there, or have the daemon write into a file
only root may write. So a directory is used only when every step of its path is
owned by root or the daemon's uid and no one else can rename what a step holds
(a symlink on the way must be theirs too); the directory itself must be the
daemon's own and not a symlink; and its files are opened by name relative to the
checked directory's descriptor, never following a symlink. Anything else raises
UnsafePath: one line that names the path, what was found and what to do. The
daemon stops on it (daemon/main.py).
"""

import errno
import logging
import os
import pwd
import stat

log = logging.getLogger(__name__)

_NO_SYMLINK = os.O_NOFOLLOW | os.O_CLOEXEC
_GROUP_OR_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafePath(Exception):
    """A path the daemon will not use: another user could read or change what it holds."""


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _check_step(fd: int, step: str, path: str, role: str) -> None:
    """A directory on the way to `path`: root's or ours, and no one else may rename its entries
    (a sticky directory such as /tmp or /dev/shm lets each user rename only their own)."""
    info = os.fstat(fd)
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafePath(f"{role} {path}: {step} on its way is owned by {_user(info.st_uid)}, who could swap what "
                         f"lies below it; choose a path that only root or {_user(os.geteuid())} controls")
    if info.st_mode & _GROUP_OR_OTHERS_WRITE and not info.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{role} {path}: {step} on its way has mode {stat.S_IMODE(info.st_mode):04o}, so other "
                         f"users could swap what lies below it; choose another path or chmod go-w {step}")


def _open_or_make(name: str, parent: int, flags: int, mode: int) -> int:
    """Opens the directory `name` under `parent` without following a symlink, making it first if missing."""
    flags |= os.O_DIRECTORY | _NO_SYMLINK
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:  # someone else made it meanwhile: what it is gets checked like anything found
            pass
        return os.open(name, flags, dir_fd=parent)


def _open_parent(path: str, role: str) -> tuple[int, str]:
    """An O_PATH descriptor of the absolute `path`'s parent and the parent's real path,
    reached from / one checked step at a time; missing steps are made (0755). A symlink
    on the way (/var/run, say) is followed only if root or we own it: the directory it sits
    in is checked already, so then no one else can point it elsewhere."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | _NO_SYMLINK)
    at = "/"
    steps = os.path.dirname(path).split("/")
    symlinks = 0
    try:
        _check_step(fd, at, path, role)
        while steps:
            name = steps.pop(0)
            if name in ("", "."):
                continue
            step = os.path.normpath(os.path.join(at, name))
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is not None and stat.S_ISLNK(info.st_mode):
                if info.st_uid not in (0, os.geteuid()):
                    raise UnsafePath(f"{role} {path}: {step} on its way is a symlink owned by {_user(info.st_uid)}, "
                                     f"who could point it elsewhere; choose a path that only root or "
                                     f"{_user(os.geteuid())} controls")
                symlinks += 1
                if symlinks > 40:
                    raise UnsafePath(f"{role} {path}: too many symlinks on its way; choose another path")
                target = os.readlink(name, dir_fd=fd)
                steps[:0] = target.split("/")
                if target.startswith("/"):
                    os.close(fd)
                    fd, at = os.open("/", os.O_PATH | os.O_DIRECTORY | _NO_SYMLINK), "/"
                continue
            try:
                below = _open_or_make(name, fd, os.O_PATH, 0o755)
            except NotADirectoryError:
                raise UnsafePath(f"{role} {path}: {step} on its way is not a directory (or turned into a symlink "
                                 f"as sleepd started); choose another path") from None
            os.close(fd)
            fd, at = below, step
            _check_step(fd, at, path, role)
        return fd, at
    except BaseException:
        os.close(fd)
        raise


def _open_own_directory(path: str, role: str, mode: int) -> tuple[int, str]:
    """Creates `path` with `mode` or opens the one there; either way it must be a real
    directory of ours that no one else may write. Returns its descriptor and real path."""
    path = os.path.abspath(path)
    parent, real_parent = _open_parent(path, role)
    name = os.path.basename(path)
    real = os.path.join(real_parent, name)
    try:
        try:
            fd = _open_or_make(name, parent, os.O_RDONLY, mode)
        except NotADirectoryError:
            found = "a symlink" if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode) else "not a directory"
            raise UnsafePath(f"{role} {real} is {found}, not a directory sleepd made; remove it, or name the "
                             f"directory itself, and start sleepd again") from None
    finally:
        os.close(parent)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePath(f"{role} {real} is owned by {_user(info.st_uid)}, not by {_user(os.geteuid())} that runs "
                         f"sleepd: another user may have made it to read or replace what sleepd keeps there; "
                         f"remove it (rm -r {real}) and start sleepd again")
    if info.st_mode & _GROUP_OR_OTHERS_WRITE:
        os.close(fd)
        raise UnsafePath(f"{role} {real} has mode {stat.S_IMODE(info.st_mode):04o}: other users may have put "
                         f"files in it; check what it holds, then chmod go-w {real} (or remove it), and start "
                         f"sleepd again")
    return fd, real


def read_secret(path: str, setting: str) -> bytes:
    """The contents of a file that holds a secret (a private key, a token). Symlinks are
    followed: Kubernetes mounts secrets as links into a ..data directory, so the mode that
    guards the secret is the final target's, read from the descriptor that reads it.
    Raises UnsafePath unless only root or the daemon's uid may read it."""
    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        target = os.path.realpath(path)
        named = path if target == os.path.abspath(path) else f"{path} (a link to {target})"
        if info.st_uid not in (0, os.geteuid()):
            raise UnsafePath(f"{setting} {named} is owned by {_user(info.st_uid)}, who may read the secret it "
                             f"holds; chown {os.geteuid()} {target}, chmod 600 {target} and "
                             f"start sleepd again")
        if info.st_mode & 0o077:
            raise UnsafePath(f"{setting} {named} has mode {stat.S_IMODE(info.st_mode):04o}, so other users may "
                             f"read the secret it holds; chmod 600 {target} (on Kubernetes: defaultMode: 0400 on "
                             f"the secret's volume) and start sleepd again")
        return file.read()


def socket_directory(path: str) -> str:
    """Checks (creating it if missing, 0755) the directory the sockets go in: ours, and
    writable by no one else, though other uids may reach it. Returns its real path."""
    fd, real = _open_own_directory(path, "socket directory", 0o755)
    os.close(fd)
    return real


class PrivateDirectory:
    """A directory only the daemon's uid may enter, and its files, always named
    relative to the directory's descriptor."""

    def __init__(self, path: str, role: str):
        """Creates `path` (0700) or opens the one there; raises UnsafePath unless it is ours."""
        self.role = role
        self.fd, self.path = _open_own_directory(path, role, 0o700)
        mode = stat.S_IMODE(os.fstat(self.fd).st_mode)
        if mode & 0o077:
            # Ours and writable by no one else (e.g. made 0755 by a kubelet hostPath): closing it loses nothing.
            os.fchmod(self.fd, 0o700)
            log.info("%s %s: mode %04o narrowed to 0700", role, self.path, mode)

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def open(self, name: str, flags: int = os.O_RDWR) -> int:
        """An existing file here: refused unless it is a regular file of ours with no other link."""
        try:
            fd = os.open(name, flags | _NO_SYMLINK, dir_fd=self.fd)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise UnsafePath(f"{self._file(name)} is a symlink; sleepd follows none in its {self.role}: remove it "
                             f"and start sleepd again") from None
        info = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
                   else f"is owned by {_user(info.st_uid)}" if info.st_uid != os.geteuid()
                   else f"has {info.st_nlink} names (hard links)" if info.st_nlink != 1 else None)
        if problem:
            os.close(fd)
            raise UnsafePath(f"{self._file(name)} {problem}, so it may not be sleepd's own; remove it and start "
                             f"sleepd again")
        return fd

    def create(self, name: str) -> int:
        """A new file here (0600), read-write; fails if the name is taken."""
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_SYMLINK, 0o600, dir_fd=self.fd)

    def read(self, name: str) -> bytes | None:
        """A file's contents, or None if there is no such file."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as file:
            return file.read()

    def replace(self, name: str, data: bytes) -> None:
        """Writes a file atomically: a fresh temporary file renamed over `name`. No fsync: what
        these files describe (engines' mappings, the tmpfs pool) does not outlive the kernel,
        and a daemon that dies finds the renamed file in the page cache."""
        temporary = name + ".tmp"
        self.remove(temporary)  # left by a write that died half-way
        with os.fdopen(self.create(temporary), "wb") as file:
            file.write(data)
        os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        """Removes a name here (never what a symlink points to); nothing if it is not there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        os.close(self.fd)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)
