"""A warm launcher for ClientApps: Flower's own SuperExec loop, with a fork instead of a new interpreter.

With `flower-supernode --isolation subprocess` (the default) the SuperNode starts `flower-superexec`, which
starts a fresh `flwr-clientapp` process for every message; each one imports torch, torchvision and timm
again (12–16 s here with three sites on two cores, most of a small round). Flower 1.42 has no long-lived
ClientApp, but it has `--isolation process`: the SuperNode serves its Runtime API and leaves launching to an
outside process. This module is that process:

    flower-supernode ... --isolation process --port 9095
    python -m federation.warm_exec --runtime-api-address 127.0.0.1:9095 --insecure --parent-pid <supernode pid>

It imports the heavy third-party libraries once (`PRELOAD`, never the app itself: the app still comes from
the run's FAB, fresh for every message), then runs Flower's `run_superexec` loop unchanged except for the
executor: each ClientApp task is `os.fork()`ed from the warm parent and runs Flower's own `run_clientapp`
with the task's token. Every message still gets its own process (nothing is shared between rounds, a crash
still stays in its process); only the imports are inherited. The parent never runs a torch operation, so
no thread pool exists to be broken by the fork. Polling for tasks is every 0.2 s instead of 1 s.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback

PRELOAD = ("numpy", "PIL.Image", "scipy.ndimage", "torch", "torchvision.transforms.v2", "timm")
POLL_INTERVAL_S = "0.2"


class ForkExecutor:
    """Flower's executor interface (`flwr.supercore.superexec.executor.types.Executor`) for ClientApps."""

    def __init__(self) -> None:
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        from flwr.supercore.constant import TaskType

        return set(supported_task_types) & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.superexec.executor import LaunchResult

        pid = os.fork()
        if pid == 0:  # the child: one ClientApp task, then exit without running the parent's handlers
            os._exit(_run_task(spec))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while self.children and time.time() < deadline:
            self.reconcile()
            time.sleep(0.1)


def _run_task(spec) -> int:
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # run_clientapp installs its own
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
        return 0
    except SystemExit as exc:  # Flower ends the task with sys.exit(code)
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the SuperNode's log, then the child exits
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    t0 = time.time()
    for name in modules:
        importlib.import_module(name)
    return time.time() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (loopback only)")
    parser.add_argument("--root-certificates", default=None, help="CA of the SuperNode's Runtime API TLS")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    args = parser.parse_args(argv)

    seconds = preload()
    print(f"warm_exec: preloaded {', '.join(PRELOAD)} in {seconds:.1f} s", flush=True)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", POLL_INTERVAL_S)

    flower_loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    executor = ForkExecutor()
    flower_loop.get_executor = lambda *a, **k: executor  # the one substitution; the loop is Flower's
    flower_loop.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
