"""watcher.snapshot: the typed status document and its schema-1 JSON form."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
import jsonschema
import pytest

from watcher.snapshot import (JSON_SCHEMA, IgnoredTarget, KeyInfo, KeyStatus, ManualKey,
                              ManualStatus, RefusedName, SettingsView, SnapshotError,
                              SourceStatus, StatusDocument, TargetStatus,
                              WatcherState, from_json, to_json)

FP = "SHA256:" + "A" * 43


def full_document() -> StatusDocument:
    return StatusDocument(
        heartbeat=1_700_000_000.5, mode="docker", sshd_pid=17, sshd_restarts=1,
        settings=SettingsView(("*",), ("22", "8080"), ("proxy=on",)),
        state=WatcherState(
            targets=(TargetStatus("0123456789ab", "web", "172.18.0.11", ("web", "0123456789ab"),
                                  KeyStatus.OK, "http", (KeyInfo("ssh-ed25519", FP),),
                                  since=1_699_999_990.0),
                     TargetStatus("ba9876543210", "db", "172.18.0.12", (), KeyStatus.FAILED,
                                  error="GET answered HTTP 503", rejected=("line 2: bad",))),
            ignored=(IgnoredTarget("aaaaaaaaaaaa", "other", "label 'proxy' missing"),),
            refused_aliases=(RefusedName("evil", "db", "belongs to target db"),),
            manual_keys=(ManualKey("/keys/admin:1", "ssh-rsa", FP, ('permitopen="db:22"',)),),
            keys_served=2, writes=5, last_write=1_699_999_991.0, last_event=1_699_999_992.0,
            source=SourceStatus("docker", True, reconnects=2, since=1_699_999_000.0),
            manual=ManualStatus(1, 1, ("/keys/x:3: not a key",))))


def test_round_trip() -> None:
    doc = full_document()
    assert from_json(to_json(doc)) == doc
    empty = StatusDocument(heartbeat=1.0, mode="manual")
    assert from_json(to_json(empty)) == empty


def test_json_matches_the_published_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)
    data = json.loads(to_json(full_document()))
    jsonschema.validate(data, JSON_SCHEMA)
    assert data["schema"] == 1
    # The first format's names stay readable (e2e helpers, operators' scripts).
    assert data["targets"][0]["fingerprints"] == [FP]
    assert data["refused_aliases"] == [["evil", "db", "belongs to target db"]]
    del data["targets"][0]["since"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, JSON_SCHEMA)


def test_recorded_snapshot_still_reads() -> None:
    """A document as a schema-1 watcher wrote it: future readers must keep reading it."""
    text = (Path(__file__).parent / "data" / "status-schema1.json").read_text()
    jsonschema.validate(json.loads(text), JSON_SCHEMA)
    doc = from_json(text)
    assert doc.mode == "docker"
    assert [t.key_status for t in doc.state.targets] == [KeyStatus.FAILED, KeyStatus.OK]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema=2), "status schema 2 is not supported"),
    (lambda d: d.pop("mode"), "status.mode is missing"),
    (lambda d: d.update(sshd_restarts=True), "status.sshd_restarts: expected int"),
    (lambda d: d["source"].update(connected="yes"), "status.source.connected: expected bool"),
    (lambda d: d["targets"][0].update(key_status="great"), "unknown state 'great'"),
    (lambda d: d.update(refused_aliases=[["a", "b"]]), "expected [target, alias, reason]"),
    (lambda d: d["targets"][1].update(aliases=[1]), "status.targets[1].aliases"),
])
def test_bad_documents_say_what_is_wrong(mutate, message) -> None:
    data = json.loads(to_json(full_document()))
    mutate(data)
    with pytest.raises(SnapshotError) as err:
        from_json(json.dumps(data))
    assert message in str(err.value)


def test_not_json() -> None:
    with pytest.raises(SnapshotError, match="not JSON"):
        from_json("{half")


def test_port_rule() -> None:
    assert SettingsView(permit_ports=("*",)).port_rule == "any port"
    assert SettingsView(permit_ports=("22", "8080")).port_rule == "22,8080"


def test_without_targets_reads_everything_else_and_never_the_rows() -> None:
    """What `watcher health` reads: at 100k targets building the rows took ~3 s of the
    HEALTHCHECK's 10 s; a row health never looks at cannot make it fail either."""
    doc = full_document()
    data = json.loads(to_json(doc))
    data["targets"][0]["key_status"] = "no such status"
    text = json.dumps(data)
    assert from_json(text, targets=False) == replace(doc, state=replace(doc.state, targets=()))
    with pytest.raises(SnapshotError, match="key_status"):
        from_json(text)


def test_health_answers_from_a_status_whose_rows_it_does_not_read(tmp_path: Path, capsys) -> None:
    from watcher import cli
    doc = replace(full_document(), heartbeat=__import__("time").time())
    data = json.loads(to_json(doc))
    data["targets"][0]["key_status"] = "no such status"
    (tmp_path / "status.json").write_text(json.dumps(data))
    assert cli.main(["health", "--status", str(tmp_path / "status.json"), "--port", "1"]) == cli.EXIT_ERROR
    assert capsys.readouterr().out == "unhealthy: sshd does not listen on port 1\n"


def test_each_target_row_is_one_line_with_its_keys_sorted() -> None:
    """One row per line (grep finds a target whole); keys sorted, as in the rest."""
    doc = full_document()
    text = to_json(doc)
    rows = json.loads(text)["targets"]
    lines = [line for line in text.splitlines() if line.startswith("  {\"address\"")]
    assert lines == [f"  {json.dumps(row, sort_keys=True)}," for row in rows[:-1]] + [
        f"  {json.dumps(rows[-1], sort_keys=True)}"]
    assert json.loads(to_json(replace(doc, state=WatcherState())))["targets"] == []
