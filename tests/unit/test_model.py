"""watcher.model: an admin line's place moves in place (LineNumber), and what that means for
equality, hashing and how owners are named."""

from __future__ import annotations

from watcher.model import ManualLine, PublicKey, owner_names, owners_sorted

KEY = PublicKey("ssh-ed25519", "AAAA", "", "SHA256:x", 256)


def test_a_line_is_itself_wherever_it_moves() -> None:
    line = ManualLine.at("/k/a.pub:7", ("no-pty",), KEY)
    assert (line.path, line.number.value, line.origin) == ("/k/a.pub", 7, "/k/a.pub:7")
    assert ManualLine.at("admin", (), KEY).origin == "admin"  # a bare name has no number
    # One line deleted, the same text below it moved up to its number: two lines still.
    gone, moved = ManualLine.at("/k/a.pub:5", (), KEY), ManualLine.at("/k/a.pub:9", (), KEY)
    held = {gone: "deleted", moved: "in the file"}
    moved.number.value = 5
    assert gone != moved and gone.origin == moved.origin
    assert (gone.path, gone.options, gone.key) == (moved.path, moved.options, moved.key)
    assert held[moved] == "in the file" and [l for l in (gone, moved) if l not in {gone}] == [moved]


def test_owners_named_as_of_now_and_sorted_as_strings() -> None:
    line = ManualLine.at("/k/a.pub:9", (), KEY)
    owners = owners_sorted({"web", line, "api"})
    assert owners == ("api", "web", line)
    assert owner_names(owners) == ("/k/a.pub:9", "api", "web")
    line.number.value = 10  # moved after the owners were worked out
    assert owner_names(owners) == ("/k/a.pub:10", "api", "web")
