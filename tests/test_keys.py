"""Member keys: `visita keys import` (all or nothing, line numbers), the encrypted vault, the cmd/members handler,
and the token tables of MemberDirectory (prepared ahead, updated in place)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.identity import TOKEN_WINDOW_S, MemberDirectory, member_token
from gateway.members import (
    KEY_FILE,
    VAULT_FILE,
    KeyImportError,
    KeyStoreError,
    KeyVault,
    MemberKeys,
    apply_members_command,
    import_keys,
    load_into,
)
from gateway.model import MemberFrame

KEYS = {f"m-{i}": bytes([i]) * 32 for i in range(1, 6)}


def lines(keys: dict[str, bytes], tier: str | None = "gold") -> str:
    return "".join(
        json.dumps({"member": r, "key": k.hex(), **({"tier": tier} if tier else {})}) + "\n" for r, k in keys.items()
    )


def frame(key: bytes, ts: float) -> MemberFrame:
    window = int(ts // TOKEN_WINDOW_S)
    return MemberFrame(1, window & 0xFF, -59, member_token(key, window))


def test_import_stores_keys_encrypted_with_mode_0600_and_loads_them_back(tmp_path: Path) -> None:
    result = import_keys(tmp_path, lines(KEYS), "keys.jsonl")
    assert result["members"] == 5 and result["added"] == 5 and result["version"] == 1
    vault, key_file = tmp_path / VAULT_FILE, tmp_path / KEY_FILE
    for f in (vault, key_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    blob = vault.read_bytes()
    for k in KEYS.values():  # neither raw nor hex: the file alone reveals no key
        assert k not in blob and k.hex().encode() not in blob
    assert b"m-1" not in blob, "member refs are inside the ciphertext too"
    d = MemberDirectory()
    assert load_into(d, tmp_path) == 5
    assert d.key("m-3") == KEYS["m-3"] and d.tier("m-3") == "gold" and d.version == 1
    ts = 1_780_000_000.0
    assert d.resolve(frame(KEYS["m-2"], ts), ts) == "m-2"


def test_bad_lines_are_all_reported_with_their_numbers_and_nothing_changes(tmp_path: Path) -> None:
    import_keys(tmp_path, lines({"m-1": KEYS["m-1"]}), "first.jsonl")
    before = (tmp_path / VAULT_FILE).read_bytes()
    secret = "ab" * 31  # 62 hex digits: one byte short
    text = (
        lines({"m-2": KEYS["m-2"]})
        + "{not json\n"
        + json.dumps({"member": "m-3", "key": secret})
        + "\n"
        + json.dumps({"member": "m-2", "key": KEYS["m-2"].hex()})
        + "\n"
        + json.dumps({"member": "m 4", "key": KEYS["m-4"].hex()})
        + "\n"
        + json.dumps({"member": "m-5", "key": KEYS["m-5"].hex(), "colour": 1})
        + "\n"
    )
    with pytest.raises(KeyImportError) as e:
        import_keys(tmp_path, text, "bad.jsonl")
    problems = e.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6"], problems
    assert "bad.jsonl:3: member m-3: key must be 64 hex digits" in problems[1]
    assert "already on line 1" in problems[2]
    assert all(secret not in p for p in problems), "a nearly-right key is still a secret"
    assert (tmp_path / VAULT_FILE).read_bytes() == before


def test_cli_import_exit_codes_and_output_never_show_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(lines(KEYS))
    bad.write_text(lines(KEYS) + '{"member": "x"}\n')
    data = tmp_path / "data"
    assert main(["keys", "import", str(bad), "--data-dir", str(data)]) == 2
    out = capsys.readouterr()
    assert "bad.jsonl:6:" in out.err and "nothing was imported" in out.err
    assert not (data / VAULT_FILE).exists()
    assert main(["keys", "import", str(good), "--data-dir", str(data), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["members"] == 5
    for k in KEYS.values():
        assert k.hex() not in out.out + out.err
    good.chmod(0o644)  # as a download or a copy often is
    assert main(["keys", "import", str(good), "--data-dir", str(data)]) == 0, "imported all the same"
    err = capsys.readouterr().err
    assert f"warning: the key file {good}: mode 0644 lets anyone on this machine read it" in err, err
    good.chmod(0o600)
    assert main(["keys", "import", str(good), "--data-dir", str(data)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_import_is_refused_while_a_gateway_holds_the_data_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.store import Store

    keys = tmp_path / "keys.jsonl"
    keys.write_text(lines(KEYS))
    data = tmp_path / "data"
    store = Store(data)  # as `visita run` holds it: its member set is in memory, cmd/members writes it whole
    try:
        assert main(["keys", "import", str(keys), "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert "held by a running gateway" in err and "nothing was imported" in err, err
        assert "Stop the gateway" in err and "cmd/members" in err, err
        assert not (data / VAULT_FILE).exists() and not (data / KEY_FILE).exists()
    finally:
        store.close()
    assert main(["keys", "import", str(keys), "--data-dir", str(data)]) == 0  # stopped: imported
    with Store(data):  # and the import released the directory again
        pass


def test_a_key_on_two_lines_or_already_another_members_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    import_keys(tmp_path, lines({"m-1": KEYS["m-1"], "m-2": KEYS["m-2"]}), "first.jsonl")
    before = (tmp_path / VAULT_FILE).read_bytes()
    twice = lines({"m-3": KEYS["m-3"], "m-4": KEYS["m-4"], "m-5": KEYS["m-3"]})
    with pytest.raises(KeyImportError) as e:
        import_keys(tmp_path, twice, "twice.jsonl")
    (problem,) = e.value.problems
    assert problem.startswith("twice.jsonl:3: member m-5 has the same key as member m-3 on line 1"), problem
    assert KEYS["m-3"].hex() not in problem
    with pytest.raises(KeyImportError) as e:
        import_keys(tmp_path, lines({"m-9": KEYS["m-2"], "m-8": KEYS["m-5"]}), "vault.jsonl")
    (problem,) = e.value.problems
    assert problem.startswith(f"vault.jsonl:1: member m-9 has the same key as member m-2 already in {tmp_path}"), (
        problem
    )
    assert (tmp_path / VAULT_FILE).read_bytes() == before
    # Keys may move between members when the file gives both their new keys, and --replace drops the old set.
    import_keys(tmp_path, lines({"m-1": KEYS["m-2"], "m-2": KEYS["m-1"]}), "swap.jsonl")
    import_keys(tmp_path, lines({"m-9": KEYS["m-2"]}), "new.jsonl", replace=True)
    assert [(m.member, m.key) for m in KeyVault(tmp_path).load().members] == [("m-9", KEYS["m-2"])]


def test_members_command_refuses_a_key_two_members_would_share_and_unknown_fields(tmp_path: Path) -> None:
    d = MemberDirectory()
    keys = MemberKeys(d, KeyVault(tmp_path))

    def member(ref: str, key: str) -> dict[str, object]:
        return {"member": ref, "key": KEYS[key].hex()}

    full = {"op": "full", "version": 1, "members": [member("m-1", "m-1"), member("m-2", "m-1")]}
    r = apply_members_command(keys, full)
    assert not r["ok"] and "members[1]: member m-2 has the same key as member m-1 (members[0])" in r["error"]
    assert len(d) == 0 and not (tmp_path / VAULT_FILE).exists()
    full["members"] = [member("m-1", "m-1"), member("m-2", "m-2")]
    assert apply_members_command(keys, full)["ok"]
    r = apply_members_command(keys, {"op": "add", "version": 2, "members": [member("m-3", "m-2")]})
    assert not r["ok"] and "member m-3 has the same key as member m-2, already provisioned" in r["error"]
    r = apply_members_command(
        keys, {"op": "add", "version": 2, "members": [member("m-3", "m-3"), member("m-3", "m-4")]}
    )
    assert not r["ok"] and "members[1]: member m-3 is already members[0]" in r["error"]
    r = apply_members_command(keys, {"op": "add", "version": 2, "members": [member("m-3", "m-3")], "extra": 1})
    assert not r["ok"] and "unknown field(s) extra" in r["error"]
    assert d.version == 1 and sorted(r for r, _, _ in d.items()) == ["m-1", "m-2"]
    again = MemberDirectory()
    load_into(again, tmp_path)
    assert again.version == 1 and len(again) == 2
    # A key moves to another member when the same command gives its old holder a new one.
    swap = {"op": "add", "version": 2, "members": [member("m-3", "m-2"), member("m-2", "m-5")]}
    assert apply_members_command(keys, swap)["ok"]
    ts = 1_780_000_000.0
    assert d.resolve(frame(KEYS["m-2"], ts), ts) == "m-3" and d.resolve(frame(KEYS["m-5"], ts), ts) == "m-2"


def test_a_readable_key_file_a_changed_vault_and_a_lost_key_are_refused(tmp_path: Path) -> None:
    import_keys(tmp_path, lines(KEYS), "k")
    key_file = tmp_path / KEY_FILE
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        KeyVault(tmp_path).load()
    os.chmod(key_file, 0o600)
    vault = tmp_path / VAULT_FILE
    blob = bytearray(vault.read_bytes())
    blob[-1] ^= 1
    vault.write_bytes(bytes(blob))
    with pytest.raises(KeyStoreError, match="does not decrypt"):
        KeyVault(tmp_path).load()
    key_file.unlink()
    with pytest.raises(KeyStoreError, match="missing"):
        KeyVault(tmp_path).load()


def test_an_unreadable_vault_is_replaced_by_import_replace_as_its_message_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import_keys(tmp_path, lines(KEYS), "k")
    vault = tmp_path / VAULT_FILE
    damaged = vault.read_bytes() + b"x"
    vault.write_bytes(damaged)
    keys = tmp_path / "keys.jsonl"
    keys.write_text(lines(KEYS))
    # A merge needs the old members: refused, and the message names the way out.
    assert main(["keys", "import", str(keys), "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "does not decrypt" in err and "visita keys import FILE --replace" in err, err
    assert vault.read_bytes() == damaged
    # --replace needs none of them: the unreadable vault is kept aside and the new one holds the file's members.
    assert main(["keys", "import", str(keys), "--data-dir", str(tmp_path), "--replace", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["members"] == len(KEYS) and out["version"] == 1 and out["removed"] == 0
    kept = Path(out["unreadable_vault_kept_at"])
    assert kept.parent == tmp_path and kept.read_bytes() == damaged
    assert {m.member for m in KeyVault(tmp_path).load().members} == set(KEYS)
    # A vault key others may read is a key problem, not an unreadable vault: --replace leaves the vault where it is.
    good = vault.read_bytes()
    os.chmod(tmp_path / KEY_FILE, 0o644)
    assert main(["keys", "import", str(keys), "--data-dir", str(tmp_path), "--replace"]) == 1
    assert "chmod 600" in capsys.readouterr().err and vault.read_bytes() == good
    # Two replacements in the same second keep both unreadable vaults.
    os.chmod(tmp_path / KEY_FILE, 0o600)
    for _ in range(2):
        vault.write_bytes(damaged)
        assert main(["keys", "import", str(keys), "--data-dir", str(tmp_path), "--replace"]) == 0
    assert len(list(tmp_path.glob(VAULT_FILE + ".unreadable-*"))) == 3


def test_the_systemd_credential_is_the_vault_key_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "visita-vault-key").write_text("11" * 32)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    data = tmp_path / "data"
    assert "systemd credential" in import_keys(data, lines(KEYS), "k")["vault_key"]
    assert not (data / KEY_FILE).exists()
    assert len(KeyVault(data).load().members) == 5
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(KeyStoreError):  # without the credential the vault stays shut
        KeyVault(data).load()


def test_members_command_full_add_remove_versions_and_refusals_change_nothing(tmp_path: Path) -> None:
    d = MemberDirectory()
    keys = MemberKeys(d, KeyVault(tmp_path))

    def member(ref: str, tier: str | None = None) -> dict[str, object]:
        return {"member": ref, "key": KEYS[ref].hex(), **({"tier": tier} if tier else {})}

    full = {"op": "full", "version": 3, "members": [member("m-1"), member("m-2", "silver")]}
    assert apply_members_command(keys, json.dumps(full).encode()) == {"ok": True, "version": 3, "members": 2}
    r = apply_members_command(keys, {"op": "add", "version": 5, "members": [member("m-3")]})
    assert not r["ok"] and "send a full set" in r["error"] and len(d) == 2
    r = apply_members_command(keys, {"op": "add", "version": 4, "members": [member("m-3"), {"member": "m-4"}]})
    assert not r["ok"] and "members[1]" in r["error"] and len(d) == 2 and d.version == 3
    assert apply_members_command(keys, {"op": "add", "version": 4, "members": [member("m-3", "gold")]})["ok"]
    r = apply_members_command(keys, {"op": "remove", "version": 5, "members": ["m-1", "nobody"]})
    assert r == {"ok": True, "version": 5, "members": 2, "removed": 1}
    assert not apply_members_command(keys, {"op": "full", "version": 5, "members": []})["ok"]
    assert keys.commands == {"applied": 3, "refused": 3}
    again = MemberDirectory()
    load_into(again, tmp_path)
    assert sorted(r for r, _, _ in again.items()) == ["m-2", "m-3"] and again.version == 5
    assert again.tier("m-3") == "gold"
    ts = 1_780_000_000.0
    assert d.resolve(frame(KEYS["m-1"], ts), ts) is None
    assert d.resolve(frame(KEYS["m-3"], ts), ts) == "m-3"


def test_a_vault_that_cannot_be_written_refuses_the_command_names_the_file_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = MemberDirectory()
    keys = MemberKeys(d, KeyVault(tmp_path))
    full = {"op": "full", "version": 1, "members": [{"member": "m-1", "key": KEYS["m-1"].hex()}]}
    assert apply_members_command(keys, full)["ok"]

    def disk_full(self: KeyVault, members: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(KeyVault, "save", disk_full)
    r = apply_members_command(keys, {"op": "remove", "version": 2, "members": ["m-1"]})
    assert not r["ok"] and "members.vault" in r["error"] and "No space left" in r["error"]
    assert r["version"] == 1 and d.known("m-1") and keys.commands["refused"] == 1


def test_a_full_set_of_100_000_members_fits_in_one_command() -> None:
    from gateway.downlink import MAX_PAYLOAD

    members = [{"member": f"member-{i:06d}", "key": "ab" * 32, "tier": "silver"} for i in range(100_000)]
    assert len(json.dumps({"op": "full", "version": 1, "members": members})) < MAX_PAYLOAD


def test_prepare_builds_the_window_after_next_in_chunks_before_it_is_needed() -> None:
    d = MemberDirectory(chunk=2)
    d.set_members(KEYS)
    ts = 1_780_000_000.0
    window = int(ts // TOKEN_WINDOW_S)
    d.prepare(ts)
    assert all(d.ready(w) for w in (window - 1, window, window + 1))
    assert not d.ready(window + 2)
    for _ in range(2):
        d.prepare(ts)
    assert d.ready(window + 2)  # 5 members, 2 per call: done by the third call
    later = (window + 1) * TOKEN_WINDOW_S + 1.0
    d.prepare(later)
    assert not d.ready(window - 2)
    assert d.resolve(frame(KEYS["m-5"], later + TOKEN_WINDOW_S), later) == "m-5"  # a phone one window ahead
    assert d.diagnostics()["tables_on_demand"] == 0


def test_cli_import_finds_the_data_directory_through_the_gateways_config(tmp_path: Path) -> None:
    """Without --data-dir the import went to ~/.local/state/visita even where the gateway's config keeps its data in
    /var/lib/visita: imported, and never loaded (and the running gateway's lock never asked)."""
    good, cfg = tmp_path / "good.jsonl", tmp_path / "visita.toml"
    good.write_text(lines(KEYS))
    cfg.write_text('[storage]\ndata_dir = "state"\n')
    assert main(["keys", "import", str(good), "--config", str(cfg)]) == 0
    assert (tmp_path / "state" / VAULT_FILE).exists()


def test_a_members_command_with_thousands_of_problems_gets_a_reply_of_a_few_lines(tmp_path: Path) -> None:
    from gateway.members import REPLY_PROBLEMS_MAX

    keys = MemberKeys(MemberDirectory(), KeyVault(tmp_path))
    one = bytes([7]) * 32
    full = {"op": "full", "version": 1, "members": [{"member": f"m-{i}", "key": one.hex()} for i in range(5000)]}
    r = apply_members_command(keys, full)
    assert not r["ok"]
    assert r["error"].count("has the same key as") == REPLY_PROBLEMS_MAX
    assert r["error"].endswith(f"; and {4999 - REPLY_PROBLEMS_MAX} more problem(s) like these")
    assert len(r["error"]) < 200 * REPLY_PROBLEMS_MAX
