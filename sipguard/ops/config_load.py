"""Reading the config file, and error reports an operator can act on.

:func:`load_config` reads a YAML file, :func:`parse_config` validates YAML text and
:func:`config_with_overrides` applies ``--listen`` / ``--core`` from the command line, each
giving a :class:`~sipguard.ops.config.Config`. Every problem is reported at once as a
:class:`ConfigError` whose lines read ``FILE:LINE: FIELD: message``, e.g.
``sipguard.yaml:7: sip.max_message_size: Input should be less than or equal to 1048576``:
the YAML is read with node line numbers, keys given twice are caught before YAML would keep the
last one, and pydantic's errors are mapped back to the line of the key they are about (with
a "did you mean" for misspelt keys).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sipguard.ops.config import Config
from sipguard.ops.endpoints import Endpoint
from sipguard.policy.settings import ListFileError

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "FieldError",
    "config_with_overrides",
    "load_config",
    "parse_config",
    "parse_config_as",
    "read_config",
]

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


class FieldError(ValueError):
    """A setting that validates but cannot be used as it stands: a file it names cannot be
    read, an admin API off loopback has no token. ``key`` is the setting's place in the config
    (``("admin", "token_file")``), so that the error names the config file's line too
    (:func:`located`), as every other config error does."""

    def __init__(self, key: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at ``path``; relative paths in it resolve against
    its folder. Raises :class:`ConfigError`."""
    return read_config(path)[1]


def read_config(path: str | Path) -> tuple[str, Config]:
    """:func:`load_config`, with the text it read: (text, config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [ConfigIssue("", None, f"cannot read: {reason}")]) from None
    return text, parse_config_as(text, path)


def parse_config_as(text: str, path: str | Path) -> Config:
    """Validate ``text`` as if it were the file at ``path``: named ``path`` in errors, and
    relative paths in it resolved against that file's folder (not the working directory) —
    the text a file held earlier, read again as that file. Raises :class:`ConfigError`."""
    return parse_config(text, source=str(path), base_dir=Path(path).resolve().parent)


def located(exc: ListFileError | FieldError, source: str | Path) -> ConfigError:
    """A number list's error as a :class:`ConfigError` naming the config file, the line of the
    key that names the list (``peers[2].numbers_file``) and the list's own bad lines; a
    :class:`FieldError` the same way, at its key's line. The file is read again for the
    line; if it cannot be, the error still names the key."""
    path, line = _key_path(exc.key), None
    try:
        node = yaml.compose(Path(source).read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        node = None
    if isinstance(node, yaml.MappingNode):
        loc = list(exc.key)
        if len(loc) > 1 and loc[0] == "peers" and isinstance(loc[1], str):
            loc[1] = _peer_index(node, loc[1])
        path, line = _key_path(tuple(loc)), _line_of(node, tuple(loc))
    return ConfigError(str(source), [ConfigIssue(path, line, str(exc))])


def _peer_index(root: yaml.MappingNode, name: str) -> int | str:
    """The index of the peer called ``name`` in the ``peers`` list (or ``name`` itself)."""
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "peers" and \
                isinstance(value, yaml.SequenceNode):
            for i, item in enumerate(value.value):
                if isinstance(item, yaml.MappingNode) and any(
                        isinstance(k, yaml.ScalarNode) and k.value == "name" and
                        isinstance(v, yaml.ScalarNode) and v.value == name
                        for k, v in item.value):
                    return i
    return name


def _key_path(loc: tuple[str | int, ...]) -> str:
    """``("peers", 0, "numbers")`` as the errors write it: ``peers[0].numbers``."""
    path = ""
    for part in loc:
        path = _join(path, part)
    return path


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's integers: ``10``, ``-3``, ``0x1F``, ``0o17``.
    YAML 1.1 read ``010`` as 8, ``1_0`` as 10 and ``4:00`` as 240 (base 60): a lifetime
    written ``4:00`` would have been four minutes. Those are strings now, so a number field
    refuses them with the line."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"),
    list("-+0123456789"))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    if text.startswith(("0x", "0o")):
        return int(text, 0)
    return int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Validate YAML ``text``; ``source`` names it in errors, ``base_dir`` anchors relative
    paths (default: the working directory). Raises :class:`ConfigError`."""
    try:
        # (the reader checks every character as it is made: a control character pasted
        # from a terminal raises here)
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(source, [_reader_issue(text, exc)]) from None
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
    except yaml.reader.ReaderError as exc:
        raise ConfigError(source, [_reader_issue(text, exc)]) from None
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
    cfg: Config, listen: Sequence[Endpoint] | None = None, core: Endpoint | None = None,
    workers: int | None = None,
) -> Config:
    """Return ``cfg`` with command-line ``--listen`` (replaces the whole list; None or empty
    keeps the file's), ``--core`` and ``--workers`` applied, validated again. Raises
    :class:`ConfigError`."""
    data: dict[str, Any] = {name: getattr(cfg, name) for name in Config.model_fields}
    if listen:
        data["listen"] = tuple(listen)
    if core is not None:
        data["core"] = core
    if workers is not None:
        data["workers"] = workers
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("<command line>", _issues(exc, None)) from None


def region_advice(cfg: Config) -> list[str]:
    """Peers without ``default_region`` whose calls a limit on the called number applies to
    (``concurrency.per_callee``, ``rate.per_callee``, ``dialer.pumping``), one line each: a
    called number they send in national form (``16465558800``, ``6465558800``, ``011…``)
    cannot be read as E.164 and is another key than ``+16465558800`` — the same number
    counted apart. Not an error (a peer may send E.164 only); said by ``check-config``, at
    start and on reload."""
    out = []
    for peer in cfg.peers:
        if peer.default_region is not None:
            continue
        rules = peer.rules  # the top-level rules with the peer's overrides merged in
        con, rate, dialer = rules.concurrency, rules.rate, rules.dialer
        keys = [key for key, on in (
            ("concurrency.per_callee",
             con is not None and con.enabled and con.per_callee is not None),
            ("rate.per_callee", rate is not None and rate.enabled and rate.per_callee is not None),
            ("dialer.pumping", dialer is not None and dialer.enabled and dialer.pumping is not None),
        ) if on]
        if keys:
            out.append(f"peer {peer.name!r} has no default_region: a called number it sends "
                       f"in national form is not read as E.164 and is counted apart from its "
                       f"+ form by {', '.join(keys)}")
    return out


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _reader_issue(text: str, exc: yaml.reader.ReaderError) -> ConfigIssue:
    """A character YAML does not take (a control character, a NUL), with its line."""
    line = text.count("\n", 0, exc.position) + 1
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return ConfigIssue("", line, f"YAML syntax: unacceptable character {char!r} "
                       f"(#x{ord(char):04x}): remove it")


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
        message = _message(error, loc)
        if error["type"] == "value_error" and root is not None:
            loc = _named_key(root, loc, message)
        line = None if root is None else _line_of(root, loc)
        issues.append(ConfigIssue(_key_path(loc), line, message))
    # A peer's rules are the top-level rules with its overrides merged in: a problem in the
    # top-level rules shows up once per peer too. Report it once, where it is written.
    # (A check of a whole section may point at one of its keys at the top level — written
    # there — and at the section in a peer: the same problem.)
    top = [(i.path, i.message) for i in issues if i.path.startswith("rules.")]

    def said_at_top(issue: ConfigIssue) -> bool:
        path = re.sub(r"^peers\[\d+\]\.", "", issue.path)
        return any(message == issue.message and (where == path or where.startswith(path + "."))
                   for where, message in top)

    issues = [i for i in issues if not (i.path.startswith("peers[") and said_at_top(i))]
    return sorted(issues, key=lambda issue: issue.line or 0)


_FIRST_WORD = re.compile(r"[a-z_][a-z0-9_]*")


def _named_key(root: yaml.Node, loc: tuple[int | str, ...], message: str
               ) -> tuple[int | str, ...]:
    """A check of a whole section whose message starts with one of its keys written in the
    file (``cache_min_s must not exceed cache_max_s``): that key's place, so the error points
    at its line, not at the section's; else ``loc``."""
    m = _FIRST_WORD.match(message)
    if m is None:
        return loc
    node: yaml.Node | None = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value
                         if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
        else:
            node = None
        if node is None:
            return loc
    if isinstance(node, yaml.MappingNode) and any(
            isinstance(k, yaml.ScalarNode) and k.value == m.group(0) for k, _ in node.value):
        return (*loc, m.group(0))
    return loc


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
