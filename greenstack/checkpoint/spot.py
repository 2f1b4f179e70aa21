"""AWS spot interruption notices: poll the instance metadata service and raise the alarm early.

A spot instance gets a two-minute warning at `/latest/meta-data/spot/instance-action` (404 until
then). Polling it lets the checkpointing policy save before the SIGTERM that follows, with the whole
budget available. Off AWS the endpoint does not answer; the poller then backs off and stays quiet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx

log = logging.getLogger("greenstack")
IMDS = "http://169.254.169.254"


class SpotNoticePoller:
    """Calls `on_notice(description)` once when the instance is scheduled for interruption."""

    def __init__(self, on_notice: Callable[[str], None], endpoint: str = IMDS, interval_s: float = 5.0,
                 timeout_s: float = 1.0) -> None:
        self.on_notice, self.endpoint, self.interval_s = on_notice, endpoint.rstrip("/"), interval_s
        self._client = httpx.Client(timeout=timeout_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="greenstack-spot", daemon=True)
        self.notice: str | None = None
        self.failures = 0

    def start(self) -> SpotNoticePoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 2)
        self._client.close()

    def check(self) -> str | None:
        """One poll (IMDSv2: session token, then the instance-action document); None when no notice."""
        token = self._client.put(f"{self.endpoint}/latest/api/token",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        headers = {"X-aws-ec2-metadata-token": token.text} if token.status_code == 200 else {}
        response = self._client.get(f"{self.endpoint}/latest/meta-data/spot/instance-action", headers=headers)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data = response.json()
        return f"spot {data.get('action', 'interruption')} at {data.get('time', 'unknown time')}"

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            try:
                notice = self.check()
                self.failures, wait = 0, self.interval_s
            except (httpx.HTTPError, ValueError) as e:
                self.failures += 1
                wait = min(self.interval_s * 2 ** min(self.failures, 6), 300.0)
                if self.failures == 1:
                    log.info("spot notices: metadata service not reachable (%s); backing off", type(e).__name__)
                continue
            if notice:
                self.notice = notice
                log.warning("spot notices: %s", notice)
                self.on_notice(notice)
                return
