"""The rules' live state: one typed object, made once per process, outliving every reload.

What the rules count and remember — live-call leases, rate buckets, dialer windows and
cooldowns, flood counts and bans, verified certificates — lives here, not in the rules. The
shell makes one :class:`RuleState` at start-up and hands it to every policy build; a reload
builds a new policy on the same state. Building never writes to it: whatever a build wants to
change in it (a bigger certificate cache, a newly read number list) is queued on the
:class:`~sipguard.policy.engine.BuildContext` and applied by ``Policy.activate()`` when the new
policy is swapped in, so a build that fails, or is overtaken by a newer reload, changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sipguard.policy.concurrency import Tracker
from sipguard.policy.dialer_state import DialerState
from sipguard.policy.flood import FloodState
from sipguard.policy.national_cli import HttpGetter, RoamingCache
from sipguard.policy.passport import SignatureChecks
from sipguard.policy.peers import NumberSet
from sipguard.policy.rate import Buckets
from sipguard.policy.stircert import CertCache, CertFetcher
from sipguard.policy.suspensions import SuspensionStore
from sipguard.state.base import SharedCounts


@dataclass(slots=True)
class RuleState:
    """Every kind of rule state, one typed field each."""

    tracker: Tracker = field(default_factory=Tracker)  # concurrency: live-call leases
    # state.backend redis: the counts shared by every instance (concurrency, rate); None: memory
    shared: SharedCounts | None = None
    buckets: Buckets = field(default_factory=Buckets)  # rate: GCRA state per limit
    dialer: DialerState = field(default_factory=DialerState)  # dialer: windows, cooldowns
    flood: FloodState = field(default_factory=FloodState)  # flood: counts and bans
    certs: CertCache = field(default_factory=CertCache)  # identity: chains and verdicts
    # suspended numbers and prefixes made through the admin API (with the config's list)
    suspensions: SuspensionStore = field(default_factory=SuspensionStore)
    # identity: the shell's HTTPS fetcher (None: every uncached certificate fails, 436)
    fetcher: CertFetcher | None = None
    # identity: the shell's signature-check threads (None: every check in the loop)
    verifier: SignatureChecks | None = None
    # national_cli: the shell's HTTP client for roaming lookups (None: lookups fail, on_error)
    http: HttpGetter | None = None
    # national_cli: roaming answers per number (bounded, each kept cache_s)
    roaming: RoamingCache = field(default_factory=RoamingCache)
    # peers with tls_subject: a TLS connection id -> its verified client certificate's names
    # (subject CN, SAN DNS names, lower case), a lookup the shell gives (None: no TLS)
    tls_names: Callable[[int], tuple[str, ...]] | None = None
    # identity: Unix time minus the loop clock ``now`` (kept current by the shell)
    wall_offset: float = 0.0
    # callerid / peers: number list files already read, path -> ((mtime_ns, size), numbers)
    list_files: dict[str, tuple[tuple[int, int], NumberSet]] = field(default_factory=dict)
    # the shell's way to let the event loop run while a thread builds (or empties) a large
    # number list: called every few thousand entries; it lets go of the GIL, which compiled
    # code otherwise holds for the whole build (None: builds run through, as in check-config)
    pause: Callable[[], None] | None = None
