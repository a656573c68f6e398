"""Member keys at rest: the encrypted key file, `visita keys import`, and the `cmd/members` downlink.

Threat model (docs/checkin.md, "Member keys at rest"):

* The member keys are stored in ``<data_dir>/members.vault``, encrypted with AES-256-GCM under a
  vault key that is *not* in that file nor in the database (``visita.json``). A copied database or
  vault file alone reveals no key, and a changed vault fails authentication instead of loading
  forged keys.
* The vault key comes from the gateway's credentials: systemd's ``$CREDENTIALS_DIRECTORY/visita-vault-key``
  (``LoadCredentialEncrypted=``, sealed to the machine or its TPM) when present, otherwise
  ``<data_dir>/vault.key``, created with mode 0600 and refused when group or others can read it.
  With the key file in the data directory, someone who copies the *whole directory* (or has root on the
  Pi) has the keys: that fallback protects against a leaked backup of the database, not against a
  stolen SD card. Use the systemd credential for that.
* Keys are never logged, never in events, never in the database; the files are written with mode 0600
  (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.files import write_atomic
from gateway.identity import MemberDirectory

log = logging.getLogger("visita.members")

VAULT_FILE = "members.vault"
KEY_FILE = "vault.key"
CREDENTIAL = "visita-vault-key"
_MAGIC = b"VISITA-MEMBERS\x01"
_NONCE = 12
MEMBER_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
"""Member refs: what the backend uses, safe in logs of support tools and in subjects."""
TIER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_MEMBERS = 1_000_000


class KeyStoreError(Exception):
    """The vault or its key cannot be used; the message says what and the fix."""


class KeyImportError(Exception):
    """A key file or command that cannot be applied; one line per problem, nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class MemberKey:
    """One member as the backend provisions it."""

    member: str
    """Member ref."""
    key: bytes = field(repr=False)
    """32-byte key shared with the member's app. Never logged (hidden from repr)."""
    tier: str | None = None
    """Loyalty tier name (for tier multipliers in the rules), or None."""


def parse_member(obj: object, where: str) -> MemberKey:
    """One `{"member", "key", "tier"?}` object; KeyImportError names `where` and the field, never the key."""
    if not isinstance(obj, dict):
        raise KeyImportError([f'{where}: must be a JSON object {{"member", "key", "tier"}}'])
    extra = sorted(set(obj) - {"member", "key", "tier"})
    if extra:
        raise KeyImportError([f"{where}: unknown field(s) {', '.join(extra)} (allowed: member, key, tier)"])
    ref, key, tier = obj.get("member"), obj.get("key"), obj.get("tier")
    if not isinstance(ref, str) or not MEMBER_REF.fullmatch(ref):
        raise KeyImportError([f"{where}: member must be 1-64 of A-Z a-z 0-9 _ . : - (starting with a letter or digit)"])
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", key):
        # The value is not echoed: a nearly-right key is still a secret.
        raise KeyImportError([f"{where}: member {ref}: key must be 64 hex digits (32 bytes)"])
    if tier is not None and (not isinstance(tier, str) or not TIER.fullmatch(tier)):
        raise KeyImportError([f"{where}: member {ref}: tier must be 1-32 of a-z 0-9 _ - (or left out)"])
    return MemberKey(ref, bytes.fromhex(key), tier)


def parse_key_lines(text: str, source: str) -> list[MemberKey]:
    """JSON lines of members; every bad line is reported (`FILE:LINE: ...`), and any problem rejects all."""
    return [m for _, m in _numbered_key_lines(text, source)]


def _same_key(where: str, member: str, other: str) -> str:
    # Member tokens depend on the key alone (gateway/identity.py member_token): two members with one key are one
    # phone to the gateway, credited to either, and removing one would leave the other unrecognised.
    return (
        f"{where}: member {member} has the same key as {other}: every member needs a key of its own "
        "(the gateway tells members apart by their keys alone)"
    )


def _numbered_key_lines(text: str, source: str) -> list[tuple[int, MemberKey]]:
    """`parse_key_lines` with each member's line number."""
    out: list[tuple[int, MemberKey]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    keys: dict[bytes, tuple[int, str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            m = parse_member(obj, where)
        except KeyImportError as e:
            problems.extend(e.problems)
            continue
        if m.member in seen:
            problems.append(f"{where}: member {m.member} is already on line {seen[m.member]}")
            continue
        if m.key in keys:
            first, other = keys[m.key]
            problems.append(_same_key(where, m.member, f"member {other} on line {first}"))
            continue
        seen[m.member] = n
        keys[m.key] = (n, m.member)
        out.append((n, m))
    if not out and not problems:
        problems.append(f'{source}: no members (one JSON object per line: {{"member", "key", "tier"}})')
    if problems:
        raise KeyImportError(problems)
    return out


# --------------------------------------------------------------------------- the vault


def vault_key(data_dir: Path, *, create: bool) -> tuple[bytes, str]:
    """The vault's 32-byte key and where it came from (the credential, or the key file)."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL).is_file():
        path, source = Path(cred_dir) / CREDENTIAL, f"systemd credential {CREDENTIAL}"
    else:
        path, source = data_dir / KEY_FILE, str(data_dir / KEY_FILE)
        if not path.exists():
            if not create:
                raise KeyStoreError(f"{path} is missing: the member vault cannot be decrypted without it")
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, secrets.token_hex(32).encode() + b"\n", 0o600)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyStoreError(f"{path} has mode {mode:04o}: others may read the vault key; run chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise KeyStoreError(f"{source}: cannot be read as 64 hex digits (a 32-byte key)") from None
    if len(key) != 32:
        raise KeyStoreError(f"{source}: must hold 64 hex digits (a 32-byte key), has {len(key)} bytes")
    return key, source


@dataclass(frozen=True, slots=True)
class MemberSet:
    """What the vault holds."""

    version: int
    """Version of the set: from the backend's commands, or +1 per `visita keys import`."""
    members: tuple[MemberKey, ...]
    """Every member."""


class VaultUnreadable(KeyStoreError):
    """The vault file is not one, or does not decrypt with the vault key: what `keys import --replace` replaces."""


REPLACE_HINT = "replace it with the members' keys: visita keys import FILE --replace (it is kept aside)"


class KeyVault:
    """The encrypted member key file of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / VAULT_FILE

    def exists(self) -> bool:
        """True when the data directory has a vault."""
        return self.path.exists()

    def load(self) -> MemberSet:
        """Decrypt the vault (an empty set, version 0, when there is none); KeyStoreError when it cannot."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not self.path.exists():
            return MemberSet(0, ())
        key, source = vault_key(self.data_dir, create=False)
        blob = self.path.read_bytes()
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
            raise VaultUnreadable(f"{self.path} is not a Visita member vault; {REPLACE_HINT}")
        nonce, sealed = blob[len(_MAGIC) : len(_MAGIC) + _NONCE], blob[len(_MAGIC) + _NONCE :]
        try:
            plain = AESGCM(key).decrypt(nonce, sealed, _MAGIC)
        except InvalidTag:
            raise VaultUnreadable(
                f"{self.path} does not decrypt with {source}: the vault was changed or the key is another "
                f"gateway's; {REPLACE_HINT}"
            ) from None
        data = json.loads(plain)
        members = tuple(MemberKey(r, bytes.fromhex(k), t) for r, k, t in data["members"])
        return MemberSet(int(data["version"]), members)

    def save(self, members: MemberSet) -> str:
        """Encrypt and write the set atomically (mode 0600); returns where the vault key came from."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key, source = vault_key(self.data_dir, create=True)
        plain = json.dumps(
            {"version": members.version, "members": [[m.member, m.key.hex(), m.tier] for m in members.members]},
            separators=(",", ":"),
        ).encode()
        nonce = secrets.token_bytes(_NONCE)
        write_atomic(self.path, _MAGIC + nonce + AESGCM(key).encrypt(nonce, plain, _MAGIC), 0o600)
        return source


class DataDirInUse(KeyStoreError):
    """A running gateway holds the data directory: the vault is its to write (through `cmd/members`)."""


def import_keys(data_dir: Path, text: str, source: str, *, replace: bool = False) -> dict[str, Any]:
    """`visita keys import`: validate every line first, then merge (or replace) and save; all or nothing.

    Holds the data directory's single-writer lock while it reads and writes the vault: a running gateway keeps its
    member set in memory and writes it whole at the backend's next `cmd/members`, which would lose the imported
    keys (and call another set by the same version). DataDirInUse when a gateway holds the directory.
    """
    from gateway.store import StoreError, StoreInUse, holding_data_dir

    numbered = _numbered_key_lines(text, source)
    try:
        with holding_data_dir(data_dir):
            return _import_locked(data_dir, numbered, source, replace)
    except StoreInUse:
        raise DataDirInUse(
            f"{data_dir} is held by a running gateway, which keeps its member set in memory and would overwrite "
            "these keys with it at the backend's next cmd/members; nothing was imported. Stop the gateway and import "
            "again (it loads the vault when it starts), or have the backend send these members with cmd/members "
            "(docs/checkin.md)"
        ) from None
    except StoreError as e:
        raise KeyStoreError(str(e)) from None


def _import_locked(data_dir: Path, numbered: list[tuple[int, MemberKey]], source: str, replace: bool) -> dict[str, Any]:
    new = [m for _, m in numbered]
    vault = KeyVault(data_dir)
    aside: Path | None = None
    try:
        old = vault.load()
    except VaultUnreadable:
        if not replace:
            raise
        # Nothing of it is kept, so nothing of it needs reading: once the key to write the new one is known to be
        # usable, it is moved aside, and counts start afresh. A key problem (missing, readable by others) is not this.
        vault_key(vault.data_dir, create=True)
        aside = vault.path.with_name(f"{vault.path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
        vault.path.replace(aside)
        old = MemberSet(0, ())
    known = {m.member: m for m in old.members}
    if not replace:  # a member the file does not name keeps its key: none of the file's may be the same
        refs = {m.member for m in new}
        kept = {m.key: m.member for m in old.members if m.member not in refs}
        clashes = [
            _same_key(f"{source}:{n}", m.member, f"member {kept[m.key]} already in {vault.path}")
            for n, m in numbered
            if m.key in kept
        ]
        if clashes:
            raise KeyImportError(clashes)
    added = sum(1 for m in new if m.member not in known)
    changed = sum(1 for m in new if m.member in known and known[m.member] != m)
    merged = {m.member: m for m in new} if replace else {**known, **{m.member: m for m in new}}
    if len(merged) > MAX_MEMBERS:
        raise KeyImportError([f"{source}: {len(merged):,} members is more than the {MAX_MEMBERS:,} a gateway holds"])
    result = MemberSet(old.version + 1, tuple(merged.values()))
    where = vault.save(result)
    return {
        "imported": len(new),
        "added": added,
        "changed": changed,
        "removed": len(known.keys() - merged.keys()),
        "members": len(merged),
        "version": result.version,
        "vault": str(vault.path),
        "vault_key": where,
        "unreadable_vault_kept_at": str(aside) if aside else None,
    }


def load_into(directory: MemberDirectory, data_dir: Path) -> int:
    """Add the vault's members to `directory` (at start); returns how many. KeyStoreError when unreadable."""
    vault = KeyVault(data_dir)
    if not vault.exists():
        return 0
    loaded = vault.load()
    for m in loaded.members:
        directory.upsert(m.member, m.key, m.tier)
    directory.version = max(directory.version, loaded.version)
    return len(loaded.members)


# --------------------------------------------------------------------------- downlink: cmd/members


class MemberKeys:
    """The live member set and its vault: what the `cmd/members` downlink changes."""

    def __init__(self, directory: MemberDirectory, vault: KeyVault) -> None:
        self.directory = directory
        self.vault = vault
        self.commands = {"applied": 0, "refused": 0}

    def save(self) -> None:
        """Write the directory's members to the vault."""
        members = tuple(MemberKey(r, k, t) for r, k, t in self.directory.items())
        self.vault.save(MemberSet(self.directory.version, members))


REPLY_PROBLEMS_MAX = 20
"""A refused `cmd/members` reply names this many problems at most, then how many more (a set of 100,000 members with
one mistake repeated would otherwise make a reply of megabytes)."""


def apply_members_command(keys: MemberKeys, payload: bytes | Mapping[str, Any]) -> dict[str, Any]:
    """Apply one `cmd/members` message; the result is the reply (never holds a key). Nothing changes on refusal.

    Payload (JSON): ``{"op": "full", "version": N, "members": [{member, key, tier?}, ...]}`` replaces the
    set; ``{"op": "add", "version": N, "members": [...]}`` and ``{"op": "remove", "version": N,
    "members": ["ref", ...]}`` change it and must carry exactly the current version + 1 (otherwise the
    reply asks for a full set). A full set must have a version above the current one.
    """
    try:
        result = _apply(keys, payload)
    except KeyImportError as e:
        keys.commands["refused"] += 1
        shown = e.problems[:REPLY_PROBLEMS_MAX]
        more = len(e.problems) - len(shown)
        error = "; ".join(shown) + (f"; and {more} more problem(s) like these" if more else "")
        return {"ok": False, "version": keys.directory.version, "error": error}
    except (KeyStoreError, OSError) as e:  # the vault is written before anything changes: refused, the gateway runs
        keys.commands["refused"] += 1
        error = (
            f"cmd/members: the member keys could not be stored in {keys.vault.path} ({e}); nothing changed: "
            "check the free space and that the gateway may write its data directory, then send the set again"
        )
        log.error("%s", error)
        return {"ok": False, "version": keys.directory.version, "error": error}
    keys.commands["applied"] += 1
    return result


def _apply(keys: MemberKeys, payload: bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KeyImportError(["cmd/members: payload is not JSON"]) from None
    if not isinstance(payload, Mapping):
        raise KeyImportError(["cmd/members: payload must be a JSON object"])
    extra = sorted(set(payload) - {"id", "op", "version", "members"})
    if extra:
        raise KeyImportError([f"cmd/members: unknown field(s) {', '.join(extra)} (allowed: id, op, version, members)"])
    op, version, items = payload.get("op"), payload.get("version"), payload.get("members")
    current = keys.directory.version
    if op not in ("full", "add", "remove"):
        raise KeyImportError(["cmd/members: op must be full, add or remove"])
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KeyImportError(["cmd/members: version must be a positive integer"])
    if not isinstance(items, list):
        raise KeyImportError(["cmd/members: members must be a list"])
    if op == "full" and version <= current:
        raise KeyImportError([f"cmd/members: full set version {version} is not above the current {current}"])
    if op != "full" and version != current + 1:
        raise KeyImportError([f"cmd/members: {op} version {version} does not follow {current}: send a full set"])
    d = keys.directory
    if op == "remove":
        if not all(isinstance(r, str) for r in items):
            raise KeyImportError(["cmd/members: remove takes a list of member refs"])
        gone = {r for r in items if d.key(r) is not None}
        keep = tuple(MemberKey(r, k, t) for r, k, t in d.items() if r not in gone)
        keys.vault.save(MemberSet(version, keep))  # stored first: a failed write changes nothing
        for ref in gone:
            d.remove(ref)
        d.version = version
        return {"ok": True, "version": version, "members": len(d), "removed": len(gone)}
    problems: list[str] = []
    parsed: list[MemberKey] = []
    for i, obj in enumerate(items):
        try:
            parsed.append(parse_member(obj, f"cmd/members: members[{i}]"))
        except KeyImportError as e:
            problems.extend(e.problems)
    if problems:
        raise KeyImportError(problems)
    # Every member needs a key of its own: within the command, and (for add) against the members it leaves as
    # they are. A member named twice is refused as well (as `visita keys import` does): which would hold is a guess.
    first: dict[str, int] = {}
    holder: dict[bytes, str] = {}
    for i, m in enumerate(parsed):
        where = f"cmd/members: members[{i}]"
        if m.member in first:
            problems.append(f"{where}: member {m.member} is already members[{first[m.member]}]")
            continue
        first[m.member] = i
        if m.key in holder:
            problems.append(_same_key(where, m.member, holder[m.key]))
            continue
        holder[m.key] = f"member {m.member} (members[{i}])"
    if op == "add" and not problems:
        kept = {k: r for r, k, _ in d.items() if r not in first}
        problems += [
            _same_key(f"cmd/members: members[{i}]", m.member, f"member {kept[m.key]}, already provisioned")
            for i, m in enumerate(parsed)
            if m.key in kept
        ]
    if problems:
        raise KeyImportError(problems)
    if op == "full":
        keys.vault.save(MemberSet(version, tuple(parsed)))
        d.set_members({m.member: m.key for m in parsed}, {m.member: m.tier for m in parsed if m.tier}, version)
    else:
        merged = {r: MemberKey(r, k, t) for r, k, t in d.items()} | {m.member: m for m in parsed}
        keys.vault.save(MemberSet(version, tuple(merged.values())))
        for m in parsed:
            d.upsert(m.member, m.key, m.tier)
        d.version = version
    return {"ok": True, "version": version, "members": len(d)}
