"""The app served by waitress: several pages at once, request size caps, clean errors."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from statscope.dashboards import create_app
from statscope.dashboards.callbacks import POLL_MAX_AGE
from statscope.dashboards.limits import MAX_REQUEST_BYTES
from statscope.dashboards.selection import view_key
from statscope.dashboards.server import ServeError, bind
from statscope.dashboards.state import ViewState
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


def _poll_body(version=None) -> dict:
    """The request a page's 2-second poll sends."""
    return {"output": "..version.data...run-status.children...notice.children..",
            "outputs": [{"id": "version", "property": "data"},
                        {"id": "run-status", "property": "children"},
                        {"id": "notice", "property": "children"}],
            "inputs": [{"id": "poll", "property": "n_intervals", "value": 1}],
            "changedPropIds": ["poll.n_intervals"],
            "state": [{"id": "version", "property": "data", "value": version}]}


def _sync_body(base: str, values: dict, changed: list[str]) -> dict:
    """The request of the selectors' sync callback, its inputs set from ``values``."""
    deps = json.loads(_get(base + "_dash-dependencies")[1])
    (sync,) = [d for d in deps if d["output"].startswith("..url.search")]
    inputs = [{"id": i["id"], "property": i["property"],
               "value": values.get(f"{i['id']}.{i['property']}")} for i in sync["inputs"]]
    outputs = [dict(zip(("id", "property"), o.split("."))) for o in
               sync["output"].strip(".").split("...")]
    return {"output": sync["output"], "outputs": outputs, "inputs": inputs,
            "changedPropIds": changed, "state": []}


def test_a_root_renamed_while_served_is_a_notice_not_an_http_500(store_root, caplog):
    app = create_app(store_root, warm=False)
    server = bind(app, "127.0.0.1", 0, threads=2).start()
    try:
        url = server.url + "_dash-update-component"
        status, body = _post(url, json.dumps(_poll_body()).encode())
        assert status == 200
        version = json.loads(body)["response"]["version"]["data"]
        assert set(version) == {"bs4", "bs128"}
        store_root.rename(store_root.with_name("moved"))
        time.sleep(POLL_MAX_AGE + 0.2)  # one rescan serves every page's polls this long
        status, body = _post(url, json.dumps(_poll_body(version)).encode())
        assert status == 200, body[-2000:]
        answer = json.loads(body)["response"]
        assert answer["version"]["data"] == {}
        assert f"No statscope runs under {store_root}" in json.dumps(answer["notice"])
        store_root.with_name("moved").rename(store_root)
        time.sleep(POLL_MAX_AGE + 0.2)
        status, body = _post(url, json.dumps(_poll_body({})).encode())
        assert status == 200
        assert set(json.loads(body)["response"]["version"]["data"]) == {"bs4", "bs128"}
    finally:
        server.stop()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


SYNC = {"url.search": "?run=bs4", "runs.value": ["bs4"], "neurons.value": ["fc1:0"],
        "layer.value": "fc1", "stat.value": "bn_std", "win-kind.value": "last",
        "win-n.value": 200, "scale.value": "raw", "by.value": "neuron",
        "tab.value": "evolution", "page.value": 0, "scalars.value": ["loss"]}


@pytest.mark.parametrize("name, body", [
    ("search a number", lambda base: _callback(12345)),
    ("search a list", lambda base: _callback(["?run=bs4"])),
    ("search an object", lambda base: _callback({"run": "bs4"})),
    ("relayout strings", lambda base: _zoom_body({"xaxis.range[0]": "abc",
                                                  "xaxis.range[1]": "def"})),
    ("relayout a list of strings", lambda base: _zoom_body({"xaxis.range": ["a", 3]})),
    ("relayout a null end", lambda base: _zoom_body({"xaxis.range[0]": None,
                                                    "xaxis.range[1]": 3})),
    ("relayout not an object", lambda base: _zoom_body([1, 2])),
    ("search_value a number", lambda base: _sync_body(
        base, {**SYNC, "neurons.search_value": 5}, ["neurons.search_value"])),
    ("runs a list of objects", lambda base: _sync_body(
        base, {**SYNC, "runs.value": [{"a": 1}]}, ["runs.value"])),
    ("runs a string", lambda base: _sync_body(base, {**SYNC, "runs.value": "bs4"},
                                              ["runs.value"])),
    ("neurons numbers", lambda base: _sync_body(base, {**SYNC, "neurons.value": [1, 2]},
                                                ["neurons.value"])),
    ("click garbage", lambda base: _sync_body(
        base, {**SYNC, "scatter-graph.clickData": {"points": ["x"]}}, ["scatter-graph.clickData"])),
    ("stat unhashable", lambda base: _sync_body(base, {**SYNC, "stat.value": ["bn_std"]},
                                                ["stat.value"])),
    ("window n infinite", lambda base: _sync_body(base, {**SYNC, "win-n.value": 1e999},
                                                  ["win-n.value"])),
    ("an unknown output", lambda base: {**_callback("?run=bs4"), "output": "nope.figure"}),
    ("no inputs", lambda base: {"output": "evolution-graph.figure",
                                "outputs": {"id": "evolution-graph", "property": "figure"}}),
    ("inputs not objects", lambda base: {**_callback("?run=bs4"), "inputs": [1, 2, 3]}),
    ("not an object", lambda base: ["evolution-graph.figure"]),
    ("zoom store of garbage", lambda base: {
        **_callback("?run=bs4"), "inputs": [
            {"id": "url", "property": "search", "value": "?run=bs4"},
            {"id": "version", "property": "data", "value": None},
            {"id": "evolution-zoom", "property": "data",
             "value": {"view": view_key(ViewState.from_query("?run=bs4")), "range": ["a", "b"],
                       "axis": "q"}}]}),
])
def test_a_malformed_callback_request_is_answered_without_a_server_error(served, caplog, name,
                                                                        body):
    """Any client can post to the callback endpoint: a value of the wrong type is ignored or
    refused, never an HTTP 500 with a traceback in the server's log."""
    status, answer = _post(served.url + "_dash-update-component",
                           json.dumps(body(served.url)).encode())
    assert status < 500, answer[-3000:]
    assert b"Traceback" not in answer
    assert not [r for r in caplog.records if r.levelname == "ERROR"], name


def _zoom_body(relayout) -> dict:
    """The request that stores a zoom of the evolution figure."""
    return {"output": "evolution-zoom.data",
            "outputs": {"id": "evolution-zoom", "property": "data"},
            "inputs": [{"id": "evolution-graph", "property": "relayoutData", "value": relayout}],
            "changedPropIds": ["evolution-graph.relayoutData"],
            "state": [{"id": "url", "property": "search", "value": "?run=bs4"}]}
