"""Eddystone-EID beacons: the ephemeral id computation (both the gateway's and the simulator's, each against the
published vectors), the registry that recognises a store's EID beacons over the radio and in check-ins, their
config, and a check-in whose beacon claim is verified, fixed, stale or forged."""

from __future__ import annotations

import json
import random
import secrets
import warnings
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from dashboard.app import create_app
from firmware_sim import frames
from firmware_sim.scenario import load_scenario, scenario_from_data, scenario_plan
from firmware_sim.world import World
from gateway.cli import main
from gateway.config import BeaconConfig, ConfigError, EidConfig, Settings, load_settings
from gateway.days import LocalDays
from gateway.decode import Decoder
from gateway.identity import BeaconRegistry, Identifier, MemberDirectory, eddystone_eid
from gateway.model import Advert, EddystoneEID
from gateway.points import load_rules
from gateway.runtime import Gateway
from gateway.store import Store
from sensors.checkins import sign
from sensors.sim import SimSource

# Published vectors (Radius Networks' ephemeral_calc, a reference resolver for Eddystone-EID): identity key
# 0102030405060708090A111213141516, rotation exponent 10, beacon time 0 and 2000.
VECTOR_KEY = bytes.fromhex("0102030405060708090a111213141516")
VECTORS = [(0, "a9b76a71c5f89290"), (2000, "4144413e45fefa58")]
NOW = 1_780_000_000.0
KEY = "00112233445566778899aabbccddeeff"


@pytest.mark.parametrize(("counter", "eid"), VECTORS)
def test_the_gateway_computes_the_published_ephemeral_ids(counter: int, eid: str) -> None:
    assert eddystone_eid(VECTOR_KEY, 10, counter).hex() == eid


@pytest.mark.parametrize(("counter", "eid"), VECTORS)
def test_the_simulated_beacon_sends_the_published_ephemeral_ids(counter: int, eid: str) -> None:
    assert frames.eid_value(VECTOR_KEY, 10, counter) == eid


def test_the_id_changes_exactly_every_two_to_the_k_seconds() -> None:
    for k in (0, 4, 10, 15):
        span = 1 << k
        base = 7 * span
        assert eddystone_eid(VECTOR_KEY, k, base) == eddystone_eid(VECTOR_KEY, k, base + span - 1)
        assert eddystone_eid(VECTOR_KEY, k, base) != eddystone_eid(VECTOR_KEY, k, base + span)
    rng = random.Random(5)
    for _ in range(100):  # the two implementations agree everywhere, not only on the vectors
        key, k, c = rng.randbytes(16), rng.randrange(16), rng.randrange(1 << 32)
        assert frames.eid_value(key, k, c) == eddystone_eid(key, k, c).hex()


def eid_beacon(key: str = KEY, exponent: int = 10, epoch: int = 0) -> BeaconConfig:
    return BeaconConfig(
        id="beacon:eid:promo", name="Promo", zone="promotions", eid=EidConfig(key=key, exponent=exponent, epoch=epoch)
    )


def sent(at: float, key: str = KEY, exponent: int = 10, epoch: int = 0) -> str:
    return eddystone_eid(bytes.fromhex(key), exponent, int(at) - epoch).hex()


def test_the_registry_accepts_this_period_and_its_neighbours_only() -> None:
    fixed = BeaconConfig(id="beacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:1:1", zone="entrance")
    reg = BeaconRegistry([fixed, eid_beacon()])
    for offset in (0, -1024, 1024):  # its clock a period off either way, or a phone reporting what it heard before
        assert reg.claim("eid:" + sent(NOW + offset), NOW) == (reg.resolve(bytes.fromhex(sent(NOW)), NOW), "verified")
    assert reg.claim("eid:" + sent(NOW - 3000), NOW) == (None, "unknown"), "recorded an hour ago: useless now"
    assert reg.claim("eid:" + sent(NOW, key="ff" * 16), NOW) == (None, "unknown"), "another beacon's key"
    assert reg.claim("eid:0123456789abcdef", NOW) == (None, "unknown")
    assert reg.claim(fixed.id, NOW) == (None, "fixed"), "a fixed id is public: it proves nothing"
    assert reg.claim("beacon:someone-elses", NOW) == (None, "unknown")
    assert reg.claim(None, NOW) == (None, "none")
    # A beacon whose counter started at registration (epoch) rather than at UNIX 0.
    late = BeaconRegistry([eid_beacon(epoch=1_700_000_123)])
    assert late.claim("eid:" + sent(NOW, epoch=1_700_000_123), NOW)[1] == "verified"
    assert late.claim("eid:" + sent(NOW), NOW)[1] == "unknown"


def test_the_identifier_keeps_the_store_eid_beacon_one_subject_across_rotations() -> None:
    reg = BeaconRegistry([eid_beacon(exponent=4)])
    ident = Identifier(MemberDirectory(), LocalDays("UTC"), beacons=reg)
    decoder = Decoder()
    subjects = set()
    for t in (NOW, NOW + 20, NOW + 40):  # three periods of 16 s
        adv = Advert(
            t, "rx-1", "C0:00:00:00:00:01", False, -70, None, {}, frames.eddystone_eid(sent(t, exponent=4), -20)
        )
        (s,) = ident.identify(decoder.decode_batch([adv]))
        subjects.add(s.subject)
    assert subjects == {"beacon:eid:promo"}
    stranger = Advert(
        NOW, "rx-1", "C0:00:00:00:00:02", False, -70, None, {}, frames.eddystone_eid("0123456789abcdef", -20)
    )
    (s,) = ident.identify(decoder.decode_batch([stranger]))
    assert s.subject == "beacon:eid-0123456789abcdef", "an EID beacon of no registration stays what it sends"


def test_eid_config_takes_exactly_one_key_and_a_key_file_must_be_private(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EidConfig()
    with pytest.raises(ValueError, match="exactly one"):
        EidConfig(key=KEY, key_file="k")
    with pytest.raises(ValueError, match="exponent"):
        EidConfig(key=KEY, exponent=16)
    path = tmp_path / "promo.key"
    path.write_text(KEY + "\n")
    path.chmod(0o640)
    assert EidConfig(key_file=str(path)).identity_key("b") == bytes.fromhex(KEY)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="lets anyone on this machine read it; chmod 640"):
        EidConfig(key_file=str(path)).identity_key("plan.beacons[0].eid")
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"plan.beacons\[0\].eid.key_file = .*must hold 32 hex digits"):
        EidConfig(key_file=str(path)).identity_key("plan.beacons[0].eid")
    with pytest.raises(ConfigError, match="cannot be read"):
        EidConfig(key_file=str(tmp_path / "missing.key")).identity_key("plan.beacons[0].eid")


def test_a_relative_key_file_is_found_next_to_the_config_and_config_check_hides_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "promo.key").write_text(KEY + "\n")
    (tmp_path / "keys" / "promo.key").chmod(0o600)
    plan = Settings().plan
    zones = "\n".join(f'[[plan.zones]]\nid = "{z.id}"\noutside = {str(z.outside).lower()}\n' for z in plan.zones)
    receivers = "\n".join(f'[[plan.receivers]]\nid = "{r.id}"\nzone = "{r.zone}"\n' for r in plan.receivers)
    beacons = (
        '[[plan.beacons]]\nid = "beacon:eid:promo"\nzone = "promotions"\neid = { key_file = "keys/promo.key" }\n'
        '[[plan.beacons]]\nid = "beacon:eid:till"\nzone = "checkout"\n'
        f'eid = {{ key = "{KEY}", exponent = 8 }}\n'
    )
    cfg = tmp_path / "site.toml"
    cfg.write_text(zones + receivers + beacons)
    settings = load_settings(cfg)
    eid = settings.plan.beacons[0].eid
    assert eid is not None and eid.key_file == str(tmp_path / "keys" / "promo.key")
    assert main(["config", "check", str(cfg), "--json"]) == 0
    out = capsys.readouterr().out
    assert KEY not in out and json.loads(out)["plan"]["beacons"][1]["eid"]["key"] == "(hidden)"
    assert KEY not in repr(settings)
    (tmp_path / "keys" / "promo.key").chmod(0o644)
    assert main(["config", "check", str(cfg)]) == 2
    assert "lets anyone on this machine read it" in capsys.readouterr().err


def test_a_simulated_eid_beacon_is_heard_under_its_plan_id_through_the_gateway() -> None:
    data = json.loads(json.dumps(load_scenario("default").model_dump(mode="json")))
    data["beacons"].append(
        {
            "name": "Promotions EID",
            "frame": "eddystone-eid",
            "eid_key": KEY,
            "rotation_exponent": 4,
            "position": [25, 15],
            "interval_ms": 300,
        }
    )
    scenario = scenario_from_data(data, "test", "eid-store")
    plan = scenario_plan(scenario)
    (b,) = [b for b in plan.beacons if b.eid is not None]
    assert (b.id, b.zone) == ("beacon:eid:promotions-eid", "promotions")
    world = World(scenario, 1, NOW)
    ident = Identifier(MemberDirectory(), LocalDays("UTC"), beacons=BeaconRegistry(plan.beacons))
    decoder, src = Decoder(), SimSource(world)
    ids: set[str] = set()
    subjects: set[str] = set()
    t = NOW
    while t < NOW + 60:  # about four rotations of 16 s
        t += 1.0
        adverts = src.poll(t)
        ids |= {f.eid for _, f in decoder.decode_batch(adverts) if isinstance(f, EddystoneEID)}
        subjects |= {s.subject for s in ident.identify(decoder.decode_batch(adverts)) if "eid" in s.subject}
    assert len(ids) >= 4, ids
    assert subjects == {"beacon:eid:promotions-eid"}


def test_eid_scenario_problems_name_the_key_and_the_name() -> None:
    data = json.loads(json.dumps(load_scenario("default").model_dump(mode="json")))
    data["beacons"].append({"frame": "eddystone-eid", "eid_key": "abc", "position": [25, 15]})
    with pytest.raises(ConfigError) as e:
        scenario_from_data(data, "store.toml", "x")
    text = "\n".join(e.value.problems)
    assert "eid_key = 'abc': eddystone-eid beacons need an identity key of 32 hex digits" in text
    assert "eddystone-eid beacons need a name" in text


# --------------------------------------------------------------------------- check-ins with a beacon claim


class NoAdverts:
    name = "none"

    async def start(self) -> None:
        pass

    def poll(self, now: float) -> list[Advert]:
        return []

    async def stop(self) -> None:
        pass

    def diagnostics(self) -> dict[str, object]:
        return {}


def test_only_a_current_eid_in_a_check_in_places_the_visit_in_the_beacons_zone(tmp_path: Path) -> None:
    base = Settings()
    fixed = base.plan.beacons[0]
    settings = base.model_copy(update={"plan": base.plan.model_copy(update={"beacons": [fixed, eid_beacon()]})})
    keys = {f"m-{i}": secrets.token_bytes(32) for i in range(5)}
    members = MemberDirectory()
    members.set_members(keys)
    gw = Gateway(settings, Store(tmp_path), NoAdverts(), members, load_rules(None), [])
    gw.clock = lambda: NOW
    claims = {
        "m-0": ("eid:" + sent(NOW), "verified", "promotions"),
        "m-1": ("eid:" + sent(NOW - 5000), "unknown", None),  # heard hours ago (or recorded and replayed)
        "m-2": (fixed.id, "fixed", None),  # copied from the air: anyone can
        "m-3": ("eid:" + sent(NOW, key="ab" * 16), "unknown", None),  # a beacon of someone else's
        "m-4": (None, "none", None),
    }
    try:
        with TestClient(create_app(gw)) as client:
            for member, (claim, proof, zone) in claims.items():
                obj: dict[str, object] = {
                    "member": member,
                    "store": "demo-store",
                    "ts": int(NOW),
                    "nonce": secrets.token_hex(16),
                }
                if claim is not None:
                    obj["beacon"] = claim
                obj["sig"] = sign(keys[member], obj)
                r = client.post("/api/v1/checkins", content=json.dumps(obj).encode())
                assert r.status_code == 201, r.text
                assert r.json()["beacon"] == proof, (member, r.json())
                visit = gw.tracker.open_visit("member:" + member)
                assert visit is not None
                assert (visit.segments[0].zone if visit.segments else None) == zone, member
            assert gw.checkins.diagnostics()["beacon_claims"] == {"none": 1, "verified": 1, "fixed": 1, "unknown": 2}
            metrics = client.get("/metrics").text
            assert 'visita_checkin_beacon_claims_total{proof="unknown"} 2' in metrics
            bad = {
                "member": "m-0",
                "store": "demo-store",
                "ts": int(NOW),
                "nonce": secrets.token_hex(16),
                "beacon": "eid:xyz",
            }
            bad["sig"] = sign(keys["m-0"], bad)
            r = client.post("/api/v1/checkins", content=json.dumps(bad).encode())
            assert (r.status_code, r.json()["field"]) == (422, "beacon")
            assert "eid:<16 hex digits>" in r.json()["message"]
        accepted = [e for e in gw.store.pending_events() if e.type == "checkin.accepted"]
        assert [e.data["beacon"] for e in accepted] == ["verified", "unknown", "fixed", "unknown", "none"]
    finally:
        gw.store.close()
        gw.checkins.close()
