"""watcher.model: an admin line's place moves in place (LineNumber), and what that means for
equality, hashing and how owners are named."""

from __future__ import annotations

from watcher.model import LineNumber, ManualLine, PublicKey, owner_names, owners_sorted

KEY = PublicKey("ssh-ed25519", "AAAA", "", "SHA256:x", 256)


def test_a_line_is_its_text_at_its_place() -> None:
    line = ManualLine.at("/k/a.pub:7", ("no-pty",), KEY)
    assert (line.path, line.number.value, line.origin) == ("/k/a.pub", 7, "/k/a.pub:7")
    assert line == ManualLine("/k/a.pub", ("no-pty",), KEY, LineNumber(7))
    assert line != ManualLine.at("/k/a.pub:8", ("no-pty",), KEY)  # the same text elsewhere
    assert ManualLine.at("admin", (), KEY).origin == "admin"  # a bare name has no number


def test_moving_a_line_keeps_it_where_a_set_put_it() -> None:
    line = ManualLine.at("/k/a.pub:7", (), KEY)
    twin = ManualLine.at("/k/a.pub:9", (), KEY)  # the same key twice in one file
    held = {line: "first", twin: "second"}
    line.number.value, twin.number.value = 8, 10  # a line inserted above both
    assert held[line] == "first" and held[twin] == "second"
    assert line.origin == "/k/a.pub:8" and line != twin


def test_owners_named_as_of_now_and_sorted_as_strings() -> None:
    line = ManualLine.at("/k/a.pub:9", (), KEY)
    owners = owners_sorted({"web", line, "api"})
    assert owners == ("api", "web", line)
    assert owner_names(owners) == ("/k/a.pub:9", "api", "web")
    line.number.value = 10  # moved after the owners were worked out
    assert owner_names(owners) == ("/k/a.pub:10", "api", "web")
