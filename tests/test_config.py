"""Config files: good ones load, bad ones fail before anything starts with one clear line per problem."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import VISITA

from gateway.cli import main
from gateway.config import (
    ConfigError,
    DashboardConfig,
    load_settings,
    parse_duration,
    parse_listen,
    parse_mqtt_url,
)

GOOD = """
store = "berlin-mitte"
gateway = "gw-2"
timezone = "Europe/Berlin"

[mqtt]
url = "mqtts://broker.example:8883"
keepalive_s = 60

[dashboard]
listen = "0.0.0.0:8090"

[visits]
absence_timeout_s = 90
staff = ["emp-7"]

[plan]
zones = [
  { id = "street", outside = true },
  { id = "shop", name = "Shop floor" },
]
receivers = [{ id = "pi", zone = "shop" }]
"""


def write(tmp_path: Path, text: str, name: str = "visita.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_good_file_loads_with_defaults_for_the_rest(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    assert (s.store, s.gateway, s.timezone) == ("berlin-mitte", "gw-2", "Europe/Berlin")
    assert s.mqtt.keepalive_s == 60 and s.mqtt.max_inflight == 100
    assert [z.id for z in s.plan.zones] == ["street", "shop"]
    assert s.visits.staff == ["emp-7"] and s.visits.min_dwell_s == 45.0


def test_no_file_means_the_demo_store() -> None:
    s = load_settings(None)
    assert s.store == "demo-store" and len(s.plan.receivers) == 6
    assert any(z.outside for z in s.plan.zones)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'store = "x"\n[mqtt]\nhots = "a"\n',
            "visita.toml: mqtt.hots: unknown key (allowed here: url, client_id",
        ),
        ("[mqtt]\nkeepalive_s = 0\n", "visita.toml: mqtt.keepalive_s = 0: Input should be greater than or equal to 5"),
        ('[mqtt]\nkeepalive_s = "30"\n', "visita.toml: mqtt.keepalive_s = '30': Input should be a valid integer"),
        ('[mqtt]\nurl = "http://x"\n', "visita.toml: mqtt.url = 'http://x': must be mqtt://HOST[:PORT]"),
        ('[mqtt]\nurl = "mqtt://u:p@x"\n', "mqtt.url = 'mqtt://***@x': must not hold a user name or password"),
        (
            '[plan]\nzones = [{ id = "a", polygon = [[0, 0], [nan, 1], [1, 1]] }]\n'
            'receivers = [{ id = "r", zone = "a" }]\n',
            "plan.zones[0].polygon[1]: coordinates must be finite numbers (metres), not nan or inf",
        ),
        (
            '[plan]\nzones = [{ id = "a", polygon = [[0, 0], [1, 1], [2, 2]] }]\n'
            'receivers = [{ id = "r", zone = "a" }]\n',
            "zones[0].polygon: its corners enclose no area",
        ),
        (
            '[plan]\nzones = [{ id = "a", polygon = [[0, 0], [10, 10], [10, 0], [0, 20]] }]\n'
            'receivers = [{ id = "r", zone = "a" }]\n',
            "zones[0].polygon: its outline crosses itself (the edge from corner 0 to 1 crosses the edge from corner 2 "
            "to 3, counting from 0); give the corners in order around the zone",
        ),
        (
            '[estimate]\nmethod = "hmm"\n[plan]\nzones = [{ id = "a" }]\nreceivers = [{ id = "r", zone = "a" }]\n',
            'estimate.method = "hmm" needs the plan\'s geometry',
        ),
        ('[mqtt]\nurl = "mqtt://x:99999"\n', "visita.toml: mqtt.url = 'mqtt://x:99999': port must be 1..65535"),
        ('store = "Main Street!"\n', "visita.toml: store = 'Main Street!': must be lowercase letters, digits"),
        ('timezone = "Mars/Olympus"\n', "visita.toml: timezone = 'Mars/Olympus': unknown time zone"),
        ('[dashboard]\nlisten = "8080"\n', "visita.toml: dashboard.listen = '8080': must be HOST:PORT"),
        ("stores = 1\n", "visita.toml: stores: unknown key (allowed here: store, gateway"),
        (
            '[plan]\nzones = [{ id = "a" }]\nreceivers = [{ id = "r", zone = "b" }]\n',
            "receivers[0].zone = 'b': no such zone (zones: a)",
        ),
        (
            '[plan]\nzones = [{ id = "a", outside = true }]\nreceivers = [{ id = "r", zone = "a" }]\n',
            "every zone is outside",
        ),
        (
            '[plan]\nzones = [{ id = "a" }, { id = "a" }]\nreceivers = [{ id = "r", zone = "a" }]\n',
            "duplicate zone id(s) a",
        ),
        ('[plan]\nzones = [{ id = "a" }]\n', "visita.toml: plan.receivers: required key is missing"),
        ("store = \n", "visita.toml: not valid TOML: "),
        ("[plan]\ndoors = [[1]]\n", "visita.toml: plan.doors[0]: too few items (no item [1]; a point is [x, y])"),
        ("[visits]\nhandover = 3\n", "visita.toml: visits.handover = 3: Input should be a valid boolean"),
        ("[mqtt]\nkeepalive_s = true\n", "visita.toml: mqtt.keepalive_s = true: "),
        (
            "timezone = 2026-01-01\n",
            "visita.toml: timezone = 2026-01-01: a TOML date or time where text is expected: put it in quotes, "
            'timezone = "2026-01-01"',
        ),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, expected: str) -> None:
    lines = problems(write(tmp_path, text))
    assert any(expected in line for line in lines), lines


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nkeepalive_s = 0\nmax_inflight = 0\n[visits]\nabsence_timeout_s = -1\n")
    lines = problems(path)
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_the_password_of_a_url_is_never_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(write(tmp_path, '[mqtt]\nurl = "mqtt://u:hunter2@x"\n'))]) == 2
    with pytest.raises(SystemExit):
        main(["run", "--sim", "--mqtt", "mqtts://u:hunt@er2@x:8883"])  # an @ in the password too
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "er2" not in out.err and out.err.count("***@x") == 2, out.err


def test_relative_secret_and_certificate_files_are_found_next_to_the_config(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = write(
        sub,
        '[mqtt]\nca = "ca.pem"\npassword_file = "/abs/pw"\n[dashboard]\ninstaller_token_file = "tok"\n'
        'support_token_file = "support"\ntls_cert_file = "tls/d.crt"\ntls_key_file = "tls/d.key"\n',
    )
    s = load_settings(cfg)
    assert (s.mqtt.ca, s.mqtt.password_file) == (str(sub / "ca.pem"), "/abs/pw")
    d = s.dashboard
    assert (d.installer_token_file, d.support_token_file) == (str(sub / "tok"), str(sub / "support"))
    assert (d.tls_cert_file, d.tls_key_file) == (str(sub / "tls/d.crt"), str(sub / "tls/d.key"))


def test_missing_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: no such file"]


def test_rules_file_is_checked_and_found_next_to_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules.toml").write_text('[[rules]]\nid = "visit"\nkind = "visit"\npoints = -5\n')
    cfg = write(tmp_path, '[points]\nrules = "rules.toml"\n')
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "rules.toml: rules[0] (id 'visit').points = -5: Input should be greater than or equal to 1" in err


def test_a_zone_bonus_for_a_zone_the_plan_lacks_is_refused_by_config_check_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rules.toml").write_text('[[rules]]\nid = "promo"\nkind = "zone_bonus"\nzone = "nowhere"\npoints = 5\n')
    cfg = write(tmp_path, '[points]\nrules = "rules.toml"\n')
    says = f"{tmp_path / 'rules.toml'}: rules[0] (id 'promo').zone = 'nowhere': no such zone in the store plan"
    assert main(["config", "check", str(cfg)]) == 2
    assert says in capsys.readouterr().err
    r = subprocess.run(
        [
            *VISITA,
            "run",
            "--sim",
            "--config",
            str(cfg),
            "--mqtt",
            "off",
            "--dashboard",
            "off",
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and says in r.stderr, r.stderr  # a bad config: systemd does not restart it


def test_config_check_ok_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, GOOD)
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ok: store berlin-mitte, gateway gw-2, 2 zones, 1 receivers" in out and "note:" not in out
    assert main(["config", "check", "--json", str(cfg)]) == 0
    assert '"store": "berlin-mitte"' in capsys.readouterr().out


def test_outlines_that_cross_or_touch_themselves_are_told_from_valid_ones() -> None:
    from gateway.config import _self_crossing

    valid = [
        [(0, 0), (10, 0), (10, 10), (0, 10)],
        [(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)],  # closed by repeating the first corner
        [(0, 0), (10, 0), (10, 0), (10, 10), (0, 10)],  # a corner given twice
        [(0, 0), (5, 0), (10, 0), (10, 10), (0, 10)],  # a corner on a straight side
        [(0, 0), (10, 0), (10, 5), (5, 5), (5, 10), (0, 10)],  # an L
        # A U on a rotated plan whose two arm tops lie on one line: float noise must not make them cross.
        [(2.3, 11.18), (11.6, 16.76), (11.6, 15.76), (12.2, 16.12), (12.2, 17.12), (16.1, 19.46), (16.1, 17.46),
         (2.3, 9.18)],
    ]  # fmt: skip
    assert [_self_crossing(p) for p in valid] == [None] * len(valid)
    assert _self_crossing([(0, 0), (10, 10), (10, 0), (0, 20)]) == (0, 2)  # a bow tie
    assert _self_crossing([(0, 0), (2, 2), (4, 4), (4, 0), (0, 4)]) == (0, 3)  # through another side's corner


def test_config_check_names_a_receiver_placed_far_from_every_zone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = (
        '[plan]\nzones = [{ id = "shop", polygon = [[0, 0], [20, 0], [20, 10], [0, 10]] },'
        ' { id = "street", outside = true, polygon = [[0, -5], [20, -5], [20, 0], [0, 0]] }]\n'
        'receivers = [{ id = "pi", zone = "shop", position = [5, 5] },'
        ' { id = "node-1", zone = "shop", position = [1500, 800] },'  # centimetres, not metres
        ' { id = "node-2", zone = "shop", position = [26, 5] }]\n'  # 6 m outside: on the wall outside, fine
    )
    assert main(["config", "check", str(write(tmp_path, plan))]) == 0  # a note, not a problem
    out = capsys.readouterr().out
    assert "note: receiver node-1 is placed 1677.6 m outside every zone: check its position" in out, out
    assert "node-2" not in out and "receiver pi" not in out


def test_config_check_names_the_zones_no_receiver_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = GOOD.replace(
        '  { id = "shop", name = "Shop floor" },\n]\nreceivers = [{ id = "pi", zone = "shop" }]',
        '  { id = "shop" },\n  { id = "till" },\n  { id = "back" },\n]\n'
        'receivers = [{ id = "pi", zone = "shop" }, { id = "node-1", zone = "street" }]',
    )
    assert plan != GOOD
    assert main(["config", "check", str(write(tmp_path, plan))]) == 0  # a note, not a problem
    out = capsys.readouterr().out
    assert "note: no receiver serves zone(s) till, back:" in out and "street" not in out.split("note:")[1]
    # With --json, standard output stays the settings alone and the note goes to stderr.
    assert main(["config", "check", "--json", str(write(tmp_path, plan))]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["plan"]["receivers"][1]["id"] == "node-1"
    assert "note: no receiver serves zone(s) till, back:" in got.err


def test_config_check_says_one_receiver_does_not_tell_zones_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = GOOD.replace('  { id = "shop", name = "Shop floor" },\n', '  { id = "shop" },\n  { id = "till" },\n')
    assert plan != GOOD
    assert main(["config", "check", str(write(tmp_path, plan))]) == 0
    out = capsys.readouterr().out
    assert "note: one receiver tells inside from outside and near from far, not zones" in out
    assert "its zone shop, none for till" in out
    assert main(["config", "check", "--json", str(write(tmp_path, plan))]) == 0
    got = capsys.readouterr()
    assert [z["id"] for z in json.loads(got.out)["plan"]["zones"]][-1] == "till"
    assert "note: one receiver tells inside from outside" in got.err and "note:" not in got.out


def test_config_check_says_when_the_backends_rules_are_in_force_instead_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.points import BACKEND_RULES_FILE, save_backend_rules

    data = tmp_path / "data"
    data.mkdir()
    cfg = write(tmp_path, f'[storage]\ndata_dir = "{data}"\n')
    assert main(["config", "check", str(cfg)]) == 0
    assert "note:" not in capsys.readouterr().out
    save_backend_rules(data, {"rules": [{"id": "promo", "kind": "visit", "points": 7}]}, 1_780_000_000.0, "r9")
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "note: the rules in force are not the file's but those sent by the backend at 2026-05-28" in out, out
    assert "cmd/rules id 'r9'" in out and "(1 rules)" in out
    (data / BACKEND_RULES_FILE).write_text("{torn")
    assert main(["config", "check", str(cfg)]) == 0
    assert (
        "note: the backend's kept rules cannot be used; the gateway will apply the rules file"
        in capsys.readouterr().out
    )


def test_run_with_bad_config_fails_before_starting(tmp_path: Path) -> None:
    """The real process: exit 2, the problem on stderr, nothing created in the data directory."""
    cfg = write(tmp_path, "[mqtt]\nkeepalive_s = 0\n")
    data = tmp_path / "data"
    proc = subprocess.run(
        [*VISITA, "run", "--sim", "--config", str(cfg), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "mqtt.keepalive_s = 0" in proc.stderr
    assert not data.exists()


def test_run_plan_must_match_the_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, GOOD)
    assert main(["run", "--sim", "--config", str(cfg), "--data-dir", str(tmp_path / "d")]) == 2
    assert "receiver(s) rx-entrance" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--speed", "0"], "must be more than 0"),
        (["--until", "soon"], "is not a duration"),
        (["--mqtt", "tcp://x"], "must be mqtt://HOST[:PORT]"),
        (["--dashboard", "localhost"], "must be HOST:PORT"),
        (["--seed", "-1"], "a seed is a whole number from 0"),
        (["--mqtt", "mqtt://user:secret@x"], "'mqtt://***@x': must not hold a user name or password"),
    ],
)
def test_bad_options_exit_2(args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--sim", *args])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err


def test_parsers() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90 and parse_duration("2") == 2
    for bad in ("", "10x", "m10", "-5", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80) and parse_listen("visita-pi.local:8443") == (
        "visita-pi.local",
        8443,
    )
    for bad, says in (
        ("http://127.0.0.1:8080", "without a scheme"),  # passed config check, then failed at start
        ("127.0.0.1:8080/", "must be HOST:PORT"),
        ("[::1:8080", "must be HOST:PORT"),
        (":8080", "must be HOST:PORT"),
        ("host:70000", "port must be 1..65535"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_listen(bad)
    assert str(parse_mqtt_url("mqtts://h")) == "mqtts://h:8883"
    assert str(parse_mqtt_url("mqtt://h")) == "mqtt://h:1883"


def test_installer_token_from_file_or_credential_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert DashboardConfig().installer_token() is None  # none configured: the installer endpoints are off
    token = tmp_path / "token"
    token.write_text("  0123456789abcdef0123  \nsecond line ignored\n")
    with pytest.raises(ValueError, match=r"token: mode 0644 lets anyone on this machine read it; chmod 640 it"):
        DashboardConfig(installer_token_file=str(token)).installer_token()
    token.chmod(0o640)
    assert DashboardConfig(installer_token_file=str(token)).installer_token() == "0123456789abcdef0123"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "visita-installer-token").write_text("from-systemd-credential-0001\n")
    (creds / "visita-installer-token").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert DashboardConfig().installer_token() == "from-systemd-credential-0001"
    token.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 characters; make one with: openssl rand -hex 24"):
        DashboardConfig(installer_token_file=str(token)).installer_token()
    with pytest.raises(ValueError, match=r"dashboard.installer_token_file .*missing.*: cannot be read"):
        DashboardConfig(installer_token_file=str(tmp_path / "missing")).installer_token()


def test_config_check_reports_every_problem_in_one_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An installer fixes a file once: the bad sections, the plan's cross-references that pydantic skips when a
    zone is invalid, and the files that the valid sections name (rules, certificate) are all reported together."""
    (tmp_path / "rules.toml").write_text("garbage = [\n")
    cfg = write(
        tmp_path,
        """
[mqtt]
keepalive_s = 0
[points]
rules = "rules.toml"
[dashboard]
tls_cert_file = "missing.pem"
tls_key_file = "missing.key"
[plan]
zones = [ { id = "shop", polygon = [[0, 0], [10, 0], [10, 10]] },
          { id = "shop", outside = true, polygon = [[0, 0], [1, "x"], [3, -3]] } ]
receivers = [ { id = "rx", zone = "till", position = [1, 1] } ]
beacons = [ { id = "beacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:1:1", zone = "nowhere" } ]
""",
    )
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{cfg}: mqtt.keepalive_s = 0: Input should be greater than or equal to 5",
        f"{cfg}: plan.zones[1].polygon[1][1] = 'x': Input should be a valid number",
        f"{cfg}: plan: duplicate zone id(s) shop: every zone id must be unique",
        f"{cfg}: plan: receivers[0].zone = 'till': no such zone (zones: shop, shop)",
        f"{cfg}: plan: beacons[0].zone = 'nowhere': no such zone (zones: shop, shop)",
        f"{tmp_path / 'rules.toml'}: not valid TOML: Invalid value (at end of document)",
        f"{cfg}: dashboard.tls_cert_file {tmp_path / 'missing.pem'}: cannot be read: No such file or directory; "
        "fix the path or its mode",
    ], err
    # Fixed, the same file passes: nothing above was reported twice or in place of another problem.
    (tmp_path / "rules.toml").write_text('[[rules]]\nid = "visit"\nkind = "visit"\npoints = 5\n')
    cfg.write_text(
        cfg.read_text()
        .replace("keepalive_s = 0", "keepalive_s = 30")
        .replace('[1, "x"]', "[1, 0]")
        .replace('id = "shop", outside', 'id = "street", outside')
        .replace('"till"', '"shop"')
        .replace('"nowhere"', '"shop"')
        .replace('tls_cert_file = "missing.pem"\ntls_key_file = "missing.key"\n', "")
    )
    assert main(["config", "check", str(cfg)]) == 0, capsys.readouterr().err


def test_config_check_names_every_bad_dashboard_file_in_one_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A world-readable installer token, a too-short support token and a missing certificate are three fixes:
    one round of `visita config check` names all three, each with its file (the first used to hide the rest)."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "installer-token").write_text("0123456789abcdef0123\n")
    (tmp_path / "installer-token").chmod(0o644)
    (tmp_path / "support-token").write_text("short\n")
    (tmp_path / "support-token").chmod(0o600)
    cfg = write(
        tmp_path,
        """
[dashboard]
installer_token_file = "installer-token"
support_token_file = "support-token"
tls_cert_file = "missing.pem"
tls_key_file = "missing.key"
""",
    )
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{cfg}: dashboard.installer_token_file {tmp_path / 'installer-token'}: mode 0644 lets anyone on this "
        "machine read it; chmod 640 it",
        f"{cfg}: dashboard.support_token_file {tmp_path / 'support-token'}: the support token must be at least 16 "
        "characters; make one with: openssl rand -hex 24",
        f"{cfg}: dashboard.tls_cert_file {tmp_path / 'missing.pem'}: cannot be read: No such file or directory; "
        "fix the path or its mode",
    ], err


def test_mqtt_tls_files_that_cannot_be_loaded_are_a_config_problem_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or garbled mqtt.ca, or a client key that is not the certificate's, passed `visita config check`
    and then crashed `visita run` with a traceback (exit 1, so systemd restarted it forever)."""
    from conftest import self_signed_cert

    cert, key = self_signed_cert(tmp_path, name="client")
    _, other = self_signed_cert(tmp_path, name="other")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    cases = [
        ('ca = "missing.pem"', f"mqtt.ca {tmp_path / 'missing.pem'}: cannot be loaded as a CA certificate (PEM): "
         "No such file or directory; fix the path or the file"),
        ('ca = "garbage.pem"', f"mqtt.ca {tmp_path / 'garbage.pem'}: cannot be loaded as a CA certificate (PEM)"),
        (f'ca = "{cert}"\ncert = "{cert}"\nkey = "{other}"', f"mqtt.cert {cert} with mqtt.key {other}: cannot be "
         "loaded: the key is not the certificate's"),
    ]  # fmt: skip
    for mqtt, says in cases:
        cfg = write(tmp_path, f'[mqtt]\nurl = "mqtts://broker.invalid"\n{mqtt}\n')
        assert main(["config", "check", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert says in err, err
        run = subprocess.run(
            [*VISITA, "run", "--sim", "--config", str(cfg), "--dashboard", "off", "--data-dir", str(tmp_path / "d")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, run.stderr
    cfg = write(tmp_path, f'[mqtt]\nurl = "mqtts://broker.invalid"\nca = "{cert}"\ncert = "{cert}"\nkey = "{key}"\n')
    assert main(["config", "check", str(cfg)]) == 0, capsys.readouterr().err


def test_a_pattern_mismatch_says_what_that_field_allows_and_a_secret_is_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "9F3A0C5D7E1B2A4C6D8E0F1A2B3C4D5E"  # upper case: almost right, and a real key all the same
    (tmp_path / "rules.toml").write_text(
        '[[rules]]\nid = "v"\nkind = "visit"\npoints = 5\n[rules.when]\nstart = 16:00:00\nend = "25:00"\n'
    )
    cfg = write(
        tmp_path,
        f"""
[points]
rules = "rules.toml"
[survey]
transmitter = "beacon:X"
[[plan.zones]]
id = "sidewalk"
outside = true
[[plan.zones]]
id = "shop"
[[plan.receivers]]
id = "hci0"
zone = "shop"
[[plan.beacons]]
id = "beacon:E2C56DB5-DFFB-48D2-B060-D0F5A71096E0:1:1"
zone = "shop"
eid = {{ key = "{key}" }}
""",
    )
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert key not in err and key.lower() not in err, err
    beacon = "must be beacon: and then lowercase letters, digits, ':', '.' or '-' (at most 120)"
    rule = f"{tmp_path / 'rules.toml'}: rules[0] (id 'v').when"
    assert err.splitlines() == [
        f"{cfg}: plan.beacons[0].id = 'beacon:E2C56DB5-DFFB-48D2-B060-D0F5A71096E0:1:1': {beacon}, the id as the "
        "gateway derives it, e.g. beacon:<uuid>:<major>:<minor> with the UUID in lowercase",
        f"{cfg}: plan.beacons[0].eid.key = (hidden): must be 32 lowercase hex digits (a 16-byte key)",
        f"{cfg}: survey.transmitter = 'beacon:X': must be empty or a beacon id: {beacon[8:]}, the id as the gateway "
        "derives it, e.g. beacon:<uuid>:<major>:<minor> with the UUID in lowercase",
        # The quoting hint gives what the field takes (HH:MM), so following it passes.
        f'{rule}.start = 16:00: a TOML date or time where text is expected: put it in quotes, start = "16:00"',
        f"{rule}.end = '25:00': must be a local time HH:MM, from 00:00 to 24:00",
    ], err


def test_overlapping_zones_are_named_and_a_zone_inside_an_earlier_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A place in two zones counts for the one listed first (the estimator's grid): a promotions area drawn inside
    the grocery aisles but listed after them would get one cell, and its zone bonus would never fire."""
    zones = """
[[plan.zones]]
id = "sidewalk"
outside = true
polygon = [[0, -5], [30, -5], [30, 0], [0, 0]]
[[plan.zones]]
id = "grocery"
polygon = [[0, 0], [20, 0], [20, 20], [0, 20]]
[[plan.zones]]
id = "promotions"
polygon = [[POLY]]
[[plan.receivers]]
id = "rx"
zone = "grocery"
position = [5, 5]
"""
    inside = write(tmp_path, zones.replace("[POLY]", "[12, 8], [18, 8], [18, 14], [12, 14]"))
    assert main(["config", "check", str(inside)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{inside}: plan: zones[2] (promotions): 100 % of it lies in grocery, listed before it; a place in two zones "
        "counts for the first listed, so promotions would get almost none of it: list it first, or correct the "
        "outlines"
    ]
    # Half a metre over a shared wall: a note, not a problem; sharing an edge only: nothing.
    over = "zone promotions overlaps grocery (about 10 m²), listed before it: places in both count for the zone listed"
    for poly, notes in (
        ("[19.5, 0], [30, 0], [30, 20], [19.5, 20]", [f"{tmp_path / 'visita.toml'}: note: {over} first"]),
        ("[20, 0], [30, 0], [30, 20], [20, 20]", []),
    ):
        assert main(["config", "check", str(write(tmp_path, zones.replace("[POLY]", poly)))]) == 0
        assert [line for line in capsys.readouterr().out.splitlines() if "overlaps" in line] == notes


def test_a_plan_missing_some_of_its_geometry_is_named_by_config_check_and_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """One forgotten polygon silently turned the HMM into the strongest-receiver baseline (and an hour of survey
    walking into a map the gateway refuses)."""
    from test_checkins import NoAdverts

    from gateway.identity import MemberDirectory
    from gateway.points import load_rules
    from gateway.runtime import Gateway
    from gateway.store import Store

    plan = """
[[plan.zones]]
id = "sidewalk"
outside = true
polygon = [[0, -5], [20, -5], [20, 0], [0, 0]]
[[plan.zones]]
id = "shop"
polygon = [[0, 0], [20, 0], [20, 10], [0, 10]]
[[plan.zones]]
id = "counter"
[[plan.receivers]]
id = "rx-a"
zone = "shop"
position = [5, 5]
[[plan.receivers]]
id = "rx-b"
zone = "counter"
"""
    cfg = write(tmp_path, plan)
    says = (
        "zone(s) counter have no polygon and receiver(s) rx-b have no position: without a polygon for every zone and "
        "a position for every receiver the estimator is the strongest-receiver baseline"
    )
    assert main(["config", "check", str(cfg)]) == 0
    assert says in capsys.readouterr().out
    settings = load_settings(cfg)
    with Store(tmp_path / "d") as store:
        Gateway(settings, store, NoAdverts(), MemberDirectory(), load_rules(None), [])
    assert any(says in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), caplog.text
    # No geometry at all is a choice (zones are the receivers' zones), not an oversight: nothing said.
    bare = "\n".join(line for line in plan.splitlines() if not line.startswith(("polygon", "position")))
    assert main(["config", "check", str(write(tmp_path, bare))]) == 0
    assert "no polygon" not in capsys.readouterr().out


def test_a_relative_data_dir_is_next_to_the_config_file_like_every_other_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, '[storage]\ndata_dir = "data"\n')
    monkeypatch.chdir("/")  # where systemd starts it
    settings = load_settings(cfg)
    assert settings.storage.directory() == tmp_path / "data"
    assert settings.storage.directory(Path("/elsewhere")) == Path("/elsewhere")  # --data-dir wins
    assert load_settings(write(tmp_path, '[storage]\ndata_dir = "/var/lib/visita"\n')).storage.directory() == Path(
        "/var/lib/visita"
    )


def test_a_missing_rules_file_names_the_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, '[points]\nrules = "rulez.toml"\n')
    assert main(["config", "check", str(cfg)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'rulez.toml'}: no such file (points.rules names it; a relative path is next to the config file)"
    ]


def test_run_refuses_an_mqtt_client_key_others_may_read_as_a_bad_config(tmp_path: Path) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("not checked before the key\n")
    key.write_text("a private key\n")
    key.chmod(0o644)
    r = subprocess.run(
        [*VISITA, "run", "--sim", "--until", "1m", "--mqtt", "mqtts://127.0.0.1:1", "--mqtt-cert", str(cert),
         "--mqtt-key", str(key), "--dashboard", "off", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"mqtt.key {key}: mode 0644 lets anyone on this machine read it; chmod 640 it" in r.stderr, r.stderr
    # And config check says the same, with the password file's (it said ok, then the unit failed).
    password = tmp_path / "pw"
    password.write_text("secret\n")
    cfg = write(tmp_path, f'[mqtt]\ncert = "{cert}"\nkey = "{key}"\npassword_file = "{password}"\n')
    r = subprocess.run([*VISITA, "config", "check", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"{cfg}: mqtt.key {key}: mode 0644 lets anyone on this machine read it; chmod 640 it"
    ], r.stderr
    key.chmod(0o600)
    r = subprocess.run([*VISITA, "config", "check", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "mqtt.password_file" in r.stderr and "chmod 640" in r.stderr, r.stderr


def test_a_huge_zone_from_a_typo_is_checked_without_running_out_of_memory(tmp_path: Path) -> None:
    import tracemalloc

    from gateway.config import PlanConfig

    tracemalloc.start()  # numpy's arrays are traced: sampled every 0.25 m this zone took gigabytes
    plan = PlanConfig.model_validate(
        {
            "zones": [
                {"id": "street", "outside": True, "polygon": [[0, -5], [20, -5], [20, 0], [0, 0]]},
                {"id": "shop", "polygon": [[0, 0], [4000, 0], [4000, 4000], [0, 4000]]},  # metres typed as cm
            ],
            "receivers": [{"id": "rx", "zone": "shop", "position": [5, 5]}],
        }
    )
    assert plan.overlap_notes() == []
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 100_000_000, f"{peak / 1e6:.0f} MB to check one plan"


SECRET_KEY = "00112233445566778899aabbccddeef1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A secret under a key the config does not have: the key is named, its value never shown.
        ('[mqtt]\npassword = "INLINEPW4"\n', "mqtt.password: unknown key (allowed here: url,"),
        (
            f'[[plan.zones]]\nid = "shop"\n[[plan.receivers]]\nid = "hci0"\nzone = "shop"\n[[plan.beacons]]\n'
            f'id = "beacon:url-0123456789ab"\nzone = "shop"\neid = {{ identity_key = "{SECRET_KEY}" }}\n',
            "plan.beacons[0].eid.identity_key: unknown key (allowed here: key",
        ),
        # A plain value where a table with a secret in it belongs.
        (
            f'[[plan.zones]]\nid = "shop"\n[[plan.receivers]]\nid = "hci0"\nzone = "shop"\n[[plan.beacons]]\n'
            f'id = "beacon:url-0123456789ab"\nzone = "shop"\neid = "{SECRET_KEY}"\n',
            "plan.beacons[0].eid = (hidden): ",
        ),
        # user:password@host without a scheme.
        ('[mqtt]\nurl = "alice:CFGURLPW3@broker"\n', "mqtt.url = '***@broker': must be mqtt://HOST[:PORT]"),
    ],
)
def test_config_errors_never_echo_a_secret_given_in_the_wrong_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    cfg = write(tmp_path, text)
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    for secret in ("INLINEPW4", SECRET_KEY, "CFGURLPW3"):
        assert secret not in err, err
    assert expected in err, err


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("mqtt://alice:p@ss@broker:1883", "mqtt://***@broker:1883"),
        ("alice:p@ss@broker:1883", "***@broker:1883"),  # without a scheme: up to the last @ as well
        ("alice:S3cret@broker", "***@broker"),
        ("broker:1883", "broker:1883"),
    ],
)
def test_redact_url_hides_all_of_a_password_that_holds_an_at_sign(text: str, shown: str) -> None:
    from gateway.config import redact_url

    assert redact_url(text) == shown


def test_store_secret_file_made_by_visita_keys_is_private_read_next_to_the_config_and_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "store-secret"
    assert main(["keys", "new-store-secret", str(secret)]) == 0
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    made = secret.read_bytes()
    assert main(["keys", "new-store-secret", str(secret)]) == 2  # never overwritten: other gateways hold a copy
    assert secret.read_bytes() == made
    out = capsys.readouterr()
    assert "exists already: not overwritten" in out.err and made.hex() not in out.out + out.err
    cfg = write(tmp_path, '[identity]\nanon_secret_file = "store-secret"\n')
    settings = load_settings(cfg)
    assert settings.identity.anon_secret_file == str(secret)  # next to the config file
    assert settings.identity.anon_secret() == made
    assert main(["config", "check", str(cfg)]) == 0
    secret.chmod(0o644)  # anyone on the Pi could compute the store's pseudonyms
    assert main(["config", "check", str(cfg)]) == 2
    assert "identity.anon_secret_file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chmod 640"):
        settings.identity.anon_secret()
    short = tmp_path / "short"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    cfg = write(tmp_path, '[identity]\nanon_secret_file = "short"\n')
    assert main(["config", "check", str(cfg)]) == 2
    assert "holds 16 bytes, fewer than 32" in capsys.readouterr().err
    assert load_settings(write(tmp_path, "")).identity.anon_secret() is None  # the default: no store secret
