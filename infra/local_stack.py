"""The cluster workflow on one machine: an S3-compatible server, an MLflow server with S3
artifacts and a Ray head, all on 127.0.0.1.

    python infra/local_stack.py up      # start all three; prints the settings to use
    python infra/local_stack.py env     # the same settings again, as `export` lines
    python infra/local_stack.py down    # stop all of it; no process is left behind

With `up --worker-nodes N`, more Ray nodes join the head (a multi-node cluster on loopback);
`kill-node --node I` takes node I away at once, as a reclaimed spot instance goes, and
`start-node --node I` brings it back.

Each service runs in its own process session, recorded in .stack/stack.json; `down` ends
exactly those sessions (TERM, then KILL after a grace period) and nothing else on the
machine. The S3 server is moto's server mode (in memory: its data lives as long as it does);
the buckets are made by infra/bootstrap.py, as on AWS. The S3 keys below are moto's
placeholders, not secrets: moto accepts any key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

INFRA = Path(__file__).resolve().parent
PREFIX = "resattn-local"
BIN = Path(sys.executable).parent
START_TIMEOUT = 120.0
STOP_GRACE = 15.0
# Every port the stack listens on, with the usual default of each; all on 127.0.0.1. Each can be
# moved, so that the stack runs beside another Ray on the machine (which holds the defaults).
PORTS = {
    "s3": (9000, "the S3-compatible server"),
    "mlflow": (5000, "the MLflow server"),
    "ray": (6379, "the Ray head's GCS (RAY_ADDRESS)"),
    "dashboard": (8265, "the Ray dashboard and job API"),
    "agent": (52365, "the Ray head's dashboard agent, which runs submitted jobs"),
    "client": (10001, "the Ray client server (ray://)"),
}


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As servers bind: connections of a stopped one lingering in TIME_WAIT don't count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (Ray's dashboard asks for its token): it is up
        except OSError:
            time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise RuntimeError(f"{name} did not come up at {url} (log {log}):\n{tail}")


def session_processes(session_id: int) -> list[psutil.Process]:
    """The live processes of one session (zombies are already dead)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def stop_processes(processes: list[psutil.Process]) -> None:
    """TERM, then KILL what is still alive after the grace period."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=STOP_GRACE)
    kill_processes(alive)


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL, and wait for them to be gone."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def stop_session(session_id: int) -> None:
    """TERM every process of the session at once, as `ray stop` does to every Ray process of a
    machine. Ray's `--block` head, TERMed alone after a sweep had run, ignored it for the whole
    grace period (then the rest needed another): `down` took 36 s instead of 9 s."""
    stop_processes(session_processes(session_id))


class Stack:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir.resolve()
        self.state_file = self.state_dir / "stack.json"

    def load(self) -> dict | None:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else None

    def save(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temp = self.state_file.with_suffix(".tmp")
        temp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(temp, self.state_file)

    def _start(self, state: dict, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.state_dir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        state["sessions"][name] = process.pid
        self.save(state)  # recorded at once, so `down` finds it even if `up` dies next
        return process

    def up(self, ports: dict[str, int], num_cpus: int, worker_nodes: int = 0, worker_node_cpus: int = 1) -> dict:
        """Start the stack on `ports` (keyed as in PORTS): its Ray head with `num_cpus` CPUs and
        `worker_nodes` more Ray nodes, each a raylet of its own with `worker_node_cpus` CPUs."""
        if (existing := self.load()) and any(session_processes(pid) for pid in existing["sessions"].values()):
            raise SystemExit(f"error: a stack from {self.state_dir} is running; stop it first: python {__file__} down")
        for name, port in ports.items():
            if not _port_is_free(port):
                raise SystemExit(f"error: port {port} on 127.0.0.1 is taken; pick another with --{name}-port")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        s3 = f"http://127.0.0.1:{ports['s3']}"
        env = {
            "AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "moto-placeholder-key",
            "AWS_SECRET_ACCESS_KEY": "moto-placeholder-secret", "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_ADDRESS": f"127.0.0.1:{ports['ray']}", "RAY_AUTH_MODE": "token",
        }
        buckets = {role: f"{PREFIX}-{role}" for role in ("data", "mlflow", "ray")}
        state = {
            "sessions": {}, "env": env, "buckets": buckets,
            "mlflow_tracking_uri": f"http://127.0.0.1:{ports['mlflow']}",
            "ray_dashboard": f"http://127.0.0.1:{ports['dashboard']}",
            # Ray's socket paths must stay under 107 bytes: a short folder of its own.
            "ray_temp_dir": tempfile.mkdtemp(prefix="ray-stack-", dir="/tmp"),
            "worker_nodes": worker_nodes, "worker_node_cpus": worker_node_cpus,
        }
        child_env = os.environ | env | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            moto = self._start(state, "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], child_env)
            wait_for(f"{s3}/moto-api/", moto, "the S3 server", self.state_dir / "s3.log")
            subprocess.run([sys.executable, str(INFRA / "bootstrap.py"), "--prefix", PREFIX], env=child_env,
                           check=True, stdout=subprocess.DEVNULL)
            mlflow = self._start(state, "mlflow", [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{buckets['mlflow']}/artifacts",
            ], child_env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
            wait_for(f"{state['mlflow_tracking_uri']}/health", mlflow, "the MLflow server", self.state_dir / "mlflow.log")
            ray = self._start(state, "ray", [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['ray']}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                f"--dashboard-agent-listen-port={ports['agent']}", f"--ray-client-server-port={ports['client']}",
                f"--num-cpus={num_cpus}",
                f"--temp-dir={state['ray_temp_dir']}", "--disable-usage-stats",
            ], child_env)
            wait_for(f"{state['ray_dashboard']}/api/version", ray, "the Ray head", self.state_dir / "ray.log")
            # The dashboard answers seconds before the agent that takes job submissions: a job
            # submitted in between, on a busy machine, was refused ("No available agent").
            wait_for(f"http://127.0.0.1:{ports['agent']}/api/healthz", ray, "the Ray head's job agent",
                     self.state_dir / "ray.log")
            for index in range(1, worker_nodes + 1):
                self.start_node(state, index)
        except BaseException:
            self.down()
            raise
        return state

    def start_node(self, state: dict, index: int) -> None:
        """Start Ray node `index` (1-based) of the stack: a raylet of its own that joins the head."""
        name, agent_port = f"ray-node-{index}", _free_port()
        if name in state["sessions"] and session_processes(state["sessions"][name]):
            raise SystemExit(f"error: Ray node {index} is running")
        child_env = os.environ | state["env"] | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        node = self._start(state, name, [
            str(BIN / "ray"), "start", "--block", f"--address={state['env']['RAY_ADDRESS']}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={state['worker_node_cpus']}",
            f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats",
        ], child_env)
        # A node's agent starts once its raylet has joined the cluster.
        wait_for(f"http://127.0.0.1:{agent_port}/api/healthz", node, f"Ray node {index}", self.state_dir / f"{name}.log")

    def kill_node(self, state: dict, index: int) -> None:
        """SIGKILL every process of Ray node `index` at once (its raylet, agents and workers), the
        way a reclaimed spot instance vanishes: nothing is told, the head finds out."""
        name = f"ray-node-{index}"
        processes = session_processes(state["sessions"].get(name, -1))
        if not processes:
            raise SystemExit(f"error: Ray node {index} is not running")
        kill_processes(processes)

    def down(self) -> list[str]:
        state = self.load()
        if state is None:
            return []
        stopped = []
        for name, session in reversed(list(state["sessions"].items())):
            if session_processes(session):
                stop_session(session)
                stopped.append(name)
        # Ray workers may start sessions of their own; each names the stack's own temp dir.
        if temp_dir := state.get("ray_temp_dir"):
            stop_processes([p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])])
        shutil.rmtree(state.get("ray_temp_dir", ""), ignore_errors=True)
        self.state_file.unlink()
        return stopped


def describe(state: dict) -> str:
    exports = "\n".join(f"export {key}={value}" for key, value in state["env"].items())
    settings = (f"-S mlflow.tracking_uri={state['mlflow_tracking_uri']} -S ray.address=auto "
                f"-S ray.storage_path=s3://{state['buckets']['ray']}/runs")
    return f"""\
{exports}
# then run the pipeline or a sweep against the stack:
#   dvc exp run {settings}
#   ray job submit --address {state['ray_dashboard']} --working-dir . -- python pipeline/tune.py --root $PWD {settings}
# MLflow UI: {state['mlflow_tracking_uri']}   Ray dashboard: {state['ray_dashboard']}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "env", "kill-node", "start-node"])
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state, logs and the MLflow database")
    for name, (default, what) in PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=default, help=what)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="the Ray head's")
    parser.add_argument("--worker-nodes", type=int, default=0,
                        help="more Ray nodes on this machine, each a raylet of its own: a multi-node cluster on loopback")
    parser.add_argument("--worker-node-cpus", type=int, default=1)
    parser.add_argument("--node", type=int, default=1,
                        help="which Ray node (1 to --worker-nodes) kill-node takes away, as a lost spot instance "
                             "goes, and start-node brings back")
    args = parser.parse_args(argv)
    stack = Stack(args.dir)
    if args.action == "up":
        try:
            state = stack.up({name: getattr(args, f"{name}_port") for name in PORTS}, args.num_cpus, args.worker_nodes,
                             args.worker_node_cpus)
        except (RuntimeError, subprocess.CalledProcessError) as error:
            raise SystemExit(f"error: {error}\n(everything it had started is stopped again)") from None
        print(describe(state))
    elif args.action == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
    else:
        state = stack.load()
        if state is None:
            raise SystemExit(f"error: no stack in {stack.state_dir}; start one with: python {__file__} up")
        if args.action == "env":
            print(describe(state))
            return
        if not 1 <= args.node <= state["worker_nodes"]:
            raise SystemExit(f"error: --node {args.node}: the stack has Ray nodes 1 to {state['worker_nodes']} "
                             f"(up --worker-nodes N)")
        if args.action == "kill-node":
            stack.kill_node(state, args.node)
        else:
            try:
                stack.start_node(state, args.node)
            except RuntimeError as error:
                raise SystemExit(f"error: {error}") from None
        print(f"Ray node {args.node}: {'killed' if args.action == 'kill-node' else 'started'}", file=sys.stderr)


if __name__ == "__main__":
    main()
