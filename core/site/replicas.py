"""The replicated Redis of ``mailyard site up --redis-replicas N`` as the site sees it: what each
member (data node or Sentinel) is doing now, whether it is ready, and where the group's
layout is kept between runs.

**Ready** means the group can lose its primary: the Sentinels that answer all name the same
primary, each knows the other Sentinels and every running replica (so that a failover can be
agreed), the primary says it is one and has every running replica connected, and each
replica follows it with its link up. ``look`` reads it live (``INFO replication`` of each
node, ``SENTINEL MASTER`` of each Sentinel): the runner, for its readiness and its state
file, and ``mailyard site status``, for what it shows.

**Layout.** The ports of the members are in site.json (``redis_group``), so that a site
started again from the same data directory finds its nodes' data and its Sentinels' files
where they were and on the ports the Sentinels know them by. A site that ran with one Redis
(``<data>/redis/appendonlydir``) and is started with replicas moves that AOF into node 0,
which starts as the primary: its mail is kept. The way back (a group's data, and a start
without ``--redis-replicas``) is refused, as a single Redis would not see that mail.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from mailyard import redisconn
from mailyard.errors import SiteError
from mailyard.site import redis_group, redis_server
from mailyard.site.redis_group import Layout

STATE_KEY = "redis_group"
PRIMARY, REPLICA = "primary", "replica"


def node_name(i: int) -> str:
    return f"redis-{i}"


def sentinel_name(j: int) -> str:
    return f"sentinel-{j}"


@dataclass
class NodeView:
    answers: bool = False
    replication: str | None = None  # PRIMARY, REPLICA, or None (not answering)
    master_port: int | None = None  # a replica's primary
    link_up: bool = False  # a replica's link to its primary
    online_replicas: list[int] = field(default_factory=list)  # a primary's connected replicas (ports)


@dataclass
class SentinelView:
    answers: bool = False
    primary: tuple[str, int] | None = None
    replicas_known: int = 0
    sentinels_known: int = 0  # the other Sentinels it knows of
    problem: str = ""  # why it did not answer


@dataclass
class GroupView:
    layout: Layout
    nodes: list[NodeView]
    sentinels: list[SentinelView]

    def named_primary(self) -> int | None:
        """The node every answering Sentinel names primary (None: none answers, or they differ)."""
        named = {s.primary for s in self.sentinels if s.answers}
        if len(named) != 1:
            return None
        (found,) = named
        return None if found is None else self.layout.node_of(*found)

    def node_problem(self, i: int, running: list[int]) -> str | None:
        """Why node ``i`` is not ready (None: it is); ``running``: the nodes whose process runs."""
        node, primary = self.nodes[i], self.named_primary()
        if not node.answers:
            return "not answering yet (starting, or loading its data)"
        if primary is None:
            return self._no_primary()
        if i == primary:
            if node.replication != PRIMARY:
                return "the Sentinels name it primary, but it is not one (yet)"
            ports = [self.layout.node_ports[k] for k in running if k != i]
            missing = [node_name(self.layout.node_ports.index(p)) for p in ports if p not in node.online_replicas]
            return f"replicas not connected yet: {', '.join(missing)}" if missing else None
        want = self.layout.node_ports[primary]
        if node.replication != REPLICA or node.master_port != want:
            return f"not a replica of the primary {node_name(primary)} yet"
        return None if node.link_up else f"its link to the primary {node_name(primary)} is down (syncing?)"

    def sentinel_problem(self, j: int, running_nodes: list[int]) -> str | None:
        s = self.sentinels[j]
        if not s.answers:
            return f"not answering yet ({s.problem})" if s.problem else "not answering yet"
        primary = self.named_primary()
        if primary is None:
            return self._no_primary()
        if s.sentinels_known < len(self.sentinels) - 1:
            return f"knows {s.sentinels_known} of the other {len(self.sentinels) - 1} Sentinels yet"
        replicas = len([k for k in running_nodes if k != primary])
        if s.replicas_known < replicas:
            return f"knows {s.replicas_known} of the {replicas} replicas yet"
        return None

    def _no_primary(self) -> str:
        named = sorted({_address(s.primary) for s in self.sentinels if s.answers})
        if not named:
            return "no Sentinel answers"
        return f"the Sentinels do not agree on a primary ({', '.join(named)})"

    def node_of_address(self, address: tuple[str, int] | None) -> str | None:
        if address is None:
            return None
        i = self.layout.node_of(*address)
        return node_name(i) if i is not None else _address(address)


def _address(address: tuple[str, int] | None) -> str:
    return "none" if address is None else f"{address[0]}:{address[1]}"


def look(layout: Layout, password: str | None) -> GroupView:
    """What every member of the group says now."""
    nodes = [_node(redis_group.replication(layout.node_url(i, password))) for i in range(len(layout.node_ports))]
    return GroupView(layout, nodes, [_sentinel(layout, port, password) for port in layout.sentinel_ports])


def _node(info: dict[str, str]) -> NodeView:
    if not info:
        return NodeView()
    if info.get("role") == "master":
        online = []
        for key, value in info.items():
            if key.startswith("slave") and key[5:].isdigit():
                fields = _replica_fields(value)
                if fields.get("state") == "online" and fields.get("port", "").isdigit():
                    online.append(int(fields["port"]))
        return NodeView(True, PRIMARY, online_replicas=online)
    port = info.get("master_port", "")
    return NodeView(True, REPLICA, int(port) if port.isdigit() else None, info.get("master_link_status") == "up")


def _replica_fields(value: str) -> dict[str, str]:
    """A primary's ``slaveN`` line of INFO: ``ip=...,port=...,state=online,...`` as Redis sends
    it, or the dict redis-py parsed it into, as text (``{'ip': ..., 'port': ...}``)."""
    if value.startswith("{"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return {}
        return {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}
    return dict(part.split("=", 1) for part in value.split(",") if "=" in part)


def _sentinel(layout: Layout, port: int, password: str | None) -> SentinelView:
    client = redis.Redis(host=layout.host, port=port, password=password or None, socket_timeout=1,
                         socket_connect_timeout=1, retry=redis_group.NO_RETRY)
    try:
        state: Any = client.sentinel_master(layout.service, return_responses=True)
    except redis.RedisError as exc:
        return SentinelView(problem=f"{type(exc).__name__}: {exc}")
    finally:
        client.close()
    if not isinstance(state, dict):
        return SentinelView(problem="no answer to SENTINEL MASTER")
    return SentinelView(True, (redisconn.text(state.get("ip", "")), int(state.get("port", 0))),
                        int(state.get("num-slaves", 0)), int(state.get("num-other-sentinels", 0)))


# region: the layout between runs


def previous_ports(data_dir: Path) -> tuple[list[int], list[int]]:
    """The nodes' and Sentinels' ports of the group as site.json last had them ([] for none)."""
    try:
        group = json.loads((data_dir / "site.json").read_text()).get(STATE_KEY) or {}
        return [int(p) for p in group.get("nodes", [])], [int(p) for p in group.get("sentinels", [])]
    except (OSError, ValueError, TypeError, AttributeError):
        return [], []


def state_of(layout: Layout) -> dict[str, Any]:
    return {"service": layout.service, "root": str(layout.root), "nodes": list(layout.node_ports),
            "sentinels": list(layout.sentinel_ports)}


def group_data(root: Path) -> list[Path]:
    """The node directories under ``root`` that hold an AOF."""
    found = []
    for d in sorted(root.glob("node-*")):
        layout = Layout(d.parent, [], [])
        if d.name.removeprefix("node-").isdigit() and redis_group.has_data(layout, int(d.name[5:])):
            found.append(d)
    return found


def adopt_single_redis(root: Path) -> bool:
    """Move the AOF of the site's former single Redis (``root/appendonlydir``) into node 0 when
    no node has data yet: the group starts with the site's mail. Returns whether it moved."""
    single = [p for p in (root / "appendonlydir", root / "appendonly.aof") if p.exists()]
    if not single or group_data(root):
        return False
    node0 = root / "node-0"
    redis_server.make_data_dir(node0)
    for path in single:
        target = node0 / path.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        path.rename(target)
    return True


def refuse_single_over_group(root: Path) -> None:
    """A single Redis would start empty beside the group's data: refuse, and say what to do."""
    found = group_data(root)
    if found:
        raise SiteError(
            f"this site's mail is in a replicated Redis ({', '.join(str(d) for d in found)}): start it with "
            "--redis-replicas N as before (a single Redis would start empty beside it)")


# endregion
