"""What a reload reports: applied or not, the errors, what changed and what needs a restart.

SIGHUP, ``sipguard reload`` and ``POST /reload`` all end in ``Server.reload_config`` (one
``asyncio.Lock``: reloads run one after the other); this module holds the pieces that need no
server: the result and how two configs differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from sipguard.ops.config import Config
from sipguard.ops.config_load import ConfigError, ConfigIssue, FieldError, located
from sipguard.policy.schema import PeerConfig
from sipguard.policy.settings import ListFileError

# Top-level keys a running sipguard cannot take over: sockets and files opened at start.
RESTART_KEYS = ("listen", "admin", "metrics", "state_dir", "state", "workers", "worker_port_base",
                "worker_spread", "worker_hang_timeout_s")
# Keys of ``log`` set up with the logger at start (a reload applies ``numbers`` and
# ``hash_key_file`` only): reported as ``log.<key>`` and kept at their running values.
LOG_RESTART_KEYS = ("level", "format", "queue_bytes", "parse_error_sample_s")
# Keys of ``sip`` read when the sockets are opened (the receive buffer; the TCP framers' size
# limit) or written into live calls (``advertise``: the Record-Route of every call up, whose
# in-dialog requests name it in their Route — sipguard must keep recognising it): reported as
# ``sip.<key>`` and kept at their running values, as the log's.
SIP_RESTART_KEYS = ("udp_receive_buffer", "max_message_size", "advertise")


def held_back(old: Config, new: Config, changed: list[str]) -> tuple[Config, list[str]]:
    """``new`` with the keys a reload cannot take over set back to their running values in
    ``old``, and those keys (``log.level`` and the like for the log's and the sip section's;
    ``default_region`` and ``peers[NAME].default_region``: see :func:`_held_regions`)."""
    restart = [k for k in RESTART_KEYS if k in changed]
    update: dict[str, Any] = {k: getattr(old, k) for k in restart}
    update_regions, held_regions = _held_regions(old, new)
    update.update(update_regions)
    restart += held_regions
    for section, keys in (("log", LOG_RESTART_KEYS), ("sip", SIP_RESTART_KEYS)):
        was, now = getattr(old, section), getattr(new, section)
        held = [k for k in keys if getattr(was, k) != getattr(now, k)]
        if held:
            update[section] = now.model_copy(update={k: getattr(was, k) for k in held})
            restart += [f"{section}.{k}" for k in held]
    return (new.model_copy(update=update) if update else new), restart


def _held_regions(old: Config, new: Config) -> tuple[dict[str, Any], list[str]]:
    """The numbering region national numbers are read in (top-level ``default_region``, a
    peer's, which a peer without its own inherits) keeps its running value: the live calls'
    numbers were read with it, and their concurrency slots are held under those spellings — a
    new region would count the same caller under another key (``2125550100`` against
    ``+12125550100``) and let it past ``per_caller`` while the old calls are up, and a
    suspension's ``end_calls`` would miss them. A peer new in this reload takes its region."""
    update: dict[str, Any] = {}
    held: list[str] = []
    if old.default_region != new.default_region:
        update["default_region"] = old.default_region
        held.append("default_region")
    running = {p.name: p for p in old.peers}
    peers = []
    for peer in new.peers:
        was = running.get(peer.name)
        if was is not None and was.default_region != peer.default_region:
            peer = peer.model_copy(update={"default_region": was.default_region})
            held.append(f"peers[{peer.name}].default_region")
        peers.append(peer)
    if len(held) > ("default_region" in held):
        update["peers"] = tuple(peers)
    return update, held


@dataclass(slots=True)
class ReloadResult:
    """The outcome of one reload."""

    applied: bool
    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    errors: list[ConfigIssue] = field(default_factory=list)
    superseded: bool = False  # a newer reload won (only when reloads bypass the lock)
    # several workers: how many others the supervisor was asked to reload (None: one process)
    others: int | None = None
    source: str = ""  # the file the errors are in ("" when there is none)

    def error_lines(self) -> list[str]:
        """Each error as ``FILE:LINE: FIELD: message`` (as ``check-config`` prints them)."""
        return [str(ConfigError(self.source or "-", [e])) for e in self.errors]

    def as_dict(self) -> dict[str, Any]:
        if self.errors:
            return {
                "applied": False,
                "errors": [
                    {"file": self.source or None, "line": e.line, "field": e.path,
                     "message": e.message} for e in self.errors
                ],
            }
        out: dict[str, Any] = {
            "applied": self.applied,
            "changed": self.changed,
            "restart_needed": self.restart_needed,
        }
        if self.superseded:
            out["superseded"] = True
        if self.others is not None:
            out["other_workers_reloading"] = self.others
        return out


def changed_keys(old: Config, new: Config) -> list[str]:
    """Top-level keys whose value differs between two configs, in schema order; then the
    settings whose file was edited in place (:func:`changed_files`).

    A peer's ``rules`` are the top-level rules with its overrides merged in, so a change of
    the top-level rules changes every peer's: ``peers`` is then listed only when a peer's own
    part changed — its other fields, the peers themselves, or an override of its own (a value
    set or changed where the peer differs from the top level)."""
    changed = []
    for name in Config.model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name == "peers" and old.rules != new.rules and not _peers_changed(old, new):
            continue
        changed.append(name)
    return changed + changed_files(old, new)


def changed_files(old: Config, new: Config) -> list[str]:
    """The settings whose file was edited in place between the two configs' loads (the same
    file, another mtime or size): a number list, ``dno_file``, a certificate. The reload
    reads them again, so it reports them — ``peers[0].numbers_file``,
    ``rules.callerid.dno_file`` — although the config itself did not change."""
    before = old.file_stamps
    return [where for where, (path, stamp) in new.file_stamps.items()
            if where in before and before[where][0] == path and before[where][1] != stamp]


def _peers_changed(old: Config, new: Config) -> bool:
    """Whether the peers differ in more than what the top-level rules' change explains."""
    if len(old.peers) != len(new.peers):
        return True
    fields = [f for f in PeerConfig.model_fields if f != "rules"]
    for a, b in zip(old.peers, new.peers, strict=True):
        if any(getattr(a, f) != getattr(b, f) for f in fields):
            return True
        if _own_change(old.rules, new.rules, a.rules, b.rules):
            return True
    return False


def _own_change(top_old: Any, top_new: Any, peer_old: Any, peer_new: Any) -> bool:
    """Whether a peer's merged setting changed other than by following the top level's."""
    if peer_old == peer_new and top_old == top_new:
        return False
    models = (top_old, top_new, peer_old, peer_new)
    if all(isinstance(m, BaseModel) for m in models) and \
            len({type(m) for m in models}) == 1:
        return any(_own_change(*(getattr(m, f) for m in models))
                   for f in type(peer_old).model_fields)
    if peer_old == top_old and peer_new == top_new:
        return False  # no override: it follows the top level
    return bool(peer_old != peer_new or (peer_old == top_old) != (peer_new == top_new))


def failure(exc: ConfigError | OSError | ValueError, source: str) -> ReloadResult:
    """A reload that could not build a config (a bad file, an unreadable number list, an
    admin section the process could not start with) from the config file ``source``."""
    if isinstance(exc, (ListFileError, FieldError)) and source:
        exc = located(exc, source)
    if isinstance(exc, ConfigError):
        return ReloadResult(False, errors=list(exc.issues), source=exc.source)
    return ReloadResult(False, errors=[ConfigIssue("", None, str(exc))], source=source)
