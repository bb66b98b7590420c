"""What a reload reports: applied or not, the errors, what changed and what needs a restart.

SIGHUP, ``sipguard reload`` and ``POST /reload`` all end in ``Server.reload_config`` (one
``asyncio.Lock``: reloads run one after the other); this module holds the pieces that need no
server: the result and how two configs differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sipguard.ops.config import Config
from sipguard.ops.config_load import ConfigError, ConfigIssue

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
    ``old``, and those keys (``log.level`` and the like for the log's and the sip section's)."""
    restart = [k for k in RESTART_KEYS if k in changed]
    update: dict[str, Any] = {k: getattr(old, k) for k in restart}
    for section, keys in (("log", LOG_RESTART_KEYS), ("sip", SIP_RESTART_KEYS)):
        was, now = getattr(old, section), getattr(new, section)
        held = [k for k in keys if getattr(was, k) != getattr(now, k)]
        if held:
            update[section] = now.model_copy(update={k: getattr(was, k) for k in held})
            restart += [f"{section}.{k}" for k in held]
    return (new.model_copy(update=update) if update else new), restart


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

    def as_dict(self) -> dict[str, Any]:
        if self.errors:
            return {
                "applied": False,
                "errors": [
                    {"line": e.line, "field": e.path, "message": e.message} for e in self.errors
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
    """Top-level keys whose value differs between two configs, in schema order."""
    return [name for name in Config.model_fields if getattr(old, name) != getattr(new, name)]


def failure(exc: ConfigError | OSError | ValueError) -> ReloadResult:
    """A reload that could not build a config (a bad file, an unreadable number list)."""
    if isinstance(exc, ConfigError):
        return ReloadResult(False, errors=list(exc.issues))
    return ReloadResult(False, errors=[ConfigIssue("", None, str(exc))])
