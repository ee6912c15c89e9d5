"""The python grader's sandbox: Linux namespaces, a read-only root, a scratch directory, limits.

Two halves, both stdlib only:

- What the pipeline needs to know: the modes (`SANDBOX_MODES`), the refusal message with its fix
  (`unavailable_message`, `platform_problem`), and the warning of the explicit opt-out
  `grader.sandbox: none` (`sandbox_warning`; the pipeline also tags its MLflow run with the mode).
- What the worker process does to itself: `enter(...)`, called by `_sandbox_child.py` (which loads
  this file by path, so the worker imports nothing else from rft) before any grader code runs.

`enter` uses the kernel, through system calls made with ctypes, so that no system package is
needed (no bubblewrap, no setuid helper). Nothing here is a Python-level hook:

1. `unshare` puts the worker in new user, mount, network, PID, IPC, UTS and cgroup namespaces.
   A helper forked just before, still outside, writes the user-ID maps: the pipeline's own user
   maps to itself; when the pipeline runs as root, the grader runs as `nobody` (65534) instead, so
   that root-owned files stay closed and the process limit applies (the kernel exempts real root).
2. `fork`: the child is PID 1 of the new PID namespace and runs the grader; it sees no other
   process of the machine and can signal none. When it ends, the kernel kills every process in
   the namespace. The calling process stays outside as its supervisor: it exits with the child's
   status, and kills it when the pipeline dies.
3. The child builds a new root: `/` bound recursively and every mount in it remounted read-only,
   a fresh read-only `/proc` of the new PID namespace, a minimal `/dev` (null, zero, full, random,
   urandom), an empty `/run` (no host service sockets), directories that `nobody` could not
   traverse replaced by an empty one with only Python's own directories bound back, and a private
   tmpfs on `/tmp` (the scratch directory, the only writable place, gone with the namespace).
   Then it moves that root onto `/` and chroots into it. The network namespace has only a
   loopback interface, and it is down: no network at all.
4. It drops every capability (bounding set included), sets no_new_privs, installs a seccomp
   filter (x86_64 and aarch64) that refuses new namespaces, mounts, ptrace, kernel keyrings, BPF,
   io_uring, module loading and AF_UNIX sockets (a socket file on a read-only mount can still be
   connected to), and sets rlimits: address space, processes, CPU time, no core dumps.

The environment is the fixed `SANDBOX_ENV`, nothing from the pipeline's.

>>> sandbox_warning("namespaces") is None
True
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import signal
import stat
import sys

SANDBOX_MODES = ("namespaces", "none")
# The worker's whole environment: thread caps keep numerical libraries inside the memory limit
# (each BLAS thread reserves address space); HOME and TMPDIR point at the scratch directory.
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp",
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
}
NOBODY = 65534

_FIX = (
    "Fix: allow unprivileged user namespaces (`sysctl -w user.max_user_namespaces=15000`; on Debian "
    "before 11 `sysctl -w kernel.unprivileged_userns_clone=1`; on Ubuntu 23.10+ `sysctl -w "
    "kernel.apparmor_restrict_unprivileged_userns=0`; in Docker, a seccomp profile that allows "
    "unshare and mount), or set `grader.sandbox: none` to run python graders WITHOUT isolation "
    "(only for grader code you trust)."
)


def sandbox_warning(mode: str) -> str | None:
    """The warning to log on every run whose python graders are not isolated; None when they are."""
    if mode != "none":
        return None
    return (
        "grader.sandbox is 'none': python graders run WITHOUT isolation (they can reach the network, "
        "read the pipeline's environment and files, and start processes); use it only for grader code you trust"
    )


def platform_problem() -> str | None:
    """Why python graders cannot be isolated on this platform (not Linux); None on Linux."""
    if sys.platform.startswith("linux"):
        return None
    return (
        f"python graders are isolated with Linux namespaces, which {platform.system() or sys.platform} "
        "does not have. Run the pipeline on Linux (a Linux container or VM works), or set "
        "`grader.sandbox: none` to run python graders WITHOUT isolation (only for grader code you trust)."
    )


def unavailable_message(reason: str) -> str:
    """The refusal to run python graders when the kernel would not isolate them, with the fix."""
    return f"python graders need a sandbox and this machine would not create one ({reason}). {_FIX}"


class IsolationUnavailable(OSError):
    """The kernel refused a step of the isolation; the message names the step."""


# ----------------------------------------------------------------------------- system calls

_CLONE_NEWNS, _CLONE_NEWCGROUP, _CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
_CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
_CLONE_NEWTIME = 0x00000080
_NAMESPACES = (_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
               | _CLONE_NEWCGROUP)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 0x40000
# statvfs f_flag bits -> the mount flags a read-only remount must repeat (the kernel refuses to
# clear flags that were locked when the mount came from the parent namespace).
_KEPT_FLAGS = {
    os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: _MS_NOEXEC,
    os.ST_SYNCHRONOUS: 0x10, os.ST_MANDLOCK: 0x40, os.ST_NOATIME: 0x400, os.ST_NODIRATIME: 0x800,
    os.ST_RELATIME: 0x200000,
}

_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_SECCOMP = 1, 4, 24, 22
_PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
_SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, step: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise IsolationUnavailable(code, f"{step}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)),
           f"mount {fstype or source or '(flags)'} on {target}")


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _libc.prctl(option, arg2, arg3, 0, 0)


# ----------------------------------------------------------------------------- entering

def enter(*, memory_bytes: int, max_processes: int, cpu_s: int, protocol_fds: tuple[int, ...]) -> None:
    """Isolate the calling process (single-threaded, before any grader code); returns inside.

    Returns in the sandboxed child (PID 1 of the new PID namespace), which owns `protocol_fds`;
    in the calling process it never returns (it supervises the child and exits with its status).
    Raises IsolationUnavailable, in whichever process the kernel refused a step.
    """
    pipeline_pid = os.getppid()
    euid, egid = os.geteuid(), os.getegid()
    run_as = (NOBODY, NOBODY) if euid == 0 else (euid, egid)
    _unshare_with_maps(euid, egid)
    lifeline_read, lifeline_write = os.pipe()  # EOF for the child when the supervisor is gone
    child = os.fork()
    if child:
        os.close(lifeline_read)
        for fd in protocol_fds:  # the child holds the channel alone: its death is EOF for the pipeline
            os.close(fd)
        _supervise(child, pipeline_pid)
    os.close(lifeline_write)
    os.setsid()  # a kill(0, ...) by the grader reaches only its own namespace
    scratch_bytes = memory_bytes  # tmpfs pages are memory too; the same budget again
    python_dirs = _python_dirs()
    _build_root(scratch_bytes, python_dirs, hide_closed=run_as[0] == NOBODY)
    _drop_privileges(run_as)
    # After the last credential change (which clears it): die with the supervisor.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline_read], [], [], 0)[0]:
        os._exit(1)
    os.close(lifeline_read)
    _check_readable(python_dirs)
    _install_seccomp()
    _set_limits(memory_bytes, max_processes, cpu_s)
    os.chdir("/tmp")


def _unshare_with_maps(euid: int, egid: int) -> None:
    """New namespaces for this process, with user-ID maps written by a helper left outside.

    Only a process in the parent user namespace with CAP_SETUID there (the pipeline's root) may
    map other IDs than its own, hence the helper: with root it maps 0 (for the set-up only) and
    nobody, which the child switches to; otherwise it maps the pipeline's user to itself.
    """
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        os.close(go_write)
        os.close(done_read)
        status = b"ok"
        try:
            if os.read(go_read, 1) == b"x":
                _write_maps(me, euid, egid)
        except OSError as exc:
            status = f"writing the user-ID maps: {exc.strerror or exc}".encode()
        os.write(done_write, status)
        os._exit(0)
    os.close(go_read)
    os.close(done_write)
    try:
        _check(_libc.unshare(_NAMESPACES), "unshare (user, mount, network, PID namespaces)")
    except IsolationUnavailable:
        os.close(go_write)
        os.waitpid(helper, 0)
        raise
    os.write(go_write, b"x")
    os.close(go_write)
    status = os.read(done_read, 4096)
    os.close(done_read)
    os.waitpid(helper, 0)
    if status != b"ok":
        raise IsolationUnavailable(errno.EPERM, status.decode(errors="replace") or "the map helper died")


def _write_maps(pid: int, euid: int, egid: int) -> None:
    if euid == 0:
        uid_map, gid_map = f"0 0 1\n{NOBODY} {NOBODY} 1\n", f"0 0 1\n{NOBODY} {NOBODY} 1\n"
    else:
        # An unprivileged user may map only itself, and only after giving up setgroups.
        with open(f"/proc/{pid}/setgroups", "w") as file:
            file.write("deny")
        uid_map, gid_map = f"{euid} {euid} 1\n", f"{egid} {egid} 1\n"
    with open(f"/proc/{pid}/uid_map", "w") as file:
        file.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as file:
        file.write(gid_map)


def _supervise(child: int, pipeline_pid: int) -> None:
    """Outside the PID namespace: mirror the child's end, and end it if the pipeline dies.

    The worker was started from a short-lived thread of the pipeline, so PR_SET_PDEATHSIG (which
    follows the parent *thread*) would fire too early: the parent is polled instead, between
    waits for SIGCHLD (no thread: after unshare(CLONE_NEWPID) this process cannot start one).
    """
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # mirroring a crash must not dump a core here
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            break
        if os.getppid() != pipeline_pid:
            os.kill(child, signal.SIGKILL)
        signal.sigtimedwait({signal.SIGCHLD}, 0.5)
    if os.WIFSIGNALED(status):  # die the same way, so that the pipeline can tell why
        number = os.WTERMSIG(status)
        if number != signal.SIGKILL:  # SIGKILL has no handler to reset
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status))


def _python_dirs() -> list[str]:
    """The directories this interpreter reads from: its prefixes and its import path."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable)), *sys.path}
    dirs = sorted({os.path.realpath(p) for p in candidates if p and os.path.isdir(p)})
    # Keep the outermost: a directory inside another one is bound with it.
    return [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def _build_root(scratch_bytes: int, python_dirs: list[str], *, hide_closed: bool) -> None:
    """Assemble the read-only root with /proc, /dev, /run and the scratch /tmp, and enter it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
    # The machine's /tmp, reachable after the assembly tmpfs below covers it: a Python that lives
    # there (a venv in /tmp) is bound into the scratch /tmp. Closed before any grader code runs.
    host_tmp = os.open("/tmp", os.O_PATH | os.O_DIRECTORY)
    try:
        # A private tmpfs to assemble in; it is left behind, shadowed, by the move below.
        _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0700")
        new = "/tmp/root"
        os.mkdir(new)
        _mount("/", new, None, _MS_BIND | _MS_REC)
        try:
            _mount("proc", f"{new}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        except IsolationUnavailable:
            # The kernel refuses a new proc where the host's is partly covered (Docker masks some
            # of its files): an empty /proc then, no view of any process rather than the host's.
            _mount("tmpfs", f"{new}/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0555")
        _build_dev(f"{new}/dev")
        for run in ("/run", "/var/run"):
            if os.path.isdir(run) and not os.path.islink(run):
                _mount("tmpfs", new + run, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
        if hide_closed:
            _hide_closed_dirs(new, python_dirs)
        _remount_readonly(new)
        _mount("tmpfs", f"{new}/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={scratch_bytes},mode=1777")
        for path in python_dirs:
            if path.startswith("/tmp/"):
                os.makedirs(new + path, exist_ok=True)
                _mount(f"/proc/self/fd/{host_tmp}/{path[len('/tmp/'):]}", new + path, None, _MS_BIND | _MS_REC)
                _remount_readonly(new + path)
    finally:
        os.close(host_tmp)
    _check(_libc.sethostname(b"sandbox", 7), "sethostname")
    os.chdir(new)
    _mount(".", "/", None, _MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def _build_dev(dev: str) -> None:
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        with open(f"{dev}/{name}", "w"):
            pass
        _mount(f"/dev/{name}", f"{dev}/{name}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(target, f"{dev}/{name}")


def _hide_closed_dirs(new: str, python_dirs: list[str]) -> None:
    """Replace each directory `nobody` cannot traverse on the way to Python's own directories
    (e.g. /root, 0700, holding a pyenv) by an empty tmpfs, and bind those directories back in.

    The grader then reaches its interpreter but nothing else of what was closed.
    """
    covered: set[str] = set()
    for path in python_dirs:
        if path.startswith("/tmp/"):
            continue  # bound into the scratch /tmp instead; /tmp here is the assembly tmpfs
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if ancestor in covered:
                break
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                _mount("tmpfs", new + ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
                covered.add(ancestor)
                break
        if any(path.startswith(c + "/") for c in covered):
            os.makedirs(new + path, exist_ok=True)
            _mount(path, new + path, None, _MS_BIND | _MS_REC)


def _remount_readonly(new: str) -> None:
    """Remount every mount under `new` read-only (a recursive bind copies the flags, not a new one)."""
    with open("/proc/self/mountinfo", "rb") as file:
        targets = [_unescape(line.split()[4]) for line in file]
    for target in targets:
        if target != new and not target.startswith(new + "/"):
            continue
        try:
            flags = os.statvfs(target).f_flag
        except OSError:
            continue  # shadowed by a later mount or out of reach: the path leads to the covering one
        kept = sum(ms for st, ms in _KEPT_FLAGS.items() if flags & st)
        _mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept)


def _unescape(field: bytes) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \ooo octal escapes.
    return os.fsdecode(field.decode("unicode_escape").encode("latin-1"))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(run_as: tuple[int, int]) -> None:
    """No capabilities, now or after any execve, and the sandbox's own user."""
    cap = 0
    while _prctl(_PR_CAPBSET_DROP, cap) == 0:  # up to the kernel's last capability (EINVAL after)
        cap += 1
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid, gid = run_as
    if uid != os.geteuid():
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        # The switch made the process non-dumpable, which hides its own /proc/self files from
        # it; nothing else is in its namespace, ptrace is refused and core dumps are off.
        _prctl(_PR_SET_DUMPABLE, 1)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    _check(_libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")


def _check_readable(python_dirs: list[str]) -> None:
    for path in python_dirs:
        if not os.access(path, os.R_OK | os.X_OK):
            raise IsolationUnavailable(
                errno.EACCES,
                f"the grader runs as user {os.geteuid()} and cannot read {path}, a directory of this Python; "
                "make it readable for others (chmod o+rx) or run the pipeline as a user other than root",
            )


# ----------------------------------------------------------------------------- seccomp

# Refused system calls (EPERM) by architecture: new namespaces and mounts (new capabilities in a
# nested user namespace, kernel attack surface), tracing and other processes' memory, kernel
# keyrings, BPF, userfaultfd and io_uring (which would bypass this filter for sockets), kexec and
# modules, and file handles.
_SECCOMP = {
    "x86_64": {
        "arch": 0xC000003E, "socket": 41, "clone": 56, "clone3": 435,
        "deny": (272, 308, 165, 166, 155, 161, 442, 428, 429, 430, 431, 432, 433,  # namespaces, mounts
                 101, 310, 311, 298, 250, 248, 249, 321, 323, 425, 426, 427,
                 246, 320, 175, 313, 176, 304),
    },
    "aarch64": {
        "arch": 0xC00000B7, "socket": 198, "clone": 220, "clone3": 435,
        "deny": (97, 268, 40, 39, 41, 51, 442, 428, 429, 430, 431, 432, 433,
                 117, 270, 271, 241, 219, 217, 218, 280, 282, 425, 426, 427,
                 104, 294, 105, 273, 106, 265),
    },
}
_AF_UNIX = 1
_CLONE_NAMESPACE_FLAGS = _NAMESPACES | _CLONE_NEWTIME
_X32_SYSCALL_BIT = 0x40000000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The classic-BPF filter (code, jt, jf, k) for `machine`; None where the syscall table is unknown."""
    table = _SECCOMP.get(machine)
    if table is None:
        return None
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ... BPF_RET|K
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    nr, arch, arg0 = 0, 4, 16  # offsets in struct seccomp_data; arg0's low word (little-endian)
    program = [(load, 0, 0, arch), (jeq, 1, 0, table["arch"]), (ret, 0, 0, eperm), (load, 0, 0, nr)]
    if machine == "x86_64":
        program += [(jge, 0, 1, _X32_SYSCALL_BIT), (ret, 0, 0, eperm)]
    for number in table["deny"]:
        program += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]
    program += [(jeq, 0, 1, table["clone3"]), (ret, 0, 0, enosys)]  # glibc then falls back to clone
    program += [(jeq, 0, 4, table["clone"]), (load, 0, 0, arg0), (jset, 0, 1, _CLONE_NAMESPACE_FLAGS),
                (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    program += [(jeq, 0, 4, table["socket"]), (load, 0, 0, arg0), (jeq, 0, 1, _AF_UNIX),
                (ret, 0, 0, eperm), (ret, 0, 0, allow)]
    program.append((ret, 0, 0, allow))
    return program


def _install_seccomp() -> None:
    program = seccomp_program(platform.machine())
    if program is None:
        return  # namespaces, capabilities and limits still hold; the filter is the extra layer
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), filters)
    _check(_prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)), "seccomp filter")


# ----------------------------------------------------------------------------- limits

def _set_limits(memory_bytes: int, max_processes: int, cpu_s: int) -> None:
    """Hard limits (soft = hard), inherited by every process the grader starts; a tighter limit
    the pipeline already runs under stays (a hard limit can only go down)."""
    import resource

    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, max_processes),
                         (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes)):
        hard = resource.getrlimit(limit)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(limit, (value, value))


def end_call() -> None:
    """After each call: kill every other process in the namespace and reap them (PID 1 only).

    Processes a grader starts live only as long as the call that started them.
    """
    try:
        # Every process of the namespace descends from PID 1 (orphans are re-parented to it):
        # no child at all means nothing to kill, at the cost of one system call.
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    try:
        os.kill(-1, signal.SIGKILL)  # from PID 1: every process of the namespace but itself
    except ProcessLookupError:
        return
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
