"""The command line's side of a running engine: HTTP requests with the API key, and a progress line."""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.error
import urllib.request


class ClientError(Exception):
    """A request to the engine failed; the message says why (with the engine's own message)."""


class Progress:
    """One status line on stderr: rewritten in place on a terminal, every tenth of the way otherwise."""

    def __init__(self, label: str, total: int, stream=sys.stderr) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self.shown = -1

    def update(self, done: int, nbytes: int) -> None:
        tenth = done * 10 // max(1, self.total)
        if not self.tty and tenth == self.shown and done != self.total:
            return
        self.shown = tenth
        seconds = max(1e-6, time.monotonic() - self.started)
        width = 30
        bar = "#" * (done * width // max(1, self.total))
        line = (f"{self.label} [{bar:<{width}}] {done}/{self.total} shards  {nbytes / 2**20:.1f} MiB  "
                f"{nbytes / 2**20 / seconds:.1f} MiB/s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def request(url: str, key: str, method: str = "GET", body: object = None):
    """Open `url` with the API key (a JSON body if given); every failure (a refusal with the engine's
    message, a bad URL, no answer) becomes one ClientError, so the commands print one line."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"x-api-key": key, **({"content-type": "application/json"} if data is not None else {})}
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"{url} is not a URL: give --url as http://HOST:PORT")
    try:
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, timeout=600)
    except ValueError as exc:  # no scheme, a broken host part
        raise ClientError(f"{url} is not a URL ({exc}); give --url as http://HOST:PORT") from None
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ClientError(f"{method} {url}: {exc.code} {message}") from None
    except urllib.error.URLError as exc:
        raise ClientError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # a reset or a timeout after connecting
        raise ClientError(f"no answer from {url}: {exc or type(exc).__name__}") from None


def get_json(url: str, key: str, method: str = "GET", body: object = None) -> dict:
    """`request`, and its answer as a JSON object (a ClientError when it is none: not an engine)."""
    with request(url, key, method, body) as r:
        raw = r.read()
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ClientError(f"{url} did not answer with JSON: is the URL a tellodb router?")
    return found
