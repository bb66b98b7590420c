"""Settings shared by every rule: the base model each rule's own ``Settings`` extends.

Every rule section in the config (``rules.<name>``) accepts these keys besides its own:

- ``enabled`` (default ``true``): ``false`` switches the rule off (useful in a peer override).
- ``mode`` (default: the top-level ``mode``): ``enforce`` or ``monitor``. In monitor mode the
  rule decides, logs and counts exactly as in enforce mode, but the call is forwarded.
"""

from __future__ import annotations

import ipaddress
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _numeric(annotation: Any) -> bool:
    """An int or float setting (possibly optional), not a bool one."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) is Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_numeric(a) for a in args)
    return False


def _numeric_items(annotation: Any) -> bool:
    """A list or tuple of ints or floats (possibly optional)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_numeric_items(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, frozenset, set):
        return any(_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return False


class ConfigModel(BaseModel):
    """Base of every config section: frozen, unknown keys refused, and a YAML boolean
    (``yes``, ``no``, ``on``, ``off``, ``true``, ``false``) refused where a number is wanted
    — pydantic would take it as 1 or 0, so ``max_diversions: off`` meant "none allowed"."""

    model_config = FROZEN

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return value
        field = cls.model_fields.get(info.field_name)
        if field is None:
            return value
        if isinstance(value, bool) and _numeric(field.annotation):
            raise ValueError(f"a number is wanted, not the boolean {str(value).lower()} "
                             "(yes/no/on/off/true/false); null switches a limit off "
                             "where the setting allows it")
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value) \
                and _numeric_items(field.annotation):
            raise ValueError("a list of numbers cannot hold a boolean (yes/no/on/off/true/false)")
        return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, dict) else {}
    base = context.get("base_dir")
    path = value.expanduser()
    if not path.is_absolute():
        path = (Path(base) if base is not None else Path.cwd()) / path
    return path


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A file path setting. Relative paths are resolved against ``base_dir`` from the validation
context (the config file's folder; the working directory when there is none). Declare file
settings as ``dno_file: ConfigPath | None = None``."""


class RuleSettings(ConfigModel):
    model_config = FROZEN

    enabled: bool = Field(
        default=True, description="false switches the rule off (e.g. for one peer)."
    )
    mode: Literal["enforce", "monitor"] | None = Field(
        default=None, description="enforce or monitor; null: the top-level mode."
    )


class Answer(ConfigModel):
    """The SIP answer a rule gives when it rejects: status, reason phrase, extra headers."""

    model_config = FROZEN

    status: int = Field(ge=300, le=699, description="SIP status code (300-699).")
    phrase: str | None = Field(default=None, description="Reason phrase; default per status.")
    headers: tuple[str, ...] = Field(default=(), description="Extra header lines, 'Name: value'.")


def networks(value: object) -> object:
    """A "before" validator for CIDR lists: one string or a list of them, each turned into an
    ``ip_network`` with an error naming the bad item; else left for pydantic. A prefix with
    host bits set is an error: ``203.0.113.5/24`` is a typo for ``/32`` as often as for
    ``203.0.113.0/24``, and read as the network it would trust 255 more addresses."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        out = []
        for item in value:
            text = str(item)
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP network: {exc}") from None
            if "/" in text and net.network_address != ipaddress.ip_address(
                    text.partition("/")[0].strip("[] ")):
                host = text.partition("/")[0]
                raise ValueError(
                    f"{item!r} has host bits set: write {net} for the network, or "
                    f"{host}/{net.max_prefixlen} for the one address")
            out.append(net)
        return tuple(out)
    return value


class ListFileError(ValueError):
    """A number list a config key names cannot be used (unreadable, bad lines). ``key`` is
    that key's place in the config — ``("peers", "carrier-a", "numbers_file")`` (a peer by
    its name), ``("rules", "callerid", "dno_file")`` — so that the error can name the
    config file's line too (:func:`sipguard.ops.config_load.located`)."""

    def __init__(self, key: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key = key

    @classmethod
    def unreadable(cls, key: tuple[str | int, ...], what: str, path: Path,
                   exc: OSError) -> ListFileError:
        """The list file ``path`` (``what``: the setting, as the message names it) cannot be
        read: missing, a permission, an I/O error."""
        return cls(key, f"{what}: cannot read {path}: {exc.strerror or exc}")


def number_list(value: Any, pattern: re.Pattern[str], what: str) -> Any:
    """A list of configured numbers checked before its type: every item that is not text (an
    unquoted YAML number, which loses its ``+`` and leading zeros) or that ``pattern`` does not
    match whole (spaces around it aside) is named in one error, with its place in the list —
    not only the first. ``what`` says what an item must be ("a number or a prefix pattern like
    '+1212555*'")."""
    if not isinstance(value, (list, tuple)):
        return value
    problems = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if pattern.fullmatch(item.strip()) is None:
                problems.append(f"[{i}] {item[:40]!r} is not {what}")
        elif isinstance(item, int) and not isinstance(item, bool):
            problems.append(f"[{i}] {item} is a YAML number, not text: quote it, as "
                            f"'+{item}' or '{item}'")
        else:
            problems.append(f"[{i}] {item!r} is not text: {what}")
    if problems:
        raise ValueError("; ".join(problems))
    return value

