"""Effective settings of a component: the typed model of mbc/runtime/config.py, filled in layers.

From lowest to highest precedence:

1. the defaults of the command's flags (the dataclass defaults, except where a flag has its own
   default, e.g. the router's port 50051, or a legacy variable such as MBC_ETCD);
2. a YAML file (`--config FILE`, or MBC_CONFIG), with one section per component:

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

3. environment variables `MBC_<COMPONENT>__<FIELD>[__<FIELD>...]`, upper case, `__` between
   levels: `MBC_ROUTER__SERVER__METRICS_PORT=9464`, `MBC_BOT__MAX_HOPS=2`,
   `MBC_STORE__ETCD_ENDPOINTS=10.0.0.5:2379,10.0.0.6:2379` (lists comma-separated, booleans
   true/false/1/0/yes/no/on/off);
4. flags given on the command line.

Everything is checked before the component starts: an unknown key or variable, a value of the
wrong type and a value out of range stop it with a message naming the setting and where it came
from (`ConfigError`). `mbc config show [router|bot|store] [--config FILE]` prints the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from mbc.runtime.config import BotConfig, RouterConfig, StoreServiceConfig, split_endpoints

KINDS: dict[str, type] = {"router": RouterConfig, "bot": BotConfig, "store": StoreServiceConfig}
ENV_PREFIX = "MBC_"
CONFIG_ENV = "MBC_CONFIG"

Path_ = tuple[str, ...]


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
            raise ConfigError(f"config file {path}: unknown section {key!r}{_suggest(str(key), KINDS)}; sections are {', '.join(KINDS)}")
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
        parts = tuple(p.lower() for p in var[len(prefix):].split("__"))
        cls: type = KINDS[kind]
        for i, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                raise ConfigError(f"unknown setting {var} ({kind}.{'.'.join(parts)}){_suggest(part, hints)}")
            if i < len(parts) - 1:
                if not dataclasses.is_dataclass(hints[part]):
                    raise ConfigError(f"unknown setting {var}: {kind}.{'.'.join(parts[:i + 1])} has no sub-settings")
                cls = hints[part]
            elif dataclasses.is_dataclass(hints[part]):
                raise ConfigError(f"{var}: {kind}.{'.'.join(parts)} is a section; name one of its settings: "
                                  f"{', '.join(f'{var}__{n.upper()}' for n in _hints(hints[part]))}")
        out[parts] = (environ[var], f"env {var}")
    return out


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
    """`base` (the flag defaults) with the file, the environment and `overrides` (given flags) on top."""
    environ = os.environ if environ is None else environ
    layers: dict[Path_, tuple[Any, str]] = {}
    if config_file:
        layers.update(file_layer(kind, config_file))
    layers.update(env_layer(kind, environ))
    layers.update(overrides or {})
    sources: dict[Path_, str] = {}
    values: dict[Path_, Any] = {}
    for path, (raw, source) in layers.items():
        values[path] = raw if source.startswith("flag") else coerce(raw, _field_type(KINDS[kind], path), f"{source} ({kind}.{'.'.join(path)})")
        sources[path] = source
    try:
        config = _build(KINDS[kind], base, values)
    except (TypeError, ValueError) as e:
        culprits = [f"{kind}.{'.'.join(p)} from {s}" for p, s in sources.items() if ".".join(p) in str(e)]
        raise ConfigError(f"invalid {kind} settings: {e}" + (f" ({'; '.join(culprits)})" if culprits else "")) from None
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


def _perturbed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.5
    if isinstance(value, str):
        return value + "\x00probe"
    if isinstance(value, list):
        return [*value, "\x00probe"]
    if isinstance(value, tuple):
        return (*value, "\x00probe")
    if value is None:
        return "\x00probe"
    return value


def flag_overrides(
    build: Callable[[Any], Any], args: Any, defaults: Mapping[str, Any], given: set[str],
    probes: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[Path_, tuple[Any, str]]]:
    """The config of the flag defaults, and the settings set by the flags given on the command line.

    `build` turns an argparse namespace into a config (the component's own mapping of flags to
    settings, untouched); `defaults` are the flags' defaults; `given` the dests present in argv.
    Which settings a flag drives is found by building with that flag changed (so a flag given
    with its default value still overrides the file and the environment); `probes` are values to
    change a flag to for that (another of its choices), when a generic change would be invalid.
    """
    import argparse

    def namespace(**changes: Any) -> argparse.Namespace:
        ns = argparse.Namespace(**vars(args))
        for name, value in {**defaults, **changes}.items():
            setattr(ns, name, value)
        return ns

    base = build(namespace())
    base_flat = flatten(base)
    full_flat = flatten(build(args))
    overrides: dict[Path_, tuple[Any, str]] = {}
    together: list[str] = []  # flags valid only with others, e.g. a certificate and its key
    for dest in sorted(given):
        if dest not in defaults:
            continue
        try:
            alone = flatten(build(namespace(**{dest: getattr(args, dest)})))
        except ValueError:
            together.append(dest)
            continue
        paths = {p for p, v in alone.items() if v != base_flat[p]}
        try:
            probe_value = (probes or {}).get(dest, _perturbed(defaults[dest]))
            probe = flatten(build(namespace(**{dest: probe_value})))
            paths |= {p for p, v in probe.items() if v != base_flat[p]}
        except Exception:  # the probe value is not valid for this flag: rely on the given value
            pass
        for path in paths:
            overrides[path] = (full_flat[path], f"flag --{dest.replace('_', '-')}")
    if together:
        jointly = flatten(build(namespace(**{dest: getattr(args, dest) for dest in together})))
        source = "flag " + "/".join(f"--{dest.replace('_', '-')}" for dest in together)
        for path in (p for p, v in jointly.items() if v != base_flat[p]):
            overrides[path] = (full_flat[path], source)
    return base, overrides


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
