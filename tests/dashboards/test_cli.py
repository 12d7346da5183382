"""``statscope dashboard``: through ``register``/``run_dashboard`` and once as a subprocess."""

import argparse
import socket
import subprocess
import sys

import pytest

from statscope.commands import dashboard as cmd
from statscope.errors import StatscopeError


def _parse(argv):
    parser = argparse.ArgumentParser(prog="statscope")
    cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_defaults_bind_localhost_and_open_a_browser():
    args = _parse(["dashboard", "runs/"])
    assert (args.path, args.host, args.port, args.no_browser) == ("runs/", "127.0.0.1", 8050, False)
    assert args.func is cmd.run_dashboard


@pytest.fixture
def served(monkeypatch):
    """Capture the server run_dashboard binds instead of serving forever; closed afterwards."""
    from statscope.dashboards.server import Server

    out = {}
    monkeypatch.setattr(Server, "run", lambda self: out.update(server=self))
    yield out
    if "server" in out:
        out["server"].stop()


def test_serves_the_runs_through_waitress_without_a_development_warning(store_root, served,
                                                                         capsys):
    assert cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser",
                                     "--port", "0"])) == 0
    server = served["server"]
    assert server.host == "127.0.0.1" and server.port > 0
    assert type(server._server).__module__.startswith("waitress")
    err = capsys.readouterr().err
    assert "2 run(s)" in err and f":{server.port}/" in err
    assert "development server" not in err.lower()


def test_binding_every_interface_warns(store_root, served, capsys):
    cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser", "--host", "0.0.0.0",
                              "--port", "0"]))
    assert "no authentication" in capsys.readouterr().err


def test_a_bad_host_is_one_usage_error(store_root, capsys):
    from statscope.cli import main

    assert main(["dashboard", str(store_root), "--no-browser", "--host", "no-such-host.invalid",
                 "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("statscope: error: --host='no-such-host.invalid'")
    assert "Traceback" not in "".join(err)


def test_a_port_in_use_is_one_runtime_error_from_the_command_line(store_root):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = "import sys; from statscope.cli import main; sys.exit(main(sys.argv[1:]))"
        out = subprocess.run([sys.executable, "-c", code, "dashboard", str(store_root),
                              "--no-browser", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (f"statscope: error: --port={port}: already in use on 127.0.0.1; stop "
                         "what listens there or choose another port with --port")
    assert "Traceback" not in out.stderr


def test_a_corrupt_store_among_good_ones_is_a_warning(store_root, served, capsys):
    (store_root / "broken").mkdir()
    (store_root / "broken" / "zarr.json").write_text("{")
    assert cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser",
                                     "--port", "0"])) == 0
    assert "skipping run 'broken'" in capsys.readouterr().err


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no statscope runs found"),
    (lambda p: p.write_text("x"), "not a folder"),
])
def test_bad_paths_raise_a_clear_error(tmp_path, setup, message):
    path = tmp_path / "runs"
    setup(path)
    with pytest.raises(StatscopeError, match=message):
        cmd.run_dashboard(_parse(["dashboard", str(path), "--no-browser"]))


def test_cli_subprocess_reports_an_empty_folder(tmp_path):
    code = "import sys; from statscope.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "dashboard", str(tmp_path), "--no-browser"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "no statscope runs found" in out.stderr


def test_the_command_serves_pages_and_stops_on_ctrl_c(store_root):
    """The real command: it prints where it serves, answers, prints no development warning,
    and Ctrl-C (SIGINT) ends it cleanly."""
    import re
    import signal
    import urllib.request

    code = "import sys; from statscope.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "dashboard", str(store_root),
                             "--no-browser", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the one line saying where; blocks until it is printed
        url = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert url, line
        with urllib.request.urlopen(url.group(1), timeout=60) as r:
            assert r.status == 200 and b"statscope" in r.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        err = line + proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
    assert "development server" not in err.lower() and "Traceback" not in err
