"""agent.config.load: defaults → YAML → THERELAY_* environment → validation; secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest

from agent import config as config_module
from agent.access.tokens import ALPHABET, CHECKSUM_LEN, Kind, generate
from agent.config import (
    CameraConfig,
    Config,
    RelaySection,
    check_secret_files,
    load,
    publisher_token,
    read_secret,
)
from agent.errors import ConfigError
from tests.conftest import remember


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    if name.endswith(".secret"):
        path.chmod(0o600)  # as the agent requires of a secret file
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ or {})


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return str(info.value)


def new_token(kind: Kind) -> str:
    text = generate(kind).text
    remember(text)  # the leak check then looks for it in every non-.secret file
    return text


def corrupt(token: str) -> str:
    """Change one character of the secret part (before the checksum)."""
    i = len(token) - CHECKSUM_LEN - 1
    replacement = ALPHABET[(ALPHABET.index(token[i]) + 1) % len(ALPHABET)]
    return token[:i] + replacement + token[i + 1:]


# -- defaults and YAML overrides ------------------------------------------------------------


def test_embedded_defaults_validate() -> None:
    config = load(None, {})
    assert config.origin == "embedded defaults"
    assert config.cameras == [CameraConfig(id="demo", name="Test pattern", source="testsrc://")]
    assert config.camera_ids == ["demo"]
    assert config.http.listen == "0.0.0.0:8800"
    assert config.http.host_port == ("0.0.0.0", 8800)
    assert config.agent.account_id == "local"
    assert config.tokens.max_active == 1000
    assert config.tokens.max_ips_per_token == 100
    assert config.tokens.failed_attempts.burst == 10
    assert config.tokens.failed_attempts.per_minute == 6.0
    assert config.audit.retention_days == 365
    assert (config.log.format, config.log.level) == ("auto", "info")
    assert config.relay.url is None
    assert config.relay.publisher_token_file is None
    config_module.validate(config)  # idempotent: the loaded config is valid


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "# nothing set\n")
    assert config.origin == str(tmp_path / "config.yaml")
    assert config.tokens.max_active == 1000
    assert config.camera_ids == ["demo"]


def test_yaml_overrides_every_section(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"""
agent:
  id: gate-7
  account_id: acme
state_dir: {tmp_path / "state"}
http:
  listen: "127.0.0.1:9000"
cameras:
  - id: front
    source: rtsp://10.0.0.5/stream
  - id: yard
    name: Yard
    source: file:///srv/yard.mp4
tokens:
  max_active: 7
  failed_attempts:
    burst: 3
    per_minute: 2
audit:
  retention_days: 30
log:
  format: json
  level: DEBUG
relay:
  url: wss://relay.example.net/agent
""")
    assert config.agent.id == "gate-7"
    assert config.agent.account_id == "acme"
    assert config.state_dir == tmp_path / "state"
    assert config.http.host_port == ("127.0.0.1", 9000)
    assert config.camera_ids == ["front", "yard"]
    assert config.cameras[1] == CameraConfig(id="yard", name="Yard",
                                             source="file:///srv/yard.mp4")
    assert config.tokens.max_active == 7
    assert config.tokens.max_ips_per_token == 100  # untouched keys keep their defaults
    assert config.tokens.failed_attempts.burst == 3
    assert config.tokens.failed_attempts.per_minute == 2.0
    assert isinstance(config.tokens.failed_attempts.per_minute, float)
    assert config.tokens.failed_attempts.max_ips == 10_000
    assert config.audit.retention_days == 30
    assert config.log.format == "json"
    assert config.log.level == "DEBUG"  # levels are case-insensitive
    assert config.relay.url == "wss://relay.example.net/agent"


def test_state_dir_expands_user(tmp_path: Path) -> None:
    config = load_text(tmp_path, "state_dir: ~/therelay\n")
    assert config.state_dir == Path("~/therelay").expanduser()
    assert "~" not in str(config.state_dir)


# -- validation errors: key path and what is expected --------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param("agent: {id: 'bad id!'}",
                     "agent.id: 'bad id!' must be 1-64 letters, digits, '.', '_' or '-'",
                     id="agent-id-chars"),
        pytest.param("agent: {id: " + "a" * 65 + "}", "agent.id: ", id="agent-id-too-long"),
        pytest.param("agent: {account_id: 'a/b'}",
                     "agent.account_id: 'a/b' must be 1-64 letters", id="account-id-chars"),
        pytest.param("http: {listen: '0.0.0.0'}",
                     "http.listen: '0.0.0.0' must be host:port, like 0.0.0.0:8800",
                     id="listen-no-port"),
        pytest.param("http: {listen: ':8800'}", "http.listen: ':8800' must be host:port",
                     id="listen-no-host"),
        pytest.param("http: {listen: 'localhost:0'}", "http.listen: 'localhost:0' must be",
                     id="listen-port-zero"),
        pytest.param("http: {listen: 'localhost:65536'}", "http.listen: 'localhost:65536'",
                     id="listen-port-too-big"),
        pytest.param("http: {listen: 'localhost:http'}", "http.listen: 'localhost:http'",
                     id="listen-port-name"),
        pytest.param("http: {listen: 'localhost:\u00b2'}", "http.listen: 'localhost:\u00b2'",
                     id="listen-port-superscript-digit"),
        pytest.param("cameras: [{id: a, source: 'testsrc://'}, {id: a, source: 'rtsp://x'}]",
                     "cameras[1].id: 'a' is used twice", id="duplicate-camera"),
        pytest.param("cameras: [{id: 'a b', source: 'testsrc://'}]",
                     "cameras[0].id: 'a b' must be 1-64 letters", id="camera-id-chars"),
        pytest.param("cameras: [{id: a, source: 'http://cam/x'}]",
                     "cameras[0].source: must start with one of rtsp://, rtsps://, testsrc://, "
                     "file://", id="source-scheme"),
        pytest.param("cameras: [{id: a, source: '/dev/video0'}]",
                     "cameras[0].source: must start with one of", id="source-no-scheme"),
        pytest.param("tokens: {max_active: 0}", "tokens.max_active: must be at least 1",
                     id="max-active-zero"),
        pytest.param("tokens: {max_ips_per_token: 0}",
                     "tokens.max_ips_per_token: must be at least 1", id="max-ips-zero"),
        pytest.param("tokens: {failed_attempts: {burst: 0}}",
                     "tokens.failed_attempts.burst: must be at least 1", id="burst-zero"),
        pytest.param("tokens: {failed_attempts: {per_minute: 0}}",
                     "tokens.failed_attempts.per_minute: must be > 0", id="per-minute-zero"),
        pytest.param("audit: {retention_days: 0}", "audit.retention_days: must be at least 1",
                     id="retention-zero"),
        pytest.param("audit: {flush_interval: 61}",
                     "audit.flush_interval: must be between 0 and 60 seconds",
                     id="flush-interval"),
        pytest.param("log: {level: loud}",
                     "log.level: 'loud' must be one of debug, info, warning, error",
                     id="log-level"),
        pytest.param("relay: {url: 'https://relay.example.net'}",
                     "relay.url: must start with wss:// (or ws:// for a relay on this LAN)",
                     id="relay-url-scheme"),
    ],
)
def test_validation_error_names_key_and_expectation(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    assert expected in config_error(tmp_path, yaml_text)


def test_validation_lists_every_problem_at_once(tmp_path: Path) -> None:
    message = config_error(tmp_path, "tokens: {max_active: 0}\naudit: {retention_days: 0}\n"
                                     "log: {level: x}\n")
    lines = message.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("tokens.max_active:")
    assert lines[1].startswith("audit.retention_days:")
    assert lines[2].startswith("log.level:")


# -- keys with a fixed set of values: checked by the loader against the field's Literal -----


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param("cameras: [{id: a, source: 'rtsp://x', transport: http}]",
                     "cameras[0].transport: must be one of tcp, udp, got text 'http'",
                     id="transport"),
        pytest.param("cameras: [{id: a, source: 'rtsp://x', audio: aac}]",
                     "cameras[0].audio: must be one of auto, passthrough, off, got text 'aac'",
                     id="audio"),
        pytest.param("cameras: [{id: a, source: 'rtsp://x', audio: true}]",
                     "cameras[0].audio: must be one of auto, passthrough, off, got true/false",
                     id="audio-true"),
        pytest.param("log: {format: xml}",
                     "log.format: must be one of auto, json, console, got text 'xml'",
                     id="log-format"),
        pytest.param("relay: {publish: sometimes}",
                     "relay.publish: must be one of on_demand, always, got text 'sometimes'",
                     id="publish"),
        pytest.param("webrtc: {send_path: gstreamer}",
                     "webrtc.send_path: must be one of agent, aiortc, got text 'gstreamer'",
                     id="send-path"),
        pytest.param("cameras: [{id: a, source: 'rtsp://x', transport: TCP}]",
                     "cameras[0].transport: must be one of tcp, udp, got text 'TCP'",
                     id="case-matters"),
    ],
)
def test_a_value_outside_the_allowed_set_names_the_allowed_values(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    assert config_error(tmp_path, yaml_text) == expected


def test_allowed_values_come_from_the_field_type() -> None:
    hints = get_type_hints(CameraConfig)
    assert get_args(hints["transport"]) == ("tcp", "udp")
    assert get_args(hints["audio"]) == ("auto", "passthrough", "off")
    assert get_args(get_type_hints(RelaySection)["publish"]) == ("on_demand", "always")


def test_unquoted_off_is_the_off_choice(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted off as false; for a key whose choices include off, it is
    taken as "off" (quoted or not, the installer means the same)."""
    config = load_text(tmp_path, "cameras: [{id: a, source: 'rtsp://x', audio: off}]\n")
    assert config.cameras[0].audio == "off"


def test_a_choice_from_the_environment_is_text(tmp_path: Path) -> None:
    config = load(None, {"THERELAY_RELAY_PUBLISH": "always",
                         "THERELAY_RELAY_WHIP_URL_TEMPLATE": "https://w/{camera_id}",
                         "THERELAY_LOG_FORMAT": "json"})
    assert (config.relay.publish, config.log.format) == ("always", "json")
    with pytest.raises(ConfigError, match=r"^log\.format: must be one of auto, json, console"):
        load(None, {"THERELAY_LOG_FORMAT": "off"})


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param("tokens: {max_active: many}",
                     "tokens.max_active: expected a whole number, got text 'many'",
                     id="int-as-text"),
        pytest.param("tokens: {max_active: 2.5}",
                     "tokens.max_active: expected a whole number, got float 2.5",
                     id="int-as-float"),
        pytest.param("tokens: {max_active: true}",
                     "tokens.max_active: expected a whole number, got true/false",
                     id="int-as-bool"),
        pytest.param("tokens: {failed_attempts: {per_minute: fast}}",
                     "tokens.failed_attempts.per_minute: expected a number, got text 'fast'",
                     id="float-as-text"),
        pytest.param("tokens: [1, 2]", "tokens: expected a mapping of keys, got a list",
                     id="list-for-mapping"),
        pytest.param("tokens: {failed_attempts: [1]}",
                     "tokens.failed_attempts: expected a mapping of keys, got a list",
                     id="nested-list-for-mapping"),
        pytest.param("http: 8800", "http: expected a mapping of keys, got int 8800",
                     id="scalar-for-mapping"),
        pytest.param("cameras: {id: a, source: 'testsrc://'}",
                     "cameras: expected a list, got a mapping", id="mapping-for-list"),
        pytest.param("cameras: [demo]",
                     "cameras[0]: expected a mapping of keys, got text 'demo'",
                     id="list-item-not-mapping"),
        pytest.param("cameras: [{id: a}]", "cameras[0].source: required key is missing",
                     id="missing-source"),
        pytest.param("cameras: [{source: 'testsrc://'}]", "cameras[0].id: required key is missing",
                     id="missing-id"),
        pytest.param("agent: {id: [a]}", "agent.id: expected text, got a list",
                     id="text-as-list"),
        pytest.param("agent: {id: null}", "agent.id: expected text, got nothing",
                     id="text-as-null"),
        pytest.param("state_dir: ''",
                     "state_dir: expected a file or directory path, got text ''",
                     id="empty-path"),
    ],
)
def test_wrong_types_name_key_and_expected_type(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    assert config_error(tmp_path, yaml_text) == expected


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param("toknes: {max_active: 3}", "toknes: unknown key (did you mean 'tokens'?)",
                     id="top-level"),
        pytest.param("tokens: {max_activ: 3}",
                     "tokens.max_activ: unknown key (did you mean 'max_active'?)", id="nested"),
        pytest.param("tokens: {failed_attempts: {brust: 3}}",
                     "tokens.failed_attempts.brust: unknown key (did you mean 'burst'?)",
                     id="deeply-nested"),
        pytest.param("cameras: [{id: a, source: 'testsrc://', nmae: A}]",
                     "cameras[0].nmae: unknown key (did you mean 'name'?)", id="in-list-item"),
        pytest.param("log: {colour: blue}",
                     "log.colour: unknown key (known keys: format, level)", id="no-close-match"),
        pytest.param("origin: elsewhere", "origin: unknown key", id="origin-is-not-a-key"),
    ],
)
def test_unknown_keys_get_a_hint(tmp_path: Path, yaml_text: str, expected: str) -> None:
    message = config_error(tmp_path, yaml_text)
    assert message.startswith(expected)


# -- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "where"),
    [
        pytest.param("tokens:\n  max_active: [1, 2\n", "line 3, column 1", id="unclosed-list"),
        pytest.param("tokens: {max_active: 3\n", "line 2, column 1", id="unclosed-mapping"),
        pytest.param("agent:\n  id: a\n bad: b\n", "line 3, column 2", id="bad-indent"),
        pytest.param("log:\n\tlevel: info\n", "line 2, column 1", id="tab"),
    ],
)
def test_malformed_yaml_gives_line_and_column(tmp_path: Path, yaml_text: str, where: str) -> None:
    message = config_error(tmp_path, yaml_text)
    assert message.startswith(f"config file {tmp_path / 'config.yaml'} at {where}: ")
    assert "Traceback" not in message
    assert "\n" not in message


def test_malformed_yaml_error_has_no_chained_exception(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "a: [\n")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True


@pytest.mark.parametrize("yaml_text", ["- tokens\n- log\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, yaml_text: str) -> None:
    assert config_error(tmp_path, yaml_text) == (
        f"config file {tmp_path / 'config.yaml'}: expected a mapping of sections at the top"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value) == f"config file {path} does not exist"


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "config.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"agent: {id: \xff\xfe}\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(info.value).startswith(f"config file {path} cannot be read: ")


# -- environment overrides ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "get", "expected"),
    [
        pytest.param({"THERELAY_TOKENS_MAX_ACTIVE": "5"},
                     lambda c: c.tokens.max_active, 5, id="int"),
        pytest.param({"THERELAY_HTTP_LISTEN": "127.0.0.1:9001"},
                     lambda c: c.http.listen, "127.0.0.1:9001", id="listen"),
        pytest.param({"THERELAY_TOKENS_FAILED_ATTEMPTS_BURST": "4"},
                     lambda c: c.tokens.failed_attempts.burst, 4, id="nested-int"),
        pytest.param({"THERELAY_TOKENS_FAILED_ATTEMPTS_PER_MINUTE": "0.5"},
                     lambda c: c.tokens.failed_attempts.per_minute, 0.5, id="float"),
        pytest.param({"THERELAY_AGENT_ID": "site-9"}, lambda c: c.agent.id, "site-9",
                     id="text"),
        pytest.param({"THERELAY_AGENT_ID": "0123"}, lambda c: c.agent.id, "0123",
                     id="text-not-octal"),
        pytest.param({"THERELAY_AGENT_ACCOUNT_ID": "1_000"}, lambda c: c.agent.account_id,
                     "1_000", id="text-not-int"),
        pytest.param({"THERELAY_AGENT_ACCOUNT_ID": "yes"}, lambda c: c.agent.account_id, "yes",
                     id="text-not-bool"),
        pytest.param({"THERELAY_STATE_DIR": "/var/lib/x"}, lambda c: c.state_dir,
                     Path("/var/lib/x"), id="path"),
        pytest.param({"THERELAY_LOG_LEVEL": "warning"}, lambda c: c.log.level, "warning",
                     id="log-level"),
        pytest.param({"THERELAY_RELAY_URL": "wss://r.example/a"}, lambda c: c.relay.url,
                     "wss://r.example/a", id="optional-text"),
        pytest.param({"THERELAY_RELAY_URL": ""}, lambda c: c.relay.url, None,
                     id="empty-unsets"),
        pytest.param({"PATH": "/bin", "OTHER_TOKENS_MAX_ACTIVE": "x"},
                     lambda c: c.tokens.max_active, 1000, id="other-prefixes-ignored"),
    ],
)
def test_environment_overrides(environ: dict[str, str], get: Any, expected: object) -> None:
    value = get(load(None, environ))
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"THERELAY_FOO": "1"}, "environment THERELAY_FOO: unknown setting (did you "
                     "mean 'THERELAY_", id="unknown"),
        pytest.param({"THERELAY_TOKENS_MAX_ACTIV": "1"},
                     "environment THERELAY_TOKENS_MAX_ACTIV: unknown setting (did you mean "
                     "'THERELAY_TOKENS_MAX_ACTIVE'?)", id="typo"),
        pytest.param({"THERELAY_CAMERAS": "x"}, "environment THERELAY_CAMERAS: unknown setting",
                     id="lists-not-settable"),
        pytest.param({"THERELAY_TOKENS_MAX_ACTIVE": "many"},
                     "tokens.max_active: expected a whole number, got text 'many'",
                     id="bad-int"),
        pytest.param({"THERELAY_TOKENS_MAX_ACTIVE": "0"}, "tokens.max_active: must be at least 1",
                     id="invalid-int"),
        pytest.param({"THERELAY_TOKENS_MAX_ACTIVE": "[1]"},
                     "tokens.max_active: expected a whole number, got text '[1]'",
                     id="structured-value-stays-text"),
        pytest.param({"THERELAY_HTTP_LISTEN": "8800"},
                     "http.listen: '8800' must be host:port", id="listen-without-host"),
    ],
)
def test_environment_errors(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, environ)
    assert str(info.value).startswith(expected)


def test_environment_beats_yaml(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "tokens: {max_active: 7, max_ips_per_token: 3}\nhttp: {listen: 'a:1'}\n",
        {"THERELAY_TOKENS_MAX_ACTIVE": "5", "THERELAY_HTTP_LISTEN": "b:2"},
    )
    assert config.tokens.max_active == 5
    assert config.tokens.max_ips_per_token == 3  # YAML value kept where the env is silent
    assert config.http.listen == "b:2"


def test_environment_overrides_a_null_yaml_section(tmp_path: Path) -> None:
    config = load_text(tmp_path, "tokens:\n", {"THERELAY_TOKENS_MAX_ACTIVE": "5"})
    assert config.tokens.max_active == 5


def test_therelay_config_is_used_when_no_path(tmp_path: Path) -> None:
    path = write(tmp_path, "tokens: {max_active: 9}\n")
    config = load(None, {"THERELAY_CONFIG": str(path)})
    assert config.tokens.max_active == 9
    assert config.origin == str(path)


def test_explicit_path_beats_therelay_config(tmp_path: Path) -> None:
    env_file = write(tmp_path, "tokens: {max_active: 9}\n", "env.yaml")
    arg_file = write(tmp_path, "tokens: {max_active: 4}\n", "arg.yaml")
    config = load(arg_file, {"THERELAY_CONFIG": str(env_file)})
    assert config.tokens.max_active == 4
    assert config.origin == str(arg_file)


def test_therelay_config_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load(None, {"THERELAY_CONFIG": str(path)})


def test_environ_none_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("THERELAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("THERELAY_TOKENS_MAX_ACTIVE", "11")
    assert load().tokens.max_active == 11
    assert load(None, {}).tokens.max_active == 1000  # an explicit environ replaces it


# -- secrets --------------------------------------------------------------------------------


def test_read_secret_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "  s3cret-value \n", "db.secret")
    assert read_secret("db", path, {}) == "s3cret-value"


def test_read_secret_from_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db.secret").write_text("from-systemd\n", encoding="utf-8")
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("db.secret", None, environ) == "from-systemd"
    assert read_secret("other.secret", None, environ) is None  # not loaded as a credential


def test_read_secret_file_beats_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db.secret").write_text("from-systemd\n", encoding="utf-8")
    path = write(tmp_path, "from-file\n", "file.secret")
    assert read_secret("db.secret", path, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-file"


def test_read_secret_none_without_any_source() -> None:
    assert read_secret("db", None, {}) is None


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_read_secret_empty_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content, "db.secret")
    with pytest.raises(ConfigError) as info:
        read_secret("db", path, {})
    assert str(info.value) == f"secret file {path} for db is empty"


@pytest.mark.parametrize("kind", ["directory", "missing", "not-utf8"])
def test_read_secret_unreadable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db.secret"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"\xff\xfe\xfa")
        path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        read_secret("db", path, {})
    assert str(info.value).startswith(f"secret file {path} for db cannot be read: ")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_secret_file_others_may_read_is_refused_with_the_fix(tmp_path: Path,
                                                                 mode: int) -> None:
    path = write(tmp_path, "s3cret-value\n", "db.secret")
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        read_secret("db", path, {})
    assert str(info.value) == (
        f"secret file {path} for db can be read or changed by other users (mode {mode:04o}): "
        f"run 'chmod 600 {path}' (owned by the agent's user)")
    assert "s3cret" not in str(info.value)
    path.chmod(0o400)  # owner-only, read-only: fine
    assert read_secret("db", path, {}) == "s3cret-value"


def test_systemd_credentials_keep_their_own_modes(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    credential = creds / "db.secret"
    credential.write_text("from-systemd\n", encoding="utf-8")
    credential.chmod(0o644)
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert read_secret("db.secret", None, environ) == "from-systemd"
    assert read_secret("db.secret", credential, environ) == "from-systemd"  # named explicitly


def test_every_secret_file_of_the_config_is_checked_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = write(tmp_path, new_token(Kind.PUBLISHER) + "\n", "publisher.secret")
    camera = write(tmp_path, "pw\n", "camera.secret")
    turn = write(tmp_path, "turn-pw\n", "turn.secret")
    config = load_text(tmp_path, f"""
relay: {{publisher_token_file: {token}}}
cameras: [{{id: door, source: "rtsp://10.0.0.9/live", username: admin,
            password_file: {camera}}}]
webrtc:
  ice_servers: [{{urls: ["turn:turn.example.net:3478"], username: a,
                  credential_file: {turn}}}]
""")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    check_secret_files(config)
    for path, what in ((token, "publisher-token"), (camera, "camera-door"), (turn, "turn-0")):
        path.chmod(0o644)
        with pytest.raises(ConfigError, match=f"for {what} can be read .*chmod 600 {path}"):
            check_secret_files(config)
        path.chmod(0o600)


# -- the publisher token --------------------------------------------------------------------


def relay_config(tmp_path: Path, token_text: str | None, url: str | None = "wss://r.example/a"
                 ) -> Config:
    lines = []
    if url is not None:
        lines.append(f"  url: {url}")
    if token_text is not None:
        path = write(tmp_path, token_text + "\n", "publisher.secret")
        lines.append(f"  publisher_token_file: {path}")
    return load_text(tmp_path, "relay:\n" + "\n".join(lines) + "\n" if lines else "")


def test_publisher_token_valid(tmp_path: Path) -> None:
    token = new_token(Kind.PUBLISHER)
    config = relay_config(tmp_path, token)
    assert config.relay.publisher_token_file == tmp_path / "publisher.secret"
    assert publisher_token(config, {}) == token


def test_publisher_token_from_credentials_directory(tmp_path: Path) -> None:
    token = new_token(Kind.PUBLISHER)
    creds = tmp_path / "creds"
    creds.mkdir()
    credential = creds / "publisher-token"  # systemd's name; not *.secret, so removed below
    credential.write_text(token, encoding="utf-8")
    try:
        config = relay_config(tmp_path, None)
        assert publisher_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) == token
    finally:
        credential.unlink()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (Kind.ACCESS, "relay.publisher_token_file: this is an access token; the relay needs a "
                      "publisher token (trp_)"),
        (Kind.ADMIN, "relay.publisher_token_file: this is an admin token; the relay needs a "
                     "publisher token (trp_)"),
    ],
)
def test_publisher_token_wrong_kind(tmp_path: Path, kind: Kind, expected: str) -> None:
    config = relay_config(tmp_path, new_token(kind))
    with pytest.raises(ConfigError) as info:
        publisher_token(config, {})
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(corrupt, "corrupted", id="one-char-changed"),
        pytest.param(lambda t: t[:-1], "malformed", id="truncated"),
        pytest.param(lambda t: "not a token", "malformed", id="garbage"),
    ],
)
def test_publisher_token_damaged(tmp_path: Path, make: Any, problem: str) -> None:
    good = new_token(Kind.PUBLISHER)
    bad = make(good)
    assert bad != good
    config = relay_config(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        publisher_token(config, {})
    message = str(info.value)
    assert message.startswith(f"relay.publisher_token_file: the publisher token is {problem}: ")
    assert bad not in message
    assert good not in message


def test_relay_url_without_token_names_the_key(tmp_path: Path) -> None:
    config = relay_config(tmp_path, None)
    with pytest.raises(ConfigError) as info:
        publisher_token(config, {})
    message = str(info.value)
    assert message.startswith("relay.publisher_token_file: the relay is configured but no "
                              "publisher token was found")
    assert "publisher-token" in message  # names the systemd credential, too


def test_no_relay_means_no_publisher_token(tmp_path: Path) -> None:
    assert publisher_token(load(None, {}), {}) is None
    creds = tmp_path / "creds"
    creds.mkdir()
    assert publisher_token(load(None, {}), {"CREDENTIALS_DIRECTORY": str(creds)}) is None
