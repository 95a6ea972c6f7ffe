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
from collections.abc import Iterator
from typing import Any

import yaml

from bot_server.definition import BotDefinition, DefinitionError
from mbc.cli.settings import ConfigError, flag_defaults, resolve

COMPONENTS = ("router", "bot", "store")
POD_IP = "10.0.0.1"
"""Stands for a value the pod gets from the downward API (status.podIP)."""


def pod_templates(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj, obj["spec"]["template"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]].get("data", {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", POD_IP)
    return env


def check(objects: list[dict]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    config_maps = by_kind.get("ConfigMap", {})
    services = by_kind.get("Service", {})
    pods = [(owner, template["metadata"]["labels"], template["spec"]) for owner, template in pod_templates(objects)]

    for owner, labels, _ in pods:
        if not selects(owner["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{owner['kind']} {owner['metadata']['name']}: its selector does not select its own pods")
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in by_kind.get(kind, {}).items():
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            if not any(selects(selector, labels) for _, labels, _ in pods):
                problems.append(f"{kind} {name}: its selector matches no pod template")

    listening: dict[str, set[str]] = {}  # Service name -> its ports that reach a container port
    for owner, labels, spec in pods:
        ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for svc_name, svc in services.items():
            if selects(svc["spec"]["selector"], labels):
                for port in svc["spec"]["ports"]:
                    if port["targetPort"] in ports:
                        listening.setdefault(svc_name, set()).add(str(port["port"]))
                    else:
                        problems.append(f"Service {svc_name}: target port {port['targetPort']} is not a port of {owner['metadata']['name']}")

    for owner, labels, spec in pods:
        where = f"{owner['kind']} {owner['metadata']['name']}"
        for volume in spec.get("volumes", []):
            if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                problems.append(f"{where}: volume {volume['name']} names a missing ConfigMap {volume['configMap']['name']}")
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = container.get(probe, {}).get("grpc")
                if grpc and grpc["port"] not in ports.values():
                    problems.append(f"{where}: the {probe} checks port {grpc['port']}, which the container does not expose")
            missing = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if s["configMapRef"]["name"] not in config_maps]
            if missing:
                problems.append(f"{where}: envFrom names a missing ConfigMap {', '.join(missing)}")
                continue
            args = container.get("args", [])
            if not (args and args[0] in COMPONENTS):
                continue
            kind = args[0]
            try:
                config = resolve(kind, flag_defaults(kind), environ=container_env(container, config_maps)).config
            except ConfigError as e:
                problems.append(f"{where}: {e}")
                continue
            if config.server.host != "0.0.0.0" or config.server.advertise_host != POD_IP:
                problems.append(f"{where}: {kind} must listen on 0.0.0.0 and advertise the pod IP (status.podIP)")
            if config.server.port not in ports.values() or config.server.metrics_port not in ports.values():
                problems.append(f"{where}: {kind} listens on {config.server.port} and {config.server.metrics_port}, not exposed")
            problems += check_etcd(where, config.etcd_endpoints, by_kind.get("StatefulSet", {}))
            if kind == "bot":
                problems += [f"{where}: {p}" for p in check_bot_addresses(config, listening, services)]
    problems += check_definitions(config_maps)
    return problems


def check_etcd(where: str, endpoints: tuple[str, ...], statefulsets: dict[str, dict]) -> list[str]:
    problems = []
    for endpoint in endpoints:
        m = re.fullmatch(r"(.+)-(\d+)\.([^.:]+):2379", endpoint)
        etcd = statefulsets.get(m.group(1)) if m else None
        if not (m and etcd and etcd["spec"]["serviceName"] == m.group(3) and int(m.group(2)) < etcd["spec"]["replicas"]):
            problems.append(f"{where}: etcd endpoint {endpoint} is not a member of an etcd StatefulSet (<name>-<n>.<service>:2379)")
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
    problems, seen = [], {}
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
