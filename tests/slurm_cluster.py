"""A real two-node SLURM cluster on this machine, for the tests of ``slurm/*.sh``.

Debian's slurm-wlm (22.05) is built to allow several slurmd on one host, so one machine
holds a controller and two compute nodes, n1 and n2, both reached at 127.0.0.1 on their
own ports; n1 and n2 do not resolve as host names, as on a cluster without DNS entries
for node names. Everything lives in a fresh temporary folder: slurm.conf, a munge key
and socket, state, spool, logs and pid files, so the cluster neither reads nor disturbs
a system SLURM or munge.

Start order (measured: both nodes idle ~1 s after the start): munged (as user munge), slurmctld,
slurmd -N n1, slurmd -N n2, each in the foreground as our own child. Stopping cancels
the jobs, then ends the daemons by PID, then every process that still carries this
cluster's marker in its environment (slurmstepd and job processes inherit it), so no
process outlives the fixture, even when a test or the start itself failed.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from pipeline.engine import free_port

NODES = ("n1", "n2")
MARKER = "BERT_PIPELINE_TEST_SLURM"  # in the environment of every process this cluster starts
# A requeued job may start again only after the job credential expires (120 s by default):
# 5 s keeps the preemption test short.
CRED_EXPIRE_S = 5
GRACE_TIME_S = 60  # a preempted job's time to checkpoint (the "debug" partition's GraceTime)



def ensure_installed() -> None:
    """``apt-get install slurm-wlm munge`` when the daemons are missing (needs root)."""
    if all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root: apt-get install slurm-wlm munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install slurm-wlm munge failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


class SlurmCluster:
    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="slurm-test-")
        os.chmod(self.root, 0o755)  # munged (user munge) must reach its folder
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf, MARKER: self.root}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":  # a test run inside a SLURM job must not leak that job's settings
                del self.env[key]
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # nor a torchrun shell's
            self.env.pop(key, None)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []

    # ---- start and stop ------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            pytest.skip("the test cluster runs munged as user munge and slurmd as root: run as root")
        ensure_installed()
        self._start_munge()
        self._write_conf()
        for sub in ("state", *(f"spool/{n}" for n in NODES)):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", self.conf])
        self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, 30, "slurmctld to answer")
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", self.conf])
        self._wait(self._nodes_idle, 60, "nodes n1 and n2 to be idle")
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = os.path.join(self.root, "munge")
        os.makedirs(folder, mode=0o700)
        key = os.path.join(folder, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.munge_socket = os.path.join(folder, "munge.socket")
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                               f"--seed-file={folder}/munged.seed"], user=munge.pw_uid, group=munge.pw_gid)
        self._wait(lambda: os.path.exists(self.munge_socket), 20, "munged's socket")

    def _write_conf(self) -> None:
        r, host = self.root, socket.gethostname()
        lines = [
            f"ClusterName=test{os.getpid()}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            # Each node offers 4 CPUs on this 2-core machine, so that two 2-node jobs and the
            # quick fail-fast jobs run side by side instead of queueing.
            "SlurmdParameters=config_overrides",
            "DefMemPerCPU=1000",  # without it one job takes a whole node and jobs run one at a time
            "SchedulerType=sched/backfill",
            "KillWait=10",
            "MinJobAge=600",  # finished jobs stay visible to scontrol while the tests read them
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/jobcomp.txt",
        ]
        for node in NODES:
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                         "CPUs=4 RealMemory=8000 State=UNKNOWN")
        # A job in "urgent" preempts those in "debug" as a site's preemptible partition does: SIGTERM
        # to their job steps (the ranks), SIGKILL once GraceTime has passed, then cancelled (CANCEL:
        # only the job's own requeue brings it back).
        lines += ["PreemptType=preempt/partition_prio", "PreemptMode=CANCEL",
                  f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                  f"GraceTime={GRACE_TIME_S} PreemptMode=CANCEL",
                  f"PartitionName=urgent Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2 "
                  "PreemptMode=OFF"]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        log = open(os.path.join(self.root, f"{name}.stdout"), "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, **kwargs)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}"
                                   f"\n{self.diagnostics()}")
            time.sleep(0.3)

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in NODES}

    def stop(self) -> None:
        """Cancels the jobs, ends the daemons by PID, then any process left with our marker."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in NODES), "slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.kill_leftovers()
        for log in self._logs:
            log.close()

    def leftover_pids(self) -> list[int]:
        """Processes whose environment carries this cluster's marker (slurmstepd, job steps)."""
        needle = f"{MARKER}={self.root}\0".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        pids.append(int(entry))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return pids

    def kill_leftovers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.leftover_pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and self.leftover_pids() and time.monotonic() < deadline:
                time.sleep(0.2)

    # ---- use -----------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs["env"] = {**self.env, **kwargs.get("env", {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                                 f"\n{self.diagnostics()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, …)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED")

    def wait_job(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Polls until the job has ended. (``sbatch --wait`` is coarser: measured here, it returns
        10 s after a 1 s job starts, 42 s after a 20 s one.)"""
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in self.FINAL_STATES:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s\n{self.diagnostics()}")
            time.sleep(0.3)
        return job

    def diagnostics(self, job_output: str | None = None) -> str:
        """The tails of the daemons' logs (and a job's output file) for assertion messages."""
        parts = []
        names = ["slurmctld.log", *(f"slurmd-{n}.log" for n in NODES), "munge/munged.log", "jobcomp.txt",
                 *(f"{n}.stdout" for n in self.procs)]
        for name in names + ([job_output] if job_output else []):
            path = name if os.path.isabs(name) else os.path.join(self.root, name)
            try:
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            parts.append(f"---- {path} (last 3000 chars) ----\n{text[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A started two-node cluster; every process it started is stopped afterwards."""
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
