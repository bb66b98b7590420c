"""Rule ``callerid``: may this peer present this caller number?

Who the caller is
    The number in the first P-Asserted-Identity (RFC 3325) that carries one, when the peer is
    trusted to assert identities (``trust_pai: true``, the default; with no peers configured
    every source is); else the number in From. Numbers are read from ``tel:`` URIs and from
    SIP URIs whose user part is a number (visual separators dropped, leading ``+`` kept).
    A national-format number is read with the peer's ``default_region``.

Checks, in this order; the first that fails decides (``reason`` in the decision log, the
answer from ``answers.<key>``):

1. ``caller_anonymous`` — a withheld caller (below) with ``anonymous: reject`` (``anonymous``);
2. ``caller_not_e164`` — ``require_e164`` and no caller number, or one that does not normalise
   to E.164 (``invalid``);
3. ``caller_invalid`` — ``reject_invalid`` and phonenumbers says the number is not valid
   (``invalid``);
4. ``caller_dno`` — the number, or the one From shows when it is another, is on the
   Do-Not-Originate list ``dno`` / ``dno_file`` (``dno``);
5. ``caller_not_owned`` — ``ownership``, the peer has ``numbers`` and this is not one of them
   (``not_owned``);
6. ``pai_mismatch`` — P-Asserted-Identity and From carry different numbers (``spoofed``);
7. ``neighbor_spoofing`` — the caller shares the callee's first N national digits
   (``spoofed``).

The last two only tag by default (the call goes on, the tag goes to the core). A withheld
(anonymous) caller is one with ``Privacy: id`` or ``Privacy: user`` (RFC 3323/3325), or a From
user of ``anonymous``, ``restricted``, ``private``, ``unavailable``, ``unknown`` or
``withheld``, or a From host ``anonymous.invalid``. An allowed anonymous caller that still
carries a number (a trusted PAI under ``Privacy: id``) is checked like any other; one without a
number skips the number checks.

What the core gets (accepted calls, and every call of a rule in monitor mode)
    * ``verstat`` (3GPP TS 24.229 §7.2A.20) on every P-Asserted-Identity value that carries a
      number: ``TN-Validation-Failed`` when a check failed (reaches the core only in monitor
      mode: in enforce mode the call is rejected) or rule ``identity``, listed before this one,
      found the STIR/SHAKEN Identity invalid and only tagged it; ``TN-Validation-Passed`` when
      ``identity`` verified it or the peer's ``numbers`` list vouches for the caller;
      ``No-TN-Validation`` otherwise. The same outcome is the decision log label ``verstat``
      (``passed`` / ``failed`` / ``none``). It is a tel URI parameter; in a
      SIP URI it goes in the user part, with ``user=phone``:
      ``<sip:+12125550100;verstat=TN-Validation-Passed@host;user=phone>``. Without a PAI (or
      with one from a peer not trusted to assert identities, which RFC 3325 says to remove) a
      ``P-Asserted-Identity: <tel:+E164;verstat=...>`` is added when the caller is E.164.
      Any ``verstat`` a peer sent is replaced, so no peer can forge one.
    * ``verdict_header`` (default ``X-Sipguard-Verdict``) listing what the rule found, e.g.
      ``callerid.pai_mismatch`` (a tag) or ``callerid.caller_not_owned;monitored`` (a reject
      in monitor mode); absent when there is nothing to say. Received copies are removed.

Fails closed: a number that cannot be read is ``caller_not_e164`` / ``caller_invalid``; the
rule never raises (phonenumbers errors are caught), so there is no fail-open path.

Cost (measured with ``loadtest/bench_callerid.py``, see docs/rules.md): about 20 µs per INVITE
for a caller number seen before (the number lookup is one cache hit, see
:mod:`sipguard.policy.numbers`), about 80 µs for a new one (phonenumbers' validity check).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from sipguard.contract import Verdict, identity_values, national_tail, same_number
from sipguard.policy import numbers
from sipguard.policy.callerid_settings import Answers
from sipguard.policy.peers import NumberSet, Peer, read_number_file
from sipguard.policy.settings import ListFileError
from sipguard.sip.errors import SipParseError
from sipguard.sip.uri import MAX_HIDDEN, display_number, hidden_numbers

if TYPE_CHECKING:
    from pathlib import Path

    from sipguard.contract import CallInfo
    from sipguard.policy.callerid_settings import Settings
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.settings import Answer
    from sipguard.sip.message import Message
    from sipguard.sip.nameaddr import NameAddr
    from sipguard.sip.uri import Uri

PASSED: Final = "TN-Validation-Passed"
FAILED: Final = "TN-Validation-Failed"
NO_VALIDATION: Final = "No-TN-Validation"
LABELS: Final = {PASSED: "passed", FAILED: "failed", NO_VALIDATION: "none"}  # CallInfo.labels["verstat"]

ANONYMOUS_USERS: Final = frozenset(
    {"anonymous", "restricted", "private", "unavailable", "unknown", "withheld"}
)
ANONYMOUS_PRIVACY: Final = frozenset({"id", "user"})


# ------------------------------------------------------------------------------- the rule

_Edit = tuple[str, str | None]


class CallerId:
    """The built rule for one peer (or for traffic from no configured peer)."""

    __slots__ = (
        "name", "mode", "settings", "peer", "region", "dno", "dno_file", "answers",
        "header", "strip", "monitored", "region_cc", "national_dno",
    )

    def __init__(
        self, settings: Settings, mode: str, peer: Peer | None, dno_file: NumberSet | None,
        region: str | None = None,
    ) -> None:
        self.name = "callerid"
        self.mode = mode
        self.settings = settings
        self.peer = peer
        self.region = peer.default_region if peer is not None else region
        self.dno = NumberSet(settings.dno) if settings.dno else None
        self.dno_file = dno_file
        self.region_cc = numbers.country_code_of(self.region)
        # a DNO list with national entries (an industry list of 10-digit NANP numbers):
        # an E.164 caller is looked up in its national spellings too (see _on_dno)
        self.national_dno = (self.dno is not None and self.dno.national) or (
            dno_file is not None and dno_file.national)
        blocked = settings.redress.reason_header()
        self.answers = {
            key: _answer(getattr(settings.answers, key), blocked)
            for key in Answers.model_fields
        }
        self.header = settings.verdict_header
        self.strip: tuple[_Edit, ...] = (
            ((settings.verdict_header.lower(), None),) if settings.verdict_header else ()
        )
        self.monitored = mode == "monitor"

    # ------------------------------------------------------------------ decide
    def decide(self, call: CallInfo, now: float) -> Verdict:
        s = self.settings
        msg = call.msg
        peer = self.peer
        trusted = peer is None or peer.trust_pai
        has_pai = msg.has("p-asserted-identity")
        pai_number = _first_number(msg.p_asserted_identities) if has_pai else None
        from_uri = msg.from_.uri
        from_number = from_uri.number
        raw = pai_number if trusted and pai_number is not None else from_number
        # what From shows: its number, or one a receiver may read where sipguard reads none
        # (*67+1312…, +1312…x12, x1900…)
        hidden = hidden_numbers(from_uri) if from_number is None else []
        shown = from_number if from_number is not None else (hidden[0] if hidden else None)
        if s.anonymous == "reject" and _is_anonymous(msg, from_uri):
            return self._fail(call, "caller_anonymous", "anonymous", None, NO_VALIDATION, ())
        if len(hidden) > MAX_HIDDEN:
            # decoy after decoy (x1234567x1234567x…+1900…): no identity a rule can check
            return self._fail(call, "caller_invalid", "invalid", None, FAILED, ())
        if raw is None:
            if s.require_e164 and not _is_anonymous(msg, from_uri):
                return self._fail(call, "caller_not_e164", "invalid", None, FAILED, ())
            if s.display_mismatch != "ignore" and display_number(msg.from_.display) is not None:
                # a withheld caller whose display name is a number: a number no rule
                # checked, on the agent's screen ("+1 800 …" <sip:anonymous@anonymous.invalid>)
                if s.display_mismatch == "reject":
                    return self._fail(call, "display_mismatch", "spoofed", None, FAILED, ())
                return self._pass(call, None, NO_VALIDATION, ["callerid.display_mismatch"])
            return self._pass(call, None, NO_VALIDATION, ())
        region = self.region
        info = numbers.lookup(raw, region)
        e164: str | None = info.e164
        if s.require_e164 and e164 is None:
            return self._fail(call, "caller_not_e164", "invalid", e164, FAILED, ())
        if s.reject_invalid and not info.valid:
            return self._fail(call, "caller_invalid", "invalid", e164, FAILED, ())
        if (self.dno is not None or self.dno_file is not None) and (
            self._on_dno(e164, raw) or any(
                # a DNO number shown in From, behind another asserted identity or a decoy
                # run of digits (sip:123456x+1900…@)
                other != raw and self._on_dno(numbers.lookup(other, region).e164, other)
                for other in ((from_number,) if from_number is not None else hidden)
            )
        ):
            return self._fail(call, "caller_dno", "dno", e164, FAILED, ())
        verstat = NO_VALIDATION
        if s.ownership and peer is not None and peer.numbers is not None:
            if not _listed(peer.numbers, e164, raw):
                return self._fail(call, "caller_not_owned", "not_owned", e164, FAILED, ())
            if not peer.numbers.match_all:  # "*" vouches for no number in particular
                verstat = PASSED
        tags: list[str] = []
        if s.pai_mismatch != "ignore" and pai_number is not None and trusted and \
                shown is not None and (
            # a telephone number (an extension, From sip:1000@pbx, is none) that is another
            shown.startswith("+") or sum(c.isdigit() for c in shown) >= 6
        ) and not _same_number(pai_number, shown, region):
            if s.pai_mismatch == "reject":
                return self._fail(call, "pai_mismatch", "spoofed", e164, FAILED, ())
            tags.append("callerid.pai_mismatch")
        if s.display_mismatch != "ignore" and _display_mismatch(
                msg, has_pai and trusted, raw, from_number, region):
            if s.display_mismatch == "reject":
                return self._fail(call, "display_mismatch", "spoofed", e164, FAILED, tags)
            tags.append("callerid.display_mismatch")
        ns = s.neighbor_spoofing
        if ns.enabled and e164 is not None and call.callee is not None:
            callee = numbers.parts(call.callee, region)  # compared, not judged: no validity
            if (
                callee.e164 is not None
                and callee.e164 != e164
                and callee.country_code == info.country_code
                and len(info.national) > ns.digits
                and callee.national[: ns.digits] == info.national[: ns.digits]
            ):
                if ns.action == "reject":
                    return self._fail(call, "neighbor_spoofing", "spoofed", e164, FAILED, tags)
                tags.append("callerid.neighbor_spoofing")
        return self._pass(call, e164, verstat, tags)

    def _on_dno(self, e164: str | None, raw: str) -> bool:
        dno, dno_file = self.dno, self.dno_file
        if (dno is not None and _listed(dno, e164, raw)) or (
                dno_file is not None and _listed(dno_file, e164, raw)):
            return True
        if e164 is None or not self.national_dno:
            return False
        # national entries: the number's national spellings, when it is of the peer's
        # country (any country without a default_region: a DNO list only ever blocks)
        if self.region_cc and numbers.parts(e164).country_code != self.region_cc:
            return False
        return any((dno is not None and n in dno) or (dno_file is not None and n in dno_file)
                   for n in numbers.national_forms(e164))

    # ------------------------------------------------------------------ verdicts
    def _pass(
        self, call: CallInfo, e164: str | None, verstat: str, tags: list[str] | tuple[str, ...]
    ) -> Verdict:
        identity = call.labels.get("identity")  # rule identity, when it ran before this one
        if identity == "failed":
            verstat = FAILED
        elif identity == "passed":
            verstat = PASSED
        call.labels["verstat"] = LABELS[verstat]
        if tags:  # the first, as rule dialer's: the decision line's field, a counter
            call.labels["callerid"] = tags[0].removeprefix("callerid.")
        forward = (f"{self.header}: {', '.join(tags)}",) if tags and self.header else ()
        return Verdict(
            "accept",
            rule=self.name,
            forward_headers=forward,
            replace_headers=self._edits(call.msg, e164, verstat),
        )

    def _fail(
        self, call: CallInfo, reason: str, answer: str, e164: str | None, verstat: str,
        tags: list[str] | tuple[str, ...],
    ) -> Verdict:
        status, phrase, headers = self.answers[answer]
        call.labels["verstat"] = LABELS[verstat]
        forward: tuple[str, ...] = ()
        if self.monitored and self.header:  # only a monitored reject is ever forwarded
            forward = (f"{self.header}: {', '.join([*tags, f'callerid.{reason};monitored'])}",)
        return Verdict(
            "reject",
            rule=self.name,
            reason=reason,
            status=status,
            phrase=phrase,
            headers=headers,
            forward_headers=forward,
            replace_headers=self._edits(call.msg, e164, verstat) if self.monitored else (),
        )

    def _edits(self, msg: Message, e164: str | None, verstat: str) -> tuple[_Edit, ...]:
        """Strip the verdict header a peer sent; put verstat on P-Asserted-Identity."""
        trusted = self.peer is None or self.peer.trust_pai
        has_pai = msg.has("p-asserted-identity")
        pai: _Edit | None = None
        if has_pai and trusted and not self.settings.verstat:
            pass  # as received, to the proxy's one-identity rule (contract.one_identity)
        elif line := (_pai_line(msg, verstat) if has_pai and trusted else ""):
            pai = ("p-asserted-identity", line)
        elif self.settings.verstat and e164 is not None:
            # None there (or no value left), or not trusted (RFC 3325 §5: removed): assert
            # the checked caller.
            pai = ("p-asserted-identity", f"P-Asserted-Identity: <tel:{e164};verstat={verstat}>")
        elif has_pai:
            pai = ("p-asserted-identity", None)
        return self.strip if pai is None else (*self.strip, pai)


def _answer(answer: Answer, blocked_reason: str) -> tuple[int, str, tuple[str, ...]]:
    """(status, phrase, headers); a ``603 Network Blocked`` gets the 603+ Reason unless the
    answer brings its own Reason."""
    phrase = answer.phrase or ""
    headers = answer.headers
    if (
        answer.status == 603
        and phrase.lower() == "network blocked"
        and not any(h.split(":", 1)[0].strip().lower() == "reason" for h in headers)
    ):
        headers = (*headers, blocked_reason)
    return answer.status, phrase, headers


# ------------------------------------------------------------------------------- helpers


def _first_number(values: list[NameAddr]) -> str | None:
    for na in values:
        if na.uri.number is not None:
            return na.uri.number
    return None


def _display_mismatch(msg: Message, pai: bool, caller: str, from_number: str | None,
                      region: str | None) -> bool:
    """The display name of From (or of any P-Asserted-Identity value, ``pai``) is a
    telephone number that is neither ``caller`` nor From's number."""
    names = [msg.from_.display]
    if pai:
        names.extend(na.display for na in msg.p_asserted_identities)
    for name in names:
        digits = display_number(name)
        if digits is None:
            continue
        if not _shows(digits, caller, region) and (
                from_number is None or not _shows(digits, from_number, region)):
            return True
    return False


def _shows(digits: str, number: str, region: str | None) -> bool:
    """A display name's ``digits`` are ``number``: the same in E.164, or its national
    spelling — the number's last digits but at most a country code's three, a trunk 0 aside
    (read without a region too). An international spelling (``+``, ``00``) must be the same
    number: ``+2015552201`` is Egypt's, not ``+12015552201``."""
    if _same_number(digits, number, region):
        return True
    if digits.startswith("+"):  # a trunk 0 left after the country code: "+44 (0)20 …"
        info = numbers.lookup(digits)  # (not when +CC0… is a number itself: Italy's 0…)
        return bool(info.country_code) and not info.valid and info.national.startswith("0") \
            and same_number(f"+{info.country_code}{info.national.lstrip('0')}", number)
    if digits.startswith("00"):
        return False
    return national_tail(digits.lstrip("0"), "".join(c for c in number if c.isdigit()))


def asserts_caller(msg: Message, caller: str | None, region: str | None) -> bool:
    """A caller's later request (or answer) in a call checked as ``caller``: its
    P-Asserted-Identity — the first number there, and a number a display name there shows —
    is that caller (the same in E.164, read with the peer's ``region``; a display name in its
    national spelling too). A withheld caller (None) asserts no number later."""
    try:
        values = msg.p_asserted_identities
    except SipParseError:
        return False
    number = _first_number(values)
    if number is not None and (caller is None or not _same_number(number, caller, region)):
        return False
    for na in values:
        digits = display_number(na.display)
        if digits is not None and (caller is None or not _shows(digits, caller, region)):
            return False
    return True


def _listed(ns: NumberSet, e164: str | None, raw: str) -> bool:
    return (e164 is not None and e164 in ns) or raw in ns


def _same_number(a: str, b: str, region: str | None) -> bool:
    """One number: the same digits in another international spelling (contract.same_number),
    or the same E.164 number once each is read with ``region``."""
    if a == b or same_number(a, b):
        return True
    ea = numbers.lookup(a, region).e164
    return ea is not None and ea == numbers.lookup(b, region).e164


def _is_anonymous(msg: Message, from_uri: Uri) -> bool:
    """Withheld caller: Privacy id/user (RFC 3323 §4.2, RFC 3325 §9.3) or an anonymous From
    (RFC 3323 §4.1.1.3 recommends ``"Anonymous" <sip:anonymous@anonymous.invalid>``)."""
    if msg.has("privacy"):
        for value in msg.values("privacy"):
            for token in value.replace(",", ";").split(";"):
                if token.strip().lower() in ANONYMOUS_PRIVACY:
                    return True
    if from_uri.host == "anonymous.invalid":
        return True
    user = from_uri.user
    return user is not None and user.lower() in ANONYMOUS_USERS


_PAI_LINES: Final[dict[tuple[tuple[str, ...], str], str]] = {}
_PAI_LINES_MAX: Final = 4096
_PAI_MEMO_CHARS: Final = 512  # the longest received PAI text memoised


def pai_with_verstat(msg: Message, verstat: str, caller: str | None, trusted: bool) -> str | None:
    """The P-Asserted-Identity line that carries ``verstat``, for rule ``identity`` when rule
    ``callerid`` does not put verstat on: the received values with it set on the caller's
    (``trusted``: the peer asserts identities), else ``<tel:caller>`` for an E.164 caller; ""
    when an untrusted PAI is to be removed with nothing in its place (RFC 3325 §5); None when
    nothing changes."""
    has_pai = msg.has("p-asserted-identity")
    if has_pai and trusted:
        line = _pai_line(msg, verstat)
        if line:
            return line
    if caller is not None and caller.startswith("+") and caller[1:].isdigit():
        return f"P-Asserted-Identity: <tel:{caller};verstat={verstat}>"
    return "" if has_pai else None


def _pai_line(msg: Message, verstat: str) -> str:
    """The P-Asserted-Identity line for the received values with ``verstat`` set on those
    holding the caller's number (the first number among them: the one checked) and any other
    ``verstat`` removed — a second identity nobody checked is not vouched for (TS 24.229
    §7.2A.20). Memoised by the received text (a caller's PAI comes back call after call); the
    memo is emptied when full; long values are not memoised (a memo of 4096 entries of 64 KB
    would hold 256 MB)."""
    values = tuple(msg.values("p-asserted-identity"))
    key = (values, verstat)
    line = _PAI_LINES.get(key)
    if line is None:
        pais = msg.p_asserted_identities
        checked = _first_number(pais)
        kept = identity_values(pais)  # as the proxy keeps them (contract.one_identity)
        line = "P-Asserted-Identity: " + ", ".join(
            _with_verstat(na, verstat if na.uri.number == checked else None) for na in kept
        ) if kept else ""  # none left: the header goes (RFC 3325 §9.1: never empty)
        if sum(map(len, values)) <= _PAI_MEMO_CHARS:
            if len(_PAI_LINES) >= _PAI_LINES_MAX:
                _PAI_LINES.clear()
            _PAI_LINES[key] = line
    return line


def _with_verstat(na: NameAddr, verstat: str | None) -> str:
    """One P-Asserted-Identity value with ``verstat`` set (TS 24.229 §7.2A.20; None: none
    set) and any ``verstat`` the peer put there (in the URI or as a header parameter)
    removed."""
    uri_text = _uri_with_verstat(na.uri, verstat)
    raw = na.raw
    params = [(k, v) for k, v in na.params if k != "verstat"]
    old = "<" + na.uri.raw + ">"
    at = raw.find(old)
    display = raw[:at] if at >= 0 else ""
    # a display name that spells a verstat ('"x;verstat=TN-Validation-Passed"') is left out:
    # a receiver that looks for "verstat=" in the text would read it before ours
    forged = "verstat" in display.lower()
    if uri_text is None and len(params) == len(na.params) and not forged:
        return raw
    if forged:
        display = ""
    tail = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)
    return f"{display}<{uri_text or na.uri.raw}>{tail}"


def _is_verstat(param: str) -> bool:
    """Whether a raw URI parameter (``name=value``) is a verstat, however its name is written
    (any case, %-escaped letters: the URI grammar reads ``ver%73tat`` as ``verstat``)."""
    name = param.split("=", 1)[0].strip()
    if "%" in name:
        name = unquote(name, encoding="latin-1")
    return name.lower() == "verstat"


def _without_verstat(rest: str) -> str:
    """``@host;params?headers`` of a SIP URI without any ``verstat`` URI parameter or URI
    header a peer put there (receivers read it there too)."""
    if "verstat" not in rest.lower() and "%" not in rest:
        return rest
    hostparams, question, headers = rest.partition("?")
    host, *params = hostparams.split(";")
    out = ";".join([host, *(p for p in params if not _is_verstat(p))])
    if question:
        kept = [h for h in headers.split("&") if not _is_verstat(h)]
        if kept:
            out += "?" + "&".join(kept)
    return out


def _uri_with_verstat(uri: Uri, verstat: str | None) -> str | None:
    """The URI text with ``;verstat=`` set (None: only any verstat removed): a tel URI
    parameter, or in the user part of a SIP URI (with ``user=phone`` added when the URI has
    no ``user`` parameter). Without a telephone number none is set, any the peer wrote
    removed. None for another scheme."""
    raw = uri.raw
    if uri.number is None:
        verstat = None  # none set; one the peer put there still goes (a sip:gw@carrier)
    add = [] if verstat is None else [f"verstat={verstat}"]
    if uri.scheme == "tel":
        head, *params = raw.split(";")
        kept = [p for p in params if not _is_verstat(p)]
        return ";".join([head, *kept, *add])
    if uri.scheme not in ("sip", "sips"):
        return None
    if uri.user is None:
        return raw[: raw.index(":") + 1] + _without_verstat(raw[raw.index(":") + 1 :])
    start = raw.index(":") + 1
    at = raw.index("@", start)
    user, colon, password = raw[start:at].partition(":")
    if "%" in user:  # an escaped ";" or "=" (the number reader un-escapes them) written out,
        # so that a verstat hidden behind them is found (";" and "=" are allowed in a user)
        user = user.replace("%3B", ";").replace("%3b", ";").replace("%3D", "=").replace(
            "%3d", "=")
    head, *params = user.split(";")
    kept = [p for p in params if not _is_verstat(p)]
    user = ";".join([head, *kept, *add])
    out = raw[:start] + user + colon + password + _without_verstat(raw[at:])
    if verstat is not None and not uri.has_param("user"):
        query = out.find("?", start + len(user))
        out = out + ";user=phone" if query < 0 else out[:query] + ";user=phone" + out[query:]
    return out


# ------------------------------------------------------------------------------- build


DNO_FILE_KEY: Final = ("rules", "callerid", "dno_file")  # where it is set (ListFileError)


def load_list(ctx: BuildContext, path: Path) -> NumberSet:
    """A number list file as a NumberSet, reused across peers and reloads while the file is
    unchanged (same mtime and size): a million-line DNO list is read once, not per peer. A
    list read anew is remembered when the policy that read it is activated."""
    key = str(path)
    same = ctx.used_lists.get(key)
    if same is not None:  # one list per file in one build, even if it changes meanwhile
        return same[1]
    try:
        st = path.stat()
    except OSError as exc:
        raise ListFileError.unreadable(DNO_FILE_KEY, "callerid dno_file", path, exc) from None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = ctx.pending_lists.get(key) or ctx.state.list_files.get(key)
    if hit is not None and hit[0] == stamp:
        ctx.used_lists[key] = hit
        return hit[1]
    try:
        numbers_set = NumberSet(read_number_file(path, ctx.state.pause), ctx.state.pause)
    except ValueError as exc:
        raise ListFileError(DNO_FILE_KEY, f"callerid dno_file: {exc}") from None
    except OSError as exc:
        raise ListFileError.unreadable(DNO_FILE_KEY, "callerid dno_file", path, exc) from None
    ctx.pending_lists[key] = ctx.used_lists[key] = (stamp, numbers_set)
    return numbers_set


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> CallerId:
    """The rule for ``peer`` (None: traffic from no configured peer)."""
    dno_file = load_list(ctx, settings.dno_file) if settings.dno_file else None
    return CallerId(settings, ctx.mode_of(settings), peer, dno_file, ctx.cfg.default_region)
