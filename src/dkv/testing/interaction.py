"""Readable Raft scenarios: a tiny command language and a textual rendering of what nodes did.

In the spirit of etcd-io/raft's datadriven "interaction" tests. A scenario file
(``tests/raft/testdata/*.txt``) is a sequence of commands, each followed by ``----`` and the
output it must produce::

    # Raft §5.2: a candidate that receives votes from a majority becomes leader.
    add-nodes 3 voters=1,2,3
    ----
    1: follower term=1 vote=0 lead=0 last=1 commit=1 applied=1 Voters:[1 2 3] (voter)
    ...

    campaign 1
    ----
    1 became pre-candidate at term 1

Lines starting with ``#`` and blank lines between commands are kept verbatim. An output ends at
the first blank line; an empty output is written ``ok``. In rewrite mode (``pytest
--rewrite`` or ``DKV_REWRITE=1``) the outputs are regenerated in place; otherwise a mismatch
fails with a unified diff naming the file and line of the command.

Rendering. ``t/i`` is an entry's term and index; ``1->2`` a message from 1 to 2. Messages show
the fields their type uses: ``MsgApp Term:2 Log:1/3 Commit:3 Entries:[2/4 EntryNormal "put k
v"]`` (``Log`` is the entry preceding ``Entries``), ``MsgVote Term:2 Log:1/3`` (the candidate's
last entry; ``Transfer`` when caused by TimeoutNow), ``MsgAppResp Term:2 Index:4``, or
``Index:4 Rejected Hint:1/3`` (the follower's hint for fast backtracking), ``MsgSnap`` with
one chunk, ``MsgHeartbeat Term:2 Tick:7 Commit:4`` (``Tick`` is the leader's tick count when
it sent the heartbeat, echoed by ``MsgHeartbeatResp``: it times the leader lease),
``Ctx:"r1"`` for a ReadIndex request id; any other field a message sets is appended as
``field=value``. ``> N handling Ready`` prints a Ready in the order a host obeys it
(``HardState``, ``Entries`` and ``Snapshot`` to persist, ``Messages`` to send,
``CommittedEntries`` to apply, ``ReadStates``), then what applying it did. ``> N receiving
messages`` lists the messages stepped into N, each followed by what it caused (a role or term
change, an error, a log line). ``> dropped (reason)`` lists messages lost in the network.

Commands (``<n>`` a node id, ``[..]`` optional; lists are comma-separated, e.g. ``1,2,3``):

Cluster and time
  ``add-nodes <count> [voters=..] [learners=..] [option=value ...]``
      Add nodes with the next ids. With ``voters``/``learners`` they are bootstrapped members
      of that configuration (``MemoryStorage``'s bootstrap: a snapshot 1/1 carrying it, hard
      state term 1, commit 1; so the first election is for term 2). Without, they start empty
      and learn the configuration from the leader (a joining node): the leader's log starts
      after the bootstrap snapshot, so the newcomer receives that snapshot first. Options:
      ``pre-vote``, ``check-quorum``, ``lease-reads``, ``forwarding``, ``step-down-on-removal``
      (true/false; defaults true, true, false, true, true), ``election`` (ticks, default 3),
      ``heartbeat`` (ticks, default 1), ``max-msg-bytes``, ``max-inflight``, ``chunk-bytes``
      (InstallSnapshot chunk size), ``max-uncommitted-bytes``, ``snapshot-every`` (host takes a
      snapshot every N applied entries, default 0 = never) and ``compact-keep`` (entries kept
      behind such a snapshot, default 5).
  ``set-log <n> ... entry-terms=1,1,4 [term=T] [vote=V] [commit=C]``
      Replace each n's persisted log (after its snapshot) by entries of the given terms, set
      its hard state (term defaults to the last entry's term, commit to the snapshot index),
      and restart n. Builds the figures of the Raft paper; after the bootstrap snapshot 1/1
      the first entry is at index 2, one more than in the figures. Entry data is
      ``put x t<term>``.
  ``tick-election [<n> ...]``  each node ticks ``election`` times: a leader runs CheckQuorum
      once; a follower's memory of its leader expires (thesis §4.2.3), but its own randomized
      timer does not fire (the driver's dice draw timeouts in ``(T, 2T)``, never exactly ``T``).
  ``tick-until-campaign <n> ...``  each node ticks until its randomized election timer fires
      (at most ``2*election`` ticks); independent of the random draw.
  ``tick-heartbeat [<n> ...]``  each node ticks ``heartbeat`` times.
  ``tick [<n> ...] count=N``  each node ticks N times.
  ``crash <n> ...`` / ``restart <n> ...``  lose volatile state / restart from storage.
  ``compact <n> [index]``  the host snapshots its state machine at its applied index and
      discards log entries up to ``index`` (default: the applied index).
  ``log-level debug|info|warning|none``  which core log lines are printed (default warning).

Local requests (errors are printed as ``error: <Type>: <message>``)
  ``campaign <n>``  start an election now (what the election timer does).
  ``propose <n> key=value ...``  propose puts (several pairs: one batch).
  ``propose-conf-change <n> add-voter|add-learner|remove <id>``
  ``transfer-leadership from=<n> to=<m>``
  ``read-index <n> <ctx>``  a linearizable read; a ReadState with ctx appears in a Ready.

Network
  ``process-ready [<n> ...]``  handle one Ready of each node (persist, apply, queue messages).
  ``deliver-msgs [<n> ...] [from=..] [type=MsgApp,..]``  deliver queued messages to the nodes
      (default all) that match; the others stay queued.
  ``drop-msgs [<n> ...] [from=..] [type=..]``  drop queued messages that match.
  ``stabilize [<n> ...] [quiet=true]``  process Readys and deliver messages until nothing is
      left to do; ``quiet=true`` prints nothing (for set-up steps that are not the point).
  ``partition 1 | 2 3``  only nodes in the same group can talk; unnamed nodes are isolated.
      Messages across groups or to a crashed node are dropped when delivered.
  ``isolate <n>``  partition n from everyone else.  ``heal``  remove the partition.

Inspection
  ``raft-state``  one line per node.  ``status <n>``  a node's Status with its progress map.
  ``raft-log <n>``  entries of n's log.  ``log-terms [<n> ...]``  terms of each log, like the
  paper's figures.  ``kv <n>``  the state machine's data.  ``msgs``  the queued messages.
  ``serve-reads <n> ...``  the host serves the ReadStates whose index it has applied, printing
  what each read returns (the whole KV map), and lists those still waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import itertools
import json
import random
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from dkv.errors import DkvError
from dkv.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RawNode,
    ReadOnlyOption,
    ReadState,
    Ready,
    Role,
    Snapshot,
)
from dkv.testing.memhost import MemoryHost, encode_command

__all__ = [
    "Arg",
    "Block",
    "Command",
    "Interaction",
    "ScenarioError",
    "format_entry",
    "format_message",
    "format_ready",
    "parse_scenario",
    "render_scenario",
    "run_scenario_file",
]

SEPARATOR: Final = "----"
DEFAULT_ELECTION_TICKS: Final = 3
DEFAULT_HEARTBEAT_TICKS: Final = 1
# Bound on rounds of ``stabilize``: a livelock must fail the scenario, not hang it.
MAX_STABILIZE_ROUNDS: Final = 1000


class ScenarioError(Exception):
    """The scenario file is malformed or misuses a command (a bug in the test, not in Raft)."""


# ----------------------------------------------------------------------------------------------
# The file format


@dataclass(frozen=True, slots=True)
class Arg:
    """One word of a command line: ``value`` alone, or ``key=value``."""

    key: str | None
    value: str


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command line; ``line`` is its 1-based line number in the file."""

    name: str
    args: tuple[Arg, ...]
    line: int
    text: str

    def positional(self) -> list[str]:
        return [a.value for a in self.args if a.key is None]

    def keywords(self, allowed: Sequence[str]) -> dict[str, str]:
        """The ``key=value`` arguments, rejecting keys outside ``allowed`` (typo protection)."""
        out: dict[str, str] = {}
        for a in self.args:
            if a.key is None:
                continue
            if a.key not in allowed:
                raise ScenarioError(
                    f"{self.name}: unknown argument {a.key!r} (allowed: {', '.join(allowed)})"
                )
            out[a.key] = a.value
        return out


@dataclass(slots=True)
class Block:
    """A command with the lines before it (comments, blank lines) and its expected output.

    ``expected`` is None when the command has no ``----`` yet (a freshly written command; the
    rewrite mode fills it in)."""

    prelude: list[str]
    command: Command
    expected: list[str] | None


def _parse_command(text: str, line: int) -> Command:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ScenarioError(f"line {line}: cannot parse {text!r}: {exc}") from exc
    args: list[Arg] = []
    for w in words[1:]:
        key, eq, value = w.partition("=")
        args.append(Arg(key, value) if eq and key else Arg(None, w))
    return Command(words[0], tuple(args), line, text)


def parse_scenario(text: str) -> tuple[list[Block], list[str]]:
    """Split a scenario file into blocks, plus the lines after the last block."""
    lines = text.splitlines()
    blocks: list[Block] = []
    prelude: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if not ln.strip() or ln.lstrip().startswith("#"):
            prelude.append(ln)
            i += 1
            continue
        if ln == SEPARATOR:
            raise ScenarioError(f"line {i + 1}: {SEPARATOR} without a command")
        cmd = _parse_command(ln, i + 1)
        i += 1
        expected: list[str] | None = None
        if i < len(lines) and lines[i] == SEPARATOR:
            i += 1
            expected = []
            while i < len(lines) and lines[i].strip():
                expected.append(lines[i])
                i += 1
        blocks.append(Block(prelude, cmd, expected))
        prelude = []
    return blocks, prelude


def render_scenario(blocks: Sequence[Block], outputs: Sequence[str], trailing: list[str]) -> str:
    """The file text with ``outputs`` as the blocks' outputs (the inverse of parsing)."""
    out: list[str] = []
    for block, output in zip(blocks, outputs, strict=True):
        out.extend(block.prelude)
        out.append(block.command.text)
        out.append(SEPARATOR)
        out.extend(output.splitlines())
    out.extend(trailing)
    return "\n".join(out) + "\n"


def run_scenario_file(path: Path, rewrite: bool = False, seed: int = 0) -> None:
    """Run one scenario file. Raises AssertionError with a readable diff on a mismatch; in
    ``rewrite`` mode writes the actual outputs into the file instead."""
    text = path.read_text()
    blocks, trailing = parse_scenario(text)
    env = Interaction(seed=seed)
    outputs: list[str] = []
    for block in blocks:
        cmd = block.command
        where = f"{path}:{cmd.line}: {cmd.text}"
        try:
            outputs.append(env.run(cmd))
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {exc}") from exc
        except BaseException as exc:
            exc.add_note(f"while running {where}")
            raise
    actual = render_scenario(blocks, outputs, trailing)
    if rewrite:
        if actual != text:
            path.write_text(actual)
        return
    if actual == text:
        return
    problems: list[str] = []
    for block, output in zip(blocks, outputs, strict=True):
        got = output.splitlines()
        if block.expected == got:
            continue
        cmd = block.command
        if block.expected is None:
            problems.append(f"{path}:{cmd.line}: `{cmd.text}` has no expected output")
            continue
        diff = difflib.unified_diff(
            block.expected,
            got,
            fromfile=f"{path}:{cmd.line} `{cmd.text}` (expected)",
            tofile="actual",
            lineterm="",
        )
        problems.append("\n".join(diff))
    if not problems:  # only whitespace between blocks differs
        problems.append(
            "\n".join(difflib.unified_diff(text.splitlines(), actual.splitlines(), lineterm=""))
        )
    shown = problems[:3]
    more = f"\n... and {len(problems) - 3} more differing commands" if len(problems) > 3 else ""
    raise AssertionError(
        f"scenario {path} differs from its expected output "
        f"(rerun with --rewrite or DKV_REWRITE=1 to accept):\n\n" + "\n\n".join(shown) + more
    )


# ----------------------------------------------------------------------------------------------
# Rendering

_MSG_NAMES: Final[dict[MessageType, str]] = {
    MessageType.HUP: "MsgHup",
    MessageType.BEAT: "MsgBeat",
    MessageType.PROP: "MsgProp",
    MessageType.APP: "MsgApp",
    MessageType.APP_RESP: "MsgAppResp",
    MessageType.VOTE: "MsgVote",
    MessageType.VOTE_RESP: "MsgVoteResp",
    MessageType.SNAP: "MsgSnap",
    MessageType.HEARTBEAT: "MsgHeartbeat",
    MessageType.HEARTBEAT_RESP: "MsgHeartbeatResp",
    MessageType.UNREACHABLE: "MsgUnreachable",
    MessageType.SNAP_STATUS: "MsgSnapStatus",
    MessageType.CHECK_QUORUM: "MsgCheckQuorum",
    MessageType.TRANSFER_LEADER: "MsgTransferLeader",
    MessageType.TIMEOUT_NOW: "MsgTimeoutNow",
    MessageType.READ_INDEX: "MsgReadIndex",
    MessageType.READ_INDEX_RESP: "MsgReadIndexResp",
    MessageType.PRE_VOTE: "MsgPreVote",
    MessageType.PRE_VOTE_RESP: "MsgPreVoteResp",
    MessageType.SNAP_RESP: "MsgSnapResp",
}
_MSG_BY_NAME: Final = {v: k for k, v in _MSG_NAMES.items()}

_CC_NAMES: Final[dict[ConfChangeType, str]] = {
    ConfChangeType.ADD_NODE: "add-voter",
    ConfChangeType.ADD_LEARNER: "add-learner",
    ConfChangeType.REMOVE_NODE: "remove",
}
_CC_BY_NAME: Final = {v: k for k, v in _CC_NAMES.items()}


def _ids(ids: Sequence[int]) -> str:
    return "[" + " ".join(str(i) for i in ids) + "]"


def format_conf(cs: ConfState) -> str:
    """``Voters:[1 2 3]``, with ``Learners:[4]`` when there are learners."""
    s = f"Voters:{_ids(cs.voters)}"
    return s + (f" Learners:{_ids(cs.learners)}" if cs.learners else "")


def _entry_payload(e: Entry) -> str:
    if e.type is EntryType.CONF_CHANGE:
        try:
            cc = ConfChange.decode(e.data)
        except DkvError:
            return repr(e.data)
        return f'"{_CC_NAMES[cc.type]} {cc.node_id}"'
    if not e.data:
        return '""'
    try:
        decoded = json.loads(e.data)
    except ValueError:
        return repr(e.data)
    if isinstance(decoded, list) and len(decoded) >= 2:
        # [op_id, op, key, *args]: the op id is bookkeeping, leave it out.
        return '"' + " ".join(str(w) for w in decoded[1:]) + '"'
    return repr(e.data)


def format_entry(e: Entry) -> str:
    """``1/4 EntryNormal "put k v"``: term/index, type, and the command it carries."""
    kind = "EntryConfChange" if e.type is EntryType.CONF_CHANGE else "EntryNormal"
    return f"{e.term}/{e.index} {kind} {_entry_payload(e)}"


def _format_entries(ents: Sequence[Entry]) -> str:
    return "[" + ", ".join(format_entry(e) for e in ents) + "]"


def _ctx(b: bytes) -> str:
    return f'"{b.decode(errors="backslashreplace")}"'


def format_message(m: Message) -> str:
    """One message on one line, e.g. ``1->2 MsgApp Term:1 Log:1/3 Commit:3 Entries:[...]``.

    Each type shows the fields it uses; any other field that is set is appended as
    ``field=value``, so nothing a message carries is ever hidden."""
    t = m.type
    parts = [f"{m.frm}->{m.to} {_MSG_NAMES[t]} Term:{m.term}"]
    shown = {"type", "frm", "to", "term"}

    def show(text: str, *fields: str) -> None:
        parts.append(text)
        shown.update(fields)

    if t in (MessageType.APP, MessageType.VOTE, MessageType.PRE_VOTE):
        show(f"Log:{m.log_term}/{m.index}", "log_term", "index")
    if t in (MessageType.HEARTBEAT, MessageType.HEARTBEAT_RESP):
        show(f"Tick:{m.index}", "index")  # the leader's tick count: times its lease
    if t in (MessageType.APP, MessageType.HEARTBEAT):
        show(f"Commit:{m.commit}", "commit")
    if t in (MessageType.APP_RESP, MessageType.READ_INDEX_RESP, MessageType.SNAP_RESP):
        show(f"Index:{m.index}", "index")
    if m.entries:
        show(f"Entries:{_format_entries(m.entries)}", "entries")
    if m.snapshot is not None:
        c = m.snapshot
        meta = c.metadata
        show(
            f"Snapshot:[{meta.term}/{meta.index} {format_conf(meta.conf_state)} "
            f"Offset:{c.offset} Len:{len(c.data)} Total:{c.total_bytes} "
            f"Done:{str(c.done).lower()}]",
            "snapshot",
        )
        if m.index == meta.index:
            shown.add("index")  # the snapshot's index, already shown
    if m.reject:
        show("Rejected", "reject")
        if t is MessageType.APP_RESP:
            show(f"Hint:{m.log_term}/{m.reject_hint}", "log_term", "reject_hint")
    if t is MessageType.SNAP_RESP and not m.reject:
        show(f"Next:{m.reject_hint}", "reject_hint")
    if m.context:
        if m.context == b"transfer" and t in (MessageType.VOTE, MessageType.PRE_VOTE):
            show("Transfer", "context")
        else:
            show(f"Ctx:{_ctx(m.context)}", "context")
    for f in dataclasses.fields(m):
        if f.name in shown:
            continue
        value = getattr(m, f.name)
        if value != f.default:
            parts.append(f"{f.name}={value!r}")
    return " ".join(parts)


def format_ready(rd: Ready) -> list[str]:
    """The lines describing a Ready: what to persist, send, apply and serve."""
    out = [f"Ready MustSync={str(rd.must_sync).lower()}:"]
    if rd.soft_state is not None:
        out.append(f"Lead:{rd.soft_state.leader_id} State:{rd.soft_state.role.value}")
    if rd.hard_state is not None:
        hs = rd.hard_state
        out.append(f"HardState Term:{hs.term} Vote:{hs.vote} Commit:{hs.commit}")
    if rd.snapshot is not None:
        meta = rd.snapshot.metadata
        out.append(
            f"Snapshot {meta.term}/{meta.index} {format_conf(meta.conf_state)} "
            f"Bytes:{len(rd.snapshot.data)}"
        )
    sections: list[tuple[str, list[str]]] = [
        ("Entries:", [format_entry(e) for e in rd.entries]),
        ("CommittedEntries:", [format_entry(e) for e in rd.committed_entries]),
        ("Messages:", [format_message(m) for m in rd.messages]),
        ("ReadStates:", [_format_read_state(rs) for rs in rd.read_states]),
    ]
    for title, items in sections:
        if items:
            out.append(title)
            out.extend("  " + it for it in items)
    return out


def _format_read_state(rs: ReadState) -> str:
    return f"Index:{rs.index} Ctx:{_ctx(rs.request_ctx)}"


# ----------------------------------------------------------------------------------------------
# The hosts


class _RecordingRawNode(RawNode):
    """A RawNode that remembers the last Ready it handed out, so the driver can print it."""

    last_ready: Ready | None = None

    def ready(self) -> Ready:
        rd = super().ready()
        self.last_ready = rd
        return rd


class _Host(MemoryHost):
    """A MemoryHost whose RawNode records its Readys (MemoryHost consumes them internally)."""

    def start(self) -> None:
        super().start()
        node = self.raw()
        # Same object, one extra behaviour: re-class rather than rebuild, so the core's state
        # (and the RNG draws made while constructing it) stay exactly those of MemoryHost.
        node.__class__ = _RecordingRawNode

    def recorder(self) -> _RecordingRawNode:
        node = self.raw()
        assert isinstance(node, _RecordingRawNode)
        return node


class _Dice(random.Random):
    """The RNG handed to each node: seeded, and ``randrange`` never returns its ``start``.

    The core draws its election timeout as ``T + randrange(0, T)``. Excluding the minimum keeps
    every timeout strictly above ``T``, so ``tick-election`` (T ticks) can expire a follower's
    leader lease (thesis §4.2.3) without ever firing its election timer."""

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        if stop is None or step != 1:
            raise ScenarioError("the driver's dice only support randrange(start, stop)")
        if stop - start <= 1:
            return start
        return super().randrange(start + 1, stop)


_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "none": 100}


class _CaptureLogger:
    """Feeds the core's log lines into the scenario output, filtered by ``log-level``."""

    def __init__(self, env: Interaction) -> None:
        self._env = env

    def _log(self, level: str, msg: str, args: tuple[object, ...]) -> None:
        if _LEVELS[level] >= self._env.log_level:
            self._env.emit(f"{level.upper()} {msg % args if args else msg}")

    def debug(self, msg: str, *args: object) -> None:
        self._log("debug", msg, args)

    def info(self, msg: str, *args: object) -> None:
        self._log("info", msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._log("warning", msg, args)


def _bool(cmd: Command, key: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise ScenarioError(f"{cmd.name}: {key} must be true or false, got {value!r}")
    return value == "true"


def _int(cmd: Command, what: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ScenarioError(f"{cmd.name}: {what} must be an integer, got {value!r}") from exc


def _int_list(cmd: Command, what: str, value: str) -> list[int]:
    value = value.strip("()[]")
    if not value:
        return []
    return [_int(cmd, what, v) for v in value.replace(" ", ",").split(",") if v]


@dataclass(slots=True)
class _NodeOptions:
    config: dict[str, object] = field(default_factory=dict)
    snapshot_every: int = 0
    compact_keep: int = 5


# ----------------------------------------------------------------------------------------------
# The driver


class Interaction:
    """Runs scenario commands against in-memory hosts connected by a scripted network.

    ``run(command)`` returns the command's output. Everything is deterministic: each node's
    RNG is seeded from ``seed`` and its id; messages are delivered in the order sent.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.hosts: dict[int, _Host] = {}
        # Messages sent and not yet delivered or dropped, in the order they were sent.
        self.queue: list[Message] = []
        self.partition: list[frozenset[int]] | None = None
        self.log_level = _LEVELS["warning"]
        self._out: list[str] = []
        self._indent = ""
        self._applied_notes: dict[int, list[str]] = {}
        self._op_counter = 0
        self._quiet = False
        self._handlers: dict[str, Callable[[Command], None]] = {
            "add-nodes": self._add_nodes,
            "set-log": self._set_log,
            "tick-election": self._tick_election,
            "tick-until-campaign": self._tick_until_campaign,
            "tick-heartbeat": self._tick_heartbeat,
            "tick": self._tick,
            "crash": self._crash,
            "restart": self._restart,
            "compact": self._compact,
            "log-level": self._log_level,
            "campaign": self._campaign,
            "propose": self._propose,
            "propose-conf-change": self._propose_conf_change,
            "transfer-leadership": self._transfer_leadership,
            "read-index": self._read_index,
            "process-ready": self._process_ready_cmd,
            "deliver-msgs": self._deliver_msgs,
            "drop-msgs": self._drop_msgs,
            "stabilize": self._stabilize,
            "partition": self._partition,
            "isolate": self._isolate,
            "heal": self._heal,
            "raft-state": self._raft_state,
            "status": self._status,
            "raft-log": self._raft_log,
            "log-terms": self._log_terms,
            "kv": self._kv,
            "msgs": self._msgs,
            "serve-reads": self._serve_reads,
        }

    # -- output ---------------------------------------------------------------------------------

    def emit(self, line: str) -> None:
        if not self._quiet:
            self._out.append(self._indent + line)

    @contextlib.contextmanager
    def _indented(self) -> Iterator[None]:
        saved = self._indent
        self._indent = saved + "  "
        try:
            yield
        finally:
            self._indent = saved

    def run(self, cmd: Command) -> str:
        """Execute one command and return its output (``ok`` when it printed nothing)."""
        handler = self._handlers.get(cmd.name)
        if handler is None:
            raise ScenarioError(f"unknown command {cmd.name!r}")
        self._out = []
        self._indent = ""
        handler(cmd)
        return "\n".join(self._out) if self._out else "ok"

    # -- helpers --------------------------------------------------------------------------------

    def _host(self, cmd: Command, value: str) -> _Host:
        nid = _int(cmd, "node id", value)
        host = self.hosts.get(nid)
        if host is None:
            raise ScenarioError(f"{cmd.name}: no node {nid}")
        return host

    def _live(self, cmd: Command, value: str) -> _Host:
        host = self._host(cmd, value)
        if not host.alive:
            raise ScenarioError(f"{cmd.name}: node {host.id} is down")
        return host

    def _node_args(self, cmd: Command, default_all: bool = True, live: bool = True) -> list[_Host]:
        pos = cmd.positional()
        if not pos:
            if not default_all:
                raise ScenarioError(f"{cmd.name}: which node?")
            return [h for h in self._sorted_hosts() if h.alive or not live]
        return [self._live(cmd, p) if live else self._host(cmd, p) for p in pos]

    def _sorted_hosts(self) -> list[_Host]:
        return [self.hosts[i] for i in sorted(self.hosts)]

    def _role_term(self, host: _Host) -> tuple[Role, int] | None:
        return (host.raw().raft.role, host.raw().raft.term) if host.alive else None

    def _act(self, host: _Host, action: Callable[[], object]) -> object:
        """Run ``action`` on ``host``, printing a DkvError and any change of role or term."""
        before = self._role_term(host)
        result: object = None
        try:
            result = action()
        except DkvError as exc:
            self.emit(f"error: {type(exc).__name__}: {exc}")
        after = self._role_term(host)
        if after is not None and after != before:
            self.emit(f"{host.id} became {after[0].value} at term {after[1]}")
        return result

    def _can_talk(self, a: int, b: int) -> bool:
        if self.partition is None:
            return True
        return any(a in g and b in g for g in self.partition)

    # -- cluster and time -----------------------------------------------------------------------

    _NODE_OPTIONS: Final = (
        "voters",
        "learners",
        "pre-vote",
        "check-quorum",
        "lease-reads",
        "forwarding",
        "step-down-on-removal",
        "election",
        "heartbeat",
        "max-msg-bytes",
        "max-inflight",
        "chunk-bytes",
        "max-uncommitted-bytes",
        "snapshot-every",
        "compact-keep",
    )

    def _parse_options(self, cmd: Command, kw: dict[str, str]) -> _NodeOptions:
        opts = _NodeOptions()
        c = opts.config
        c["election_timeout_ticks"] = DEFAULT_ELECTION_TICKS
        c["heartbeat_interval_ticks"] = DEFAULT_HEARTBEAT_TICKS
        bools = {
            "pre-vote": "pre_vote",
            "check-quorum": "check_quorum",
            "step-down-on-removal": "step_down_on_removal",
        }
        ints = {
            "election": "election_timeout_ticks",
            "heartbeat": "heartbeat_interval_ticks",
            "max-msg-bytes": "max_msg_bytes",
            "max-inflight": "max_inflight_msgs",
            "chunk-bytes": "snapshot_chunk_bytes",
            "max-uncommitted-bytes": "max_uncommitted_entries_bytes",
        }
        for key, value in kw.items():
            if key in bools:
                c[bools[key]] = _bool(cmd, key, value)
            elif key in ints:
                c[ints[key]] = _int(cmd, key, value)
            elif key == "lease-reads":
                lease = _bool(cmd, key, value)
                c["read_only_option"] = ReadOnlyOption.LEASE_BASED if lease else ReadOnlyOption.SAFE
            elif key == "forwarding":
                c["disable_proposal_forwarding"] = not _bool(cmd, key, value)
            elif key == "snapshot-every":
                opts.snapshot_every = _int(cmd, key, value)
            elif key == "compact-keep":
                opts.compact_keep = _int(cmd, key, value)
        return opts

    def _add_nodes(self, cmd: Command) -> None:
        pos = cmd.positional()
        if len(pos) != 1:
            raise ScenarioError("add-nodes <count> [option=value ...]")
        count = _int(cmd, "count", pos[0])
        kw = cmd.keywords(self._NODE_OPTIONS)
        voters = _int_list(cmd, "voters", kw.get("voters", ""))
        learners = _int_list(cmd, "learners", kw.get("learners", ""))
        if learners and not voters:
            raise ScenarioError("add-nodes: learners= needs voters= (a group needs a voter)")
        opts = self._parse_options(cmd, kw)
        # Bootstrapped members, or (no configuration) a node that joins later with empty storage.
        cs = ConfState.of(voters, learners) if voters else None
        first = max(self.hosts, default=0) + 1
        for nid in range(first, first + count):
            storage = MemoryStorage(cs)
            config = Config(id=nid, **opts.config)  # type: ignore[arg-type]
            host = _Host(
                config,
                storage,
                _Dice(f"{self.seed}/{nid}"),
                logger=_CaptureLogger(self),
                snapshot_every_entries=opts.snapshot_every,
                compact_keep_entries=opts.compact_keep,
            )
            host.on_apply = self._on_apply
            self.hosts[nid] = host
            self.emit(self._state_line(host))

    def _set_log(self, cmd: Command) -> None:
        pos = cmd.positional()
        if not pos:
            raise ScenarioError("set-log <node> ... entry-terms=.. [term=T] [vote=V] [commit=C]")
        kw = cmd.keywords(("entry-terms", "term", "vote", "commit"))
        terms = _int_list(cmd, "entry-terms", kw.get("entry-terms", ""))
        if any(b < a for a, b in itertools.pairwise(terms)):
            raise ScenarioError("set-log: entry terms must not decrease")
        for p in pos:
            host = self._host(cmd, p)
            old = host.storage
            snap = old.snapshot()
            # The same bootstrap as add-nodes (none for a node that joined empty), then the
            # node's newest snapshot if it took or received one since.
            cs = old.initial_state()[1]
            storage = MemoryStorage(cs if cs.voters else None)
            if not snap.is_empty():
                storage.apply_snapshot(snap)
            base = snap.metadata.index
            ents = [
                Entry(t, i, data=encode_command(f"t{t}i{i}", "put", "x", f"t{t}"))
                for i, t in enumerate(terms, start=base + 1)
            ]
            storage.append(ents)
            last_term = ents[-1].term if ents else snap.metadata.term
            term = _int(cmd, "term", kw.get("term", str(last_term)))
            vote = _int(cmd, "vote", kw.get("vote", "0"))
            commit = _int(cmd, "commit", kw.get("commit", str(base)))
            if term < last_term:
                raise ScenarioError("set-log: term must be at least the last entry's term")
            storage.set_hard_state(HardState(term=term, vote=vote, commit=commit))
            if host.alive:
                host.crash()
            host.storage = storage
            host.restart()
            self.emit(self._state_line(host))
            self.emit(self._log_terms_line(host))

    def _tick_n(self, host: _Host, n: int) -> None:
        for _ in range(n):
            self._act(host, host.raw().tick)

    def _tick_election(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd):
            self._tick_n(host, host.config.election_timeout_ticks)

    def _tick_until_campaign(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False):
            raft = host.raw().raft
            before = self._role_term(host)
            for _ in range(2 * host.config.election_timeout_ticks):
                self._act(host, host.raw().tick)
                # The timer resets election_elapsed when it fires (and ticking alone delivers
                # no message that could reset it).
                if raft.role is not Role.LEADER and raft.election_elapsed == 0:
                    if self._role_term(host) == before:
                        self.emit(
                            f"{host.id}'s election timer fired again: still {raft.role.value} "
                            f"at term {raft.term}"
                        )
                    break
            else:
                ticks = 2 * host.config.election_timeout_ticks
                self.emit(f"{host.id} did not campaign within {ticks} ticks")

    def _tick_heartbeat(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd):
            self._tick_n(host, host.config.heartbeat_interval_ticks)

    def _tick(self, cmd: Command) -> None:
        kw = cmd.keywords(("count",))
        if "count" not in kw:
            raise ScenarioError("tick [<node> ...] count=N")
        n = _int(cmd, "count", kw["count"])
        for host in self._node_args(cmd):
            self._tick_n(host, n)

    def _crash(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False):
            host.crash()
            self.emit(f"{host.id} crashed")

    def _restart(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False, live=False):
            if host.alive:
                raise ScenarioError(f"restart: node {host.id} is running")
            host.restart()
            self.emit(self._state_line(host))

    def _compact(self, cmd: Command) -> None:
        cmd.keywords(())
        pos = cmd.positional()
        if len(pos) not in (1, 2):
            raise ScenarioError("compact <node> [index]")
        host = self._live(cmd, pos[0])
        applied = host.applied_index
        index = _int(cmd, "index", pos[1]) if len(pos) == 2 else applied
        if index > applied:
            raise ScenarioError(f"compact: index {index} is beyond applied index {applied}")
        snap = host.storage.create_snapshot(applied, host.conf_state, host.sm.snapshot())
        try:
            host.storage.compact(index)
        except DkvError as exc:
            self.emit(f"error: {type(exc).__name__}: {exc}")
            return
        meta = snap.metadata
        self.emit(
            f"{host.id}: snapshot {meta.term}/{meta.index} ({len(snap.data)} bytes); "
            f"log now starts at {host.storage.first_index()}"
        )

    def _log_level(self, cmd: Command) -> None:
        pos = cmd.positional()
        if len(pos) != 1 or pos[0] not in _LEVELS:
            raise ScenarioError(f"log-level {'|'.join(_LEVELS)}")
        self.log_level = _LEVELS[pos[0]]

    # -- local requests -------------------------------------------------------------------------

    def _one_node(self, cmd: Command, usage: str) -> tuple[_Host, list[str]]:
        pos = cmd.positional()
        if not pos:
            raise ScenarioError(usage)
        return self._live(cmd, pos[0]), pos[1:]

    def _campaign(self, cmd: Command) -> None:
        cmd.keywords(())
        host, rest = self._one_node(cmd, "campaign <node>")
        if rest:
            raise ScenarioError("campaign <node>")
        self._act(host, host.raw().campaign)

    def _propose(self, cmd: Command) -> None:
        host, _ = self._one_node(cmd, "propose <node> key=value ...")
        pairs = [(a.key, a.value) for a in cmd.args if a.key is not None]
        if not pairs or len(cmd.positional()) != 1:
            raise ScenarioError("propose <node> key=value ...")
        datas = []
        for key, value in pairs:
            self._op_counter += 1
            datas.append(encode_command(f"op{self._op_counter}", "put", key, value))
        node = host.raw()
        lead = node.raft.lead
        result = self._act(host, lambda: node.propose_batch(datas))
        if isinstance(result, int):
            self.emit(f"proposed at index {result}")
        elif node.raft.msgs and node.raft.msgs[-1].type is MessageType.PROP:
            self.emit(f"forwarded to leader {lead}")

    def _propose_conf_change(self, cmd: Command) -> None:
        cmd.keywords(())
        host, rest = self._one_node(cmd, "propose-conf-change <node> <type> <id>")
        if len(rest) != 2 or rest[0] not in _CC_BY_NAME:
            raise ScenarioError(
                f"propose-conf-change <node> {'|'.join(_CC_BY_NAME)} <id>, got {rest}"
            )
        cc = ConfChange(_CC_BY_NAME[rest[0]], _int(cmd, "node id", rest[1]))
        node = host.raw()
        result = self._act(host, lambda: node.propose_conf_change(cc))
        if isinstance(result, int):
            self.emit(f"proposed at index {result}")

    def _transfer_leadership(self, cmd: Command) -> None:
        kw = cmd.keywords(("from", "to"))
        if "from" not in kw or "to" not in kw or cmd.positional():
            raise ScenarioError("transfer-leadership from=<node> to=<node>")
        host = self._live(cmd, kw["from"])
        to = _int(cmd, "to", kw["to"])
        self._act(host, lambda: host.raw().transfer_leader(to))

    def _read_index(self, cmd: Command) -> None:
        cmd.keywords(())
        host, rest = self._one_node(cmd, "read-index <node> <ctx>")
        if len(rest) != 1:
            raise ScenarioError("read-index <node> <ctx>")
        ctx = rest[0].encode()
        self._act(host, lambda: host.raw().read_index(ctx))

    # -- network --------------------------------------------------------------------------------

    def _on_apply(self, host: MemoryHost, e: Entry) -> None:
        if e.type is EntryType.CONF_CHANGE:
            cc = ConfChange.decode(e.data)
            self._applied_notes.setdefault(host.id, []).append(
                f"applied {_CC_NAMES[cc.type]} {cc.node_id}: {format_conf(host.conf_state)}"
            )

    def _process_ready(self, host: _Host) -> bool:
        """Handle one Ready of ``host`` if it has one, printing it. Returns whether it did."""
        if not host.alive or not host.raw().has_ready():
            return False
        snaps_before = host.snapshots_taken
        self.emit(f"> {host.id} handling Ready")
        with self._indented():
            self._applied_notes[host.id] = []
            mark = len(self._out)
            msgs = self._act(host, host.process_ready)
            # Role changes and log lines caused by applying the Ready were emitted while it was
            # processed; print the Ready first and them after it.
            caused = self._out[mark:]
            del self._out[mark:]
            rd = host.recorder().last_ready
            assert rd is not None
            for ln in format_ready(rd):
                self.emit(ln)
            for note in self._applied_notes.pop(host.id):
                self.emit(note)
            self._out.extend(caused)
            if host.snapshots_taken != snaps_before:
                meta = host.storage.snapshot().metadata
                self.emit(
                    f"host: snapshot {meta.term}/{meta.index}; "
                    f"log now starts at {host.storage.first_index()}"
                )
        assert isinstance(msgs, list)
        self.queue.extend(msgs)
        return True

    def _process_ready_cmd(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd):
            self._process_ready(host)

    def _select(self, cmd: Command) -> list[Message]:
        kw = cmd.keywords(("from", "type"))
        to = {_int(cmd, "node id", p) for p in cmd.positional()}
        frm = set(_int_list(cmd, "from", kw["from"])) if "from" in kw else None
        types: set[MessageType] | None = None
        if "type" in kw:
            types = set()
            for name in kw["type"].split(","):
                if name not in _MSG_BY_NAME:
                    raise ScenarioError(f"unknown message type {name!r}")
                types.add(_MSG_BY_NAME[name])
        return [
            m
            for m in self.queue
            if (not to or m.to in to)
            and (frm is None or m.frm in frm)
            and (types is None or m.type in types)
        ]

    def _deliver(self, msgs: list[Message]) -> None:
        """Deliver ``msgs`` (taken off the queue), grouped by recipient in id order."""
        chosen = {id(m) for m in msgs}
        self.queue = [m for m in self.queue if id(m) not in chosen]
        for to in sorted({m.to for m in msgs}):
            batch = [m for m in msgs if m.to == to]
            host = self.hosts.get(to)
            if host is None or not host.alive:
                reason = "no such node" if host is None else f"{to} is down"
                self._print_dropped(batch, reason)
                continue
            cut = [m for m in batch if not self._can_talk(m.frm, m.to)]
            ok = [m for m in batch if self._can_talk(m.frm, m.to)]
            if cut:
                self._print_dropped(cut, "partition")
            if not ok:
                continue
            self.emit(f"> {to} receiving messages")
            with self._indented():
                for m in ok:
                    self.emit(format_message(m))
                    with self._indented():
                        self._act(host, functools.partial(host.raw().step, m))

    def _print_dropped(self, msgs: list[Message], reason: str) -> None:
        self.emit(f"> dropped ({reason})")
        with self._indented():
            for m in msgs:
                self.emit(format_message(m))

    def _deliver_msgs(self, cmd: Command) -> None:
        self._deliver(self._select(cmd))

    def _drop_msgs(self, cmd: Command) -> None:
        msgs = self._select(cmd)
        chosen = {id(m) for m in msgs}
        self.queue = [m for m in self.queue if id(m) not in chosen]
        if msgs:
            self._print_dropped(msgs, "drop-msgs")

    def _stabilize(self, cmd: Command) -> None:
        kw = cmd.keywords(("quiet",))
        hosts = self._node_args(cmd, live=False)
        ids = {h.id for h in hosts}
        self._quiet = _bool(cmd, "quiet", kw.get("quiet", "false"))
        try:
            for _ in range(MAX_STABILIZE_ROUNDS):
                progressed = False
                for host in hosts:
                    progressed |= self._process_ready(host)
                pending = [m for m in self.queue if m.to in ids]
                if pending:
                    self._deliver(pending)
                    progressed = True
                if not progressed:
                    return
        finally:
            self._quiet = False
        raise ScenarioError(f"stabilize: not quiet after {MAX_STABILIZE_ROUNDS} rounds")

    def _partition(self, cmd: Command) -> None:
        cmd.keywords(())
        groups: list[set[int]] = []
        seen: set[int] = set()
        for part in " ".join(cmd.positional()).split("|"):
            group = {self._host(cmd, w).id for w in part.split()}
            if not group or group & seen:
                raise ScenarioError("partition: use `partition 1 | 2 3` (each node once)")
            seen |= group
            groups.append(group)
        if len(groups) < 2:
            raise ScenarioError("partition: use `partition 1 | 2 3`")
        self.partition = [frozenset(g) for g in groups]
        self._print_partition()

    def _isolate(self, cmd: Command) -> None:
        cmd.keywords(())
        host, rest = self._one_node(cmd, "isolate <node>")
        if rest:
            raise ScenarioError("isolate <node>")
        others = frozenset(self.hosts) - {host.id}
        self.partition = [frozenset({host.id}), others]
        self._print_partition()

    def _print_partition(self) -> None:
        assert self.partition is not None
        groups = " | ".join(" ".join(str(i) for i in sorted(g)) for g in self.partition)
        isolated = sorted(set(self.hosts) - set().union(*self.partition))
        self.emit(f"partition: {groups}" + (f" (isolated: {_ids(isolated)})" if isolated else ""))

    def _heal(self, cmd: Command) -> None:
        cmd.keywords(())
        self.partition = None

    # -- inspection -----------------------------------------------------------------------------

    def _state_line(self, host: _Host) -> str:
        if not host.alive:
            return f"{host.id}: down"
        node = host.raw()
        r = node.raft
        st = node.status()
        member = (
            "voter"
            if host.id in st.conf_state.voters
            else "learner"
            if host.id in st.conf_state.learners
            else "not a member"
        )
        return (
            f"{host.id}: {r.role.value} term={r.term} vote={r.vote} lead={r.lead} "
            f"last={st.last_index} commit={st.commit} applied={st.applied} "
            f"{format_conf(st.conf_state)} ({member})"
        )

    def _raft_state(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, live=False):
            self.emit(self._state_line(host))

    def _status(self, cmd: Command) -> None:
        cmd.keywords(())
        host, rest = self._one_node(cmd, "status <node>")
        if rest:
            raise ScenarioError("status <node>")
        st = host.raw().status()
        self.emit(self._state_line(host))
        if st.lead_transferee:
            self.emit(f"transferring leadership to {st.lead_transferee}")
        for nid, pr in st.progress.items():
            flags = [pr.state.value]
            if pr.is_learner:
                flags.append("learner")
            if pr.recent_active:
                flags.append("active")
            self.emit(f"  {nid}: match={pr.match} next={pr.next} {' '.join(flags)}")

    def _entries_of(self, host: _Host) -> tuple[Snapshot, list[Entry], int]:
        """(snapshot, log entries after it, commit) as the node sees them (storage if down)."""
        if host.alive:
            log = host.raw().raft.log
            snap = log.snapshot()
            ents = log.slice(log.first_index(), log.last_index() + 1, None)
            return snap, ents, log.committed
        st = host.storage
        snap = st.snapshot()
        ents = st.entries(st.first_index(), st.last_index() + 1)
        return snap, ents, st.hard_state.commit

    def _raft_log(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False, live=False):
            snap, ents, commit = self._entries_of(host)
            self.emit(f"{host.id}: commit={commit}" + ("" if host.alive else " (down: storage)"))
            if not snap.is_empty():
                meta = snap.metadata
                self.emit(f"  snapshot {meta.term}/{meta.index} {format_conf(meta.conf_state)}")
            for e in ents:
                self.emit("  " + format_entry(e))

    def _log_terms_line(self, host: _Host) -> str:
        snap, ents, commit = self._entries_of(host)
        prefix = ""
        if not snap.is_empty():
            prefix = f"snapshot {snap.metadata.term}/{snap.metadata.index}, then "
        terms = " ".join(str(e.term) for e in ents)
        down = "" if host.alive else " (down)"
        return f"{host.id}: {prefix}[{terms}] commit={commit}{down}"

    def _log_terms(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, live=False):
            self.emit(self._log_terms_line(host))

    def _kv(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False):
            data = host.sm.data
            pairs = " ".join(f"{k}={data[k]}" for k in sorted(data))
            self.emit(f"{host.id}: applied={host.applied_index} {pairs or '(empty)'}")

    def _serve_reads(self, cmd: Command) -> None:
        cmd.keywords(())
        for host in self._node_args(cmd, default_all=False):
            served = host.take_read_states()
            for rs in served:
                data = host.sm.data
                pairs = " ".join(f"{k}={data[k]}" for k in sorted(data)) or "(empty)"
                self.emit(
                    f"{host.id}: read {_ctx(rs.request_ctx)} at index {rs.index} "
                    f"(applied {host.applied_index}): {pairs}"
                )
            for rs in host.read_states:
                self.emit(f"{host.id}: read {_ctx(rs.request_ctx)} waits for index {rs.index}")
            if not served and not host.read_states:
                self.emit(f"{host.id}: no read to serve")

    def _msgs(self, cmd: Command) -> None:
        cmd.keywords(())
        for m in self.queue:
            self.emit(format_message(m))
