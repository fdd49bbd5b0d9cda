"""Settings: TOML loading, defaults, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from proxy.config import (
    SESSION_MODE_TEXT,
    ConfigError,
    SessionSettings,
    Settings,
    load_settings,
    masked,
    resolve_workers,
    session_mode,
    settings_from_mapping,
    settings_from_sources,
    settings_sources,
)
from proxy.policy import Principal, Role
from proxy.signing import Keypair

SECRET_A = "s3cr3t-for-admin-AAAA"
SECRET_B = "s3cr3t-for-user-BBBB"

FULL_TOML = f"""
[server]
bind = "0.0.0.0:9000"
heartbeat_interval = 7.5
outbox_limit = 128
history_size = 0
graceful_timeout = 2

[upstream]
target = "manager.internal:50052"
keepalive_time = 20.0
keepalive_timeout = 4.0
reconnect_min = 0.5
reconnect_max = 30.0

[auth]
max_clock_skew = 300

[[keypairs]]
access_key = "AKADMIN"
secret_key = "{SECRET_A}"
role = "admin"
user_id = "a1"
domain = "research"

[[keypairs]]
access_key = "AKUSER"
secret_key = "{SECRET_B}"
user_id = "u1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def keypair(**overrides: Any) -> dict[str, Any]:
    return {"access_key": "AK1", "secret_key": "12345678", "user_id": "u1"} | overrides


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    return str(info.value)


# --- Loading --------------------------------------------------------------------------


def test_full_file_loads_every_value(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_TOML))
    server, upstream = settings.server, settings.upstream
    assert server.bind == "0.0.0.0:9000"
    assert server.heartbeat_interval == 7.5
    assert server.outbox_limit == 128
    assert server.history_size == 0
    assert server.graceful_timeout == 2.0
    assert upstream.target == "manager.internal:50052"
    assert upstream.keepalive_time == 20.0
    assert upstream.keepalive_timeout == 4.0
    assert upstream.reconnect_min == 0.5
    assert upstream.reconnect_max == 30.0
    assert settings.auth.max_clock_skew == 300.0
    assert [kp.access_key for kp in settings.keypairs] == ["AKADMIN", "AKUSER"]
    admin, user = settings.keypairs
    assert admin.secret_key.get_secret_value() == SECRET_A
    assert (admin.role, admin.user_id, admin.domain) == ("admin", "a1", "research")
    assert (user.role, user.user_id, user.domain) == ("user", "u1", "default")


def test_keypair_index_builds_principals_with_the_right_role(tmp_path: Path) -> None:
    index = load_settings(write(tmp_path, FULL_TOML)).keypair_index()
    assert index == {
        "AKADMIN": Keypair("AKADMIN", SECRET_A, Principal("AKADMIN", Role.ADMIN, "a1", "research")),
        "AKUSER": Keypair("AKUSER", SECRET_B, Principal("AKUSER", Role.USER, "u1", "default")),
    }
    assert type(index["AKADMIN"].principal.role) is Role


@pytest.mark.parametrize(
    ("role", "expected"),
    [("user", Role.USER), ("admin", Role.ADMIN), ("superadmin", Role.SUPERADMIN)],
)
def test_each_role_maps_to_its_enum(role: str, expected: Role) -> None:
    settings = settings_from_mapping({"keypairs": [keypair(role=role)]})
    assert settings.keypair_index()["AK1"].principal.role is expected


def test_keypair_index_is_empty_without_keypairs() -> None:
    assert Settings().keypair_index() == {}


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings == Settings()
    assert settings.server.bind == "127.0.0.1:8080"
    assert settings.server.heartbeat_interval == 15.0
    assert settings.server.outbox_limit == 4096
    assert settings.server.history_size == 10_000
    assert settings.server.graceful_timeout == 5.0
    assert settings.upstream.target == "127.0.0.1:50051"
    assert settings.upstream.keepalive_time == 5.0
    assert settings.upstream.keepalive_timeout == 3.0
    assert settings.upstream.reconnect_min == 0.1
    assert settings.upstream.reconnect_max == 10.0
    assert settings.auth.max_clock_skew == 900.0
    assert settings.keypairs == ()


def test_heartbeat_default_matches_the_originals_fifteen_seconds() -> None:
    assert Settings().server.heartbeat_interval == 15.0


def test_clock_skew_default_matches_the_originals_fifteen_minutes() -> None:
    assert Settings().auth.max_clock_skew == 15 * 60


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[server]\nbind = "[::1]:8443"\n'))
    assert settings.server.bind == "[::1]:8443"
    assert settings.server.heartbeat_interval == 15.0
    assert settings.upstream == Settings().upstream


def test_keypair_defaults_are_user_role_and_default_domain() -> None:
    kp = settings_from_mapping({"keypairs": [keypair()]}).keypairs[0]
    assert kp.role == "user"
    assert kp.domain == "default"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.server.bind = "0.0.0.0:1"


# --- Unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"serve": {}}, "serve: unknown key"),
        ({"server": {"bnd": "0.0.0.0:1"}}, "server.bnd: unknown key"),
        ({"upstream": {"targt": "h:1"}}, "upstream.targt: unknown key"),
        ({"auth": {"skew": 1}}, "auth.skew: unknown key"),
        ({"keypairs": [keypair(rol="admin")]}, "keypairs.0.rol: unknown key"),
        ({"keypairs": [keypair(), keypair(access_key="AK2", x=1)]}, "keypairs.1.x: unknown key"),
    ],
)
def test_unknown_key_is_an_error_naming_its_path(data: dict[str, Any], expected: str) -> None:
    assert expected in error_of(data)


def test_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nbnd = "0.0.0.0:1"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "server.bnd: unknown key" in message


def test_unknown_keypair_key_in_a_file(tmp_path: Path) -> None:
    text = '[[keypairs]]\naccess_key = "AK"\nsecret_key = "12345678"\nuser_id = "u"\nrol = "x"\n'
    with pytest.raises(ConfigError, match=r"keypairs\.0\.rol: unknown key"):
        load_settings(write(tmp_path, text))


def test_every_offending_key_is_reported_at_once() -> None:
    message = error_of({"server": {"bnd": 1, "heartbeat_interval": -1}, "auth": {"x": 1}})
    assert "server.bnd: unknown key" in message
    assert "server.heartbeat_interval" in message
    assert "auth.x: unknown key" in message


# --- Invalid values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bind",
    [
        "localhost",
        "8080",
        ":8080",
        "localhost:",
        "localhost:http",
        "localhost:-1",
        "localhost:65536",
        "localhost:99999999999999999999",
        "localhost:\uff18\uff10\uff18\uff10",  # fullwidth digits
        "localhost:²",
        "localhost: 80",
        "",
    ],
)
def test_bad_bind_is_rejected_naming_server_bind(bind: str) -> None:
    message = error_of({"server": {"bind": bind}})
    assert message.startswith("server.bind: ")
    assert "HOST:PORT" in message


@pytest.mark.parametrize("bind", ["0.0.0.0:0", "localhost:65535", "[::]:8080", "a:1"])
def test_good_bind_is_accepted(bind: str) -> None:
    assert settings_from_mapping({"server": {"bind": bind}}).server.bind == bind


def test_bad_upstream_target_is_rejected_naming_upstream_target() -> None:
    assert error_of({"upstream": {"target": "nohost"}}).startswith("upstream.target: ")


@pytest.mark.parametrize("value", [-1, 0, -0.5, 86_401, float("inf"), float("nan")])
def test_bad_heartbeat_is_rejected_naming_the_key(value: float) -> None:
    assert error_of({"server": {"heartbeat_interval": value}}).startswith(
        "server.heartbeat_interval: "
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("server", "graceful_timeout"),
        ("upstream", "keepalive_time"),
        ("upstream", "keepalive_timeout"),
        ("upstream", "reconnect_min"),
        ("upstream", "reconnect_max"),
        ("auth", "max_clock_skew"),
    ],
)
def test_every_duration_must_be_positive(section: str, key: str) -> None:
    assert error_of({section: {key: -1}}).startswith(f"{section}.{key}: ")
    assert error_of({section: {key: 0}}).startswith(f"{section}.{key}: ")


@pytest.mark.parametrize(
    ("key", "value"),
    [("outbox_limit", 0), ("outbox_limit", 1_000_001), ("history_size", -1)],
)
def test_bad_sizes_are_rejected_naming_the_key(key: str, value: int) -> None:
    assert error_of({"server": {key: value}}).startswith(f"server.{key}: ")


def test_bad_role_is_rejected_naming_the_key() -> None:
    message = error_of({"keypairs": [keypair(role="root")]})
    assert message.startswith("keypairs.0.role: ")
    assert "superadmin" in message


def test_role_is_case_sensitive() -> None:
    assert error_of({"keypairs": [keypair(role="Admin")]}).startswith("keypairs.0.role: ")


def test_empty_user_id_is_rejected_naming_the_key() -> None:
    assert error_of({"keypairs": [keypair(user_id="")]}).startswith("keypairs.0.user_id: ")


def test_missing_user_id_is_rejected_naming_the_key() -> None:
    data = keypair()
    del data["user_id"]
    assert error_of({"keypairs": [data]}).startswith("keypairs.0.user_id: ")


def test_empty_domain_is_rejected_naming_the_key() -> None:
    assert error_of({"keypairs": [keypair(domain="")]}).startswith("keypairs.0.domain: ")


def test_short_secret_is_rejected_naming_the_key_without_showing_it() -> None:
    message = error_of({"keypairs": [keypair(secret_key="Xq7#zz")]})
    assert message.startswith("keypairs.0.secret_key: ")
    assert "Xq7#zz" not in message


def test_eight_character_secret_is_accepted() -> None:
    settings = settings_from_mapping({"keypairs": [keypair(secret_key="12345678")]})
    assert settings.keypairs[0].secret_key.get_secret_value() == "12345678"


@pytest.mark.parametrize("access_key", ["", "A K", "AK:1", "AK,1", "Ä", "A" * 129])
def test_bad_access_key_is_rejected_naming_the_key(access_key: str) -> None:
    assert error_of({"keypairs": [keypair(access_key=access_key)]}).startswith(
        "keypairs.0.access_key: "
    )


def test_error_in_a_later_keypair_names_its_index() -> None:
    data = {"keypairs": [keypair(), keypair(access_key="AK2", role="boss")]}
    assert error_of(data).startswith("keypairs.1.role: ")


def test_duplicate_access_keys_are_rejected() -> None:
    message = error_of({"keypairs": [keypair(), keypair(secret_key="abcdefgh", user_id="u2")]})
    assert "'AK1' appears twice" in message
    assert "keypairs" in message


def test_duplicate_access_keys_in_a_file_are_rejected(tmp_path: Path) -> None:
    one = '[[keypairs]]\naccess_key = "AK"\nsecret_key = "12345678"\nuser_id = "u"\n'
    with pytest.raises(ConfigError, match="appears twice"):
        load_settings(write(tmp_path, one + one))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- Unreadable or invalid files ------------------------------------------------------


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nbind = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")


def test_invalid_utf8_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nbind = "h\xe9:1"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: cannot read")


def test_directory_instead_of_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read")


def test_wrong_type_for_a_section_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*: server: "):
        load_settings(write(tmp_path, 'server = "yes"\n'))


# --- Secrets --------------------------------------------------------------------------


def test_secret_is_a_secret_str() -> None:
    kp = settings_from_mapping({"keypairs": [keypair(secret_key=SECRET_A)]}).keypairs[0]
    assert isinstance(kp.secret_key, SecretStr)
    assert kp.secret_key.get_secret_value() == SECRET_A


def test_repr_and_str_never_show_secrets(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_TOML))
    for text in (
        repr(settings),
        str(settings),
        repr(settings.keypairs),
        str(settings.keypairs[0]),
        settings.model_dump_json(),
        str(settings.model_dump()),
    ):
        assert SECRET_A not in text
        assert SECRET_B not in text


def test_config_errors_never_show_secrets() -> None:
    message = error_of({"keypairs": [keypair(secret_key=SECRET_A, role="root", extra=1)]})
    assert SECRET_A not in message


# -- environment overrides and precedence -------------------------------------------


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[server]\nbind = "127.0.0.1:1"\nheartbeat_interval = 3.0\n')
    env = {"KEP_SERVER__BIND": "127.0.0.1:2", "KEP_UPSTREAM__TARGET": "10.0.0.1:9"}
    settings = load_settings(path, env)
    assert settings.server.bind == "127.0.0.1:2"
    assert settings.server.heartbeat_interval == 3.0  # from the file
    assert settings.upstream.target == "10.0.0.1:9"
    flagged = load_settings(path, env, {"server": {"bind": "127.0.0.1:3"}})
    assert flagged.server.bind == "127.0.0.1:3"


def test_unknown_environment_setting_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="KEP_SERVER__BND: unknown setting"):
        load_settings(None, {"KEP_SERVER__BND": "x"})
    with pytest.raises(ConfigError, match="KEP_NOPE__BIND: unknown setting"):
        load_settings(None, {"KEP_NOPE__BIND": "x"})


def test_other_kep_variables_are_not_settings() -> None:
    assert load_settings(None, {"KEP_URL": "http://x", "KEP_SDK_PYTHON": "/p"}) == Settings()


def test_invalid_environment_value_names_key_and_variable() -> None:
    with pytest.raises(
        ConfigError, match=r"server\.heartbeat_interval \(from KEP_SERVER__HEARTBEAT_INTERVAL\)"
    ):
        load_settings(None, {"KEP_SERVER__HEARTBEAT_INTERVAL": "soon"})


def test_keypairs_file_adds_keypairs(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        '[[keypairs]]\naccess_key = "AKFILE"\nsecret_key = "file-secret-123"\n'
        'role = "admin"\nuser_id = "f1"\n'
    )
    main = tmp_path / "p.toml"
    main.write_text(
        f'[auth]\nkeypairs_file = "{keys}"\n'
        '[[keypairs]]\naccess_key = "AKINLINE"\nsecret_key = "inline-secret-1"\nuser_id = "i1"\n'
    )
    settings = load_settings(main, {})
    assert [kp.access_key for kp in settings.keypairs] == ["AKINLINE", "AKFILE"]
    keys.write_text('[[keypairs]]\naccess_key = "AKFILE"\nsecret_key = "short"\nuser_id = "f"\n')
    with pytest.raises(ConfigError, match=r"keys\.toml: keypairs\.0\.secret_key"):
        load_settings(main, {})


def test_masked_settings_hide_every_secret() -> None:
    settings = load_settings(
        None,
        {},
        {"keypairs": [{"access_key": "AK", "secret_key": "super-secret-value", "user_id": "u"}]},
    )
    shown = masked(settings)
    assert "super-secret-value" not in repr(shown)
    assert shown["keypairs"][0]["secret_key"] == "**********"


# --- Browser sessions, bearer tokens, CORS --------------------------------------------


def test_session_jwt_and_cors_defaults_are_off() -> None:
    settings = Settings()
    assert settings.session.secret_key is None
    assert settings.session.max_age == 12 * 3600
    assert settings.session.cookie_name == "kep_session"
    assert settings.jwt.key is None
    assert settings.jwt.algorithms == ("HS256",)
    assert settings.server.cors_origins == ()


def test_session_jwt_and_cors_load_and_keep_secrets_out_of_reprs(tmp_path: Path) -> None:
    session_key, jwt_key = "s" * 40, "j" * 48
    settings = load_settings(
        write(
            tmp_path,
            f"""
[server]
cors_origins = ["https://Dash.example", "http://localhost:3000"]

[session]
secret_key = "{session_key}"
max_age = 3600
cookie_name = "kep"
cookie_secure = true

[jwt]
key = "{jwt_key}"
algorithms = ["HS256", "HS384"]
issuer = "https://idp.example"
audience = "kep"
""",
        )
    )
    assert settings.server.cors_origins == ("https://dash.example", "http://localhost:3000")
    assert settings.session.secret_key is not None
    assert settings.session.secret_key.get_secret_value() == session_key
    assert (settings.session.max_age, settings.session.cookie_name) == (3600, "kep")
    assert settings.session.cookie_secure is True
    assert settings.jwt.algorithms == ("HS256", "HS384")
    assert (settings.jwt.issuer, settings.jwt.audience) == ("https://idp.example", "kep")
    assert session_key not in repr(settings)
    assert jwt_key not in repr(settings)


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"session": {"secret_key": "short"}}, "session.secret_key"),
        ({"session": {"max_age": 10}}, "session.max_age"),
        ({"session": {"cookie_name": "a b"}}, "session.cookie_name"),
        ({"session": {"secret": "x" * 40}}, "session.secret: unknown key"),
        ({"jwt": {"algorithms": ["none"]}}, "jwt.algorithms"),
        ({"jwt": {"algorithms": ["RS256"]}}, "jwt.algorithms"),
        ({"jwt": {"algorithms": []}}, "jwt.algorithms"),
        ({"jwt": {"key": "k" * 40, "algorithms": ["HS512"]}}, "64 bytes"),
        ({"server": {"cors_origins": ["*"]}}, "server.cors_origins.0"),
        ({"server": {"cors_origins": ["https://a.example/"]}}, "server.cors_origins.0"),
        ({"server": {"cors_origins": ["a.example"]}}, "server.cors_origins.0"),
        ({"server": {"cors_origins": ["ftp://a.example"]}}, "server.cors_origins.0"),
    ],
)
def test_bad_session_jwt_and_cors_settings_name_the_key(data: dict[str, Any], names: str) -> None:
    assert names in error_of(data)


def test_session_and_jwt_keys_from_the_environment() -> None:
    settings = load_settings(None, {"KEP_SESSION__SECRET_KEY": "e" * 40, "KEP_JWT__KEY": "f" * 40})
    assert settings.session.secret_key is not None
    assert settings.session.secret_key.get_secret_value() == "e" * 40
    assert settings.jwt.key is not None
    assert settings.jwt.key.get_secret_value() == "f" * 40


def test_session_mode_names_how_browser_sign_in_works() -> None:
    assert session_mode(SessionSettings()) == "generated"
    key = SecretStr("k" * 32)
    assert session_mode(SessionSettings(secret_key=key)) == "configured"
    assert session_mode(SessionSettings(enabled=False, secret_key=key)) == "off"
    assert set(SESSION_MODE_TEXT) == {"generated", "configured", "off"}


def test_state_section_defaults_and_values() -> None:
    assert (Settings().state.retention, Settings().state.max_entities) == (3600.0, 100_000)
    assert Settings().state.idle_timeout == 300.0
    state = settings_from_mapping({"state": {"retention": 0, "max_entities": 5}}).state
    assert (state.retention, state.max_entities) == (0.0, 5)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"retention": -1}, "state.retention"),
        ({"max_entities": 0}, "state.max_entities"),
        ({"max_entites": 5}, "state.max_entites: unknown key"),
    ],
)
def test_bad_state_settings_name_the_key(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        settings_from_mapping({"state": data})


# --- server.workers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), (4, 4), ("4", 4), (" 2 ", 2), ("auto", "auto"), (256, 256)]
)
def test_workers_is_a_count_or_auto(value: object, expected: object) -> None:
    assert settings_from_mapping({"server": {"workers": value}}).server.workers == expected


@pytest.mark.parametrize("value", [0, -1, 257, "0", "four", "Auto", 2.5, True, "", None])
def test_bad_workers_is_one_error_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"server": {"workers": value}})
    message = str(info.value)
    assert message.startswith("server.workers: ")
    assert 'or "auto" (one per core)' in message
    assert ";" not in message  # one error, not one per member of a union


def test_workers_from_the_environment_names_the_variable() -> None:
    assert load_settings(None, {"KEP_SERVER__WORKERS": "auto"}).server.workers == "auto"
    with pytest.raises(ConfigError, match=r"server\.workers \(from KEP_SERVER__WORKERS\)"):
        load_settings(None, {"KEP_SERVER__WORKERS": "lots"})


def test_auto_workers_is_one_per_core() -> None:
    assert Settings().server.workers == 1
    assert resolve_workers("auto", 8) == 8
    assert resolve_workers("auto", 0) == 1
    assert resolve_workers(3, 8) == 3


def test_sources_are_plain_data_and_each_worker_reads_the_keypairs_file_itself(
    tmp_path: Path,
) -> None:
    """A worker started later must see the file as it is then, not as it was: a key
    removed since must not come back as if it were configured inline."""
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keypairs]]\naccess_key = "AKF"\nsecret_key = "file-secret"\nuser_id = "f"\n')
    path = tmp_path / "p.toml"
    path.write_text(
        f'[auth]\nkeypairs_file = "{keys}"\n'
        '[[keypairs]]\naccess_key = "AKI"\nsecret_key = "inline-secret"\nuser_id = "i"\n'
    )
    sources, origin = settings_sources(path, {"KEP_SERVER__WORKERS": "2"})
    assert [kp["access_key"] for kp in sources["keypairs"]] == ["AKI"]
    assert origin == {"server.workers": "KEP_SERVER__WORKERS"}
    first = settings_from_sources(sources, origin, path)
    assert [kp.access_key for kp in first.keypairs] == ["AKI", "AKF"]
    assert first.server.workers == 2
    keys.write_text("")
    assert [kp.access_key for kp in settings_from_sources(sources).keypairs] == ["AKI"]
