"""The one config loader: TOML file, then ``TIERCACHE_<SECTION>__<KEY>`` environment overrides.

CLI, daemon, embedded mode and tests all build their settings here, so a key
means the same thing everywhere. Unknown sections or keys and bad values are
errors that name the key (``ConfigError: tiers.host.bytes: bad size 'lots'``).
Sizes are strings like ``"32GiB"``. Sub-tables such as ``[tiers.host]`` are
overridden as ``TIERCACHE_TIERS_HOST__BYTES``.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tiercache.policy.base import POLICIES
from tiercache.spec import parse_size
from tiercache.tiers.host import slot_count

ENV_PREFIX = "TIERCACHE_"


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/tiercache-{os.getuid()}"
    return Path(base)


def _data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tiercache"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(slots=True)
class DaemonConfig:
    socket: str = field(default_factory=lambda: str(_runtime_dir() / "tiercache.sock"))
    socket_group: str = ""
    log_level: str = "info"

    def __post_init__(self) -> None:
        # Checked here, not by logging at serve time (a traceback after the socket is up).
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"daemon.log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
            )


@dataclass(slots=True)
class DeviceTierConfig:
    bytes: int = 0
    devices: list[str] = field(default_factory=lambda: ["cuda:0"])

    def __post_init__(self) -> None:
        if self.bytes and len(self.devices) != 1:
            raise ConfigError(
                f"tiers.device.devices: one cache uses one device, got {self.devices}; "
                "run one daemon (or embedded cache) per GPU"
            )


@dataclass(slots=True)
class HostTierConfig:
    bytes: int = 2**30
    slot_bytes: int = 0  # 0: the block size of the first namespace registered
    shared: bool = False  # a /dev/shm arena that CPU engines in other processes map

    def __post_init__(self) -> None:
        # Checked here, not where the arena is made: there a bad value was a traceback.
        if self.bytes <= 0:
            raise ConfigError(f"tiers.host.bytes: must be positive, got {self.bytes}")
        if self.slot_bytes:
            try:
                slot_count(self.bytes, self.slot_bytes)
            except ValueError as e:
                raise ConfigError(f"tiers.host.slot_bytes: {e}") from None


@dataclass(slots=True)
class DiskTierConfig:
    url: str = field(default_factory=lambda: "file://" + str(_data_dir() / "disk"))
    bytes: int = 64 * 2**30


@dataclass(slots=True)
class RemoteTierConfig:
    """The shared tier (``tiercache/tiers/remote.py``): an S3 bucket prefix several daemons use."""

    url: str = ""  # s3://bucket/prefix
    endpoint: str = ""  # "": AWS S3, or AWS_ENDPOINT_URL
    region: str = ""  # "": AWS_REGION, else us-east-1
    key_id: str = ""  # "": AWS_ACCESS_KEY_ID
    secret_file: str = ""  # a file holding the secret key; "": AWS_SECRET_ACCESS_KEY
    timeout: float = 1.0  # seconds: a request's deadline, and the most a lookup waits
    queue_blocks: int = 4096  # write-behind bound; blocks offered beyond it are dropped, counted
    admission: int = 1  # share a block on its N-th sighting (save or hit); 0: pinned only
    share_pinned: bool = True  # a pinned session's blocks are shared whatever their count
    max_age: int = 0  # retention: seconds since written; 0: no age limit
    max_bytes: int = 0  # retention: total block bytes; 0: no size limit
    retention_interval: int = 0  # seconds between the daemon's retention runs; 0: never

    def __post_init__(self) -> None:
        if self.url and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]*(/.*)?", self.url):
            raise ConfigError(
                f"tiers.remote.url: {self.url!r} is not s3://bucket/prefix (a valid bucket name)"
            )
        if self.endpoint and not re.fullmatch(r"https?://[^/\s]+/?", self.endpoint):
            raise ConfigError(
                f"tiers.remote.endpoint: {self.endpoint!r} is not http(s)://host[:port]"
            )
        if not self.timeout > 0:
            raise ConfigError(f"tiers.remote.timeout: must be seconds > 0, got {self.timeout}")
        for name in ("queue_blocks",):
            if getattr(self, name) < 1:
                raise ConfigError(f"tiers.remote.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("admission", "max_age", "max_bytes", "retention_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tiers.remote.{name}: must be >= 0, got {getattr(self, name)}")
        if self.retention_interval and not (self.max_age or self.max_bytes):
            raise ConfigError(
                "tiers.remote.retention_interval: set max_age or max_bytes for it to apply"
            )


@dataclass(slots=True)
class PolicyConfig:
    eviction: str = "lru"
    write: str = "write-back"
    admission: int = 1  # store a block on its N-th offer

    def __post_init__(self) -> None:
        if self.eviction not in POLICIES:
            raise ConfigError(
                f"policy.eviction: {self.eviction!r} is not one of {', '.join(POLICIES)}"
            )
        if self.write not in ("write-through", "write-back"):
            raise ConfigError(
                f"policy.write: {self.write!r} is not one of write-through, write-back"
            )
        if self.admission < 1:
            raise ConfigError(f"policy.admission: must be >= 1, got {self.admission}")


@dataclass(slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"


@dataclass(slots=True)
class MqttConfig:
    host: str = ""
    port: int = 1883
    prefix: str = "tiercache"
    node: str = field(default_factory=socket.gethostname)
    username: str = ""
    password_file: str = ""
    tls_ca: str = ""


@dataclass(slots=True)
class TiersConfig:
    device: DeviceTierConfig | None = None
    host: HostTierConfig = field(default_factory=HostTierConfig)
    disk: DiskTierConfig | None = field(default_factory=DiskTierConfig)
    remote: RemoteTierConfig | None = None


@dataclass(slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _to_dict(self)
        return out


_SIZE_KEYS = {"bytes", "slot_bytes", "max_bytes"}
SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "tiers.device": DeviceTierConfig,
    "tiers.host": HostTierConfig,
    "tiers.disk": DiskTierConfig,
    "tiers.remote": RemoteTierConfig,
    "policy": PolicyConfig,
    "metrics": MetricsConfig,
    "mqtt": MqttConfig,
}


def _to_dict(obj: Any) -> Any:
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, list):
        return [_to_dict(x) for x in obj]
    return {
        f.name: _to_dict(getattr(obj, f.name))
        for f in fields(obj)
        if getattr(obj, f.name) is not None
    }


def _coerce(where: str, name: str, default: Any, value: Any) -> Any:
    if name in _SIZE_KEYS:
        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{where}.{name}: {e}") from None
    kind = type(default)
    if kind is bool:
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
    elif kind is int:
        # Only real integers or integer strings: int(1.9) would silently truncate.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value):
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(f):
                    return f
    elif kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}.{name}: expected {kind.__name__}, got {value!r}")


def _build(where: str, cls: type, table: Mapping[str, Any]) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    defaults = cls()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(where, k, getattr(defaults, k), v) for k, v in table.items()}
    try:
        return cls(**{**{f.name: getattr(defaults, f.name) for f in fields(cls)}, **kwargs})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _env_tables(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``TIERCACHE_TIERS_HOST__BYTES=8GiB`` -> ``{"tiers.host": {"bytes": "8GiB"}}``."""
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, key = name[len(ENV_PREFIX) :].lower().rsplit("__", 1)
        dotted = section.replace("_", ".", 1) if section.startswith("tiers_") else section
        if dotted not in SECTIONS:
            raise ConfigError(
                f"environment {name}: unknown section {dotted!r}; known: {', '.join(SECTIONS)}"
            )
        out.setdefault(dotted, {})[key] = value
    return out


def socket_gid(group: str) -> int:
    """The id of ``[daemon] socket_group``; a ConfigError where this machine has no such group."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"daemon.socket_group: {group!r} is not a group on this machine; create it "
            "(groupadd) or leave socket_group empty (owner-only socket)"
        ) from None


def preflight(cfg: Config) -> None:
    """What a daemon with ``cfg`` asks of this machine, checked before it starts (and by
    ``tiercache serve --check-config``): a metrics address and MQTT settings it can use,
    a socket group that exists, room in /dev/shm for its host arena (a daemon's is always shared; arenas of daemons that
    died count as room, the daemon removes them) and a CUDA device for a device tier.
    Raises ``ConfigError`` naming the key."""
    from tiercache.daemon.metrics import parse_listen
    from tiercache.tiers.host import SHM_DIR, shm_free, stale_arenas

    # What serve would refuse only after opening the cache and its socket.
    parse_listen(cfg.metrics.listen)
    if cfg.mqtt.host:
        from tiercache.daemon.mqtt import _check_config

        _check_config(cfg.mqtt)
    host = cfg.tiers.host.bytes
    if host:
        room = shm_free(SHM_DIR) + sum(size for _, size in stale_arenas(SHM_DIR))
        if room < host:
            raise ConfigError(
                f"tiers.host.bytes: {host} B, but {SHM_DIR}, where the daemon's host arena "
                f"lives, has room for {room} B; lower it or enlarge {SHM_DIR}"
            )
    if cfg.daemon.socket_group:
        socket_gid(cfg.daemon.socket_group)
    device = cfg.tiers.device
    if device is not None and device.bytes:
        from tiercache.tiers.device import no_cuda

        if (missing := no_cuda(device.devices[0])) is not None:
            raise ConfigError(
                f"tiers.device.devices: {missing}; remove [tiers.device] or set its bytes to 0"
            )


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults <- TOML file (if given) <- environment overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    tables: dict[str, dict[str, Any]] = {}
    for section, body in raw.items():
        if section == "tiers":
            if not isinstance(body, dict):
                raise ConfigError("tiers: expected a table")
            for tier, tbody in body.items():
                if f"tiers.{tier}" not in SECTIONS:
                    raise ConfigError(
                        f"tiers.{tier}: unknown tier; known: device, host, disk, remote"
                    )
                tables[f"tiers.{tier}"] = dict(tbody) if isinstance(tbody, dict) else tbody
        elif section in SECTIONS:
            tables[section] = dict(body) if isinstance(body, dict) else body
        else:
            raise ConfigError(f"unknown section [{section}]; known: {', '.join(SECTIONS)}")
    for section, overrides in _env_tables(os.environ if env is None else env).items():
        tables[section] = {**tables.get(section, {}), **overrides}

    built = {
        name: _build(name, cls, tables[name]) for name, cls in SECTIONS.items() if name in tables
    }
    tiers = TiersConfig(
        device=built.get("tiers.device"),
        host=built.get("tiers.host", HostTierConfig()),
        disk=built.get("tiers.disk", DiskTierConfig()),
        remote=built.get("tiers.remote"),
    )
    if tiers.disk is not None and tiers.disk.url in ("", "none"):
        tiers.disk = None
    if tiers.remote is not None and not tiers.remote.url:
        tiers.remote = None
    return Config(
        daemon=built.get("daemon", DaemonConfig()),
        tiers=tiers,
        policy=built.get("policy", PolicyConfig()),
        metrics=built.get("metrics", MetricsConfig()),
        mqtt=built.get("mqtt", MqttConfig()),
    )


def to_toml(cfg: Config) -> str:
    """The effective config as TOML (what ``tiercache serve --check-config`` prints)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    d = cfg.to_dict()
    if cfg.tiers.disk is None:  # left out, the table would mean the default disk tier
        d["tiers"] = {**d["tiers"], "disk": {"url": "none"}}
    for section in ("daemon", "tiers", "policy", "metrics", "mqtt"):
        tables = d[section].items() if section == "tiers" else [(None, d[section])]
        for sub, body in tables:
            lines.append(f"[{section}.{sub}]" if sub else f"[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in body.items())
            lines.append("")
    return "\n".join(lines)
