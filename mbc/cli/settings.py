"""Effective settings of a component: the typed model of mbc/runtime/config.py, filled in layers.

From lowest to highest precedence:

1. the flag defaults: the dataclass defaults, except where a component's flag has its own default
   (`section(..., flag_defaults=...)`, e.g. the router's port 50051);
2. deprecated single-name variables (below), as the flag defaults they used to be;
3. a YAML file (`--config FILE`, or MBC_CONFIG), with one section per component:

       router:
         etcd_endpoints: [10.0.0.5:2379]
         server: {port: 50051, metrics_port: 9464}
         encoder: {backend: onnx}
       bot:
         router_address: 10.0.0.7:50051
         max_hops: 2
       store:
         server: {metrics_port: 9465}
         limits: {max_value_bytes: 100000}

4. environment variables (the one scheme, below);
5. flags given on the command line (even with their default value).

Environment variables: `MBC_<COMPONENT>__<FIELD>[__<FIELD>...]`, upper case, `__` between levels,
the component being ROUTER, BOT or STORE: `MBC_ROUTER__SERVER__METRICS_PORT=9464`,
`MBC_BOT__MAX_HOPS=2`, `MBC_STORE__ETCD_ENDPOINTS=10.0.0.5:2379,10.0.0.6:2379` (lists
comma-separated, booleans true/false/1/0/yes/no/on/off). The client commands (`mbc match`,
`chat`, `participants`, `group`, `etcd-auth`, `calibrate`, `overlap`, `bench`, `eval`) take their
defaults from the same scheme with the component CLIENT (`CLIENT_SETTINGS`):
`MBC_CLIENT__ROUTER_ADDRESS`, `MBC_CLIENT__ENTRY_ADDRESS`, `MBC_CLIENT__STORE_ADDRESS`,
`MBC_CLIENT__ETCD_ENDPOINTS`, `MBC_CLIENT__TLS__CA_FILE` (`CERT_FILE`, `KEY_FILE`),
`MBC_CLIENT__LOG_LEVEL`. MBC_CONFIG, the file of all sections, is the one variable outside the
scheme. The older single names (`LEGACY_ENV`: MBC_ETCD, MBC_ROUTER, MBC_TLS_CA, ...) are still
read for one release, each with a one-line deprecation notice on stderr naming its new name.

Flags: every field made with `setting(flag=...)` is a flag of the components that hold it
(`add_flags`), and a given flag sets exactly its field (`given_flags`).

Everything is checked before the component starts: an unknown key or variable, a value of the
wrong type and a value out of range stop it with a message naming the setting and where it came
from (`ConfigError`). `mbc config show [router|bot|store] [--config FILE]` prints the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from mbc.runtime.config import BotConfig, RouterConfig, StoreServiceConfig, split_endpoints

KINDS: dict[str, type] = {"router": RouterConfig, "bot": BotConfig, "store": StoreServiceConfig}
ENV_PREFIX = "MBC_"
CONFIG_ENV = "MBC_CONFIG"

Path_ = tuple[str, ...]

CLIENT = "client"
CLIENT_SETTINGS: dict[Path_, str] = {
    ("router_address",): "the router host:port (`mbc match --router`)",
    ("entry_address",): "the bot a new conversation starts with (`mbc chat --entry`)",
    ("store_address",): "the Context Session Store (`mbc chat --store`)",
    ("etcd_endpoints",): "etcd endpoints (`--etcd` of participants, group, etcd-auth, calibrate, overlap)",
    ("tls", "ca_file"): "`--tls-ca` of the client commands",
    ("tls", "cert_file"): "`--tls-cert` of the client commands",
    ("tls", "key_file"): "`--tls-key` of the client commands",
    ("log_level",): "log level of the client commands",
}
"""What the client commands read from MBC_CLIENT__* when their flag is not given."""

LEGACY_ENV: dict[str, dict[str, Path_]] = {
    "MBC_ETCD": {
        "router": ("etcd_endpoints",),
        "bot": ("etcd_endpoints",),
        "store": ("etcd_endpoints",),
        CLIENT: ("etcd_endpoints",),
    },
    "MBC_MODEL": {"router": ("encoder", "model"), "bot": ("encoder", "model")},
    "MBC_LOG_LEVEL": {"router": ("log_level",), "bot": ("log_level",), "store": ("log_level",), CLIENT: ("log_level",)},
    "MBC_ROUTER": {"bot": ("router_address",), CLIENT: ("router_address",)},
    "MBC_STORE": {"bot": ("store_address",), CLIENT: ("store_address",)},
    "MBC_ENTRY": {CLIENT: ("entry_address",)},
    "MBC_CALIBRATION": {"router": ("decision", "calibration_path")},
    "MBC_EMBEDDING_CACHE": {"router": ("embedding_cache_dir",)},
    "MBC_ENCODER_BACKEND": {"router": ("encoder", "backend")},
    "MBC_ENCODER_THREADS": {"router": ("encoder", "threads")},
    "MBC_ONNX_DIR": {"router": ("encoder", "onnx_dir")},
    "MBC_TLS_CA": {CLIENT: ("tls", "ca_file")},
    "MBC_TLS_CERT": {CLIENT: ("tls", "cert_file")},
    "MBC_TLS_KEY": {CLIENT: ("tls", "key_file")},
}
"""The single-name variables of earlier releases, per component: the setting each one fills.
Deprecated: read for one release, with a notice."""


def env_name(kind: str, path: Path_) -> str:
    """The variable of a setting: MBC_<COMPONENT>__<FIELD>[__<FIELD>...]."""
    return ENV_PREFIX + "__".join(p.upper() for p in (kind, *path))


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range."""


# -- reading layers -------------------------------------------------------------------------


def read_file(path: str) -> dict[str, Any]:
    """The YAML config file as a mapping of component sections."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping with sections {', '.join(KINDS)}, got {type(data).__name__}")
    for key in data:
        if key not in KINDS:
            raise ConfigError(
                f"config file {path}: unknown section {key!r}{_suggest(str(key), KINDS)}; sections are {', '.join(KINDS)}"
            )
    return data


def file_layer(kind: str, path: str) -> dict[Path_, tuple[Any, str]]:
    section = read_file(path).get(kind) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: section {kind!r} must be a mapping")
    out: dict[Path_, tuple[Any, str]] = {}

    def walk(cls: type, mapping: Mapping, prefix: Path_) -> None:
        hints = _hints(cls)
        for key, value in mapping.items():
            name = str(key)
            where = f"{kind}.{'.'.join((*prefix, name))} in {path}"
            if name not in hints:
                raise ConfigError(f"unknown setting {where}{_suggest(name, hints)}")
            if dataclasses.is_dataclass(hints[name]):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where} must be a mapping")
                walk(hints[name], value, (*prefix, name))
            else:
                out[(*prefix, name)] = (value, f"file {path}")

    walk(KINDS[kind], section, ())
    return out


def env_layer(kind: str, environ: Mapping[str, str]) -> dict[Path_, tuple[Any, str]]:
    prefix = f"{ENV_PREFIX}{kind.upper()}__"
    out: dict[Path_, tuple[Any, str]] = {}
    for var in sorted(environ):
        if not var.startswith(prefix):
            continue
        parts = tuple(p.lower() for p in var[len(prefix) :].split("__"))
        cls: type = KINDS[kind]
        for i, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                raise ConfigError(f"unknown setting {var} ({kind}.{'.'.join(parts)}){_suggest(part, hints)}")
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(hints[part]):
                    raise ConfigError(f"unknown setting {var}: {kind}.{'.'.join(parts[: i + 1])} has no sub-settings")
                cls = hints[part]
            elif dataclasses.is_dataclass(hints[part]):
                raise ConfigError(
                    f"{var}: {kind}.{'.'.join(parts)} is a section; name one of its settings: "
                    f"{', '.join(f'{var}__{n.upper()}' for n in _hints(hints[part]))}"
                )
        out[parts] = (environ[var], f"env {var}")
    return out


def legacy_layer(kind: str, environ: Mapping[str, str], notices: TextIO | None = None) -> dict[Path_, tuple[Any, str]]:
    """The deprecated single-name variables set for `kind`, each announced on one line of stderr."""
    out: dict[Path_, tuple[Any, str]] = {}
    for old, paths in LEGACY_ENV.items():
        if old in environ and kind in paths:
            deprecated(old, env_name(kind, paths[kind]), notices)
            out[paths[kind]] = (environ[old], f"env {old} (deprecated)")
    return out


def deprecated(old: str, new: str, notices: TextIO | None = None) -> None:
    print(f"mbc: DeprecationWarning: {old} is deprecated: use {new}", file=notices or sys.stderr)


def client_default(path: Path_, default: str, environ: Mapping[str, str] | None = None) -> str:
    """A client command's default for a setting not given as a flag: MBC_CLIENT__<FIELD>, else the
    deprecated single name (with its notice), else `default`."""
    environ = os.environ if environ is None else environ
    new = env_name(CLIENT, path)
    if new in environ:
        return environ[new]
    for old, paths in LEGACY_ENV.items():
        if paths.get(CLIENT) == path and old in environ:
            deprecated(old, new)
            return environ[old]
    return default


# -- building -------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` (from YAML, or a string from the environment) as the field type, or ConfigError."""
    from_env = isinstance(value, str) and where.startswith("env ")

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong("a boolean (true/false)")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise wrong("an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise wrong("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = split_endpoints(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise wrong("a list of strings (or one comma-separated string)")
    return value


def _get(config: Any, path: Path_) -> Any:
    for part in path:
        config = getattr(config, part)
    return config


def _replace(config: Any, path: Path_, value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    return dataclasses.replace(config, **{path[0]: _replace(getattr(config, path[0]), path[1:], value)})


def _field_type(cls: type, path: Path_) -> Any:
    for part in path[:-1]:
        cls = _hints(cls)[part]
    return _hints(cls)[path[-1]]


def flatten(config: Any, prefix: Path_ = ()) -> dict[Path_, Any]:
    """Every leaf setting of a config dataclass, by path."""
    out: dict[Path_, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, (*prefix, f.name)))
        else:
            out[(*prefix, f.name)] = value
    return out


@dataclasses.dataclass
class Effective:
    config: Any
    sources: dict[Path_, str]
    """Where each setting that is not at its flag default came from."""


def resolve(
    kind: str,
    base: Any,
    config_file: str = "",
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[Path_, tuple[Any, str]] | None = None,
) -> Effective:
    """`base` (the flag defaults) with the deprecated variables, the file, the environment and
    `overrides` (given flags) on top."""
    environ = os.environ if environ is None else environ
    layers: dict[Path_, tuple[Any, str]] = legacy_layer(kind, environ)
    if config_file:
        layers.update(file_layer(kind, config_file))
    layers.update(env_layer(kind, environ))
    layers.update(overrides or {})
    sources: dict[Path_, str] = {}
    values: dict[Path_, Any] = {}
    for path, (raw, source) in layers.items():
        values[path] = (
            raw
            if source.startswith("flag")
            else coerce(raw, _field_type(KINDS[kind], path), f"{source} ({kind}.{'.'.join(path)})")
        )
        sources[path] = source
    try:
        config = _build(KINDS[kind], base, values)
    except (TypeError, ValueError) as e:
        named = [(p, s) for p, s in sources.items() if ".".join(p) in str(e)]
        culprits = [f"{kind}.{'.'.join(p)} from {s}" for p, s in named]
        what = "invalid flag value" if named and all(s.startswith("flag") for _, s in named) else f"invalid {kind} settings"
        raise ConfigError(f"{what}: {e}" + (f" ({'; '.join(culprits)})" if culprits else "")) from None
    return Effective(config, sources)


def _build(cls: type, base: Any, values: Mapping[Path_, Any]) -> Any:
    """Rebuild `base` with `values`, each dataclass constructed (and so validated) once."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name)
        if dataclasses.is_dataclass(current):
            nested = {p[1:]: v for p, v in values.items() if p[0] == f.name}
            kwargs[f.name] = _build(type(current), current, nested) if nested else current
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
        else:
            kwargs[f.name] = current
    return cls(**kwargs)


# -- command-line flags ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag derived from a config field."""

    path: Path_
    name: str
    """"--port", or a positional argument's name ("definition")."""
    kind: Any
    help: str
    choices: tuple[str, ...]
    metavar: str

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def source(self) -> str:
        return f"flag {self.name}"

    def value(self, parsed: Any) -> Any:
        """The field value of a parsed flag (an on/off choice is a boolean)."""
        if isinstance(parsed, list):
            return tuple(parsed)  # a positional list (nargs="+")
        return parsed == self.choices[0] if self.kind is bool and self.choices else parsed


def field_flags(cls: type, only: tuple[str, ...] | None = None, prefix: Path_ = ()) -> list[Flag]:
    """The flags of a settings dataclass, nested sections included, in field order; `only`: the
    names of the fields of `cls` itself that may be flags."""
    out: list[Flag] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_flags(hints[f.name], f.metadata.get("flags"), (*prefix, f.name))
        elif f.metadata.get("flag"):
            m = f.metadata
            out.append(Flag((*prefix, f.name), m["flag"], hints[f.name], m["help"], m["choices"], m["metavar"]))
    return out


def flags_of(kind: str) -> list[Flag]:
    flags = field_flags(KINDS[kind])
    names = [f.name for f in flags]
    assert len(names) == len(set(names)), f"{kind}: a flag names two settings: {names}"
    return flags


def flag_defaults(kind: str) -> Any:
    """The config of `kind` with its flags' defaults (layer 1)."""

    def build(cls: type, defaults: Mapping[str, Any]) -> Any:
        kwargs = dict(defaults)
        for f in dataclasses.fields(cls):
            if "flag_defaults" in f.metadata and f.name not in kwargs:
                kwargs[f.name] = build(_hints(cls)[f.name], f.metadata["flag_defaults"])
        return cls(**kwargs)

    return build(KINDS[kind], {})


def add_field_arguments(parser: Any, flags: list[Flag], defaults: Any = argparse.SUPPRESS) -> None:
    """One argparse argument per flag. With `defaults` SUPPRESS, a flag absent from the command
    line is absent from the namespace, so the given ones are known (`given_flags`); otherwise
    `defaults` is a config (or section) whose values are the flags' defaults."""
    for flag in flags:
        options: dict[str, Any] = {"help": flag.help}
        if defaults is not argparse.SUPPRESS:
            value = _get(defaults, flag.path)
            options["default"] = (flag.choices[0] if value else flag.choices[1]) if flag.kind is bool and flag.choices else value
        elif flag.name.startswith("-"):
            options["default"] = argparse.SUPPRESS
        if flag.metavar:
            options["metavar"] = flag.metavar
        if flag.kind is bool and not flag.choices:
            options["action"] = "store_true"
        elif flag.choices:
            options["choices"] = flag.choices
        elif flag.kind in (int, float):
            options["type"] = flag.kind
        elif typing.get_origin(flag.kind) is tuple:
            if flag.name.startswith("-"):
                options["type"] = split_endpoints
            else:
                options["nargs"] = "+"
        parser.add_argument(flag.name, **options)


def add_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """The flags of `mbc KIND`, derived from its config: top-level settings first, then one group
    per section (server, etcd, encoder, ...)."""
    groups: dict[str, Any] = {}
    for flag in flags_of(kind):
        if len(flag.path) == 1:
            target: Any = parser
        else:
            target = groups.get(flag.path[0])
            if target is None:
                cls = _hints(KINDS[kind])[flag.path[0]]
                target = groups[flag.path[0]] = parser.add_argument_group(
                    f"{flag.path[0]} settings", (cls.__doc__ or "").split("\n")[0]
                )
        add_field_arguments(target, [flag])


def given_flags(kind: str, args: argparse.Namespace) -> dict[Path_, tuple[Any, str]]:
    """The settings set by the flags given on the command line (parsed by `add_flags`)."""
    return {f.path: (f.value(getattr(args, f.dest)), f.source) for f in flags_of(kind) if hasattr(args, f.dest)}


# -- printing -------------------------------------------------------------------------------


def render(kind: str, effective: Effective) -> str:
    """YAML of every setting (usable as a --config file), each non-default one with its source."""
    lines = [f"{kind}:"]

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, tuple):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=False)

    def walk(config: Any, prefix: Path_, indent: int) -> None:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            pad = "  " * indent
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                walk(value, (*prefix, f.name), indent + 1)
                continue
            source = effective.sources.get((*prefix, f.name))
            lines.append(f"{pad}{f.name}: {scalar(value)}" + (f"  # {source}" if source else ""))

    walk(effective.config, (), 1)
    return "\n".join(lines)
