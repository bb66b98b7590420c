"""Rule ``national_cli``: a national caller number arriving over an international interconnect.

European regulators fight caller-ID spoofing at the border: a call handed over by an
*international* interconnection that presents a *national* (home-country) number is blocked or
anonymised, unless the caller is a subscriber roaming abroad (see docs/rules.md for the
countries and their regulators).

When it applies
    Only to calls from a peer with ``interconnect: international`` (for other peers, and for
    traffic from no configured peer, the rule is not even built), and only when the caller
    number — as the peer's view of it: P-Asserted-Identity unless ``trust_pai: false``, national
    format read with ``default_region``; else the number From shows, when it is another — is
    E.164 and starts with one of ``home_countries``
    (country codes such as ``31`` or longer prefixes such as ``+3120``). A caller that cannot
    be read as E.164 is not a home number (rule ``callerid`` deals with unreadable callers).

What it does
    The number's type (phonenumbers' numbering-plan metadata) picks the action: ``fixed``,
    ``mobile`` or ``other`` (toll-free, VoIP, premium, unknown ...). ``FIXED_LINE_OR_MOBILE``
    (plans that do not tell them apart) counts as both and the stricter action wins:
    ``block`` > ``anonymise`` > ``allow``. Before acting, the roaming exception: a number on
    ``roaming_allow`` passes (``roaming_allowed``), and with ``roaming_lookup`` an HTTP
    endpoint is asked ``GET url?number=+E164`` and answers ``{"roaming": true|false}``
    (``roaming_confirmed`` passes). Answers are cached ``cache_s`` in ``RuleState.roaming``;
    a lookup that fails or takes longer than ``timeout_ms`` applies ``on_error`` instead of
    the type's action (reason ``roaming_lookup_<error>``).

    * ``block`` — the caller hears ``answer`` (default ``603 Network Blocked`` with the 603+
      Reason of rule ``callerid``'s ``redress``, or this rule's own ``redress``); reason
      ``national_cli_<type>``.
    * ``anonymise`` — the call goes on with the caller identity withheld (RFC 3323 / 3325): the
      proxy rewrites From to ``"Anonymous" <sip:anonymous@anonymous.invalid>`` keeping its tag,
      the user part of Contact to ``anonymous``, removes P-Asserted-Identity (kept with
      ``keep_pai_to_core: true``), P-Preferred-Identity and Remote-Party-ID, and sets
      ``Privacy: id`` (see :class:`sipguard.contract.Anonymise`), whatever rule comes later.
      The verdict header says ``national_cli.anonymised;<type>``.
    * ``allow`` — nothing.

    Every call the rule looks at gets the label ``national_cli`` (``blocked``, ``anonymised``,
    ``allowed``, ``roaming``) in the decision log and counters. In monitor mode a block is
    reported and forwarded (as every rule), and an anonymisation is only reported
    (``national_cli.anonymised;<type>;monitored`` in the verdict header): the call is forwarded
    untouched.

I/O. Without ``roaming_lookup``, or on a cache hit, the rule answers at once. Otherwise it
returns an awaitable (the INVITE waits in its server transaction) that asks the shell's
:class:`HttpGetter` (``RuleState.http``, aiohttp in ``sipguard.transport.http_get``); at most
``max_concurrent`` lookups run at once, a lookup beyond that applies ``on_error`` at once
(``roaming_lookup_busy``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from sipguard.contract import Anonymise, Verdict
from sipguard.policy import numbers
from sipguard.policy.callerid import _answer
from sipguard.policy.callerid_settings import Redress
from sipguard.policy.peers import NumberSet, Peer

if TYPE_CHECKING:
    from sipguard.contract import CallInfo
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.national_cli_settings import Action, RoamingLookup, Settings
    from sipguard.policy.state import RuleState

STRICTNESS = {"allow": 0, "anonymise": 1, "block": 2}


class HttpGetter(Protocol):
    """The shell's HTTP client: ``GET url`` with ``params`` in the query, the JSON body
    decoded, within ``timeout_s`` seconds. Raises on any failure: :class:`TimeoutError` when
    the time ran out, anything else otherwise."""

    def get_json(self, url: str, params: Mapping[str, str], timeout_s: float) -> Awaitable[Any]: ...


class RoamingCache:
    """Roaming answers per number, kept ``cache_s`` each, at most ``max_entries`` (the oldest
    answer goes first). Lives in :class:`~sipguard.policy.state.RuleState`: reloads keep it."""

    __slots__ = ("entries", "max_entries", "inflight")

    def __init__(self, max_entries: int = 10_000) -> None:
        self.entries: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self.max_entries = max_entries
        self.inflight = 0  # lookups running now

    def get(self, number: str, now: float) -> bool | None:
        hit = self.entries.get(number)
        if hit is None:
            return None
        if hit[0] <= now:
            del self.entries[number]
            return None
        return hit[1]

    def put(self, number: str, roaming: bool, until: float) -> None:
        self.entries.pop(number, None)
        self.entries[number] = (until, roaming)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self.entries)


# ------------------------------------------------------------------------------- the rule


class NationalCli:
    """The built rule for one international peer."""

    __slots__ = (
        "name", "mode", "settings", "peer", "home", "roaming_allow", "actions", "reject",
        "header", "strip", "monitored", "state", "anonymise",
    )

    def __init__(
        self, settings: Settings, mode: str, peer: Peer, redress: Redress, state: RuleState
    ) -> None:
        self.name = "national_cli"
        self.mode = mode
        self.settings = settings
        self.peer = peer
        self.home = NumberSet(f"+{p}*" for p in settings.home_countries)
        self.roaming_allow = NumberSet(settings.roaming_allow)
        self.actions: dict[str, Action] = {
            "fixed": settings.fixed,
            "mobile": settings.mobile,
            "other": settings.other,
            "fixed_or_mobile": max(settings.fixed, settings.mobile, key=STRICTNESS.__getitem__),
        }
        self.reject = _answer(settings.answer, redress.reason_header())
        self.header = settings.verdict_header
        self.strip: tuple[tuple[str, str | None], ...] = (
            ((settings.verdict_header.lower(), None),) if settings.verdict_header else ()
        )
        self.monitored = mode == "monitor"
        self.state = state
        self.anonymise = Anonymise(keep_pai=settings.keep_pai_to_core)

    def decide(self, call: CallInfo, now: float) -> Verdict | None | Awaitable[Verdict | None]:
        caller = call.caller
        e164 = self._home(caller)
        if e164 is None:
            # the number From shows, when it is another: a home number presented there behind
            # a foreign asserted identity is as much a national CLI from abroad
            caller = call.msg.from_.uri.number
            if caller is None or caller == call.caller:
                return None
            e164 = self._home(caller)
            if e164 is None:
                return None
        kind = numbers.number_kind(e164)
        action = self.actions[kind]
        if action == "allow":
            call.labels["national_cli"] = "allowed"
            return None
        if e164 in self.roaming_allow or caller in self.roaming_allow:
            call.labels["national_cli"] = "roaming"
            return None
        lookup = self.settings.roaming_lookup
        if lookup is None:
            return self._act(call, action, kind, f"national_cli_{kind}")
        cache = self.state.roaming
        known = cache.get(e164, now)
        if known is not None:
            if known:
                call.labels["national_cli"] = "roaming"
                return None
            return self._act(call, action, kind, f"national_cli_{kind}")
        getter = self.state.http
        if getter is None:
            return self._act(call, lookup.on_error, kind, "roaming_lookup_unavailable")
        if cache.inflight >= lookup.max_concurrent:
            return self._act(call, lookup.on_error, kind, "roaming_lookup_busy")
        return self._ask(getter, lookup, call, e164, action, kind, now)

    def _home(self, number: str | None) -> str | None:
        """``number`` in E.164 when it is a home-country number, else None — also written as
        a receiver still reads it as one: ``00`` for ``+`` (with no region to say so), a
        trunk 0 left after the country code (``+32(0)2…``, which phonenumbers reads)."""
        if number is None:
            return None
        home = self.home
        spellings = (number, "+" + number[2:]) if number.startswith("00") else (number,)
        for spelling in spellings:
            info = numbers.lookup(spelling, self.peer.default_region)
            e164 = info.e164
            if not info.valid and info.national.startswith("0") and spelling[0] == "+":
                repaired = numbers.lookup(f"+{info.country_code}{info.national.lstrip('0')}")
                if repaired.valid:
                    e164 = repaired.e164
            if e164 is not None and e164 in home:
                return e164
        return None

    async def _ask(
        self, getter: HttpGetter, lookup: RoamingLookup, call: CallInfo, e164: str,
        action: Action, kind: str, now: float,
    ) -> Verdict | None:
        cache = self.state.roaming
        cache.inflight += 1
        try:
            answer = await getter.get_json(lookup.url, {"number": e164},
                                           lookup.timeout_ms / 1000)
        except TimeoutError:
            return self._act(call, lookup.on_error, kind, "roaming_lookup_timeout")
        except Exception:  # noqa: BLE001 - any failure of the lookup applies on_error
            return self._act(call, lookup.on_error, kind, "roaming_lookup_failed")
        finally:
            cache.inflight -= 1
        roaming = answer.get("roaming") if isinstance(answer, dict) else None
        if not isinstance(roaming, bool):
            return self._act(call, lookup.on_error, kind, "roaming_lookup_bad_answer")
        if lookup.cache_s > 0:
            cache.put(e164, roaming, now + lookup.cache_s)
        if roaming:
            call.labels["national_cli"] = "roaming"
            return None
        return self._act(call, action, kind, f"national_cli_{kind}")

    def _act(self, call: CallInfo, action: Action, kind: str, reason: str) -> Verdict | None:
        if action == "allow":
            call.labels["national_cli"] = "allowed"
            return None
        if action == "anonymise":
            call.labels["national_cli"] = "anonymised"
            why = f"national_cli.anonymised;{kind}"
            forward: tuple[str, ...]
            if self.monitored:
                forward = (f"{self.header}: {why};monitored",) if self.header else ()
                return Verdict("accept", rule=self.name, forward_headers=forward,
                               replace_headers=self.strip)
            forward = (f"{self.header}: {why}",) if self.header else ()
            return Verdict("accept", rule=self.name, forward_headers=forward,
                           replace_headers=self.strip, anonymise=self.anonymise)
        call.labels["national_cli"] = "blocked"
        status, phrase, headers = self.reject
        forward = ()
        if self.monitored and self.header:
            forward = (f"{self.header}: national_cli.{reason};monitored",)
        return Verdict("reject", rule=self.name, reason=reason, status=status, phrase=phrase,
                       headers=headers, forward_headers=forward,
                       replace_headers=self.strip if self.monitored else ())


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> NationalCli | None:
    """The rule for an international ``peer``; None for any other (it would never act)."""
    if peer is None or peer.interconnect != "international":
        return None
    redress = settings.redress
    if redress is None:
        cid = ctx.rules.callerid if ctx.rules is not None else None
        redress = cid.redress if cid is not None else Redress()
    return NationalCli(settings, ctx.mode_of(settings), peer, redress, ctx.state)
