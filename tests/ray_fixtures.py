"""A real two-node Ray cluster on loopback, started and stopped by a test, and the processes of Ray.

`ray start --head --node-ip-address 127.0.0.1 --port P --num-cpus 1` and a second
`ray start --address 127.0.0.1:P --num-cpus 1`, each with a temp directory of its own, token
authentication on (a token file of the test's, given to every node and driver through
RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH). Stopped by PID, never with `ray stop` (which stops every
Ray of the machine): every process whose command line names one of the cluster's temp
directories, and every descendant of those (the agents and workers the raylets start), is killed,
and the stop checks that none is left.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- processes


def stats() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is gone already
            continue
        found[int(entry.name)] = (int(fields[1]), cmdline.strip())
    return found


def descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    table = table if table is not None else stats()
    found, frontier = set(), set(roots)
    while frontier:
        children = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    return pid in stats()


def wait_gone(pids: set[int] | list[int], timeout_s: float = 60.0) -> set[int]:
    """The pids still running after up to `timeout_s` (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    left = set(pids)
    while left and time.monotonic() < deadline:
        table = stats()
        left = {pid for pid in left if pid in table}
        if left:
            time.sleep(0.5)
    return left


# What Ray's processes look like: actors and agents name themselves ray::<Class>; the rest run these.
RAY_PROCESS_SIGNS = ("ray::", "gcs_server", "raylet", "ray/dashboard", "log_monitor.py", "ray/autoscaler",
                     "default_worker.py", "runtime_env/agent")


def ray_children(pid: int, timeout_s: float = 30.0) -> dict[int, str]:
    """Ray processes among the descendants of `pid` still running after up to `timeout_s` (what a
    Ray instance it started left behind)."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = stats()
        found = {p: table[p][1] for p in descendants({pid}, table)
                 if any(sign in table[p][1] for sign in RAY_PROCESS_SIGNS)}
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# --------------------------------------------------------------------------- the cluster


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]  # what a driver (or a node) of this cluster needs in its environment
    temp_dirs: list[Path]
    log: Path
    pids_seen: set[int] = field(default_factory=set)

    def processes(self) -> set[int]:
        """Every process of the cluster now: those naming its temp directories, and their descendants."""
        table = stats()
        roots = {pid for pid, (_, cmd) in table.items() if any(str(d) in cmd for d in self.temp_dirs)}
        every = roots | descendants(roots, table)
        self.pids_seen |= every
        return every

    def workers(self) -> dict[int, str]:
        """The cluster's processes that run a stage's work (Ray Train's workers and controller)."""
        table = stats()
        return {pid: table[pid][1] for pid in self.processes()
                if pid in table and ("RayTrainWorker" in table[pid][1] or "TrainController" in table[pid][1])}

    def stop(self) -> set[int]:
        """Kill every process of the cluster; returns those still running after (should be none)."""
        for _ in range(3):  # a process may start another while we kill: look again
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        left = wait_gone(self.pids_seen, timeout_s=30)
        for directory in self.temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        return left


def start_cluster(base_env: dict[str, str], logs: Path) -> RayCluster:
    """Two nodes of one CPU each on 127.0.0.1 (a head and a worker node)."""
    temp = Path(tempfile.mkdtemp(prefix="rft-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    env = {
        **base_env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    head_dir, node_dir = temp / "head", temp / "node"
    cluster = RayCluster(f"127.0.0.1:{port}", env, [head_dir, node_dir], logs / "ray-cluster.log")
    ray = str(BIN / "ray")
    commands = [
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
         "--include-dashboard", "false", "--temp-dir", str(head_dir), "--disable-usage-stats"],
        [ray, "start", "--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
         "--temp-dir", str(node_dir), "--disable-usage-stats"],
    ]
    try:
        for command in commands:
            with open(cluster.log, "ab") as out:
                done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=180,
                                      start_new_session=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{cluster.log.read_text()[-3000:]}")
        wait_for_nodes(cluster, 2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_nodes(cluster: RayCluster, count: int, timeout_s: float = 120.0) -> None:
    """Until `ray status` lists `count` alive nodes."""
    deadline = time.monotonic() + timeout_s
    script = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    while True:
        done = subprocess.run([sys.executable, "-c", script, cluster.address], env=cluster.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster has not {count} nodes: {done.stdout[-500:]} {done.stderr[-2000:]}")
        time.sleep(2)
