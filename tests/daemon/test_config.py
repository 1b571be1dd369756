"""The one config loader: defaults, TOML file, TIERCACHE_<SECTION>__<KEY> environment overrides."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import fuzz_examples
from tiercache.daemon.config import (
    Config,
    ConfigError,
    DeviceTierConfig,
    DiskTierConfig,
    HostTierConfig,
    MqttConfig,
    PolicyConfig,
    RemoteTierConfig,
    load_config,
)

GiB = 2**30

# Every key the loader knows, as the environment variable that overrides it.
ENV_KEYS = {
    "TIERCACHE_DAEMON__SOCKET": "daemon.socket",
    "TIERCACHE_DAEMON__SOCKET_GROUP": "daemon.socket_group",
    "TIERCACHE_DAEMON__LOG_LEVEL": "daemon.log_level",
    "TIERCACHE_TIERS_DEVICE__BYTES": "tiers.device.bytes",
    "TIERCACHE_TIERS_DEVICE__DEVICES": "tiers.device.devices",
    "TIERCACHE_TIERS_HOST__BYTES": "tiers.host.bytes",
    "TIERCACHE_TIERS_HOST__SLOT_BYTES": "tiers.host.slot_bytes",
    "TIERCACHE_TIERS_HOST__SHARED": "tiers.host.shared",
    "TIERCACHE_TIERS_DISK__URL": "tiers.disk.url",
    "TIERCACHE_TIERS_DISK__BYTES": "tiers.disk.bytes",
    "TIERCACHE_TIERS_REMOTE__URL": "tiers.remote.url",
    "TIERCACHE_TIERS_REMOTE__ENDPOINT": "tiers.remote.endpoint",
    "TIERCACHE_TIERS_REMOTE__REGION": "tiers.remote.region",
    "TIERCACHE_TIERS_REMOTE__KEY_ID": "tiers.remote.key_id",
    "TIERCACHE_TIERS_REMOTE__SECRET_FILE": "tiers.remote.secret_file",
    "TIERCACHE_TIERS_REMOTE__TIMEOUT": "tiers.remote.timeout",
    "TIERCACHE_TIERS_REMOTE__QUEUE_BLOCKS": "tiers.remote.queue_blocks",
    "TIERCACHE_TIERS_REMOTE__ADMISSION": "tiers.remote.admission",
    "TIERCACHE_TIERS_REMOTE__SHARE_PINNED": "tiers.remote.share_pinned",
    "TIERCACHE_TIERS_REMOTE__MAX_AGE": "tiers.remote.max_age",
    "TIERCACHE_TIERS_REMOTE__MAX_BYTES": "tiers.remote.max_bytes",
    "TIERCACHE_TIERS_REMOTE__RETENTION_INTERVAL": "tiers.remote.retention_interval",
    "TIERCACHE_POLICY__EVICTION": "policy.eviction",
    "TIERCACHE_POLICY__WRITE": "policy.write",
    "TIERCACHE_POLICY__ADMISSION": "policy.admission",
    "TIERCACHE_METRICS__LISTEN": "metrics.listen",
    "TIERCACHE_MQTT__HOST": "mqtt.host",
    "TIERCACHE_MQTT__PORT": "mqtt.port",
    "TIERCACHE_MQTT__PREFIX": "mqtt.prefix",
    "TIERCACHE_MQTT__NODE": "mqtt.node",
    "TIERCACHE_MQTT__USERNAME": "mqtt.username",
    "TIERCACHE_MQTT__PASSWORD_FILE": "mqtt.password_file",
    "TIERCACHE_MQTT__TLS_CA": "mqtt.tls_ca",
}

RUNTIME_DIR = "/run/user/4242"
DATA_HOME = "/home/someone/.local/share"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Defaults read XDG dirs from the real environment: pin them, and drop stray overrides."""
    for name in list(os.environ):
        if name.startswith("TIERCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_RUNTIME_DIR", RUNTIME_DIR)
    monkeypatch.setenv("XDG_DATA_HOME", DATA_HOME)
    yield


def from_toml(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "tiercache.toml"
    path.write_text(text)
    return load_config(path, env={} if env is None else env)


def lookup(config: Config, dotted: str) -> Any:
    obj: Any = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- defaults -------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    assert load_config(env={}).to_dict() == {
        "daemon": {
            "socket": f"{RUNTIME_DIR}/tiercache.sock",
            "socket_group": "",
            "log_level": "info",
        },
        "tiers": {
            "host": {"bytes": 1 * GiB, "slot_bytes": 0, "shared": False},
            "disk": {"url": f"file://{DATA_HOME}/tiercache/disk", "bytes": 64 * GiB},
        },
        "policy": {"eviction": "lru", "write": "write-back", "admission": 1},
        "metrics": {"listen": "127.0.0.1:9464"},
        "mqtt": {
            "host": "",
            "port": 1883,
            "prefix": "tiercache",
            "node": socket.gethostname(),
            "username": "",
            "password_file": "",
            "tls_ca": "",
        },
    }


def test_no_device_or_remote_tier_by_default() -> None:
    tiers = load_config(env={}).tiers

    assert (tiers.device, tiers.remote) == (None, None)


def test_default_socket_without_xdg_runtime_dir_is_a_per_user_tmp_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")

    assert load_config(env={}).daemon.socket == f"/tmp/tiercache-{os.getuid()}/tiercache.sock"


def test_default_disk_without_xdg_data_home_is_under_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))

    disk = load_config(env={}).tiers.disk

    assert disk is not None
    assert disk.url == f"file://{tmp_path}/.local/share/tiercache/disk"


# --- TOML file ------------------------------------------------------------------------------


DESIGN_EXAMPLE = """
[daemon]
socket = "/run/tiercache/tiercache.sock"
[tiers.device]
bytes = "8GiB"
devices = ["cuda:0"]
[tiers.host]
bytes = "32GiB"
[tiers.disk]
url = "file:///var/lib/tiercache"
bytes = "500GiB"
[tiers.remote]
url = "s3://bucket/prefix"
endpoint = "http://127.0.0.1:8333"
[policy]
eviction = "lru"
write = "write-back"
[metrics]
listen = "127.0.0.1:9464"
[mqtt]
host = "127.0.0.1"
port = 1883
prefix = "tiercache"
node = "gpu-node-1"
username = ""
password_file = ""
tls_ca = ""
"""


def test_design_example_file_loads_exactly(tmp_path: Path) -> None:
    config = from_toml(tmp_path, DESIGN_EXAMPLE)

    assert config.daemon.socket == "/run/tiercache/tiercache.sock"
    assert config.tiers.device == DeviceTierConfig(bytes=8 * GiB, devices=["cuda:0"])
    assert config.tiers.host == HostTierConfig(bytes=32 * GiB)
    assert config.tiers.disk == DiskTierConfig(url="file:///var/lib/tiercache", bytes=500 * GiB)
    assert config.tiers.remote == RemoteTierConfig(
        url="s3://bucket/prefix", endpoint="http://127.0.0.1:8333"
    )
    assert config.policy == PolicyConfig(eviction="lru", write="write-back")
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.mqtt == MqttConfig(
        host="127.0.0.1", port=1883, prefix="tiercache", node="gpu-node-1"
    )


def test_file_keys_left_out_keep_their_defaults(tmp_path: Path) -> None:
    config = from_toml(tmp_path, '[mqtt]\nhost = "broker"\n')

    assert config.mqtt == MqttConfig(host="broker", node=socket.gethostname())
    assert config.tiers.host == HostTierConfig()


def test_sizes_may_be_integers_of_bytes(tmp_path: Path) -> None:
    config = from_toml(tmp_path, "[tiers.host]\nbytes = 1048576\nslot_bytes = 4096\n")

    assert (config.tiers.host.bytes, config.tiers.host.slot_bytes) == (1_048_576, 4096)


@pytest.mark.parametrize("url", ["none", ""])
def test_disk_url_none_or_empty_disables_the_disk_tier(tmp_path: Path, url: str) -> None:
    assert from_toml(tmp_path, f'[tiers.disk]\nurl = "{url}"\n').tiers.disk is None


def test_remote_tier_without_url_is_absent(tmp_path: Path) -> None:
    config = from_toml(tmp_path, '[tiers.remote]\nendpoint = "http://127.0.0.1:8333"\n')

    assert config.tiers.remote is None


def test_empty_device_table_enables_the_device_tier_with_defaults(tmp_path: Path) -> None:
    assert from_toml(tmp_path, "[tiers.device]\n").tiers.device == DeviceTierConfig(
        bytes=0, devices=["cuda:0"]
    )


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match=rf"^config file not found: {re.escape(str(path))}$"):
        load_config(path, env={})


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiercache.toml"
    path.write_text("[policy\neviction = ")

    with pytest.raises(
        ConfigError, match=rf"^config file {re.escape(str(path))} is not valid TOML: "
    ):
        load_config(path, env={})


def test_config_path_may_be_a_string(tmp_path: Path) -> None:
    path = tmp_path / "tiercache.toml"
    path.write_text('[policy]\neviction = "arc"\n')

    assert load_config(str(path), env={}).policy.eviction == "arc"


@pytest.mark.parametrize("name", ["lru", "arc", "prefix"])
def test_every_eviction_policy_is_accepted(tmp_path: Path, name: str) -> None:
    path = tmp_path / "tiercache.toml"
    path.write_text(f'[policy]\neviction = "{name}"\n')

    assert load_config(path, env={}).policy.eviction == name


# --- environment overrides ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "key", "expected"),
    [
        ("TIERCACHE_TIERS_HOST__BYTES", "8GiB", "tiers.host.bytes", 8 * GiB),
        ("TIERCACHE_TIERS_HOST__SLOT_BYTES", "2MiB", "tiers.host.slot_bytes", 2 * 2**20),
        ("TIERCACHE_TIERS_HOST__SHARED", "yes", "tiers.host.shared", True),
        ("TIERCACHE_TIERS_HOST__SHARED", "Off", "tiers.host.shared", False),
        ("TIERCACHE_TIERS_DISK__BYTES", "1 TB", "tiers.disk.bytes", 10**12),
        ("TIERCACHE_TIERS_DISK__URL", "file:///scratch/kv", "tiers.disk.url", "file:///scratch/kv"),
        ("TIERCACHE_DAEMON__SOCKET", "/tmp/t.sock", "daemon.socket", "/tmp/t.sock"),
        ("TIERCACHE_POLICY__EVICTION", "arc", "policy.eviction", "arc"),
        ("TIERCACHE_POLICY__WRITE", "write-through", "policy.write", "write-through"),
        ("TIERCACHE_POLICY__ADMISSION", "2", "policy.admission", 2),
        ("TIERCACHE_METRICS__LISTEN", "", "metrics.listen", ""),
        ("TIERCACHE_MQTT__PORT", "8883", "mqtt.port", 8883),
        ("TIERCACHE_MQTT__PASSWORD_FILE", "/etc/pw", "mqtt.password_file", "/etc/pw"),
    ],
)
def test_environment_overrides_a_key(name: str, value: str, key: str, expected: Any) -> None:
    assert lookup(load_config(env={name: value}), key) == expected


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
def test_true_spellings_for_a_bool_key(value: str) -> None:
    assert load_config(env={"TIERCACHE_TIERS_HOST__SHARED": value}).tiers.host.shared is True


@pytest.mark.parametrize("value", ["0", "false", "no", "off"])
def test_false_spellings_for_a_bool_key(value: str) -> None:
    assert load_config(env={"TIERCACHE_TIERS_HOST__SHARED": value}).tiers.host.shared is False


def test_environment_list_is_comma_separated() -> None:
    config = load_config(env={"TIERCACHE_TIERS_DEVICE__DEVICES": "cuda:0, cuda:1,,"})

    assert config.tiers.device == DeviceTierConfig(bytes=0, devices=["cuda:0", "cuda:1"])


def test_environment_for_a_tier_absent_from_the_file_enables_it() -> None:
    config = load_config(env={"TIERCACHE_TIERS_REMOTE__URL": "s3://b/p"})

    assert config.tiers.remote == RemoteTierConfig(url="s3://b/p")


def test_environment_disk_url_none_disables_the_disk_tier() -> None:
    assert load_config(env={"TIERCACHE_TIERS_DISK__URL": "none"}).tiers.disk is None


def test_environment_wins_over_the_file_and_keeps_the_files_other_keys(tmp_path: Path) -> None:
    config = from_toml(
        tmp_path,
        '[tiers.host]\nbytes = "32GiB"\nslot_bytes = "1MiB"\n',
        env={"TIERCACHE_TIERS_HOST__BYTES": "8GiB"},
    )

    assert config.tiers.host == HostTierConfig(bytes=8 * GiB, slot_bytes=2**20)


def test_environment_mapping_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIERCACHE_POLICY__EVICTION", "arc")

    assert load_config().policy.eviction == "arc"


@pytest.mark.parametrize("name", ["TIERCACHE_CONFIG", "TIERCACHE_", "OTHER_POLICY__EVICTION"])
def test_variables_that_are_not_overrides_are_ignored(name: str) -> None:
    assert load_config(env={name: "whatever"}) == load_config(env={})


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        pytest.param(
            "[bogus]\nx = 1\n",
            "unknown section [bogus]; known: daemon, tiers.device, tiers.host, tiers.disk, "
            "tiers.remote, policy, metrics, mqtt",
            id="unknown-section",
        ),
        pytest.param(
            "[tiers.gpu]\nbytes = 1\n",
            "tiers.gpu: unknown tier; known: device, host, disk, remote",
            id="unknown-tier",
        ),
        pytest.param(
            "[policy]\nevict = 'lru'\n",
            "policy: unknown key(s) evict; known: admission, eviction, write",
            id="unknown-key",
        ),
        pytest.param(
            "[tiers.host]\nbytes = 'lots'\n",
            "tiers.host.bytes: bad size 'lots': expected a number with a unit B, KB, MB, GB, TB, "
            "KiB, MiB, GiB or TiB",
            id="bad-size",
        ),
        pytest.param(
            "[tiers.disk]\nbytes = -1\n",
            "tiers.disk.bytes: size must not be negative, got -1",
            id="negative-size",
        ),
        pytest.param(
            "[tiers.host]\nslot_bytes = true\n",
            "tiers.host.slot_bytes: size must be a string like '32GiB' or an integer, got True",
            id="bool-size",
        ),
        pytest.param(
            "[tiers.host]\nbytes = 0\n", "tiers.host.bytes: must be positive, got 0", id="no-host"
        ),
        pytest.param(
            "[tiers.host]\nbytes = '1MiB'\nslot_bytes = '2MiB'\n",
            "tiers.host.slot_bytes: host tier budget (1048576 B) is smaller than one block "
            "(2097152 B); raise [tiers.host] bytes",
            id="slot-over-budget",
        ),
        pytest.param(
            "[tiers.host]\nbytes = '1GiB'\nslot_bytes = 4\n",
            "tiers.host.slot_bytes: a 4 B block would carve the 1073741824 B host tier into "
            "268435456 slots, more than the 16777216 it keeps track of; host slots are sized by "
            "the first namespace registered: register the real model first or set [tiers.host] "
            "slot_bytes to at least 64",
            id="tiny-slots",
        ),
        pytest.param("[mqtt]\nport = 'abc'\n", "mqtt.port: expected int, got 'abc'", id="bad-int"),
        pytest.param("[mqtt]\nport = true\n", "mqtt.port: expected int, got True", id="bool-int"),
        pytest.param(
            "[tiers.host]\nshared = 'maybe'\n",
            "tiers.host.shared: expected bool, got 'maybe'",
            id="bad-bool",
        ),
        pytest.param(
            "[tiers.host]\nshared = 1\n", "tiers.host.shared: expected bool, got 1", id="int-bool"
        ),
        pytest.param("[daemon]\nsocket = 5\n", "daemon.socket: expected str, got 5", id="bad-str"),
        pytest.param(
            "[tiers.device]\ndevices = [0, 1]\n",
            "tiers.device.devices: expected list, got [0, 1]",
            id="bad-list",
        ),
        pytest.param(
            "[policy]\neviction = 'fifo'\n",
            "policy.eviction: 'fifo' is not one of lru, arc, prefix",
            id="bad-eviction",
        ),
        pytest.param(
            "[policy]\nwrite = 'writeback'\n",
            "policy.write: 'writeback' is not one of write-through, write-back",
            id="bad-write",
        ),
        pytest.param(
            "[policy]\nadmission = 0\n", "policy.admission: must be >= 1, got 0", id="bad-admission"
        ),
        pytest.param("policy = 5\n", "policy: expected a table, got 5", id="section-not-table"),
        pytest.param("tiers = 5\n", "tiers: expected a table", id="tiers-not-table"),
        pytest.param(
            "[tiers]\nhost = 5\n", "tiers.host: expected a table, got 5", id="tier-not-table"
        ),
    ],
)
def test_bad_file_is_a_config_error_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        from_toml(tmp_path, toml)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"TIERCACHE_BOGUS__X": "1"},
            "environment TIERCACHE_BOGUS__X: unknown section 'bogus'; known: daemon, ",
            id="unknown-section",
        ),
        pytest.param(
            {"TIERCACHE_TIERS_GPU__BYTES": "1GiB"},
            "environment TIERCACHE_TIERS_GPU__BYTES: unknown section 'tiers.gpu'; ",
            id="unknown-tier",
        ),
        pytest.param(
            {"TIERCACHE_POLICY__NOPE": "1"},
            "policy: unknown key(s) nope; known: admission, eviction, write",
            id="unknown-key",
        ),
        pytest.param(
            {"TIERCACHE_TIERS_HOST__BYTES": "8 gigs"},
            "tiers.host.bytes: bad size '8 gigs'",
            id="bad-size",
        ),
        pytest.param(
            {"TIERCACHE_MQTT__PORT": "1883.5"},
            "mqtt.port: expected int, got '1883.5'",
            id="bad-int",
        ),
        pytest.param(
            {"TIERCACHE_TIERS_HOST__SHARED": "2"},
            "tiers.host.shared: expected bool, got '2'",
            id="bad-bool",
        ),
        pytest.param(
            {"TIERCACHE_POLICY__EVICTION": "LRU"},
            "policy.eviction: 'LRU' is not one of lru, arc, prefix",
            id="bad-eviction",
        ),
    ],
)
def test_bad_environment_override_is_a_config_error_naming_it(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(env=env)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


JUNK = st.one_of(
    st.text(),
    st.from_regex(
        r"\s*-?[0-9]{0,20}(\.[0-9]{0,6})?(e-?[0-9]{1,2})?\s*([KMGT]i?B|B|[a-z]{1,3})?\s*",
        fullmatch=True,
    ),
    st.sampled_from(["true", "off", "lru", "arc", "write-through", "none", "cuda:0,cuda:1"]),
)


@settings(max_examples=fuzz_examples(100))
@given(name=st.sampled_from(sorted(ENV_KEYS)), value=JUNK)
def test_junk_environment_value_for_a_known_key_loads_or_raises_a_config_error_naming_it(
    name: str, value: str
) -> None:
    try:
        load_config(env={name: value})
    except ConfigError as e:
        assert str(e).startswith(f"{ENV_KEYS[name]}: ")


@pytest.mark.parametrize("value", ["1e400", "1e300TiB", "9" * 400])
def test_overflowing_size_override_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^tiers\.host\.bytes: "):
        load_config(env={"TIERCACHE_TIERS_HOST__BYTES": value})


def test_negative_size_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^tiers\.host\.bytes: "):
        load_config(env={"TIERCACHE_TIERS_HOST__BYTES": "-8GiB"})


@pytest.mark.parametrize(
    ("toml", "key"),
    [("[mqtt]\nport = 1.9\n", "mqtt.port"), ("[policy]\nadmission = 2.5\n", "policy.admission")],
)
def test_float_for_an_int_key_is_a_config_error(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: expected int"):
        from_toml(tmp_path, toml)
