"""The sipguard configuration file: schema, loading, and error reports an operator can act on.

The file is YAML. Only ``listen`` and ``core`` are required; every other setting has a default
(see ``config/sipguard.yaml`` for all of them, each with a comment)::

    listen: [udp://127.0.0.1:5060, tcp://127.0.0.1:5060]
    core: udp://127.0.0.1:5080

Unknown keys, duplicate keys and out-of-range values are errors. :func:`load_config` reports
every problem at once as a :class:`ConfigError` whose lines read ``FILE:LINE: FIELD: message``,
e.g. ``sipguard.yaml:7: sip.max_message_size: Input should be less than or equal to 1048576``.

Every model is frozen: a loaded :class:`Config` never changes, so a reload builds a fresh tree
with :func:`load_config` and swaps one reference; code holding the old tree keeps a consistent
view until it looks again.

Relative file paths (future ``dno_file``, ``numbers_file``, ``trust_anchors``, ``token_file``)
are declared with the :data:`ConfigPath` type. It resolves them against the folder of the config
file (``base_dir``, passed to pydantic as validation context), not against the process's
working directory, so ``sipguard run --config /etc/sipguard/sipguard.yaml`` finds
``dno.txt`` next to the config file wherever it is started from.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from sipguard.policy.callerid import Settings as CallerIdSettings
from sipguard.policy.concurrency import Settings as ConcurrencySettings
from sipguard.policy.dialer import Settings as DialerSettings
from sipguard.policy.flood import Settings as FloodSettings
from sipguard.policy.identity import Settings as IdentitySettings
from sipguard.policy.rate import Settings as RateSettings
from sipguard.policy.settings import FROZEN as _RULE_FROZEN
from sipguard.policy.settings import ConfigPath, networks

__all__ = [
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ConfigPath",
    "Endpoint",
    "ListenUri",
    "LogSettings",
    "SipSettings",
    "config_with_overrides",
    "load_config",
    "parse_config",
]

# --------------------------------------------------------------------------- endpoints

_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
_HOSTPORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[^:]*))?")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _check_host(text: str, bracketed: bool) -> str:
    """Return the host normalised (IP literals compressed), or raise ValueError."""
    if bracketed:
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"[{text}] is not an IPv6 address") from None
    if not text:
        raise ValueError("host is missing")
    if re.fullmatch(r"[0-9.]+", text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv4 address") from None
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not an IP address or hostname")
    return text.lower()


def _split_hostport(text: str, port_required: bool) -> tuple[str, int | None]:
    """Split ``host:port`` / ``[v6]:port`` (port optional unless required) and check both."""
    if text.count(":") > 1 and not text.startswith("["):
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. [::1]:5060, got {text!r}")
    match = _HOSTPORT.fullmatch(text)
    if match is None:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    bracketed = match["v6"] is not None
    host = _check_host(match["v6"] if bracketed else match["name"], bracketed)
    if match["port"] is None:
        if port_required:
            raise ValueError(f"port is missing in {text!r}, e.g. {text}:5060")
        return host, None
    if not match["port"].isdigit() or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"port must be 1..65535, got {match['port']!r}")
    return host, int(match["port"])


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A transport address written as a URI: ``udp://HOST:PORT``, ``tcp://[::1]:5060``.

    ``host`` is an IP literal (IPv6 stored without brackets, compressed) or a hostname.
    ``str(endpoint)`` gives the URI back. In a config file it is written as that string.
    """

    transport: Literal["udp", "tcp"]
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse a URI such as ``udp://10.0.0.1:5060``; raise ValueError saying what is wrong.

        For argparse, wrap it so the message survives: catch ValueError and raise
        ``argparse.ArgumentTypeError(str(exc))``.
        """
        match = _URI.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"expected a URI like udp://HOST:PORT or tcp://HOST:PORT, got {text!r}"
            )
        scheme = match["scheme"].lower()
        if scheme == "tls":
            raise ValueError("tls listeners are not supported yet")
        if scheme not in ("udp", "tcp"):
            raise ValueError(f"unknown transport {scheme + '://'!r}: use udp:// or tcp://")
        rest = match["rest"]
        if any(c in rest for c in "/@?#; \t"):
            raise ValueError(f"expected only HOST:PORT after {scheme}://, got {rest!r}")
        host, port = _split_hostport(rest, port_required=True)
        assert port is not None
        return cls("udp" if scheme == "udp" else "tcp", host, port)

    def __str__(self) -> str:
        return f"{self.transport}://{_format_host(self.host)}:{self.port}"

    @classmethod
    def _validate(cls, value: object) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        if not isinstance(value, str):
            raise ValueError("expected a URI string like udp://HOST:PORT")
        return cls.parse(value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


ListenUri: TypeAlias = Endpoint
"""A listen address: an :class:`Endpoint` written as ``udp://HOST:PORT`` / ``tcp://HOST:PORT``."""

# --------------------------------------------------------------------------- file paths


# --------------------------------------------------------------------------- schema

_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SipSettings(BaseModel):
    """SIP protocol behaviour and limits (the ``sip:`` section)."""

    model_config = _FROZEN

    max_message_size: int = Field(
        default=65535,
        ge=1024,
        le=1048576,
        description="Largest SIP message accepted, bytes (513 above).",
    )
    max_dialog_lifetime_s: float = Field(
        default=14400,
        gt=0,
        description="A dialog older than this is forgotten (no BYE seen), seconds.",
    )
    answer_options: bool = Field(
        default=True,
        description="Answer out-of-dialog OPTIONS addressed to sipguard itself with 200.",
    )
    record_route: bool = Field(
        default=True, description="Add Record-Route so in-dialog requests pass us."
    )
    t1_ms: int = Field(default=500, ge=1, description="RFC 3261 T1, RTT estimate, milliseconds.")
    t2_ms: int = Field(
        default=4000, ge=1, description="RFC 3261 T2, max non-INVITE retransmit interval."
    )
    t4_ms: int = Field(
        default=5000, ge=1, description="RFC 3261 T4, max time a message stays in network."
    )
    timer_c_s: float = Field(
        default=180,
        gt=0,
        description="RFC 3261 §16.6 Timer C, proxy INVITE timeout; > 180 s advised.",
    )
    tcp_idle_timeout_s: float = Field(
        default=600, gt=0, description="Close idle TCP connections, seconds."
    )
    udp_receive_buffer: int = Field(
        default=4194304,
        ge=65536,
        le=268435456,
        description="SO_RCVBUF of each UDP socket, bytes: the queue that absorbs bursts "
        "(the kernel drops and counts datagrams beyond it).",
    )
    overload_shed_above: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Overload protection: when a UDP receive queue is fuller than this share "
        "of udp_receive_buffer, new calls get 503 + Retry-After at once, so the calls in "
        "progress keep their messages. None: off.",
    )
    overload_resume_below: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Overload protection ends when every UDP receive queue is below this share.",
    )
    overload_retry_after_s: int = Field(
        default=5, ge=0, description="Retry-After on the 503 answers while overloaded, seconds."
    )
    advertise: str | None = Field(
        default=None,
        description="host[:port] for Via/Record-Route instead of the listen address "
        "(NAT, 0.0.0.0 binds). None: use the listen address.",
    )

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = _split_hostport(value.strip(), port_required=False)
        return _format_host(host) + ("" if port is None else f":{port}")

    @model_validator(mode="after")
    def _check_timers(self) -> SipSettings:
        if self.t2_ms < self.t1_ms:
            raise ValueError(f"t2_ms ({self.t2_ms}) must not be below t1_ms ({self.t1_ms})")
        shed = self.overload_shed_above
        if shed is not None and self.overload_resume_below >= shed:
            raise ValueError(
                f"overload_resume_below ({self.overload_resume_below}) must be below "
                f"overload_shed_above ({shed})"
            )
        return self


class MetricsSettings(BaseModel):
    """Prometheus metrics (the ``metrics:`` section)."""

    model_config = _FROZEN

    listen: str | None = Field(
        default=None,
        description="host:port of the HTTP endpoint serving /metrics (and /healthz); "
        "null: no endpoint.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = _split_hostport(value.strip(), port_required=True)
        return _format_host(host) + f":{port}"

    @property
    def host_port(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class LogSettings(BaseModel):
    """Logging (the ``log:`` section)."""

    model_config = _FROZEN

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written."
    )
    format: Literal["json", "console"] = Field(
        default="json", description="json: one JSON object a line; console: human-readable."
    )
    parse_error_sample_s: float = Field(
        default=1.0, ge=0, description="At most one log line per error kind per this many seconds."
    )


class RulesConfig(BaseModel):
    """The ``rules:`` section: one key per rule, evaluated in the order the file lists them.

    A rule that is absent is off. Each rule's parameters, with defaults, are documented in its
    module under ``sipguard/policy/`` and in ``docs/rules.md``.
    """

    model_config = _RULE_FROZEN

    callerid: CallerIdSettings | None = Field(default=None, description="Caller-ID spoofing.")
    identity: IdentitySettings | None = Field(
        default=None, description="STIR/SHAKEN Identity verification."
    )
    concurrency: ConcurrencySettings | None = Field(
        default=None, description="Per-number concurrent call limits."
    )
    rate: RateSettings | None = Field(default=None, description="Call-rate limits (GCRA).")
    dialer: DialerSettings | None = Field(default=None, description="Dialer analytics.")
    flood: FloodSettings | None = Field(
        default=None, description="Flood and scanner defence (before parsing)."
    )
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, dict):
            model._order = tuple(k for k in data if data[k] is not None)
        elif isinstance(data, RulesConfig):
            model._order = data._order
        return model

    @property
    def order(self) -> tuple[str, ...]:
        """Names of the configured rules, in file order."""
        return tuple(n for n in self._order if getattr(self, n, None) is not None)


def _deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` (mappings recursively; anything else replaced)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _deep_merge(base.get(key), value) if key in base else value
        return out
    return over


class PeerConfig(BaseModel):
    """One peer (``peers:`` list item): who it is and what caller numbers it may present.

    - ``name`` (required): a label used in logs, metrics and the admin API.
    - ``networks`` (required): source CIDRs (IPv4/IPv6) this peer sends from.
    - ``numbers``: caller numbers it may present: exact E.164 numbers or ``+1212555*`` prefix
      patterns; ``numbers_file``: the same, one a line, ``#`` comments (up to millions of
      lines). Neither given: the peer may present any number.
    - ``default_region``: ISO country code (``US``) to read national-format numbers.
    - ``trust_pai`` (``true``): take the caller from P-Asserted-Identity when present.
    - ``rules``: overrides merged over the top-level ``rules:`` for this peer's traffic.
    """

    model_config = _FROZEN

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(min_length=1)
    numbers: tuple[str, ...] = ()
    numbers_file: ConfigPath | None = None
    default_region: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    trust_pai: bool = True
    rules: RulesConfig = Field(default=RulesConfig())

    @field_validator("networks", mode="before")
    @classmethod
    def _strict_networks(cls, value: object) -> object:
        return networks(value)

    @field_validator("numbers")
    @classmethod
    def _check_numbers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not re.fullmatch(r"\+?[0-9 ().-]+\*?|\*", item.strip()):
                raise ValueError(f"{item!r} is not a number or a prefix pattern like '+1212555*'")
        return value

    @field_validator("numbers_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value


class Config(BaseModel):
    """The whole configuration file.

    - ``listen`` (required): one or more ``udp://HOST:PORT`` / ``tcp://HOST:PORT`` to accept
      SIP on; a single string is accepted as a one-item list.
    - ``core`` (required): where accepted calls are sent, same URI syntax.
    - ``mode`` (``enforce``): ``enforce`` rejects what policy rejects; ``monitor`` only logs.
    - ``sip``: :class:`SipSettings`; ``log``: :class:`LogSettings` (all defaults if omitted).
    """

    model_config = _FROZEN

    listen: tuple[ListenUri, ...] = Field(min_length=1, description="Addresses to accept SIP on.")
    core: Endpoint = Field(description="Where accepted calls are sent.")
    mode: Literal["enforce", "monitor"] = Field(
        default="enforce", description="enforce: reject per policy; monitor: only log the decision."
    )
    sip: SipSettings = Field(default=SipSettings(), description="SIP behaviour and limits.")
    log: LogSettings = Field(default=LogSettings(), description="Logging.")
    metrics: MetricsSettings = Field(
        default=MetricsSettings(), description="Prometheus metrics endpoint."
    )
    peers: tuple[PeerConfig, ...] = Field(
        default=(), description="Known peers; empty: every source is accepted."
    )
    unknown_source: Literal["reject", "drop"] = Field(
        default="reject",
        description="Traffic from an address in no peer's networks: 403, or dropped silently.",
    )
    suspended: tuple[str, ...] = Field(
        default=(), description="Numbers suspended at once: INVITEs from or to them get 403."
    )
    rules: RulesConfig = Field(default=RulesConfig(), description="Rules, in evaluation order.")

    @model_validator(mode="before")
    @classmethod
    def _merge_peer_rules(cls, data: Any) -> Any:
        """Each peer's ``rules`` become the top-level rules with the peer's overrides merged in."""
        if not isinstance(data, dict) or not isinstance(data.get("peers"), list):
            return data
        top = data.get("rules") or {}
        peers = []
        for peer in data["peers"]:
            if isinstance(peer, dict) and isinstance(top, dict):
                over = peer.get("rules") or {}
                if isinstance(over, dict):
                    merged = _deep_merge(top, over)
                    # keep the file order of the top level, then rules only the peer adds
                    peer = {**peer, "rules": merged}
            peers.append(peer)
        return {**data, "peers": peers}

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: tuple[PeerConfig, ...]) -> tuple[PeerConfig, ...]:
        seen: set[str] = set()
        for peer in value:
            if peer.name in seen:
                raise ValueError(f"peer name {peer.name!r} is used twice")
            seen.add(peer.name)
        return value

    @field_validator("suspended")
    @classmethod
    def _check_suspended(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not re.fullmatch(r"\+?[0-9 ().-]+", item.strip()):
                raise ValueError(f"{item!r} is not a telephone number")
        return value

    @field_validator("sip", "log", "metrics", mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, value: object) -> object:
        return {} if value is None else value

    @field_validator("listen", mode="before")
    @classmethod
    def _one_listen_string(cls, value: object) -> object:
        return [value] if isinstance(value, str | Endpoint) else value

    @field_validator("listen")
    @classmethod
    def _unique_listen(cls, value: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        for i, endpoint in enumerate(value):
            if endpoint in value[:i]:
                raise ValueError(f"{endpoint} is listed twice")
        return value

    @field_validator("core")
    @classmethod
    def _core_is_elsewhere(cls, value: Endpoint, info: ValidationInfo) -> Endpoint:
        if value.host in ("0.0.0.0", "::"):
            raise ValueError(f"core must be a concrete address, not {_format_host(value.host)}")
        if value in info.data.get("listen", ()):
            raise ValueError(f"core {value} is also a listen address: calls would loop")
        return value


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: dotted field ``path`` (``sip.t1_ms``, ``listen[1]``; empty for the whole
    file), the 1-based ``line`` in the file when known, and what is wrong."""

    path: str
    line: int | None
    message: str


class ConfigError(Exception):
    """The configuration cannot be used; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = []
        for issue in self.issues:
            where = self.source if issue.line is None else f"{self.source}:{issue.line}"
            field = f" {issue.path}:" if issue.path else ""
            lines.append(f"{where}:{field} {issue.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at ``path``; relative paths in it resolve against
    its folder. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [ConfigIssue("", None, f"cannot read: {reason}")]) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Validate YAML ``text``; ``source`` names it in errors, ``base_dir`` anchors relative
    paths (default: the working directory). Raises :class:`ConfigError`."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError(source, [ConfigIssue("", None, "the file is empty")])
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(source, [ConfigIssue("", _line(root), "expected a mapping of keys")])
        duplicates = _duplicate_keys(root, "", set())
        if duplicates:
            raise ConfigError(source, duplicates)
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_issue(exc)]) from None
    finally:
        loader.dispose()
    context = {"base_dir": base_dir if base_dir is not None else Path.cwd()}
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, _issues(exc, root)) from None


def config_with_overrides(
    cfg: Config, listen: Sequence[Endpoint] | None = None, core: Endpoint | None = None
) -> Config:
    """Return ``cfg`` with command-line ``--listen`` (replaces the whole list; None or empty
    keeps the file's) and ``--core`` applied, validated again. Raises :class:`ConfigError`."""
    data: dict[str, Any] = {name: getattr(cfg, name) for name in Config.model_fields}
    if listen:
        data["listen"] = tuple(listen)
    if core is not None:
        data["core"] = core
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("<command line>", _issues(exc, None)) from None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _yaml_issue(exc: yaml.YAMLError) -> ConfigIssue:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return ConfigIssue("", None, f"YAML syntax: {exc}")
    mark = exc.problem_mark or exc.context_mark
    problem, context = exc.problem or "invalid YAML", exc.context
    if context:  # PyYAML phrases these as "while parsing X" / "expected X, but found Y"
        problem = f"{context} {problem}" if problem.startswith("but") else f"{problem} ({context})"
    return ConfigIssue("", None if mark is None else mark.line + 1, f"YAML syntax: {problem}")


def _duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> list[ConfigIssue]:
    """Keys given twice in one mapping, anywhere in the tree (YAML would keep the last)."""
    if id(node) in seen:
        return []
    seen.add(id(node))
    issues: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            child = _join(path, key.value if isinstance(key, yaml.ScalarNode) else "?")
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in first:
                    message = (
                        f"duplicate key {key.value!r} (first at line {first[key.tag, key.value]})"
                    )
                    issues.append(ConfigIssue(child, _line(key), message))
                else:
                    first[key.tag, key.value] = _line(key)
            issues += _duplicate_keys(value, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            issues += _duplicate_keys(item, f"{path}[{i}]", seen)
    return issues


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _issues(exc: ValidationError, root: yaml.Node | None) -> list[ConfigIssue]:
    errors = exc.errors(include_url=False)
    bad_items = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    issues = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and loc in bad_items:
            continue  # "no items left" only because an item was rejected: say that instead
        path = ""
        for part in loc:
            path = _join(path, part)
        line = None if root is None else _line_of(root, loc)
        issues.append(ConfigIssue(path, line, _message(error, loc)))
    # A peer's rules are the top-level rules with its overrides merged in: a problem in the
    # top-level rules shows up once per peer too. Report it once, where it is written.
    top = {(i.path, i.message) for i in issues if i.path.startswith("rules.")}
    issues = [
        i for i in issues
        if not (i.path.startswith("peers[") and (re.sub(r"^peers\[\d+\]\.", "", i.path),
                                                 i.message) in top)
    ]
    return sorted(issues, key=lambda issue: issue.line or 0)


def _line_of(node: yaml.Node, loc: tuple[int | str, ...]) -> int:
    """Line of the key (or list item) at ``loc``; of the deepest existing parent if missing."""
    line = _line(node)
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, child = _line(key), value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if 0 <= part < len(node.value) else None
            line = line if child is None else _line(child)
        if child is None:
            break
        node = child
    return line


def _message(error: Any, loc: tuple[int | str, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = list(_model_at(loc[:-1]).model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})"
        return f"unknown key {str(loc[-1])!r}{suffix}"
    if kind == "missing":
        return "required setting is missing"
    if kind == "too_short":
        return "needs at least one entry"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in ("tuple_type", "list_type"):
        return "should be a list"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "should be a mapping of settings"
    return str(error["msg"])


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The model that the mapping at ``loc`` is validated against (list indexes skipped)."""
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        sub = _submodel(field.annotation) if field is not None else None
        if sub is None:
            break
        model = sub
    return model


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``Model``, ``Model | None`` or ``tuple[Model, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None
