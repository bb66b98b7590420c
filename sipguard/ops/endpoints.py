"""Transport addresses as the config file and the command line write them.

The endpoint grammar: ``udp://HOST:PORT`` / ``tcp://[::1]:5060`` / ``tls://HOST:5061`` parsed into an
:class:`Endpoint` (a pydantic field type too, written in the file as that string), and the
``HOST[:PORT]`` pieces the ``sip.advertise`` and ``metrics.listen`` settings use
(:func:`split_hostport`, :func:`format_host`). Errors are ``ValueError`` with a message saying
what is wrong, which pydantic reports under the field's path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

__all__ = ["Endpoint", "ListenUri", "format_host", "split_hostport"]

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


def split_hostport(text: str, port_required: bool) -> tuple[str, int | None]:
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


def format_host(host: str) -> str:
    """``host`` as written in a URI or ``host:port``: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A transport address written as a URI: ``udp://HOST:PORT``, ``tcp://[::1]:5060``,
    ``tls://HOST:5061`` (TCP with TLS, RFC 3261 §26).

    ``host`` is an IP literal (IPv6 stored without brackets, compressed) or a hostname.
    ``str(endpoint)`` gives the URI back. In a config file it is written as that string.
    """

    transport: Literal["udp", "tcp", "tls"]
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
                f"expected a URI like udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT, "
                f"got {text!r}"
            )
        scheme = match["scheme"].lower()
        if scheme not in ("udp", "tcp", "tls"):
            raise ValueError(
                f"unknown transport {scheme + '://'!r}: use udp://, tcp:// or tls://"
            )
        rest = match["rest"]
        if any(c in rest for c in "/@?#; \t"):
            raise ValueError(f"expected only HOST:PORT after {scheme}://, got {rest!r}")
        host, port = split_hostport(rest, port_required=True)
        assert port is not None
        transport: Literal["udp", "tcp", "tls"] = (
            "udp" if scheme == "udp" else "tls" if scheme == "tls" else "tcp"
        )
        return cls(transport, host, port)

    def __str__(self) -> str:
        return f"{self.transport}://{format_host(self.host)}:{self.port}"

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
"""A listen address: an :class:`Endpoint` written as ``udp://HOST:PORT`` / ``tcp://HOST:PORT`` /
``tls://HOST:PORT``."""
