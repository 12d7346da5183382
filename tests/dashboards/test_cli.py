"""``statscope dashboard``: through ``register``/``run_dashboard`` and once as a subprocess."""

import argparse
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


def test_serves_the_runs_without_debug(store_root, monkeypatch, capsys):
    served = {}
    monkeypatch.setattr(cmd, "_serve", lambda app, host, port: served.update(app=app, host=host,
                                                                             port=port))
    assert cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser",
                                     "--port", "8123"])) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    assert served["app"].catalog.names() == ["bs4", "bs128"]
    assert "2 run(s)" in capsys.readouterr().err


def test_run_calls_flask_with_debug_off(store_root, monkeypatch):
    calls = {}
    from dash import Dash

    monkeypatch.setattr(Dash, "run", lambda self, **kw: calls.update(kw))
    cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser"]))
    assert calls["debug"] is False and calls["host"] == "127.0.0.1"


def test_binding_every_interface_warns(store_root, monkeypatch, capsys):
    monkeypatch.setattr(cmd, "_serve", lambda *a: None)
    cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser", "--host", "0.0.0.0"]))
    assert "no authentication" in capsys.readouterr().err


def test_a_corrupt_store_among_good_ones_is_a_warning(store_root, monkeypatch, capsys):
    (store_root / "broken").mkdir()
    (store_root / "broken" / "zarr.json").write_text("{")
    monkeypatch.setattr(cmd, "_serve", lambda *a: None)
    assert cmd.run_dashboard(_parse(["dashboard", str(store_root), "--no-browser"])) == 0
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
