"""HTTP for live carbon-intensity providers: timeouts, retries with backoff, secrets kept out of text.

Why a wrapper: every provider needs the same three things, and getting any of them wrong is costly
(a hung request stalls a training run; a burst of retries gets an account throttled; an API key in a
log line or exception leaks into W&B/MLflow). Transient failures (connection errors, timeouts, HTTP
429 and 5xx) are retried with exponential backoff; other HTTP errors fail at once. Redirects are
followed by hand: credentials (the provider's headers, basic auth) go only to the origin they were
meant for, never to the host of a cross-origin redirect (httpx itself strips only `Authorization`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from greenstack.errors import GreenstackError

log = logging.getLogger("greenstack.carbon.providers")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 3
MAX_REDIRECTS = 5
REDACTED = "***"


class ProviderError(GreenstackError):
    """A live provider could not deliver usable data; the message never contains a secret."""


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (API key, password, token) replaced by ***."""
    out = str(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, REDACTED)
    return out


class _Transient(Exception):
    """A failure worth retrying (network error, 429, 5xx); carries a redacted description."""


class HttpClient:
    """GET JSON with a timeout, bounded retries and redaction of the given secrets.

    `transport` lets tests replay recorded responses (httpx.MockTransport) through the same code.
    """

    def __init__(self, base_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None,
                 secrets: Iterable[str | None] = (), provider: str = "provider") -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = max(1, int(retries))
        self.backoff_s = float(backoff_s)
        self.provider = provider
        self.secrets = [s for s in secrets if s]
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(self.timeout_s),
                                    transport=transport, follow_redirects=False)

    def add_secret(self, secret: str | None) -> None:
        """Also redact `secret` (e.g. a session token obtained at login)."""
        if secret:
            self.secrets.append(secret)

    def close(self) -> None:
        self._client.close()

    def get_json(self, path: str, *, params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None) -> Any:
        """GET base_url/path and decode JSON; raises ProviderError (redacted) when it cannot."""

        def before_sleep(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            log.warning("%s: %s; retry %d/%d", self.provider, err, state.attempt_number, self.retries - 1)

        retrying = Retrying(stop=stop_after_attempt(self.retries),
                            wait=wait_exponential(multiplier=self.backoff_s, min=self.backoff_s, max=8.0),
                            retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
                            before_sleep=before_sleep, reraise=True)
        try:
            return retrying(self._get_once, path, params, headers, auth)
        except _Transient as err:
            raise ProviderError(f"{self.provider}: {err} (after {self.retries} attempts)") from None

    def _follow(self, response: httpx.Response) -> httpx.Response:
        """Follow up to MAX_REDIRECTS redirects; a hop to another origin gets no credentials at all."""
        origin = _origin(response.request.url)
        for _ in range(MAX_REDIRECTS):
            nxt = response.next_request
            if not response.has_redirect_location or nxt is None:
                return response
            response.close()
            if _origin(nxt.url) == origin:
                response = self._client.send(nxt)  # same origin: httpx kept the request's own headers
            else:
                log.warning("%s: redirected to another origin (%s); following without credentials",
                            self.provider, _origin(nxt.url))
                response = self._client.send(self._client.build_request("GET", nxt.url))
        return response

    def _get_once(self, path: str, params: Mapping[str, Any] | None, headers: Mapping[str, str] | None,
                  auth: tuple[str, str] | None) -> Any:
        where = f"GET {self.base_url}{path}"
        try:
            response = self._follow(self._client.get(path, params=params, headers=headers, auth=auth))
        except httpx.TimeoutException:
            raise _Transient(redact(f"{where}: timed out after {self.timeout_s:g} s", self.secrets)) from None
        except httpx.TransportError as err:
            raise _Transient(redact(f"{where}: {type(err).__name__}: {err}", self.secrets)) from None
        status = response.status_code
        log.debug("%s -> HTTP %d", redact(where, self.secrets), status)
        if status == 429 or status >= 500:
            raise _Transient(redact(f"{where}: HTTP {status}", self.secrets))
        if status >= 400:
            hint = " (check the credentials in the environment)" if status in (401, 403) else ""
            body = redact(response.text[:200], self.secrets)
            raise ProviderError(redact(f"{self.provider}: {where}: HTTP {status}{hint}: {body}", self.secrets))
        try:
            return response.json()
        except ValueError:
            raise ProviderError(redact(f"{self.provider}: {where}: response is not JSON: "
                                       f"{response.text[:80]!r}", self.secrets)) from None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what "same origin" compares."""
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port
