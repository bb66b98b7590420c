"""The policy as a whole: peer classification, suspended numbers, then the peer's rule pipeline.

:class:`Policy` turns a loaded config into the peer table, one :class:`Pipeline` for
traffic from no configured peer and one per peer (the top-level rules with that peer's
overrides merged in), each rule built by its module's ``build()``, and the pre-parse flood
guard. The state that must outlive a reload (live-call leases, rate buckets, bans, ...) is one
:class:`~sipguard.policy.state.RuleState` made once by the shell and handed to every build.
Building writes nothing to it; what a build wants changed there is applied by
:meth:`Policy.activate` when the edge core swaps the new policy in.

The edge core (:mod:`sipguard.edge`) asks :meth:`Policy.decide` about every initial INVITE and
tells the policy, in the same synchronous step, what became of each call: a dialog started
(:meth:`Policy.dialog_started`), or the call was given up (:meth:`Policy.abandoned`: whatever
its decision took from the limits goes back), and later the dialog's end.

Order of decisions for an initial INVITE:

1. the source address is matched to a peer; with peers configured, an unknown source gets
   ``403 Forbidden`` (or silence, ``unknown_source: drop``) — rule ``peers``. The caller is
   then the peer's view of it: the From number when the peer has ``trust_pai: false`` (else
   P-Asserted-Identity first, as :class:`CallInfo` reads it), and caller and callee in
   national format are brought to E.164 with the peer's ``default_region``;
2. a suspended caller or called number gets ``403 Forbidden`` with a Reason header — rule
   ``suspended``: the config's ``suspended:`` list and the numbers and prefixes suspended
   through the admin API (:mod:`sipguard.policy.suspensions`, kept in the rules' state);
3. the peer's rules, in file order (see :mod:`sipguard.policy.pipeline`).

In ``mode: monitor`` steps 1 and 2 are decided and reported the same way but forwarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sipguard.contract import CallInfo, Dialog, Flow, Verdict
from sipguard.policy import callerid, concurrency, dialer, flood, identity, national_cli, rate
from sipguard.policy.numbers import e164_pattern, to_e164
from sipguard.policy.peers import NumberSet, Pause, Peer, PeerTable, read_number_file
from sipguard.policy.pipeline import Pipeline, Rule, Shared
from sipguard.policy.schema import PeerConfig, RulesConfig
from sipguard.policy.schema import PolicyConfig as Config
from sipguard.policy.settings import ListFileError
from sipguard.policy.state import RuleState
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message
from sipguard.sip.nameaddr import parse_name_addr

# rule name -> build(settings, ctx, peer) -> Rule | None
RuleBuilder = Callable[[Any, "BuildContext", Peer | None], Rule | None]
BUILDERS: dict[str, RuleBuilder] = {
    "callerid": callerid.build,
    "concurrency": concurrency.build,
    "identity": identity.build,
    "national_cli": national_cli.build,
    "rate": rate.build,
    "dialer": dialer.build,
    "flood": flood.build,
}


@dataclass(slots=True)
class BuildContext:
    """What a rule's ``build()`` gets besides its settings."""

    cfg: Config
    state: RuleState  # survives reloads: leases, buckets, windows, bans, certificates
    observers: list[Any] = field(default_factory=list)  # get dialog_started / dialog_ended
    # changes to ``state`` the build wants, applied when the policy is activated
    activations: list[Callable[[], None]] = field(default_factory=list)
    # number list files read by this build: path -> ((mtime_ns, size), numbers)
    pending_lists: dict[str, tuple[tuple[int, int], NumberSet]] = field(default_factory=dict)
    # every number list file this build uses, read anew or reused (RuleState.list_files once
    # the policy is activated: the lists no policy uses any more go)
    used_lists: dict[str, tuple[tuple[int, int], NumberSet]] = field(default_factory=dict)

    # the rules of the pipeline being built (a rule may depend on which others are on)
    rules: RulesConfig | None = None

    def on_activate(self, change: Callable[[], None]) -> None:
        """Run ``change`` (a change to the live state) when this policy is swapped in."""
        self.activations.append(change)

    def mode_of(self, settings: Any) -> str:
        return str(getattr(settings, "mode", None) or self.cfg.mode)

    def largest(self, rule: str, field: str, default: int) -> int:
        """The largest ``field`` among the enabled sections of ``rule`` (the top level's and
        every peer's override): a table all of them share is sized for the largest, never
        shrunk by one peer's smaller cap."""
        sections = [getattr(self.cfg.rules, rule),
                    *(getattr(p.rules, rule) for p in self.cfg.peers)]
        return max((int(getattr(s, field)) for s in sections
                    if s is not None and s.enabled), default=default)

    def observe(self, observer: Any) -> None:
        """Register an object for dialog start/end events (once, however many peers use it)."""
        if all(o is not observer for o in self.observers):
            self.observers.append(observer)


def build_peer(pc: PeerConfig, ctx: BuildContext | None = None) -> Peer:
    """The peer of ``pc``; its caller numbers from ``numbers`` and ``numbers_file`` — with a
    ``ctx``, reused from the last build while the file is unchanged (same mtime and size) and
    ``numbers`` and ``default_region`` are the same: a reload of a config with a million-line
    list reads it again only when it has changed."""
    numbers: NumberSet | None = None
    if pc.numbers or pc.numbers_file is not None:
        key = stamp = None
        if pc.numbers_file is not None and ctx is not None:
            key = "\n".join(("peer", str(pc.numbers_file), pc.default_region or "",
                             *pc.numbers))
            try:
                st = pc.numbers_file.stat()
            except OSError as exc:
                raise ListFileError.unreadable(_list_key(pc), f"peer {pc.name}: numbers_file",
                                               pc.numbers_file, exc) from None
            stamp = (st.st_mtime_ns, st.st_size)
            # one list per file in one build, even if the file changes meanwhile (a list
            # this build uses is never retired by it)
            hit = ctx.used_lists.get(key) or ctx.pending_lists.get(key) \
                or ctx.state.list_files.get(key)
            if hit is not None and (hit[0] == stamp or key in ctx.used_lists):
                numbers = hit[1]
                ctx.used_lists[key] = hit
        if numbers is None:
            numbers = _peer_numbers(pc, ctx.state.pause if ctx is not None else None)
            if key is not None and stamp is not None and ctx is not None:
                ctx.pending_lists[key] = ctx.used_lists[key] = (stamp, numbers)
    return Peer(pc.name, pc.networks, numbers, pc.default_region, pc.trust_pai, pc.interconnect,
                pc.tls_subject.lower() if pc.tls_subject else None)


def _list_key(pc: PeerConfig) -> tuple[str, ...]:
    """Where a peer's ``numbers_file`` is set, for an error about it (ListFileError)."""
    return ("peers", pc.name, "numbers_file")


def _peer_numbers(pc: PeerConfig, pause: Pause) -> NumberSet:
    """``numbers`` and the lines of ``numbers_file``; with ``default_region`` each national
    entry also as E.164 (a caller written either way is the same number)."""
    numbers = NumberSet(pc.numbers, pause)
    patterns: list[str] = []
    if pc.numbers_file is not None:
        try:
            patterns = read_number_file(pc.numbers_file, pause)
        except ValueError as exc:
            raise ListFileError(_list_key(pc), f"peer {pc.name}: numbers_file: {exc}") from None
        except OSError as exc:
            raise ListFileError.unreadable(_list_key(pc), f"peer {pc.name}: numbers_file",
                                           pc.numbers_file, exc) from None
        numbers.extend(patterns, pause)
    region = pc.default_region
    if region is not None:
        national = [p for p in (*pc.numbers, *patterns) if not p.strip().startswith("+")]
        for n, pattern in enumerate(national, 1):
            e164 = e164_pattern(pattern, region)
            if e164 is not None:
                numbers.add(e164)
            if pause is not None and n % 256 == 0:  # a number parsed each: slower than a line
                pause()
    return numbers


def build_pipeline(rules: RulesConfig, ctx: BuildContext, peer: Peer | None) -> Pipeline:
    """The rules of one pipeline, in order; linked to the shared store when there is one."""
    built: list[Rule] = []
    ctx.rules = rules
    for name in rules.order:
        settings = getattr(rules, name)
        if settings is None or not settings.enabled:
            continue
        rule = BUILDERS[name](settings, ctx, peer)
        if rule is not None:
            built.append(rule)
    shared: Shared | None = None
    store = ctx.state.shared
    if store is not None:
        tracker = ctx.state.tracker
        shared = Shared(store, store.retry_after_s, tracker.hold, tracker.give_back)
    return Pipeline(built, shared)


def _in_e164(call: CallInfo, region: str) -> None:
    """The call's numbers in national format brought to E.164 with ``region``."""
    call.caller = to_e164(call.caller, region)
    call.callee = to_e164(call.callee, region)
    if call.shown is not None:
        shown = to_e164(call.shown, region)
        call.shown = shown if shown != call.caller else None
    if call.diverters:  # one diverter in two spellings is one diverter
        call.diverters = tuple(dict.fromkeys(
            n for d in call.diverters if (n := to_e164(d, region)) is not None))


class Policy:
    """Decides initial INVITEs; receives dialog starts and ends for the stateful rules.

    ``trusted`` lists (address, port) pairs the flood guard never checks (the core)."""

    def __init__(
        self,
        cfg: Config,
        state: RuleState | None = None,
        trusted: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.cfg = cfg
        self.monitor = cfg.mode == "monitor"
        self.state = state if state is not None else RuleState()
        self.ctx = BuildContext(cfg, self.state)
        self.retired_lists: list[NumberSet] = []  # see activate
        peers = [(pc, build_peer(pc, self.ctx)) for pc in cfg.peers]
        self.peers = PeerTable(p for _, p in peers)
        self.default = build_pipeline(cfg.rules, self.ctx, None)
        self.by_peer = {p.name: build_pipeline(pc.rules, self.ctx, p) for pc, p in peers}
        self.suspended = NumberSet(cfg.suspended, self.state.pause)
        # national numbers from sources of no peer (no peers configured) are read with it
        self.default_region = cfg.default_region
        self.unknown_drop = cfg.unknown_source == "drop"
        self._unknown_source = Verdict(
            "drop" if self.unknown_drop else "reject",
            rule="peers",
            reason="unknown_source",
            status=0 if self.unknown_drop else 403,  # dropped: the source hears nothing
            phrase="" if self.unknown_drop else "Forbidden",
            sample="peers:unknown_source",
        )
        # the same, reported with a call's decision in mode: monitor: each call its own line
        self._unknown_monitored = Verdict(
            self._unknown_source.action, rule="peers", reason="unknown_source",
            status=self._unknown_source.status, phrase=self._unknown_source.phrase,
        )
        # the pre-parse flood and scanner check (rule ``flood``), run by the edge core
        self.flood = flood.guard(
            cfg.rules.flood, cfg.mode, self.state.flood, self.peers,
            [(self.peers.peers[pc.name], pc.rules.flood) for pc in cfg.peers],
            trusted=tuple(trusted), ipv6_prefix=cfg.ipv6_prefix,
        )

    def activate(self) -> None:
        """This policy is being swapped in: apply the changes its build queued for the live
        state (grown caches, number lists read anew). Called once, by the edge core. The
        number lists the policy before used and this one does not are left in
        ``retired_lists``, for the shell to empty off the loop (:meth:`NumberSet.drain`)."""
        used = self.ctx.used_lists
        self.retired_lists = [entry[1] for key, entry in self.state.list_files.items()
                              if key not in used or used[key][1] is not entry[1]]
        self.state.list_files = dict(used)
        for change in self.ctx.activations:
            change()
        if self.flood is not None:
            self.flood.activate()

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.default.rules

    def screen(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        """An out-of-dialog request from outside, before sipguard keeps or sends anything:
        the unknown-source check (every method), and for requests other than INVITE (whose
        pipeline does it) the suspended numbers. None: go on."""
        peer: Peer | None = None
        if self.peers:
            peer = self._peer_of(flow)
            if peer is None:
                return self._global(self._unknown_source)
        if (self.suspended or self.state.suspensions) and msg.method != "INVITE":
            caller: str | None = None
            if (peer is None or peer.trust_pai) and msg.has("p-asserted-identity"):
                caller = next((n for na in msg.p_asserted_identities
                               if (n := na.uri.number) is not None), None)
            shown = msg.from_.uri.number
            caller = caller or shown
            uri = msg.request_uri  # as CallInfo: To's only without a user part
            callee = uri.number if uri.user else msg.to.uri.number
            region = self._region(peer)
            verdict = self._suspended(to_e164(caller, region), to_e164(callee, region),
                                      to_e164(shown, region), now)
            if verdict is not None:
                return self._global(verdict)
        return None

    def screen_transfer(self, msg: Message, flow: Flow, now: float) -> Verdict | None:
        """A REFER from outside (in a call or not): its ``Refer-To`` target — the number the
        core would call on the party's word — must not be a suspended one (``callee_suspended``,
        as an INVITE to it). The rules' other checks are for calls that come in; a call the
        core places passes none. None: go on."""
        if not (self.suspended or self.state.suspensions):
            return None
        try:
            target = parse_name_addr(msg.get("refer-to") or "").uri.number
        except SipParseError:
            return None  # (the core's to refuse: no number sipguard could suspend)
        region = self._region(self._peer_of(flow) if self.peers else None)
        verdict = self._suspension(None, to_e164(target, region), now)
        return self._global(verdict) if verdict is not None else None

    def _region(self, peer: Peer | None) -> str | None:
        """The region national numbers from ``peer`` are read in: its own (or the top-level
        one it inherited); from no peer, the top-level ``default_region``."""
        return peer.default_region if peer is not None else self.default_region

    def silent_to(self, flow: Flow) -> bool:
        """An unknown source with ``unknown_source: drop``: it hears nothing at all."""
        return self.unknown_drop and bool(self.peers) and self._peer_of(flow) is None

    def asserts_caller(self, dialog: Dialog, msg: Message) -> bool:
        """The P-Asserted-Identity of a caller's later request or answer in ``dialog`` is the
        caller the call was checked as (read with its peer's ``default_region``)."""
        peer = self.peers.peers.get(dialog.peer) if dialog.peer is not None else None
        return callerid.asserts_caller(msg, dialog.caller, self._region(peer))

    def asserts_identity(self, flow: Flow) -> bool:
        """A P-Asserted-Identity from ``flow`` is an identity (RFC 3325 §5): it comes from a
        peer with ``trust_pai: true`` — or no peers are configured (every source is one)."""
        if not self.peers:
            return True
        peer = self._peer_of(flow)
        return peer is not None and peer.trust_pai

    def same_party(self, dialog: Dialog, flow: Flow) -> bool:
        """An in-dialog request from another address of the peer the call came from (a
        carrier's second SBC) speaks for the call's outside party; for a call the core
        placed, another address of the peer it was placed to (the address that answered)."""
        if not self.peers:
            return False
        name = dialog.peer
        if name is None and dialog.outbound and dialog.party is not None:
            owner = self.peers.lookup(dialog.party.addr[0])
            name = owner.name if owner is not None else None
        if name is None:
            return False
        peer = self._peer_of(flow)
        return peer is not None and peer.name == name

    def same_peer(self, sent: Flow, flow: Flow) -> bool:
        """An answer from another address of the peer its request was sent to (a carrier's
        second SBC answering for the first)."""
        if not self.peers:
            return False
        owner = self.peers.lookup(sent.addr[0])
        if owner is None:
            return False
        peer = self._peer_of(flow)
        return peer is not None and peer.name == owner.name

    def _peer_of(self, flow: Flow) -> Peer | None:
        """The peer a message comes from: by source address, and — for a peer with
        ``tls_subject`` — only over TLS with a verified client certificate naming it."""
        peer = self.peers.lookup(flow.addr[0])
        if peer is None or peer.tls_subject is None:
            return peer
        names = self.state.tls_names
        if flow.transport != "tls" or flow.conn is None or names is None:
            return None
        return peer if peer.tls_subject in names(flow.conn) else None

    def _suspended(self, caller: str | None, callee: str | None, shown: str | None,
                   now: float) -> Verdict | None:
        """The suspension of a call's caller or callee, or of the number its From shows when
        that is another than the caller (a suspended number behind another asserted
        identity)."""
        verdict = self._suspension(caller, callee, now)
        if verdict is None and shown is not None and shown != caller:
            verdict = self._suspension(shown, None, now)
        return verdict

    def _suspension(self, caller: str | None, callee: str | None, now: float) -> Verdict | None:
        """The config's ``suspended:`` list and the admin API's store, caller first."""
        suspended, store = self.suspended, self.state.suspensions
        if caller in suspended or (store and store.match(caller, now) is not None):
            which = "caller"
        elif callee in suspended or (store and store.match(callee, now) is not None):
            which = "callee"
        else:
            return None
        return Verdict(
            "reject",
            rule="suspended",
            reason=f"{which}_suspended",
            status=403,
            phrase="Forbidden",
            headers=(f'Reason: SIP;cause=403;text="{which.title()} number suspended"',),
        )

    def decide(self, call: CallInfo, now: float) -> Verdict | Awaitable[Verdict]:
        pipeline = self.default
        # In mode: monitor an unknown source or a suspended number is reported as a rule in
        # monitor mode would be, and the rules still run: the top-level ones for an unknown
        # source (any of them in mode: enforce refuses), and the verdict carries their headers
        monitored: tuple[Verdict, ...] = ()
        peer = self._peer_of(call.flow) if self.peers else None
        if self.peers and peer is None:
            if not self.monitor:
                return self._unknown_source
            monitored = (self._unknown_monitored,)
        elif peer is not None:
            call.peer = peer.name
            if not peer.trust_pai:
                call.caller = call.msg.from_.uri.number
                call.shown = None
                call.pai_untrusted = True
            if peer.default_region is not None:
                _in_e164(call, peer.default_region)
            pipeline = self.by_peer[peer.name]
        elif self.default_region is not None:  # no peers: every source reads with it
            _in_e164(call, self.default_region)
        if self.suspended or self.state.suspensions:
            verdict = self._suspended(call.caller, call.callee, call.shown, now)
            if verdict is not None:
                if not self.monitor:
                    return verdict
                monitored = (*monitored, verdict)
        return pipeline.decide(call, now, monitored)

    def suspension_of(self, call: CallInfo, now: float) -> Verdict | None:
        """The refusal of a call whose decision waited for I/O, when its caller or callee (or
        the number its From shows) was suspended meanwhile; None when not, and in ``mode:
        monitor`` (the verdict in hand, with its headers, stands)."""
        if self.monitor or not (self.suspended or self.state.suspensions):
            return None
        return self._suspended(call.caller, call.callee, call.shown, now)

    def _global(self, verdict: Verdict) -> Verdict:
        if not self.monitor:
            return verdict
        return Verdict("accept", rule=verdict.rule, reason=verdict.reason,
                       status=verdict.status, phrase=verdict.phrase, monitored=True)

    def dialog_started(self, dialog: Dialog, now: float) -> list[Awaitable[None]]:
        """Tell the stateful rules; what they could not do at once is returned to be run."""
        pending = []
        for observer in self.ctx.observers:
            later = observer.dialog_started(dialog, now)
            if later is not None:
                pending.append(later)
        return pending

    def dialog_ended(self, dialog: Dialog, now: float) -> list[Awaitable[None]]:
        pending = []
        for observer in self.ctx.observers:
            later = observer.dialog_ended(dialog, now)
            if later is not None:
                pending.append(later)
        return pending

    def abandoned(self, call: CallInfo, now: float) -> list[Awaitable[None]]:
        """A decided call that did not become a dialog: what its decision took goes back
        (whatever policy is in force now: the slot lives in the state, not in a rule)."""
        if not call.held:
            return []
        call.held = False
        later = self.state.tracker.call_abandoned(call, now)
        return [later] if later is not None else []

    def adopt(
        self, previous: Policy | None, dialogs: Iterable[Dialog], now: float
    ) -> list[Awaitable[None]]:
        """After a reload: observers the previous policy did not have (a rule turned on, or
        back on) are brought up to date with the live ``dialogs`` (their ``resync``)."""
        old = previous.ctx.observers if previous is not None else []
        live: list[Dialog] | None = None
        pending = []
        for observer in self.ctx.observers:
            if any(o is observer for o in old) or not hasattr(observer, "resync"):
                continue
            if live is None:
                live = list(dialogs)
            later = observer.resync(live, now)
            if later is not None:
                pending.append(later)
        return pending
