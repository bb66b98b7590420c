"""The parameter reference, generated from the config schema: one source for every default.

Every setting is a pydantic ``Field(default=..., description=...)`` in the schema (the root
:class:`~sipguard.ops.config.Config`, each rule's ``Settings`` in ``sipguard/policy/``). This
module renders them into the files people read, between marker lines:

- ``docs/rules.md``: one parameter table per rule (key, type, default, meaning), between
  ``<!-- BEGIN GENERATED: rules.<rule> -->`` and ``<!-- END GENERATED: rules.<rule> -->``, and
  the ``peers`` table;
- ``config/sipguard.yaml``: the active ``sip:``, ``log:`` and ``tls:`` sections written out at their
  defaults, and a commented reference of ``peers:`` and of every rule, every key with its default
  and the first sentence of its description, between ``# BEGIN GENERATED: config.<name>`` and
  ``# END GENERATED: config.<name>``. Required keys show a placeholder (:data:`PLACEHOLDERS`);
  the concurrency and rate limits, off by default, show an example (:data:`EXAMPLES`) and say
  their default.

Everything outside the markers (prose, examples, the active ``listen``/``core``/``metrics``) is
left as written. ::

    python -m sipguard.ops.docgen           # rewrite the generated blocks in place (make docs)
    python -m sipguard.ops.docgen --check   # exit 1 naming each file and block that differs

A field without a description is an error: the fix is a ``description=`` in the schema, never
an edit between the markers.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sipguard.ops.config import Config

__all__ = [
    "CONFIG_YAML",
    "EXAMPLES",
    "PLACEHOLDERS",
    "RULES_MD",
    "Block",
    "apply_blocks",
    "blocks_for",
    "check",
    "main",
    "write",
]

RULES_MD = Path("docs") / "rules.md"
CONFIG_YAML = Path("config") / "sipguard.yaml"
ROOT = Path(__file__).resolve().parents[2]

# Models written as one value (a flow mapping), not key by key: they are given whole.
_LEAF_MODELS = ("Answer", "Threshold", "RulesConfig")
# Required keys have no default: the reference shows a placeholder the reader replaces.
PLACEHOLDERS: dict[str, Any] = {
    "peers[].name": "carrier-a",
    "peers[].networks": ["203.0.113.0/24"],
    "rules.identity.trust_anchors": "sti-ca/",
}
# Limits are off by default, and a reference of nulls shows nothing worth uncommenting: these
# keys show an example value instead, their comment says the default.
EXAMPLES: dict[str, Any] = {
    "rules.concurrency.per_caller": 2,
    "rules.concurrency.per_callee": 20,
    "rules.concurrency.per_diverter": 2,
    "rules.concurrency.max_diversions": 2,
    "rules.concurrency.per_peer": 500,
    "rules.rate.per_caller": {"rate": 1, "burst": 3},
    "rules.rate.per_callee": {"rate": 2, "burst": 10},
    "rules.rate.per_peer": {"rate": 50, "burst": 100},
    "rules.rate.per_source_ip": {"rate": 20, "burst": 40},
}
# Optional in the schema, but required while the rule is enabled (a validator says so).
_REQUIRED = frozenset({"rules.identity.trust_anchors"})
# Keys every rule takes (RuleSettings): docs/rules.md explains them once, in its introduction.
_COMMON_RULE_KEYS = ("enabled", "mode")
_COMMENT_COLUMN = 32  # of the YAML comments, counted in the uncommented text
_COMMENT_WIDTH = 110  # wrap the "when set" notes of the YAML beyond this column
_RUN_COLUMN = 44  # consecutive longer lines align their comments up to this column
_CODE_WIDTH = 84  # wrap a long list value (flood's scanners) beyond this column

_MISSING: Any = PydanticUndefined


@dataclass(frozen=True, slots=True)
class Block:
    """One generated block: the ``file`` it belongs in (relative to the repository), its marker
    ``name`` and its ``text`` (whole lines, each ending in a newline)."""

    file: Path
    name: str
    text: str


# --------------------------------------------------------------------------- the schema


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _optional(annotation: Any) -> tuple[Any, bool]:
    """``(inner, True)`` for ``X | None``, else ``(annotation, False)``."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
            return _unwrap(inner), True
    return annotation, False


def _model(annotation: Any) -> type[BaseModel] | None:
    """The model class of ``Model`` / ``Model | None``; None for anything else."""
    inner, _ = _optional(annotation)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner
    return None


def _field_model(model: type[BaseModel], name: str) -> type[BaseModel]:
    found = _model(model.model_fields[name].annotation)
    if found is None:
        raise TypeError(f"{model.__name__}.{name} is not a settings section")
    return found


def _peer_model() -> type[BaseModel]:
    inner, _ = _optional(Config.model_fields["peers"].annotation)
    (item,) = {a for a in get_args(inner) if a is not Ellipsis}
    if not (isinstance(item, type) and issubclass(item, BaseModel)):
        raise TypeError("Config.peers is not a list of models")
    return item


def _rule_models() -> dict[str, type[BaseModel]]:
    rules = _field_model(Config, "rules")
    return {name: _field_model(rules, name) for name in rules.model_fields}


def _is_leaf(model: type[BaseModel]) -> bool:
    return model.__name__ in _LEAF_MODELS


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.get_default(call_default_factory=True, validated_data={})
    return field.default


@dataclass(frozen=True, slots=True)
class _Param:
    key: str  # dotted, from the section's root: answers.per_caller, per_*.burst
    name: str  # the last part
    path: str  # from the config's root: rules.rate.per_caller.burst
    field: FieldInfo
    default: Any  # _MISSING when required
    required: bool

    @property
    def description(self) -> str:
        text = self.field.description
        if not text or not text.strip():
            raise ValueError(f"{self.path}: the schema has no description= for this setting "
                             "(add one to its Field)")
        return " ".join(text.split())


def _params(
    model: type[BaseModel], path: str, key: str, defaults: BaseModel | None, skip: Sequence[str]
) -> Iterator[tuple[_Param, type[BaseModel] | None, BaseModel | None]]:
    """Each field of ``model`` (its value in ``defaults`` when given, else the field default),
    with its nested model when it has one and that model's defaults (None: the class's)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        full = f"{path}{name}"
        default = getattr(defaults, name) if defaults is not None else _default(field)
        required = field.is_required() or full in _REQUIRED
        sub = _model(field.annotation)
        param = _Param(f"{key}{name}", name, full, field,
                       _MISSING if field.is_required() else default, required)
        sub_defaults = default if isinstance(default, BaseModel) else None
        yield param, (None if sub is None or _is_leaf(sub) else sub), sub_defaults


# --------------------------------------------------------------------------- values


def _plain(value: Any) -> Any:
    """``value`` as plain YAML data; a model as the mapping of its fields that differ from the
    class default (required ones always)."""
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if field.is_required() or item != _default(field):
                out[name] = _plain(item)
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style), quoted where YAML needs it."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False,
                          width=1_000_000, allow_unicode=True)
    text = text.strip()
    return text[: -len("...")].rstrip() if text.endswith("\n...") else text


def _class_defaults(model: type[BaseModel]) -> str:
    """The defaults of ``model`` as a flow mapping, required keys shown as ``<required>``."""
    parts = []
    for name, field in model.model_fields.items():
        value = "<required>" if field.is_required() else _flow(_default(field))
        parts.append(f"{name}: {value}")
    return "{" + ", ".join(parts) + "}"


def _answer_md(value: Any) -> str:
    status, phrase = getattr(value, "status"), getattr(value, "phrase")  # noqa: B009
    text = f"`{status} {phrase}`" if phrase else f"`{status}`"
    for header in getattr(value, "headers"):  # noqa: B009
        text += f" + `{header}`"
    return text


def _default_md(param: _Param, sub: type[BaseModel] | None) -> str:
    if param.required:
        return "— (required)"
    value = param.default
    if value is None:  # a section that is off, unless the description says what null means
        described = "null:" in (param.field.description or "")
        return "null (off)" if sub is not None and not described else "null"
    if sub is not None:
        return "on, see below" if _optional(param.field.annotation)[1] else "see below"
    if type(value).__name__ == "Answer":
        return _answer_md(value)
    return f"`{_flow(value)}`".replace("|", "\\|")


# --------------------------------------------------------------------------- types


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _bounds(metadata: Sequence[Any]) -> str:
    low = high = ""
    low_v: object = None
    high_v: object = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low, low_v = "≥", item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_v = ">", item.gt
        elif isinstance(item, annotated_types.Le):
            high, high_v = "≤", item.le
        elif isinstance(item, annotated_types.Lt):
            high, high_v = "<", item.lt
    if low == "≥" and high == "≤":
        return f" {_number(low_v)}–{_number(high_v)}"
    parts = [f"{sign} {_number(v)}" for sign, v in ((low, low_v), (high, high_v)) if sign]
    return " " + ", ".join(parts) if parts else ""


def _lengths(metadata: Sequence[Any]) -> str:
    for item in metadata:
        if isinstance(item, annotated_types.MaxLen):
            return f" ≤ {item.max_length} chars"
    return ""


def _scalar_type(annotation: Any, name: str) -> str:
    annotation = _unwrap(annotation)
    if get_origin(annotation) is Literal:
        return " / ".join(f"`{v}`" for v in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        args = set(get_args(annotation))
        if args <= {ipaddress.IPv4Network, ipaddress.IPv6Network}:
            return "CIDR"
        return " / ".join(_scalar_type(a, name) for a in get_args(annotation))
    if annotation is bool:
        return "bool"
    if annotation in (int, float):
        for suffix, unit in (("_ms", "milliseconds"), ("_s", "seconds"), ("_bytes", "bytes")):
            if name.endswith(suffix):
                return unit
        return "int" if annotation is int else "number"
    if annotation is str:
        return "header name" if name.endswith("_header") else "string"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {
            "Answer": "answer",
            "Limit": "limit",
            "Threshold": "`{tag, block}`",
            "RulesConfig": "like `rules:`",
        }.get(annotation.__name__, "mapping")
    if isinstance(annotation, type):
        return {"Endpoint": "URI"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _plural(text: str) -> str:
    if text.startswith("`") or " / " in text:
        return text
    return {"CIDR": "CIDRs", "URI": "URIs", "path": "paths", "string": "strings",
            "int": "ints", "number": "numbers", "bool": "bools"}.get(text, text)


def _type_md(param: _Param) -> str:
    inner, optional = _optional(param.field.annotation)
    meta = param.field.metadata
    if get_origin(inner) in (tuple, list):
        item = next(a for a in get_args(inner) if a is not Ellipsis)
        text = "list of " + _plural(_scalar_type(item, ""))
    else:
        text = _scalar_type(inner, param.name)
        if inner in (int, float):
            text += _bounds(meta)
        elif inner is str:
            text += _lengths(meta)
    return (text + " / null" if optional and not param.required else text).replace("|", "\\|")


# --------------------------------------------------------------------------- docs/rules.md


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_rows(
    model: type[BaseModel], path: str, key: str, defaults: BaseModel | None,
    skip: Sequence[str] = (),
) -> Iterator[str]:
    items = list(_params(model, path, key, defaults, skip))
    # Sibling sections of one model that are off by default (rate's four limits) share
    # their sub-keys: listed once, as per_*.burst, after the last of them.
    groups: dict[type[BaseModel], list[str]] = {}
    for param, sub, _ in items:
        if sub is not None and param.default is None:
            groups.setdefault(sub, []).append(param.name)
    for param, sub, sub_defaults in items:
        yield (f"| `{param.key}` | {_type_md(param)} | {_default_md(param, sub)} | "
               f"{_md_cell(param.description)} |\n")
        if sub is None:
            continue
        names = groups.get(sub, [param.name])
        if len(names) > 1:
            if param.name != names[-1]:
                continue
            prefix = re.sub(r"_?$", "", _common_prefix(names))
            group_key = f"{key}{prefix}_*." if prefix else f"{key}*."
            yield from _md_rows(sub, f"{path}{param.name}.", group_key, None)
        else:
            yield from _md_rows(sub, f"{path}{param.name}.", f"{param.key}.", sub_defaults)


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]


_MD_HEAD = "| key | type | default | meaning |\n|---|---|---|---|\n"


def _rules_md_blocks() -> list[Block]:
    blocks = []
    peer = _peer_model()
    rows = list(_md_rows(peer, "peers[].", "peers[].", None))
    rows += _md_rows(Config, "", "", None,
                     skip=[n for n in Config.model_fields if n not in (
                         "default_region", "unknown_source", "suspended")])
    blocks.append(Block(RULES_MD, "peers", _MD_HEAD + "".join(rows)))
    for rule, model in _rule_models().items():
        rows = list(_md_rows(model, f"rules.{rule}.", "", None, skip=_COMMON_RULE_KEYS))
        blocks.append(Block(RULES_MD, f"rules.{rule}", _MD_HEAD + "".join(rows)))
    return blocks


# --------------------------------------------------------------------------- config/sipguard.yaml


def _first_sentence(text: str) -> str:
    """The description's first sentence, without Markdown backticks or the final period."""
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z`])", text)
    if match is not None:
        text = text[: match.start()]
    return text.replace("`", "").rstrip(".")


@dataclass(frozen=True, slots=True)
class _Line:
    indent: int
    code: str  # "" for a comment-only continuation line
    comment: str


def _yaml_lines(
    model: type[BaseModel], path: str, defaults: BaseModel | None, indent: int,
    skip: Sequence[str] = (),
) -> Iterator[_Line]:
    items = list(_params(model, path, "", defaults, skip))
    groups: dict[type[BaseModel], list[str]] = {}
    for param, sub, _ in items:
        if sub is not None and param.default is None:
            groups.setdefault(sub, []).append(param.name)
    for param, sub, sub_defaults in items:
        full = f"{path}{param.name}"
        comment = _first_sentence(param.description)
        if param.required and "required" not in comment:
            comment = "required: " + comment
        if sub is not None and sub_defaults is not None:
            yield _Line(indent, f"{param.name}:", comment)
            yield from _yaml_lines(sub, f"{full}.", sub_defaults, indent + 2)
            continue
        value = PLACEHOLDERS.get(full, param.default)
        if full in EXAMPLES:
            value = EXAMPLES[full]
            comment += f" (default: {_flow(param.default)})"
        if value is _MISSING:
            raise ValueError(f"{full}: required, and docgen has no placeholder value for it")
        code = _key_value(param.name, value, indent)
        if isinstance(value, BaseModel) and indent + len(code) > _CODE_WIDTH:
            # a long answer: one key a line, so that the comment stays in sight
            yield _Line(indent, f"{param.name}:", comment)
            for name, item in _plain(value).items():
                yield _Line(indent + 2, f"{name}: {_flow(item)}", "")
        else:
            yield _Line(indent, code, comment)
        if sub is not None:
            names = groups.get(sub, [param.name])
            if param.name == names[-1]:
                label = "when set" if len(names) == 1 else "each, when set"
                yield _Line(indent, "", f"{label}: {_class_defaults(sub)}")


def _render_yaml(lines: Sequence[_Line], prefix: str) -> str:
    """Lines with their comments in one column; consecutive lines too long for it share a
    column of their own. ``prefix`` (``"# "`` for the commented reference) goes before each.
    A description stays on one line; only the long "when set" notes are wrapped."""
    width = [len(" " * line.indent + line.code.split("\n")[-1]) for line in lines]
    column = [_COMMENT_COLUMN] * len(lines)
    i = 0
    while i < len(lines):  # runs of consecutive overlong lines with a comment
        j = i
        while j < len(lines) and lines[j].code and lines[j].comment and (
            width[j] + 2 > _COMMENT_COLUMN
        ):
            j += 1
        run = max(width[i:j], default=0) + 2
        for k in range(i, j):
            column[k] = run if run <= _RUN_COLUMN else width[k] + 2
        i = max(j, i + 1)
    out = []
    for line, col in zip(lines, column, strict=True):
        if not line.code:
            parts = textwrap.wrap(line.comment, max(_COMMENT_WIDTH - _COMMENT_COLUMN, 40),
                                  break_on_hyphens=False)
            for n, part in enumerate(parts):
                lead = "# " if n == 0 else "#   "
                out.append(f"{prefix}{' ' * _COMMENT_COLUMN}{lead}{part}\n")
            continue
        *head, last = line.code.split("\n")
        out += [f"{prefix}{' ' * line.indent}{code}\n" for code in head]
        code = " " * line.indent + last
        if line.comment:
            code = code.ljust(col) + "# " + line.comment
        out.append(f"{prefix}{code}\n")
    return "".join(out)


def _key_value(name: str, value: Any, indent: int) -> str:
    """``name: value`` in flow style; a long list is wrapped after commas, continuation lines
    aligned after its ``[``."""
    text = f"{name}: {_flow(value)}"
    plain = _plain(value)
    if indent + len(text) <= _CODE_WIDTH or not isinstance(plain, list) or len(plain) < 2:
        return text
    rows: list[str] = []
    row = f"{name}: ["
    for i, item in enumerate(plain):
        part = _flow(item) + ("]" if i == len(plain) - 1 else ",")
        if len(row) + 1 + len(part) > _CODE_WIDTH - indent and not row.endswith("["):
            rows.append(row)
            row = " " * (len(name) + 3) + part
        else:
            row += ("" if row.endswith("[") else " ") + part
    rows.append(row)
    return "\n".join(rows)


def _section_yaml(name: str) -> str:
    """An active top-level section (``sip:``, ``log:``, ``tls:``) written out at its defaults."""
    model = _field_model(Config, name)
    return f"{name}:\n" + _render_yaml(list(_yaml_lines(model, f"{name}.", None, 2)), "")


def _peers_yaml() -> str:
    lines = list(_yaml_lines(_peer_model(), "peers[].", None, 6))
    first = lines[0]
    lines[0] = _Line(first.indent - 2, "- " + first.code, first.comment)
    return "#   peers:\n" + _render_yaml(lines, "# ")


def _rule_yaml(rule: str, model: type[BaseModel]) -> str:
    lines = list(_yaml_lines(model, f"rules.{rule}.", None, 4))
    return f"#   {rule}:\n" + _render_yaml(lines, "# ")


def _config_yaml_blocks() -> list[Block]:
    blocks = [Block(CONFIG_YAML, f"config.{name}", _section_yaml(name))
              for name in ("sip", "log", "tls", "state")]
    blocks.append(Block(CONFIG_YAML, "config.peers", _peers_yaml()))
    for rule, model in _rule_models().items():
        blocks.append(Block(CONFIG_YAML, f"config.rules.{rule}", _rule_yaml(rule, model)))
    return blocks


# --------------------------------------------------------------------------- the files


def blocks_for() -> list[Block]:
    """Every generated block, rendered from the schema as it is now."""
    return _rules_md_blocks() + _config_yaml_blocks()


def _markers(file: Path) -> tuple[Callable[[str], str], Callable[[str], str], str]:
    if file.suffix == ".md":
        return (lambda n: f"<!-- BEGIN GENERATED: {n} -->", lambda n: f"<!-- END GENERATED: {n} -->",
                r"<!-- BEGIN GENERATED: (\S+) -->")
    return (lambda n: f"# BEGIN GENERATED: {n}", lambda n: f"# END GENERATED: {n}",
            r"# BEGIN GENERATED: (\S+)")


def apply_blocks(file: Path, text: str, blocks: Sequence[Block]) -> tuple[str, list[str]]:
    """``text`` (the content of ``file``) with each of ``blocks`` put between its markers,
    and the problems found: a block whose markers are missing, a marker naming no block."""
    begin, end, pattern = _markers(file)
    problems = []
    known = {b.name for b in blocks}
    for match in re.finditer(rf"^{pattern}$", text, re.MULTILINE):
        if match[1] not in known:
            problems.append(f"{file}: block {match[1]} is not generated by docgen (remove it)")
    for block in blocks:
        regex = re.compile(
            rf"^({re.escape(begin(block.name))}\n)(.*?)^({re.escape(end(block.name))})$",
            re.MULTILINE | re.DOTALL,
        )
        found = list(regex.finditer(text))
        if len(found) != 1:
            problems.append(f"{file}: block {block.name}: expected one pair of marker lines "
                            f"{begin(block.name)!r} / {end(block.name)!r}, found {len(found)}")
            continue
        text = text[: found[0].start(2)] + block.text + text[found[0].end(2):]
    return text, problems


def _by_file(blocks: Sequence[Block]) -> dict[Path, list[Block]]:
    out: dict[Path, list[Block]] = {}
    for block in blocks:
        out.setdefault(block.file, []).append(block)
    return out


def _current(file: Path, text: str, name: str) -> str | None:
    begin, end, _ = _markers(file)
    match = re.search(rf"^{re.escape(begin(name))}\n(.*?)^{re.escape(end(name))}$", text,
                      re.MULTILINE | re.DOTALL)
    return None if match is None else match[1]


def check(root: Path = ROOT, blocks: Sequence[Block] | None = None) -> list[str]:
    """One message per generated block of the files under ``root`` that differs from the
    schema (with a short diff), or whose markers are missing; empty when all are current."""
    problems: list[str] = []
    for file, file_blocks in _by_file(blocks if blocks is not None else blocks_for()).items():
        text = (root / file).read_text(encoding="utf-8")
        _, marker_problems = apply_blocks(file, text, file_blocks)
        problems += marker_problems
        for block in file_blocks:
            current = _current(file, text, block.name)
            if current is None or current == block.text:
                continue
            diff = difflib.unified_diff(current.splitlines(), block.text.splitlines(),
                                        f"{file} ({block.name}, as written)",
                                        f"{file} ({block.name}, from the schema)", n=0,
                                        lineterm="")
            lines = list(diff)
            shown = "\n".join(lines[:40]) + ("\n..." if len(lines) > 40 else "")
            problems.append(f"{file}: block {block.name} differs from the schema\n{shown}")
    return problems


def write(root: Path = ROOT, blocks: Sequence[Block] | None = None) -> tuple[list[Path],
                                                                              list[str]]:
    """Rewrite the generated blocks of the files under ``root``; returns the files changed
    and the marker problems (a file with one is left untouched)."""
    changed: list[Path] = []
    problems: list[str] = []
    for file, file_blocks in _by_file(blocks if blocks is not None else blocks_for()).items():
        path = root / file
        text = path.read_text(encoding="utf-8")
        new, file_problems = apply_blocks(file, text, file_blocks)
        problems += file_problems
        if not file_problems and new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(file)
    return changed, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sipguard.ops.docgen",
        description=f"Write the parameter reference in {RULES_MD} and {CONFIG_YAML} from the "
        "config schema (the Field descriptions and defaults).",
    )
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 naming each block that differs")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        blocks = blocks_for()
    except ValueError as exc:
        print(f"docgen: {exc}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(args.root, blocks)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `make docs` (python -m sipguard.ops.docgen) to regenerate",
                  file=sys.stderr)
        return 1 if problems else 0
    changed, problems = write(args.root, blocks)
    for problem in problems:
        print(problem, file=sys.stderr)
    for file in changed:
        print(f"rewrote {file}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
