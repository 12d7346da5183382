"""The app served by waitress: several pages at once, request size caps, clean errors."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from statscope.dashboards import create_app
from statscope.dashboards.limits import MAX_REQUEST_BYTES
from statscope.dashboards.server import ServeError, bind
from statscope.errors import StatscopeError


@pytest.fixture
def served(store_root):
    app = create_app(store_root, warm=False)
    server = bind(app, "127.0.0.1", 0, threads=4).start()
    yield server
    server.stop()


def _callback(search: str) -> dict:
    """The request a page sends for its evolution figure when its URL is ``search``."""
    return {"output": "evolution-graph.figure",
            "outputs": {"id": "evolution-graph", "property": "figure"},
            "inputs": [{"id": "url", "property": "search", "value": search},
                       {"id": "version", "property": "data", "value": None},
                       {"id": "evolution-zoom", "property": "data", "value": None}],
            "changedPropIds": ["url.search"], "state": []}


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _get(url: str, timeout: float = 60) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_several_pages_at_once_all_get_their_figures(served):
    """Eight clients, each loading the page and asking for its own view, at the same time."""
    base = served.url
    views = [f"?run={r}&neuron=fc{1 + i % 2}:{i % 4}&window=last:{50 + 10 * i}"
             for i, r in enumerate(["bs4", "bs128"] * 4)]

    def client(search):
        results = [_get(base)[0], _get(base + "_dash-layout")[0],
                   _get(base + "_dash-dependencies")[0]]
        status, body = _post(base + "_dash-update-component",
                             json.dumps(_callback(search)).encode())
        results.append(status)
        fig = json.loads(body)["response"]["evolution-graph"]["figure"]
        return results, fig

    with ThreadPoolExecutor(len(views)) as pool:
        answers = list(pool.map(client, views, timeout=120))
    for search, (codes, fig) in zip(views, answers):
        assert codes == [200, 200, 200, 200]
        runs = {t["meta"]["run"] for t in fig["data"]}
        assert runs == {search.split("&")[0][5:]}
        n = int(search.rsplit(":", 1)[1])
        stat = [t for t in fig["data"] if t["meta"].get("stat") == "bn_mean"][0]
        assert stat["x"]["dtype"] in ("i1", "i2", "i4")  # typed arrays, as plotly sends them
        assert len(json.dumps(stat["x"])) > 0 and n > 0


def test_an_oversized_request_is_refused(served):
    """The declared length is enough: the server answers 413 before reading a byte of it."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        conn.putrequest("POST", "/_dash-update-component")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_binding_a_taken_port_or_an_unknown_host_fails_cleanly(store_root):
    app = create_app(store_root, warm=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"--port={port}: already in use") as info:
            bind(app, "127.0.0.1", port)
    assert info.value.exit_code == 1
    with pytest.raises(StatscopeError, match="--host='no-such-host.invalid'") as info:
        bind(app, "no-such-host.invalid", 0)
    assert info.value.exit_code == 2
    with pytest.raises(StatscopeError, match="--port=70000"):
        bind(app, "127.0.0.1", 70000)


def test_stop_ends_the_server_thread(store_root):
    server = bind(create_app(store_root, warm=False), "127.0.0.1", 0).start()
    assert _get(server.url)[0] == 200
    server.stop()
    assert not server._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "statscope-server"]
