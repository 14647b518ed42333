"""Run a real Flower deployment on this machine: one SuperLink, one SuperNode per hospital site.

    result = run_federation("/data/wbc", ["tehran-lisc", "jiangxi-tecom", "bccd"], "/srv/registry",
                            {"num-server-rounds": 5, "strategy": "fedprox"}, "var/federation/run1")

Every Flower process is a separate OS process on loopback with free ports chosen at start, telemetry and
update checks off, runtime dependency installation off, and its own FLWR_HOME under `workdir/flwr/`.
Each SuperNode is given only its own site: a data root made by `materialize_site` that holds that
site's class folders (symlinks) and manifest, nothing else. The app is submitted with
`flwr run <project root> <connection> --stream`; its outcome is read back with `flwr ls` (`flwr run`
exits 0 even when the ServerApp crashed). Progress is drawn from the ServerApp's event log.

Teardown order: the `flwr run` client, then the SuperNodes, then the SuperLink (a SuperNode whose
SuperLink vanished keeps retrying). Each process runs in its own session; stopping one signals its
whole process group and then any descendant that left it (Flower's launchers start their
`flwr-serverapp` / `flwr-clientapp` children in sessions of their own). This runs on success, on error,
on Ctrl-C and on SIGTERM, and once more at interpreter exit as a last resort.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from federation import events as ev
from federation.server_app import RunSettings
from federation.sites import DataError, DataRoot, materialize_site, resolve_data_root

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the Flower app (root pyproject.toml)
CONNECTION = "wbc-local"
_BIN = Path(sys.executable).parent


class FederationError(RuntimeError):
    """The deployment could not be started or the run could not be followed; the message says why."""


class SuperLinkDied(FederationError):
    """The SuperLink process (and with it the ServerApp) went away during the run."""


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class FederationResult:
    run_id: int | None
    status: str  # Flower's run status, e.g. "finished:completed", "finished:failed: <reason>"
    wall_seconds: float
    run_dir: Path
    workdir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)  # rounds/round-NNN.json, in order
    registered: list[dict[str, Any]] = field(default_factory=list)  # {round, version, path}
    error: str | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)  # SuperNodes lost, SuperLink restarts, resumptions
    flower_runs: list[int] = field(default_factory=list)  # one per submission (more after a resume)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed" and self.error is None

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return [
            {
                "round": r["round"],
                "accepted": r.get("gate", {}).get("accepted"),
                "reason": r.get("gate", {}).get("reason"),
            }
            for r in self.rounds
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "rounds": len(self.rounds),
            "decisions": self.decisions,
            "registered": self.registered,
            "wall_seconds": round(self.wall_seconds, 1),
            "run_dir": str(self.run_dir),
            "faults": self.faults,
            "flower_runs": self.flower_runs,
        }


# ---- processes -------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (ppid, start time in clock ticks) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(pid: int) -> dict[int, int]:
    """pid → start time of every live descendant (start time guards against a reused pid)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = {}, list(children.get(pid, []))
    while stack:
        child = stack.pop()
        if child not in found:
            found[child] = table[child][1]
            stack.extend(children.get(child, []))
    return found


def _alive(pid: int, start: int) -> bool:
    info = _proc_table().get(pid)
    return info is not None and info[1] == start


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path):
        self.name, self.argv, self.log = name, argv, log
        cwd.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._known: dict[int, int] = {}

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def remember_children(self) -> None:
        if self.running:
            self._known.update(_descendants(self.proc.pid))

    def stop(self, grace: float = 10.0) -> None:
        self.remember_children()
        if self.running:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children in sessions of their own (Flower's launchers) are not in the group.
        leftovers = {p: s for p, s in self._known.items() if _alive(p, s)}
        for pid in leftovers:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while leftovers and time.time() < deadline:
            time.sleep(0.2)
            leftovers = {p: s for p, s in leftovers.items() if _alive(p, s)}
        for pid in leftovers:
            _signal_pid(pid, signal.SIGKILL)
        self._log_fh.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_LIVE: list[ManagedProcess] = []  # for the atexit last resort only


@atexit.register
def _stop_leftovers() -> None:
    for proc in reversed(_LIVE):
        proc.stop(grace=3.0)
    _LIVE.clear()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from a job runner) unwinds like Ctrl-C so that the teardown runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _exclusive(workdir: Path) -> Iterator[None]:
    """One deployment per workdir at a time: its FLWR_HOMEs and site folders are shared between runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".deploy.lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FederationError(
                f"{workdir} is in use by another federation run; use another workdir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- the deployment --------------------------------------------------------------------------------
@dataclass
class SiteNode:
    site: str
    data_root: Path
    port: int = 0
    process: ManagedProcess | None = None
    launcher: ManagedProcess | None = None  # federation.warm_exec, with isolation="process"
    key: Path | None = None  # private auth key (OpenSSH ECDSA) when the SuperLink authenticates nodes
    node_config: dict[str, Any] = field(default_factory=dict)  # extra --node-config entries


class LocalDeployment:
    """SuperLink + SuperNodes + CLI config under `workdir`; use as a context manager."""

    def __init__(
        self,
        site_roots: Mapping[str, Path],
        workdir: Path,
        *,
        log_dir: Path | None = None,
        insecure: bool = True,
        auth: bool = False,
        threads_per_site: int | None = None,
        start_timeout: float = 90.0,
        node_config: Mapping[str, Mapping[str, Any]] | None = None,
        isolation: str = "process",
        persist_state: bool = False,
    ):
        if isolation not in ("process", "subprocess"):
            raise FederationError(f"isolation must be 'process' (warm launcher) or 'subprocess', not {isolation!r}")
        self.isolation = isolation
        if auth and insecure:
            raise FederationError("SuperNode authentication needs TLS: use insecure=False with auth=True")
        self.workdir = workdir
        self.nodes = [
            SiteNode(site, root, node_config=dict((node_config or {}).get(site, {})))
            for site, root in site_roots.items()
        ]
        self.insecure = insecure
        self.auth = auth
        self.threads = threads_per_site or max(1, (os.cpu_count() or 1) // max(1, len(self.nodes)))
        self.start_timeout = start_timeout
        self.superlink: ManagedProcess | None = None
        self.port = 0
        self.flwr_dir = workdir / "flwr"
        self.log_dir = log_dir or workdir / "logs"
        self.cli_home = self.flwr_dir / "cli"
        self.certs: dict[str, Path] = {}
        self.keys_dir = workdir / "keys"
        # `persist_state`: the SuperLink keeps runs, node keys and message objects in SQLite across restarts.
        # Off by default: it stores every model update in SQLite (one tiny run each here: train steps 79-93 s with
        # it vs 31-42 s without, similar load),
        # and a resumed run needs only its own checkpoint (federation.resume); keys are registered again.
        self.database = self.flwr_dir / "superlink" / "state.db" if persist_state else None

    # -- environment --
    def env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(flwr_home),
            FLWR_TELEMETRY_ENABLED="0",  # on by default; nothing may leave a hospital network unasked
            FLWR_DISABLE_UPDATE_CHECK="1",  # the CLI and launchers would ask PyPI otherwise
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PATH=f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # launchers spawn flower-superexec by name
        )
        env.pop("PYTHONPATH", None)  # the app comes from the FAB, everything else from this environment
        return env

    @property
    def logs(self) -> dict[str, Path]:
        out = {"superlink": self.log_dir / "superlink.log"}
        out.update({f"supernode-{n.site}": self.log_dir / f"supernode-{n.site}.log" for n in self.nodes})
        return out

    # -- lifecycle --
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if not (_BIN / "flower-superlink").exists():
            raise FederationError(f"flower-superlink not found beside {sys.executable}; is flwr installed?")
        self.flwr_dir.mkdir(parents=True, exist_ok=True)
        if not self.insecure:
            from federation.tls import make_local_certificates

            self.certs = make_local_certificates(self.workdir / "certs")
        self._start_superlink()
        self._write_cli_config()
        if self.auth:
            for node in self.nodes:
                node.key = self.register_site_key(node.site)
        for node in self.nodes:
            self._start_supernode(node)
        self.wait_for_nodes()

    def register_site_key(self, site: str) -> Path:
        """The site's private key (made once, kept under workdir/keys), its public key registered."""
        from federation.credentials import make_site_key

        private, public = self.keys_dir / f"{site}.key", self.keys_dir / f"{site}.pub"
        if not (private.is_file() and public.is_file()):
            make_site_key(self.keys_dir, site)
        out = self.flwr("supernode", "register", str(public), CONNECTION, "--format", "json")
        text = (out.stdout + out.stderr).lower()
        if out.returncode != 0 and "already" not in text:  # a kept database already knows the key
            raise FederationError(f"could not register {site}'s key: {(out.stdout + out.stderr).strip()[-1000:]}")
        return private

    def _start_superlink(self, port: int | None = None) -> None:
        for _attempt in range(3 if port is None else 20):
            self.port = port or free_port()
            argv = [
                str(_BIN / "flower-superlink"),
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ]
            if self.database is not None:
                argv += ["--database", str(self.database)]
            argv += self._tls_server_args()
            if self.auth:
                argv.append("--enable-supernode-auth")
            proc = ManagedProcess(
                "superlink",
                argv,
                cwd=self.flwr_dir / "superlink-cwd",
                env=self.env(self.flwr_dir / "superlink"),
                log=self.logs["superlink"],
            )
            _LIVE.append(proc)
            if self._wait_port(proc, self.port):
                self.superlink = proc
                return
            proc.stop(grace=3)
            _forget(proc)
            if port is not None:
                time.sleep(1.0)  # the old SuperLink's port may take a moment to free
        raise FederationError(f"the SuperLink did not start; see {self.logs['superlink']}")

    def restart_superlink(self) -> None:
        """Start the SuperLink again on the same port (after it died or was stopped).

        SuperNodes keep retrying and reconnect by themselves; site keys are registered again (or kept in the
        database with `persist_state`).
        """
        if self.superlink is not None:
            self.superlink.stop(grace=5)
            _forget(self.superlink)
            self.superlink = None
        self._start_superlink(port=self.port)
        if self.auth and self.database is None:  # a fresh SuperLink knows no keys yet
            for node in self.nodes:
                self.register_site_key(node.site)
        # A SuperNode that dialled in before its key was registered again was refused and exited (as a
        # site's service manager would, start it again); the others reconnect by themselves.
        deadline = time.time() + self.start_timeout
        revived: dict[str, int] = {}
        while time.time() < deadline:
            for node in self.nodes:
                if all(p is not None and p.running for p in (node.process, node.launcher or node.process)):
                    continue
                if revived.get(node.site, 0) >= 3:
                    raise FederationError(f"SuperNode for {node.site} keeps exiting; see {self.log_dir}")
                revived[node.site] = revived.get(node.site, 0) + 1
                for proc in (node.launcher, node.process):
                    if proc is not None:
                        proc.stop(grace=3)
                        _forget(proc)
                node.process = node.launcher = None
                self._start_supernode(node)
            if self.online_nodes() >= len(self.nodes):
                for proc in self.processes():
                    proc.remember_children()
                return
            time.sleep(1.0)
        raise FederationError(f"not every SuperNode came back after the SuperLink restart; see {self.log_dir}")

    def _start_supernode(self, node: SiteNode) -> None:
        for _attempt in range(3):
            proc = self.launch_supernode(node)
            if self._wait_port(proc, node.port):
                node.process = proc
                if self.isolation == "process":
                    node.launcher = self._start_launcher(node, proc)
                return
            proc.stop(grace=3)
            _forget(proc)
        raise FederationError(
            f"SuperNode for {node.site} did not start; see {self.logs[f'supernode-{node.site}']}"
        )

    def _start_launcher(self, node: SiteNode, supernode: ManagedProcess) -> ManagedProcess:
        """federation.warm_exec for this SuperNode: ClientApps forked from a process with torch imported."""
        argv = [
            sys.executable,
            "-m",
            "federation.warm_exec",
            "--runtime-api-address",
            f"127.0.0.1:{node.port}",
            "--insecure",  # the SuperNode's Runtime API listens on loopback only
            "--parent-pid",
            str(supernode.proc.pid),
        ]
        home = self.flwr_dir / "nodes" / node.site
        proc = ManagedProcess(
            f"clientapps-{node.site}",
            argv,
            cwd=home / "cwd",
            env=self.env(home),
            log=self.log_dir / f"supernode-{node.site}.log",  # ClientApp output beside its SuperNode's
        )
        _LIVE.append(proc)
        return proc

    def launch_supernode(self, node: SiteNode) -> ManagedProcess:
        """Start one SuperNode process and return at once (the caller decides what to wait for)."""
        node.port = free_port()
        config = {"threads": self.threads, **node.node_config}
        node_config = " ".join(
            [f"site={_node_value(node.site)}", f"data-root={_node_value(str(node.data_root))}"]
            + [f"{k}={_node_value(str(v)) if isinstance(v, str) else _toml_value(v)}" for k, v in config.items()]
        )
        argv = [
            str(_BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(node.port),
            "--node-config",
            node_config,
        ]
        argv += ["--insecure"] if self.insecure else ["--root-certificates", str(self.certs["ca"])]
        if node.key is not None:
            argv += ["--auth-supernode-private-key", str(node.key)]
        argv += ["--isolation", self.isolation]
        home = self.flwr_dir / "nodes" / node.site
        proc = ManagedProcess(
            f"supernode-{node.site}",
            argv,
            cwd=home / "cwd",
            env=self.env(home),
            log=self.log_dir / f"supernode-{node.site}.log",
        )
        _LIVE.append(proc)
        return proc

    def _tls_server_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.certs["ca"]),
            "--ssl-certfile",
            str(self.certs["server_cert"]),
            "--ssl-keyfile",
            str(self.certs["server_key"]),
        ]

    def _wait_port(self, proc: ManagedProcess, port: int) -> bool:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if not proc.running:
                return False
            if _port_open(port):
                time.sleep(0.3)
                return proc.running  # a port taken by someone else: our process exits instead
            time.sleep(0.2)
        return False

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "127.0.0.1:{self.port}"')
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.certs["ca"]}"')
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(_BIN / "flwr"), *args],
            env=self.env(self.cli_home),
            cwd=self.cli_home,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def flwr_json(self, *args: str) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json")
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError:
            return {"success": False, "error-message": (out.stdout + out.stderr).strip()[-2000:]}

    def online_nodes(self) -> int:
        data = self.flwr_json("supernode", "list", CONNECTION)
        return sum(1 for n in data.get("nodes", []) if n.get("status") == "online")

    def wait_for_nodes(self) -> None:
        deadline = time.time() + self.start_timeout
        online = 0
        while time.time() < deadline:
            dead = [
                n.site
                for n in self.nodes
                if n.process is None or not n.process.running or (n.launcher is not None and not n.launcher.running)
            ]
            if dead:
                raise FederationError(f"SuperNode(s) for {', '.join(dead)} exited; see {self.log_dir}")
            online = self.online_nodes()
            if online >= len(self.nodes):
                for proc in self.processes():
                    proc.remember_children()
                return
            time.sleep(0.5)
        raise FederationError(
            f"only {online} of {len(self.nodes)} SuperNodes came online; see {self.log_dir}"
        )

    def processes(self) -> list[ManagedProcess]:
        procs = [n.process for n in self.nodes if n.process is not None]
        procs += [n.launcher for n in self.nodes if n.launcher is not None]
        return procs + ([self.superlink] if self.superlink else [])

    def stop(self) -> None:
        nodes = [n.process for n in self.nodes if n.process is not None]
        nodes += [n.launcher for n in self.nodes if n.launcher is not None]
        for proc in nodes:  # signal all SuperNodes first, then wait: they stop in parallel
            proc.remember_children()
            if proc.running:
                _signal_group(proc.proc.pid, signal.SIGTERM)
        for proc in nodes:  # ClientApp processes live in sessions of their own: signal them all up front too
            for pid, start in proc._known.items():
                if _alive(pid, start):
                    _signal_pid(pid, signal.SIGTERM)
        for proc in nodes:
            proc.stop()
            _forget(proc)
        for node in self.nodes:
            node.process = None
            node.launcher = None
        if self.superlink is not None:
            self.superlink.stop()
            _forget(self.superlink)
            self.superlink = None


def _node_value(text: str) -> str:
    """A TOML string for --node-config, whose parser splits on whitespace outside plain double quotes."""
    if any(c in text for c in '"\\\n'):
        raise FederationError(
            f"cannot pass {text!r} in --node-config: no double quotes, backslashes or newlines"
        )
    return f'"{text}"'


def _forget(proc: ManagedProcess) -> None:
    if proc in _LIVE:
        _LIVE.remove(proc)


# ---- the run ---------------------------------------------------------------------------------------
def app_defaults(project_root: Path = PROJECT_ROOT) -> dict[str, Any]:
    with (project_root / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def build_run_config(run_config: Mapping[str, Any], **paths: Any) -> dict[str, Any]:
    """Defaults from pyproject.toml ← deploy's paths ← the caller's values; checked by RunSettings."""
    defaults = app_defaults()
    unknown = sorted(set(run_config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **{k: v for k, v in paths.items() if v is not None}, **dict(run_config)}
    RunSettings.from_run_config(merged)  # fail here, not after the deployment started
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def run_federation(
    data_root: str | Path | None,
    sites: Sequence[str],
    registry: str | Path,
    run_config: Mapping[str, Any],
    workdir: str | Path,
    *,
    insecure: bool = True,
    auth: bool = False,
    show_progress: bool = True,
    timeout: float | None = None,
    max_restarts: int = 1,
    node_config: Mapping[str, Mapping[str, Any]] | None = None,
) -> FederationResult:
    """Start the deployment, run the app once, tear everything down; returns what happened.

    `run_config` overrides `[tool.flwr.app.config]`; `registry`, `run-dir` (a new folder under
    `workdir/runs/`), `min-nodes` (= number of sites) and `parity-images` (= the data root) are filled in
    unless given. `timeout` bounds the whole run (default: rounds × 2 steps × round-timeout + 5 min).
    `auth` (needs `insecure=False`): the SuperLink admits only SuperNodes whose key is registered.
    Faults: when the SuperLink dies (or the ServerApp fails) before the last round, the SuperLink is
    started again on its database and the run resumed from its checkpoint, at most `max_restarts` times;
    a SuperNode that dies is recorded and the run goes on when `min-nodes` is below the number of sites
    (the ServerApp then decides each round with whoever answers), otherwise the run stops.
    `node_config`: extra node-config entries per site, e.g. {"bccd": {"extra-data-roots": "/x,/y"}}.
    """
    t0 = time.time()
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("no sites given")
    source = DataRoot(resolve_data_root(data_root))
    missing = sorted(set(sites) - set(source.sites))
    if missing:
        raise DataError(f"{source.root}: no site(s) {missing}; present: {list(source.sites)}")
    workdir = Path(workdir).expanduser().resolve()
    run_dir = workdir / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    config = build_run_config(
        run_config,
        **{
            "registry": str(Path(registry).expanduser().resolve()),
            "run-dir": str(run_dir),
            "min-nodes": len(sites),
            "parity-images": str(source.root),
        },
    )
    settings = RunSettings.from_run_config(config)
    limit = timeout or settings.num_server_rounds * 2 * settings.round_timeout + 300

    result = FederationResult(None, "not-started", 0.0, run_dir, workdir)
    with _sigterm_as_interrupt(), _exclusive(workdir):
        site_roots = {site: materialize_site(source, site, workdir / "sites" / site) for site in sites}
        # Each site's own cache of its frozen trunk's outputs (federation.site_cache), kept across runs.
        node_config = {
            site: {"cache-dir": str(workdir / "site-cache" / site), **(node_config or {}).get(site, {})}
            for site in sites
        }
        run_dir.mkdir(parents=True)
        config_file = run_dir / "run-config.toml"
        config_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
        deployment = LocalDeployment(
            site_roots, workdir, log_dir=run_dir / "logs", insecure=insecure, auth=auth, node_config=node_config
        )
        result.logs = {**deployment.logs, "flwr-run": run_dir / "flwr-run.log"}
        try:
            with deployment:
                _run_with_restarts(deployment, config_file, config, settings, limit, show_progress, max_restarts, result)
        except KeyboardInterrupt as exc:
            result.error = f"interrupted ({exc or 'Ctrl-C'}); all Flower processes stopped"
            result.status = "interrupted"
        except (FederationError, subprocess.TimeoutExpired, TimeoutError) as exc:
            result.error = str(exc)
    result.wall_seconds = time.time() - t0
    _collect(result)
    if result.error is None and result.status != "finished:completed":
        result.error = _failure_reason(result)
    return result


def _run_with_restarts(
    deployment: LocalDeployment,
    config_file: Path,
    config: dict[str, Any],
    settings: RunSettings,
    limit: float,
    show_progress: bool,
    max_restarts: int,
    result: FederationResult,
) -> None:
    from federation.resume import Checkpoint

    run_dir = Path(settings.run_dir)
    deadline = time.time() + limit
    restarts = 0
    while True:
        try:
            result.run_id, result.status = _submit_and_follow(
                deployment, config_file, run_dir, settings, deadline - time.time(), show_progress, result
            )
            if result.status == "finished:completed":
                return
            why = f"run {result.run_id} ended {result.status}"
        except SuperLinkDied as exc:
            why = str(exc)
        checkpoint = Checkpoint.load(run_dir)
        resumable = checkpoint is not None and checkpoint.completed_rounds < settings.num_server_rounds
        if restarts >= max_restarts or not resumable:
            if isinstance(result.status, str) and result.status.startswith("finished"):
                return  # the failure reason comes from the event log
            raise FederationError(f"{why}; not resumed ({'no restarts left' if resumable else 'nothing to resume'})")
        restarts += 1
        assert checkpoint is not None
        result.faults.append(
            f"{why}; restart {restarts}: resuming after round {checkpoint.completed_rounds} "
            f"(last accepted round {checkpoint.accepted_round})"
        )
        if deployment.superlink is None or not deployment.superlink.running:
            deployment.restart_superlink()
        config_file = run_dir / f"run-config-resume-{restarts}.toml"
        config_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in {**config, "resume": True}.items()))


def _submit_and_follow(
    deployment: LocalDeployment,
    config_file: Path,
    run_dir: Path,
    settings: RunSettings,
    limit: float,
    show_progress: bool,
    result: FederationResult | None = None,
) -> tuple[int | None, str]:
    log_path = run_dir / "flwr-run.log"
    argv = [
        str(_BIN / "flwr"),
        "run",
        str(PROJECT_ROOT),
        CONNECTION,
        "--stream",
        "--run-config",
        str(config_file),
    ]
    client = ManagedProcess(
        "flwr-run", argv, cwd=deployment.cli_home, env=deployment.env(deployment.cli_home), log=log_path
    )
    _LIVE.append(client)
    deadline = time.time() + limit
    try:
        from federation.progress import ProgressView

        view = ProgressView(
            settings.num_server_rounds, [n.site for n in deployment.nodes], enabled=show_progress
        )
        follower = ev.EventFollower(run_dir / ev.EVENTS_FILE)
        with view:
            lost: set[str] = set()
            known = set(result.flower_runs) if result is not None else set()
            while client.running:
                view.update(follower.poll())
                run_id = _run_id_from_log(log_path) if result is not None else None
                if run_id is not None and run_id not in known:  # recorded even if the SuperLink dies later
                    known.add(run_id)
                    result.flower_runs.append(run_id)  # type: ignore[union-attr]
                if deployment.superlink is None or not deployment.superlink.running:
                    raise SuperLinkDied(f"the SuperLink exited during the run; see {deployment.log_dir}")
                dead = [
                    n.site
                    for n in deployment.nodes
                    if any(q is not None and not q.running for q in (n.process, n.launcher))
                ]
                if dead and settings.min_nodes >= len(deployment.nodes):  # no site may be missed
                    raise FederationError(
                        f"SuperNode(s) for {', '.join(dead)} exited during the run and min-nodes is "
                        f"{settings.min_nodes}; see {deployment.log_dir}"
                    )
                for site in set(dead) - lost:
                    lost.add(site)
                    if result is not None:
                        result.faults.append(f"SuperNode for {site} exited during the run; going on without it")
                if time.time() > deadline:
                    raise FederationError(f"the run took longer than {limit:.0f} s; stopped")
                time.sleep(0.5)
            view.update(follower.poll())
        if deployment.superlink is None or not deployment.superlink.running:
            raise SuperLinkDied(f"the SuperLink exited during the run; see {deployment.log_dir}")
        run_id = _run_id_from_log(log_path)
        if run_id is None:
            raise FederationError(f"`flwr run` did not start a run; see {log_path}")
        if result is not None and run_id not in result.flower_runs:
            result.flower_runs.append(run_id)
        status = _final_status(deployment, run_id, deadline)
        view.finish(status)
        return run_id, status
    finally:
        client.stop(grace=5)
        _forget(client)


def _run_id_from_log(log_path: Path) -> int | None:
    found = re.findall(r"Successfully started run (\d+)", log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None  # the log is appended to by every submission


def _final_status(deployment: LocalDeployment, run_id: int, deadline: float) -> str:
    """`flwr run --stream` can return before the SuperLink marks the run finished: poll `flwr ls`."""
    status = "unknown"
    while time.time() < deadline:
        data = deployment.flwr_json("ls", CONNECTION, "--run-id", str(run_id))
        runs = data.get("runs") or []
        if runs:
            status = str(runs[0].get("status", "unknown"))
            details = runs[0].get("status-details")
            if status.startswith("finished"):
                return (
                    f"{status}: {details}"
                    if status != "finished:completed" and details not in (None, "N/A")
                    else status
                )
        time.sleep(1.0)
    return status


def _collect(result: FederationResult) -> None:
    from federation.rounds import ROUNDS_DIR

    rounds_dir = result.run_dir / ROUNDS_DIR
    result.rounds = [json.loads(p.read_text()) for p in sorted(rounds_dir.glob("round-*.json"))]
    result.registered = [
        {"round": r["round"], "version": r["publish"]["version"], "path": r["publish"]["path"]}
        for r in result.rounds
        if (r.get("publish") or {}).get("status") == "registered"
    ]


def _failure_reason(result: FederationResult) -> str:
    for event in reversed(ev.read_events(result.run_dir / ev.EVENTS_FILE)):
        if event.get("kind") == ev.RUN_FAILED:
            return f"ServerApp failed: {event.get('error')}"
    return f"run status {result.status}; see {result.logs.get('flwr-run')}"
