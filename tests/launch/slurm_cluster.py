"""A real single-node SLURM on this machine, for the launcher's tests (and by hand): Debian's slurm-wlm and munge,
with a minimal slurm.conf written from the node's real CPUs and memory (`slurmd -C`), proctrack/linuxproc and
task/none (no cgroups). Two modes: without accounting (accounting_storage/none: `sacct` is off, as on many small
clusters), and with accounting: slurmdbd over a real MariaDB server that this script initializes and starts, with
associations and QOS enforced (account `stage1`, QOS `normal` and `high`) and partition limits enforced at submission.

Everything lives in one directory (keys, sockets, state, spool, logs, the database) and on free loopback ports, so it
never touches /etc/slurm, /etc/munge or a cluster already running here. Every daemon runs in the foreground as a
child of this process and is stopped by its process id; the jobs' processes (which SLURM detaches) are found by a
marker in their environment and stopped by process id too.

    from slurm_cluster import SlurmCluster, unavailable
    with SlurmCluster(tmp_dir, accounting=True) as cluster:      # starts it, stops it on exit
        subprocess.run(["sbatch", ...], env=cluster.env)          # SLURM_CONF points at its slurm.conf

By hand (root, packages slurm-wlm slurmdbd munge mariadb-server):
    python tests/launch/slurm_cluster.py [--accounting] [--dir DIR] -- bash    # a shell with the cluster; exit stops it
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = "stage1test"
PARTITION = "cpu"
ACCOUNT = "stage1"
MARKER = "STAGE1_SLURM_CLUSTER"  # in every daemon's and client's environment: how leftover job processes are found
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")
NEEDED_ACCOUNTING = ("slurmdbd", "sacctmgr", "sacct", "mariadbd", "mariadb-install-db", "mariadb")
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"


def unavailable(accounting: bool = False) -> str | None:
    """Why a SLURM cluster cannot be started here (None if it can): the tests skip with this reason."""
    if sys.platform != "linux":
        return "a SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root (slurmd starts the jobs as their user)"
    missing = [tool for tool in (*NEEDED, *(NEEDED_ACCOUNTING if accounting else ())) if not shutil.which(tool)]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: apt-get install -y {PACKAGES})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClusterError(RuntimeError):
    pass


class SlurmCluster:
    """Start with start() (or `with`), stop with stop(). `env` is the environment for SLURM's client commands and
    anything that calls them (the launcher, the jobs inherit it through sbatch)."""

    def __init__(self, root: Path | str | None = None, accounting: bool = False, kill_wait: int = 10,
                 min_job_age: int = 300, cred_expire: int = 10, enforce_part_limits: str | None = None,
                 partition_max_time: str = "INFINITE"):
        self.root = Path(root or tempfile.mkdtemp(prefix="stage1-slurm-")).resolve()
        self.accounting = accounting
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age
        self.cred_expire = cred_expire  # also how long a requeued job waits before it starts again (default 120 s)
        self.enforce_part_limits = enforce_part_limits or ("ALL" if accounting else "NO")
        self.partition_max_time = partition_max_time
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_"))]:
            if var != "SLURM_CONF":  # a test run inside a SLURM job must not hand its own job's settings on
                del self.env[var]

    # --- running ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, ...) against this cluster."""
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        why = unavailable(self.accounting)
        if why:
            raise ClusterError(why)
        try:
            for sub in ("etc", "munge", "state", "spool", "log", "run"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)  # jobs run as root here, but sockets' parents must not be group/other-writable
            self._start_munge()
            self.ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mysql")}
            if self.accounting:
                self._start_mariadb()
                self._write_slurmdbd_conf()
                # slurmdbd reads slurmdbd.conf beside $SLURM_CONF's slurm.conf
                self._spawn("slurmdbd", ["slurmdbd", "-D"])
                self._wait("slurmdbd", lambda: self.run("sacctmgr", "-n", "list", "cluster", check=False,
                                                         timeout=10).returncode == 0, 60)
                self._setup_associations()
            self._write_slurm_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False, timeout=10).stdout, 60)
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait("slurmd", self._node_idle, 60)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()

    def _wait(self, name: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{name} exited {proc.returncode} at start-up:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = ""
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if path.exists():
                text += f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10).stdout.strip()
        return state.startswith("idle")

    # --- munge -----------------------------------------------------------------------------------------------------

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        os.chmod(self.root / "munge", 0o700)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--num-threads=4"])

        def ready() -> bool:
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=5)
            back = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True,
                                  timeout=5)
            return cred.returncode == 0 and back.returncode == 0

        self._wait("munged", ready, 30)

    # --- MariaDB and slurmdbd --------------------------------------------------------------------------------------

    def _start_mariadb(self) -> None:
        data, sock = self.root / "mysql" / "data", self.root / "run" / "mysql.sock"
        data.mkdir(parents=True)
        init = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                               "--auth-root-authentication-method=socket", "--skip-test-db"],
                              capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db exited {init.returncode}: {init.stderr[-2000:]}")
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                                 f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1", "--user=root",
                                 "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
                                 f"--pid-file={self.root / 'run' / 'mariadbd.pid'}",
                                 f"--log-error={self.root / 'log' / 'mariadbd.log'}"])
        sql = ["mariadb", "--no-defaults", "-S", str(sock), "-u", "root"]
        self._wait("mariadbd", lambda: subprocess.run([*sql, "-e", "SELECT 1"], capture_output=True,
                                                      timeout=10).returncode == 0, 60)
        self.db_password = secrets.token_hex(12)
        grant = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'; "
                 "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        made = subprocess.run([*sql, "-e", grant], capture_output=True, text=True, timeout=30)
        if made.returncode != 0:
            raise ClusterError(f"creating the slurm database user failed: {made.stderr.strip()}")

    def _write_slurmdbd_conf(self) -> None:
        path = self.root / "etc" / "slurmdbd.conf"
        path.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdAddr=127.0.0.1", f"DbdHost={self.node}", f"DbdPort={self.ports['slurmdbd']}", "SlurmUser=root",
            f"LogFile={self.root / 'log' / 'slurmdbd.log'}", f"PidFile={self.root / 'run' / 'slurmdbd.pid'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.ports['mysql']}",
            "StorageUser=slurm", f"StoragePass={self.db_password}", "StorageLoc=slurm_acct_db", ""]))
        path.chmod(0o600)  # slurmdbd refuses a readable one (it holds the password)
        # sacctmgr (before slurmctld runs) needs a slurm.conf that names slurmdbd
        self._write_slurm_conf()

    def _setup_associations(self) -> None:
        user = pwd.getpwuid(os.geteuid()).pw_name
        for argv in (["add", "cluster", CLUSTER],
                     ["add", "qos", "high"],
                     ["add", "account", ACCOUNT, f"cluster={CLUSTER}"],
                     ["add", "user", user, f"account={ACCOUNT}", f"cluster={CLUSTER}", "qos=normal,high",
                      "defaultqos=normal"]):
            self.run("sacctmgr", "-i", *argv, timeout=30)

    # --- slurmctld and slurmd --------------------------------------------------------------------------------------

    def _write_slurm_conf(self) -> None:
        # the node as slurmd sees it: CPUs, sockets, cores, threads, RealMemory
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        fields = dict(f.split("=", 1) for f in node.split())
        fields["NodeName"] = self.node
        node_line = " ".join(f"{k}={v}" for k, v in fields.items()) + " NodeAddr=127.0.0.1 State=UNKNOWN"
        self.cpus, self.memory_mb = int(fields["CPUs"]), int(fields["RealMemory"])
        if self.accounting:
            accounting = ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
                          f"AccountingStoragePort={self.ports['slurmdbd']}",
                          # to slurmdbd, munge credentials come from the socket named here, not AuthInfo's
                          f"AccountingStoragePass={self.munge_socket}",
                          "AccountingStorageEnforce=associations,limits,qos", "JobAcctGatherType=jobacct_gather/linux",
                          "JobAcctGatherFrequency=30"]
        else:
            accounting = ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER}", f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}", f"SlurmdPort={self.ports['slurmd']}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "SwitchType=switch/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_min_interval=100000", "ReturnToService=2",
            f"KillWait={self.kill_wait}", f"MinJobAge={self.min_job_age}", "InactiveLimit=0", "Waittime=0",
            "MessageTimeout=10", "SlurmctldTimeout=30", "SlurmdTimeout=60", "JobCompType=jobcomp/none",
            f"EnforcePartLimits={self.enforce_part_limits}", *accounting,
            node_line,
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime={self.partition_max_time} State=UP",
            ""]))

    # --- stopping --------------------------------------------------------------------------------------------------

    def cancel_all(self, timeout: float | None = None) -> None:
        """Cancels every job and waits (KillWait and a margin at most) until the queue is empty."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        try:
            self.run("scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False, timeout=15)
            deadline = time.monotonic() + (self.kill_wait + 20 if timeout is None else timeout)
            while time.monotonic() < deadline:
                left = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if left.returncode != 0 or not left.stdout.strip():
                    return
                time.sleep(0.3)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> list[int]:
        """Cancels every job, stops the daemons by process id (TERM, then KILL), then any process of a job that
        outlived them (found by MARKER in its environment). Returns the pids it had to stop after the daemons."""
        self.cancel_all()
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):  # reverse start order
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process(proc)
        return self.sweep()

    def sweep(self) -> list[int]:
        """Kills, by pid, the processes left with this cluster's marker (not this process nor its parents)."""
        mine = {os.getpid()}
        pid = os.getpid()
        while pid > 1:
            pid = parent_of(pid)
            mine.add(pid)
        killed = []
        for _ in range(3):
            found = [p for p in marked_processes(str(self.root)) if p not in mine]
            for p in found:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
                except ProcessLookupError:
                    pass
            if not found:
                break
            time.sleep(0.5)
        return killed


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def marked_processes(root: str) -> list[int]:
    needle = f"{MARKER}={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Runs a command against a single-node SLURM started here, then stops "
                                            "it (by process id).")
    p.add_argument("--accounting", action="store_true", help="with slurmdbd over a MariaDB server it starts")
    p.add_argument("--dir", help="where its files go (default: a new temporary directory)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...: run with SLURM_CONF set")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    why = unavailable(args.accounting)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    cluster = SlurmCluster(args.dir, accounting=args.accounting)
    started = time.monotonic()
    cluster.start()
    print(f"SLURM up in {time.monotonic() - started:.1f} s: SLURM_CONF={cluster.conf} (node {cluster.node}, "
          f"{cluster.cpus} CPUs, {cluster.memory_mb} MB, partition {PARTITION}"
          f"{', accounting' if args.accounting else ''})", file=sys.stderr)
    try:
        return subprocess.run(command or ["sinfo"], env=cluster.env).returncode
    finally:
        left = cluster.stop()
        if args.dir is None:  # its own temporary directory
            shutil.rmtree(cluster.root, ignore_errors=True)
        print(f"SLURM stopped{f' (and leftover job processes {left})' if left else ''}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
