"""The generated parameter reference (sipguard.ops.docgen) in docs/rules.md and
config/sipguard.yaml: current with the schema, loadable, and its --check catching drift."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sipguard.ops import docgen
from sipguard.ops.config import Config
from sipguard.ops.config_load import load_config
from tests.unit.stir_pki import make_cert, new_key, pem

REPO = Path(__file__).resolve().parents[2]
RULE_NAMES = ("identity", "callerid", "concurrency", "rate", "dialer", "flood")


def _blocks(file: Path) -> list[docgen.Block]:
    return [b for b in docgen.blocks_for() if b.file == file]


def _copy_repo_files(root: Path) -> None:
    for file in (docgen.RULES_MD, docgen.CONFIG_YAML):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / file, root / file)


def _uncommented(block: str) -> str:
    """A commented reference block as YAML: each line without its leading ``# ``."""
    lines = block.splitlines()
    assert all(line.startswith("# ") for line in lines), block
    return "\n".join(line[2:] for line in lines) + "\n"


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True, validated_data={})


def test_rules_md_matches_the_schema() -> None:
    """Every parameter table in docs/rules.md is what the schema generates (run `make docs`)."""
    assert docgen.check(REPO, _blocks(docgen.RULES_MD)) == []


def test_example_config_matches_the_schema() -> None:
    """The generated sections of config/sipguard.yaml are what the schema generates (run `make docs`)."""
    assert docgen.check(REPO, _blocks(docgen.CONFIG_YAML)) == []


def test_every_rule_and_the_peers_have_a_table_and_a_reference() -> None:
    """docs/rules.md has a table and config/sipguard.yaml a reference for the peers and each rule."""
    names = {b.name for b in docgen.blocks_for()}
    assert {"peers", "config.sip", "config.log", "config.peers"} <= names
    for rule in RULE_NAMES:
        assert {f"rules.{rule}", f"config.rules.{rule}"} <= names


def test_example_config_active_settings_are_the_make_run_ones() -> None:
    """The example config still listens on 127.0.0.1:5060, sends to :5080, serves the admin API
    and metrics on :9090 and leaves every other setting at its default."""
    cfg = load_config(REPO / docgen.CONFIG_YAML)
    expected = Config.model_validate({
        "listen": ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"],
        "core": "udp://127.0.0.1:5080",
        "admin": {"listen": "127.0.0.1:9090"},
    })
    assert cfg == expected
    raw = yaml.safe_load((REPO / docgen.CONFIG_YAML).read_text(encoding="utf-8"))
    assert raw["rules"] == {} and raw["peers"] == []


def test_uncommented_reference_is_a_config_the_loader_accepts_at_the_defaults(
    tmp_path: Path,
) -> None:
    """The commented peers and rules reference, uncommented, loads with sipguard's own loader and
    gives every setting its schema default (but the placeholders and the example limits)."""
    key = new_key()
    (tmp_path / "sti-ca").mkdir()
    (tmp_path / "sti-ca" / "root.pem").write_bytes(
        pem(make_cert("STI-CA Test Root", key, "STI-CA Test Root", key, ca=True))
    )
    blocks = {b.name: b.text for b in _blocks(docgen.CONFIG_YAML)}
    peers = textwrap.dedent(_uncommented(blocks["config.peers"]))
    rules = "".join(_uncommented(blocks[f"config.rules.{rule}"]) for rule in RULE_NAMES)
    text = ("listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\n"
            + peers + "rules:\n" + rules)
    path = tmp_path / "reference.yaml"
    path.write_text(text, encoding="utf-8")

    cfg = load_config(path)

    assert cfg.rules.order == RULE_NAMES
    for rule in RULE_NAMES:
        settings = getattr(cfg.rules, rule)
        model = type(settings)
        for name in model.model_fields:
            key = f"rules.{rule}.{name}"
            value = getattr(settings, name)
            if key == "rules.identity.trust_anchors":
                assert value == tmp_path / "sti-ca"
            elif key in docgen.EXAMPLES:  # the concurrency and rate limits: examples
                example = docgen.EXAMPLES[key]
                if isinstance(value, BaseModel):
                    value = value.model_dump(include=set(example))
                assert value == example, key
            else:
                assert value == _default(model, name), key
    (peer,) = cfg.peers
    assert peer.name == "carrier-a" and [str(n) for n in peer.networks] == ["203.0.113.0/24"]
    for name, field in type(peer).model_fields.items():
        if not field.is_required() and name != "rules":
            assert getattr(peer, name) == _default(type(peer), name), f"peers[].{name}"
    assert peer.rules.order == RULE_NAMES  # `rules: {}`: the top-level rules, unchanged


def test_check_names_the_file_and_block_that_drifted_and_write_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check exits 1 naming the file and the block edited by hand; a plain run rewrites it."""
    _copy_repo_files(tmp_path)
    rules_md = tmp_path / docgen.RULES_MD
    text = rules_md.read_text(encoding="utf-8")
    rules_md.write_text(text.replace("| `max_keys` | int", "| `max_keys` | integer", 1),
                        encoding="utf-8")
    yaml_path = tmp_path / docgen.CONFIG_YAML
    yaml_text = yaml_path.read_text(encoding="utf-8")
    yaml_path.write_text(yaml_text.replace("  t1_ms: 500 ", "  t1_ms: 400 ", 1), encoding="utf-8")

    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/rules.md: block rules.rate differs from the schema" in err
    assert "config/sipguard.yaml: block config.sip differs from the schema" in err
    assert "rules.dialer" not in err

    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert rules_md.read_text(encoding="utf-8") == text
    assert yaml_path.read_text(encoding="utf-8") == yaml_text
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0


def test_missing_or_unknown_markers_are_reported_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A block whose markers were deleted, or a marker naming no block, is an error."""
    _copy_repo_files(tmp_path)
    rules_md = tmp_path / docgen.RULES_MD
    text = rules_md.read_text(encoding="utf-8")
    broken = (text.replace("<!-- END GENERATED: rules.flood -->\n", "", 1)
              + "<!-- BEGIN GENERATED: rules.bogus -->\n<!-- END GENERATED: rules.bogus -->\n")
    rules_md.write_text(broken, encoding="utf-8")

    assert docgen.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/rules.md: block rules.flood: expected one pair of marker lines" in err
    assert "docs/rules.md: block rules.bogus is not generated by docgen" in err
    assert rules_md.read_text(encoding="utf-8") == broken


def test_defaults_render_as_yaml_that_reads_back_as_the_default() -> None:
    """Tuples, None, paths, networks and nested answers are written as YAML values equal to the
    defaults they stand for."""
    reference = yaml.safe_load(
        textwrap.dedent(_uncommented({b.name: b.text for b in _blocks(docgen.CONFIG_YAML)}
                                     ["config.rules.identity"]))
    )["identity"]
    assert reference["x5u_ports"] == [443, 8443]
    assert reference["fetch_ca_bundle"] is None
    assert reference["answers"]["stale"] == {"status": 403, "phrase": "Stale Date"}
    flood = yaml.safe_load(textwrap.dedent(_uncommented(
        {b.name: b.text for b in _blocks(docgen.CONFIG_YAML)}["config.rules.flood"])))["flood"]
    assert flood["exempt"] == [] and "sipvicious" in flood["scanners"]


def test_a_setting_without_description_stops_the_generator(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema field without description= is an error naming its config path, not a blank cell."""
    from sipguard.policy.flood_settings import Settings as FloodSettings

    monkeypatch.setattr(FloodSettings.model_fields["ban_s"], "description", None)
    with pytest.raises(ValueError, match=r"rules\.flood\.ban_s: the schema has no description="):
        docgen.blocks_for()
    assert docgen.main(["--check"]) == 2
    assert "rules.flood.ban_s" in capsys.readouterr().err
