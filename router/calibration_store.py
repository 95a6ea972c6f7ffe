"""Where a router's calibration set, and each group's decision costs, come from: etcd, shared by
every replica.

The set lives in etcd (discovery/calibration.py), written by `mbc calibrate FILE`; each router
watches it and refits τ when it changes, so all replicas fit τ from the same utterances. A
`DecisionConfig.calibration_path` is a seed and a way in, not a second source: at start its set is
written to etcd when etcd holds none (else the file is left unused, with a log line), and when the
file changes later (`mbc calibrate FILE --install PATH`) its new set is written to etcd, from where
every replica, this one included, takes it.

A group's own decision costs are in its settings (`GroupSettings.decision_costs`, written by `mbc
group GROUP --costs ...`); the router follows every group's settings and refits the τ of a group
whose costs changed.
A group whose costs are out of range keeps the router's, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence

from discovery.calibration import CalibrationTooLarge, CalibrationWatcher, StoredCalibration, read_calibration, write_calibration
from discovery.errors import EtcdError
from discovery.etcd_client import EtcdClient
from discovery.following import EtcdFollower
from discovery.groups import GROUPS_PREFIX, read_decision_costs
from mbc.runtime.calibration_set import CalibrationError, Example, dump_calibration, load_calibration, parse_calibration
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2
from router.calibration import group_cost_overrides

log = get_logger(__name__)

FIRST_READ_SECONDS = 10.0
"""How long a starting router waits for the set in etcd before it builds without it (etcd slow or
away: the set is applied, and τ refitted, when it arrives)."""


class CalibrationSource:
    """Feeds `set_calibration` (a RouterCore's) with the set in etcd, seeded from `path` if given,
    and `set_group_costs` with the groups' decision costs in etcd."""

    def __init__(
        self,
        client: EtcdClient,
        set_calibration: Callable[[Sequence[Example]], object],
        path: str = "",
        file_interval: float = 2.0,
        set_group_costs: Callable[[dict[str, dict[str, float]]], object] | None = None,
    ) -> None:
        self._client = client
        self._set_calibration = set_calibration
        self._set_group_costs = set_group_costs
        self._path = path
        self._file_interval = file_interval
        self._mtime: float | None = None
        self._watchers: list[EtcdFollower] = [CalibrationWatcher(client, self._apply)]
        if set_group_costs is not None:
            self._watchers.append(EtcdFollower(client, "group_costs", GROUPS_PREFIX, read_decision_costs, self._apply_costs))
        self._file_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Seed etcd from the file, then wait (a while) for the set and the costs in etcd: the first
        models are built with them, not refitted a moment later."""
        if self._path:
            examples = self._read_file()
            if examples is not None:
                await self._seed(examples)
        for watcher in self._watchers:
            watcher.start()
        try:
            await asyncio.wait_for(asyncio.gather(*(w.wait_first() for w in self._watchers)), FIRST_READ_SECONDS)
        except TimeoutError:
            log.warning("calibration_not_read", waited_seconds=FIRST_READ_SECONDS, action="building without it until it is")
        if self._path:
            self._file_task = asyncio.create_task(self._watch_file(), name="calibration-file")

    async def stop(self) -> None:
        if self._file_task is not None:
            self._file_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._file_task
        for watcher in self._watchers:
            await watcher.stop()

    def _apply_costs(self, costs: dict[str, participant_pb2.DecisionCosts]) -> None:
        assert self._set_group_costs is not None  # followed only then
        overrides, refused = group_cost_overrides(costs)
        for group, error in refused.items():
            log.warning("group_costs_invalid", group=group, error=error, action="the router's costs for this group")
        self._set_group_costs(overrides)
        log.info("group_costs_loaded", groups=sorted(overrides))

    def _apply(self, stored: StoredCalibration | None) -> None:
        if stored is None:
            self._set_calibration([])
            log.info("calibration_loaded", source="etcd", examples=0)
            return
        try:
            examples = parse_calibration(stored.text, "the calibration set in etcd")
        except CalibrationError as e:
            log.warning("calibration_invalid", source="etcd", digest=stored.digest, error=str(e), action="kept the previous set")
            return
        self._set_calibration(examples)
        log.info("calibration_loaded", source="etcd", digest=stored.digest, examples=len(examples))

    def _read_file(self) -> list[Example] | None:
        try:
            self._mtime = os.stat(self._path).st_mtime
            return load_calibration(self._path)
        except (OSError, CalibrationError) as e:
            log.warning("calibration_not_loaded", path=self._path, error=str(e))
            return None

    async def _seed(self, examples: list[Example]) -> None:
        try:
            if await read_calibration(self._client) is not None:
                log.info("calibration_file_not_used", path=self._path, reason="etcd holds a set already (see `mbc calibrate`)")
                return
            digest = await write_calibration(self._client, dump_calibration(examples))
        except (EtcdError, ValueError) as e:
            log.warning("calibration_not_seeded", path=self._path, error=str(e))
            return
        log.info("calibration_seeded", path=self._path, digest=digest, examples=len(examples))

    async def _publish(self, examples: list[Example]) -> None:
        try:
            digest = await write_calibration(self._client, dump_calibration(examples))
        except (EtcdError, CalibrationTooLarge) as e:
            log.warning("calibration_not_published", path=self._path, error=str(e))
            return
        log.info("calibration_published", path=self._path, digest=digest, examples=len(examples))

    async def _watch_file(self) -> None:
        """Write the file's set to etcd when the file changes (`mbc calibrate FILE --install PATH`)."""
        while True:
            await asyncio.sleep(self._file_interval)
            try:
                mtime = os.stat(self._path).st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                examples = self._read_file()
                if examples is not None:
                    await self._publish(examples)
