"""What a schema cannot see in the rendered manifests (`kubectl kustomize deploy/kubernetes`, read
from stdin), checked offline by scripts/check_kubernetes.sh: every selector selects pods, every
name a pod or a Service refers to exists, every MBC_* variable is a real setting with a valid
value (the components' own settings code reads them), probes and Services aim at the ports the
components listen on, the etcd endpoints name the StatefulSet's members, and every bot definition
loads. Exits 1 with one line per problem.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

from bot_server.definition import BotDefinition, DefinitionError
from mbc.cli.settings import ConfigError, flag_defaults, resolve

COMPONENTS = ("router", "bot", "store")
POD_IP = "10.0.0.1"
"""Stands for a value the pod gets from the downward API (status.podIP)."""


class Manifests:
    """The built objects, by kind and name, and the pod templates with their owners."""

    def __init__(self, objects: list[dict]) -> None:
        self.by_kind: dict[str, dict[str, dict]] = {}
        for obj in objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        self.config_maps = self.of("ConfigMap")
        self.services = self.of("Service")
        self.pods = [
            (
                f"{o['kind']} {o['metadata']['name']}",
                o,
                o["spec"]["template"]["metadata"]["labels"],
                o["spec"]["template"]["spec"],
            )
            for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")
        ]

    def of(self, kind: str) -> dict[str, dict]:
        return self.by_kind.get(kind, {})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check(objects: list[dict]) -> list[str]:
    m = Manifests(objects)
    problems = check_selectors(m)
    listening, unreachable = service_ports(m)
    problems += unreachable
    for where, _, _, spec in m.pods:
        for volume in spec.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in m.config_maps:
                problems.append(f"{where}: volume {volume['name']} names a missing ConfigMap {volume['configMap']['name']}")
        for container in spec["containers"]:
            problems += [f"{where}: {p}" for p in check_container(m, container, listening)]
    return problems + check_definitions(m.config_maps)


def check_selectors(m: Manifests) -> list[str]:
    problems = [f"{where}: its selector does not select its own pods" for where, o, labels, _ in m.pods
                if not selects(o["spec"]["selector"]["matchLabels"], labels)]  # fmt: skip
    for kind, field in (("Service", "selector"), ("PodDisruptionBudget", "selector"), ("NetworkPolicy", "podSelector")):
        for name, obj in m.of(kind).items():
            selector = obj["spec"][field]
            selector = selector.get("matchLabels", selector)
            if not any(selects(selector, labels) for _, _, labels, _ in m.pods):
                problems.append(f"{kind} {name}: its selector matches no pod template")
    return problems


def service_ports(m: Manifests) -> tuple[dict[str, set[str]], list[str]]:
    """Each Service's ports that reach a named container port of the pods it selects, and the
    ports that reach none."""
    listening: dict[str, set[str]] = {}
    problems = []
    for where, _, labels, spec in m.pods:
        names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for name, service in m.services.items():
            if not selects(service["spec"]["selector"], labels):
                continue
            for port in service["spec"]["ports"]:
                if port["targetPort"] in names:
                    listening.setdefault(name, set()).add(str(port["port"]))
                else:
                    problems.append(f"Service {name}: target port {port['targetPort']} is not a port of {where}")
    return listening, problems


def check_container(m: Manifests, container: dict, listening: dict[str, set[str]]) -> list[str]:
    problems = []
    ports = {p["containerPort"] for p in container.get("ports", [])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container.get(probe, {}).get("grpc")
        if grpc and grpc["port"] not in ports:
            problems.append(f"the {probe} checks port {grpc['port']}, which the container does not expose")
    sources = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
    missing = [name for name in sources if name not in m.config_maps]
    args = container.get("args", [])
    if missing or not (args and args[0] in COMPONENTS):
        return problems + [f"envFrom names a missing ConfigMap {name}" for name in missing]
    kind = args[0]
    env = {k: v for name in sources for k, v in m.config_maps[name].get("data", {}).items()}
    env.update({var["name"]: var.get("value", POD_IP) for var in container.get("env", [])})
    try:
        config = resolve(kind, flag_defaults(kind), environ=env).config
    except ConfigError as e:
        return [*problems, str(e)]
    if config.server.host != "0.0.0.0" or config.server.advertise_host != POD_IP:
        problems.append(f"{kind} must listen on 0.0.0.0 and advertise the pod IP (status.podIP)")
    if not {config.server.port, config.server.metrics_port} <= ports:
        problems.append(f"{kind} listens on {config.server.port} and {config.server.metrics_port}, not both exposed")
    problems += check_etcd(config.etcd_endpoints, m.of("StatefulSet"))
    if kind == "bot":
        problems += check_bot_addresses(config, listening, m.services)
    return problems


def check_etcd(endpoints: tuple[str, ...], statefulsets: dict[str, dict]) -> list[str]:
    problems = []
    for endpoint in endpoints:
        m = re.fullmatch(r"(.+)-(\d+)\.([^.:]+):2379", endpoint)
        etcd = statefulsets.get(m.group(1)) if m else None
        if not (m and etcd and etcd["spec"]["serviceName"] == m.group(3) and int(m.group(2)) < etcd["spec"]["replicas"]):
            problems.append(f"etcd endpoint {endpoint} is not a member of an etcd StatefulSet (<name>-<n>.<service>:2379)")
    return problems


def check_bot_addresses(config: Any, listening: dict[str, set[str]], services: dict[str, dict]) -> list[str]:
    problems = []
    for what, address in (("router", config.router_address.removeprefix("dns:///")), ("store", config.store_address)):
        host, _, port = address.rpartition(":")
        if host not in services or port not in listening.get(host, set()):
            problems.append(f"the {what} address {address} is not a port of a Service of this deployment")
        elif what == "router" and services[host]["spec"].get("clusterIP") != "None":
            problems.append(f"the router address {address} must be a headless Service (clusterIP: None) for round_robin")
    return problems


def check_definitions(config_maps: dict[str, dict]) -> list[str]:
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for name, cm in config_maps.items():
        for file, text in cm.get("data", {}).items() if name.startswith("mbc-bots") else ():
            try:
                definition = BotDefinition.from_dict(yaml.safe_load(text))
            except (DefinitionError, yaml.YAMLError) as e:
                problems.append(f"ConfigMap {name}: {file}: {e}")
                continue
            key = (definition.group, definition.bot_id)
            if key in seen:
                problems.append(f"ConfigMap {name}: {file} and {seen[key]} both define bot {definition.bot_id}")
            seen[key] = file
    return problems


def main() -> int:
    objects = [o for o in yaml.safe_load_all(sys.stdin) if o]
    problems = check(objects)
    for problem in problems:
        print(f"ERROR {problem}", file=sys.stderr)
    print(f"check_manifests: {len(objects)} objects, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
