"""What `Client` and `AsyncClient` share beside their I/O: options and the watches they make."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from conveyor import _requests
from conveyor._deadline import Deadline
from conveyor._polling import Polling, PollingPolicy
from conveyor._retry import NO_RETRY, UNARY_RETRY, Backoff
from conveyor._watching import AllTasksWatch, TaskWatch, WatchSettings
from conveyor.tasks import TaskStatus


class ClientBase:
    """Checks and keeps the options; makes the I/O-free state of each watch and poll."""

    def __init__(
        self,
        target: str | None,
        channel: object | None,
        *,
        timeout: float | None,
        heartbeat_interval: float,
        token: str | None = None,
        retry_refused: bool = True,
    ) -> None:
        if target is not None and channel is not None:
            raise ValueError("give a target or a channel, not both")
        _requests.check_timeout(timeout)
        _requests.check_heartbeat(heartbeat_interval)
        self._target = _requests.target(target)
        self._timeout = timeout
        self._heartbeat = heartbeat_interval
        self._own_channel = channel is None
        self._retry_refused = retry_refused
        # Sent with every call: the bearer token ($CONVEYOR_TOKEN when none is given).
        self._metadata = _requests.token_metadata(token)

    def _deadline(self, timeout: float | None) -> Deadline:
        """The deadline of one unary call: its own `timeout`, else the client's."""
        _requests.check_timeout(timeout)
        return Deadline(self._timeout if timeout is None else timeout)

    def _backoff(self, retry: bool, deadline: Deadline) -> Backoff:
        """How one unary call is tried again (if `retry`) within its deadline."""
        policy = UNARY_RETRY if retry else NO_RETRY
        return Backoff(policy, deadline, retry_refused=self._retry_refused)

    def _watch_settings(self, timeout: float | None) -> WatchSettings:
        """A watch lasts `timeout` in all; it may keep reconnecting for the client's timeout."""
        _requests.check_timeout(timeout)
        return WatchSettings(self._heartbeat, self._timeout, timeout, self._retry_refused)

    def _task_watch(self, task_id: str, timeout: float | None) -> TaskWatch:
        return TaskWatch(task_id, self._watch_settings(timeout))

    def _all_tasks_watch(
        self,
        statuses: Iterable[TaskStatus] | None,
        task_type: str | None,
        labels: Mapping[str, str] | None,
        task_id_prefix: str | None,
        since_revision: int | None,
        start_statuses: list[TaskStatus] | None,
        timeout: float | None,
    ) -> AllTasksWatch:
        """A watch from `since_revision`, or starting with the tasks in `start_statuses`."""
        task_filter = _requests.task_filter(statuses, task_type, labels, task_id_prefix)
        start = None
        if start_statuses is not None:
            start = _requests.task_filter(start_statuses, task_type, labels, task_id_prefix)
        return AllTasksWatch(task_filter, since_revision, self._watch_settings(timeout), start)

    def _polling(
        self,
        task_id: str,
        timeout: float | None,
        initial: float,
        multiplier: float,
        maximum: float,
    ) -> Polling:
        _requests.check_timeout(timeout)
        policy = PollingPolicy(initial, multiplier, maximum)
        return Polling(task_id, Deadline(timeout), policy, self._timeout)
