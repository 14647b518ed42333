"""A Flower `Grid` that delivers each message to an in-process ClientApp, one per simulated site.

Why: the deployment (SuperLink + SuperNodes, `federation.deploy`) costs ~20-30 s of fixed Flower work per
train/evaluate step on this machine, so a benchmark grid of strategies x backbones x seeds would spend
most of its time polling. Flower's own simulation engine needs Ray (not installed, heavy). This grid
keeps everything that decides the result: the server side is Flower's `Strategy.start` loop with our
strategy classes (`federation.strategies.make_strategy`), the messages are Flower `Message`s carrying
`ArrayRecord`/`MetricRecord`/`ConfigRecord`, and each site is a Flower `ClientApp` called with its own
`Context` (node config: site name and data). Only the transport is replaced by a function call. Sites run
one after another; a handler exception becomes an error reply, as in a deployment.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Mapping
from typing import Self
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1
# Flower's error code for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 300
_IDENTITY = ("_run_id", "_node_id", "_task_id")


class LocalGrid(Grid):
    def __init__(self, apps: Mapping[int, ClientApp], node_configs: Mapping[int, dict], run_config: dict):
        if set(apps) != set(node_configs):
            raise ValueError("every node needs both a ClientApp and a node config")
        self.apps = dict(apps)
        self.contexts = {
            node_id: Context(RUN_ID, node_id, dict(node_configs[node_id]), RecordDict(), dict(run_config))
            for node_id in apps
        }
        self._replies: dict[str, Message] = {}
        self._run = None
        self._saved_identity: tuple | None = None
        self.messages_sent = 0

    # ---- the process's task identity, while the run lasts ------------------------------------------------
    def __enter__(self) -> Self:
        """Flower's Message constructor reads the process's task identity, which a flwr-serverapp process
        gets from the SuperLink; in-process, this process is the server of run RUN_ID until exit."""
        self._saved_identity = tuple(getattr(TaskIdentity, a) for a in _IDENTITY)
        for attr, value in zip(_IDENTITY, (RUN_ID, SUPERLINK_NODE_ID, 0)):
            setattr(TaskIdentity, attr, value)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved_identity is not None:
            for attr, value in zip(_IDENTITY, self._saved_identity):
                setattr(TaskIdentity, attr, value)

    # ---- Grid API ----------------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            node_id = int(msg.metadata.dst_node_id)
            if node_id not in self.apps:
                raise ValueError(f"no node {node_id}")
            self._replies[msg.metadata.message_id] = self._deliver(msg, node_id)
            self.messages_sent += 1
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # ---- delivery ----------------------------------------------------------------------------------
    def _deliver(self, msg: Message, node_id: int) -> Message:
        try:
            reply = self.apps[node_id](msg, self.contexts[node_id])
        except Exception as exc:  # noqa: BLE001 - becomes an error reply, like a deployment's
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        return reply
