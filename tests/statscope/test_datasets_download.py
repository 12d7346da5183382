"""The download path, for real, against an HTTP server on 127.0.0.1 started by the test."""

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import re
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest

from statscope.errors import StatscopeError, StatscopeWarning
from statscope.experiments import datasets
from statscope.experiments.datasets import load_dataset
from statscope.experiments.download import ChecksumError, UnreachableError, download

_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
          "t10k-labels-idx1-ubyte.gz")


def idx_gz(array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.tobytes(), mtime=0)


def mnist_files(seed=0):
    """{file name: gzipped IDX bytes} of a small random MNIST-format set, and the arrays."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40, np.uint8),
              rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10, np.uint8))
    return {name: idx_gz(a) for name, a in zip(_FILES, arrays)}, arrays


def md5s(files):
    return {name: hashlib.md5(data).hexdigest() for name, data in files.items()}


def dead_url():
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class Server:
    """A static file server on 127.0.0.1 in a thread; counts the requests it answered."""

    def __init__(self, root):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                outer.requests.append(self.path)

        self._httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/data/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()

    def stop(self):
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()


@pytest.fixture
def served(tmp_path):
    """(folder the server publishes as /data/, server)."""
    root = tmp_path / "www"
    (root / "data").mkdir(parents=True)
    server = Server(root)
    yield root / "data", server
    server.stop()


@pytest.fixture(autouse=True)
def no_system_fashion_mnist(isolated_env, monkeypatch):
    """Debian's Fashion-MNIST must not short-circuit the download path under test."""
    spec = dataclasses.replace(datasets._SPECS["fashion-mnist"], system_dirs=())
    monkeypatch.setitem(datasets._SPECS, "fashion-mnist", spec)


def test_good_files_are_downloaded_cached_and_reused_offline(served, isolated_env):
    folder, server = served
    files, arrays = mnist_files()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    ds = load_dataset("mnist", mirrors=[dead_url(), server.url], checksums=md5s(files),
                      quiet=True)
    assert ds.name == "mnist" and ds.source == str(isolated_env / "mnist")
    np.testing.assert_array_equal(ds.train_x.numpy(), arrays[0])
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[3])
    assert sorted(p.name for p in (isolated_env / "mnist").iterdir()) == sorted(_FILES)
    assert sorted(server.requests) == sorted(f"/data/{name}" for name in _FILES)
    server.stop()
    again = load_dataset("mnist", mirrors=[server.url], quiet=True)
    assert again.source == ds.source and len(server.requests) == 4
    np.testing.assert_array_equal(again.train_x.numpy(), arrays[0])


def test_mirror_env_var_and_progress_bar(served, monkeypatch, capsys):
    folder, server = served
    files, _ = mnist_files(seed=1)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    monkeypatch.setenv("STATSCOPE_FASHION_MNIST_URL", f"{dead_url()} {server.url}")
    ds = load_dataset("fashion-mnist", checksums=md5s(files))
    assert ds.name == "fashion-mnist" and len(server.requests) == 4
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_corrupted_file_is_an_md5_error_and_leaves_nothing_in_the_cache(served, isolated_env):
    folder, server = served
    files, _ = mnist_files()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = md5s(files)
    corrupted = bytearray(files["t10k-images-idx3-ubyte.gz"])
    corrupted[100] ^= 0xFF
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(corrupted))
    with pytest.raises(ChecksumError, match=r"t10k-images-idx3-ubyte.gz: expected md5 "
                                            + expected["t10k-images-idx3-ubyte.gz"]
                                            + r", but .* gave md5 "
                                            + hashlib.md5(corrupted).hexdigest()):
        load_dataset("mnist", mirrors=server.url, checksums=expected, quiet=True)
    cached = {p.name for p in (isolated_env / "mnist").iterdir()}
    assert "t10k-images-idx3-ubyte.gz" not in cached
    assert not [name for name in cached if name.startswith(".") or name.endswith(".part")]
    for name in cached:  # whatever was kept before the failure is verified and complete
        assert hashlib.md5((isolated_env / "mnist" / name).read_bytes()).hexdigest() == \
            expected[name]


def test_server_down_mnist_falls_back_to_the_subset_loudly_in_one_short_line(isolated_env):
    url = dead_url()
    with pytest.warns(StatscopeWarning, match=r"its download failed \(" + url[7:-1]
                                              + r": .*refused; not retried for a day\); using "
                                                r"the bundled 'mnist-5k-subset'") as caught:
        ds = load_dataset("mnist", mirrors=[url], quiet=True)
    assert ds.name == "mnist-5k-subset" and ds.train_x.shape[0] == 4000
    message = str(caught[0].message)
    assert "\n" not in message and len(message) < 240 + len(str(isolated_env))
    assert not list(isolated_env.rglob("*.part")) and not list(isolated_env.rglob("*.tmp"))
    marker = json.loads((isolated_env / "mnist" / ".download-failed").read_text())
    assert marker["mirrors"] == [url] and marker["reason"].startswith(url + "train-images")


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_server_down_other_datasets_fail_naming_what_was_tried(name):
    url = dead_url()
    with pytest.raises(StatscopeError, match=rf"name='{name}': not found in .*cache/{name}, "
                                             rf"and its download failed \({url[7:-1]}: "):
        load_dataset(name, mirrors=[url], quiet=True)


def test_a_failed_download_is_remembered_for_a_day_per_dataset_and_mirrors(isolated_env,
                                                                            monkeypatch):
    """The first failure is tried and remembered; later loads skip the network for a day, say
    so in one line, and try again once the day is over, with other mirrors, or when the marker
    is deleted; a download that succeeds forgets the failure."""
    import time

    served_url = dead_url()  # refused at once
    with pytest.warns(StatscopeWarning, match=r"its download failed \("):
        load_dataset("mnist", mirrors=[served_url], quiet=True)
    marker = isolated_env / "mnist" / ".download-failed"
    assert marker.is_file()

    def attempts(**kwargs):
        from statscope.experiments import download as dl

        calls = []
        real = dl.urllib.request.urlopen

        def counting(url, *args, **kw):
            calls.append(url)
            return real(url, *args, **kw)

        monkeypatch.setattr(dl.urllib.request, "urlopen", counting)
        with pytest.warns(StatscopeWarning) as caught:
            load_dataset("mnist", quiet=True, **kwargs)
        monkeypatch.setattr(dl.urllib.request, "urlopen", real)
        return len(calls), str(caught[0].message)

    n, message = attempts(mirrors=[served_url])
    assert n == 0 and re.search(r"its download failed \d+ s ago \(not retried for a day; "
                                r"delete \.download-failed there to retry now\); using the "
                                r"bundled 'mnist-5k-subset'", message), message
    assert attempts(mirrors=[dead_url()])[0] == 1  # other mirrors: tried
    assert attempts(mirrors=[served_url])[0] == 1  # the marker now names the other mirror
    assert attempts(mirrors=[served_url])[0] == 0
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "when": time.time() - 86401}))
    assert attempts(mirrors=[served_url])[0] == 1  # a day later: tried again
    monkeypatch.setenv("STATSCOPE_DOWNLOAD_RETRY", "0")
    assert attempts(mirrors=[served_url])[0] == 1
    monkeypatch.setenv("STATSCOPE_DOWNLOAD_RETRY", "3600")
    assert attempts(mirrors=[served_url])[0] == 0
    marker.unlink()
    assert attempts(mirrors=[served_url])[0] == 1
    monkeypatch.setenv("STATSCOPE_DOWNLOAD_RETRY", "soon")
    with pytest.raises(StatscopeError, match=r"\$STATSCOPE_DOWNLOAD_RETRY='soon': expected "
                                             r"seconds"):
        load_dataset("mnist", mirrors=[served_url], quiet=True)


def test_a_successful_download_forgets_an_earlier_failure(served, isolated_env):
    folder, server = served
    files, _ = mnist_files()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    marker = isolated_env / "mnist" / ".download-failed"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"when": 0, "mirrors": [server.url], "reason": "old"}))
    ds = load_dataset("mnist", mirrors=[server.url], checksums=md5s(files), quiet=True)
    assert ds.name == "mnist" and not marker.exists()


def test_a_damaged_failure_marker_is_ignored(isolated_env):
    url = dead_url()
    marker = isolated_env / "mnist" / ".download-failed"
    marker.parent.mkdir(parents=True)
    marker.write_text("{not json")
    with pytest.warns(StatscopeWarning, match=r"its download failed \(127"):
        load_dataset("mnist", mirrors=[url], quiet=True)
    assert json.loads(marker.read_text())["mirrors"] == [url]


def test_http_errors_move_to_the_next_mirror_and_are_reported(served):
    folder, server = served
    dead = dead_url()
    with pytest.raises(UnreachableError, match=rf"x.bin: could not be downloaded; tried "
                                               rf".*/data/x.bin \(HTTP 404\); {dead}x.bin \("):
        download("x.bin", "0" * 32, [server.url, dead], folder.parent / "dest", quiet=True)
    assert not list((folder.parent / "dest").iterdir())


def test_unknown_checksum_file_name_is_an_error():
    with pytest.raises(StatscopeError, match=r"'train.gz' is not a mnist file; expected "
                                             r"train-images-idx3-ubyte.gz"):
        load_dataset("mnist", checksums={"train.gz": "0" * 32}, mirrors=[dead_url()])


def cifar_archive(seed=0):
    """A tiny cifar-10-python.tar.gz: 4 images per batch, pickled as the original (protocol 2)."""
    rng = np.random.default_rng(seed)
    buffer, batches = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in datasets._CIFAR_BATCHES:
            batches[name] = {b"data": rng.integers(0, 256, (4, 3072), np.uint8),
                             b"labels": rng.integers(0, 10, 4).tolist()}
            payload = pickle.dumps(batches[name], protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue(), batches


def test_cifar_archive_download_with_md5(served, isolated_env):
    folder, server = served
    data, batches = cifar_archive()
    (folder / "cifar-10-python.tar.gz").write_bytes(data)
    md5 = {"cifar-10-python.tar.gz": hashlib.md5(data).hexdigest()}
    ds = load_dataset("cifar10", mirrors=[server.url], checksums=md5, quiet=True)
    archive = isolated_env / "cifar10" / "cifar-10-python.tar.gz"
    assert ds.name == "cifar10" and ds.source == str(archive) and archive.read_bytes() == data
    assert tuple(ds.train_x.shape) == (20, 3, 32, 32) and tuple(ds.test_x.shape) == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.test_x.numpy().reshape(4, -1), batches["test_batch"][b"data"])
    server.stop()
    assert load_dataset("cifar10", mirrors=[server.url]).source == str(archive)


def test_cifar_archive_with_wrong_md5_is_not_kept(served, isolated_env):
    folder, server = served
    data, _ = cifar_archive()
    (folder / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(ChecksumError, match="expected md5 c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", mirrors=[server.url], quiet=True)
    assert not list((isolated_env / "cifar10").iterdir())


def test_cifar_archive_in_a_data_root_is_read_in_place_and_checked(tmp_path, monkeypatch):
    data, batches = cifar_archive(seed=1)
    archive = tmp_path / "env" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(data)
    monkeypatch.setenv("STATSCOPE_DATA", str(archive.parent))
    ds = load_dataset("cifar10", download=False)
    assert ds.source == str(archive) and ds.train_y.tolist()[:4] == batches["data_batch_1"][b"labels"]
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(StatscopeError, match=r"\$STATSCOPE_DATA='.*/env': cifar-10-python.tar.gz "
                                             r"is not a readable CIFAR-10 archive"):
        load_dataset("cifar10", download=False)
    assert archive.read_bytes() == data[: len(data) // 2]


class FaultServer:
    """A server on 127.0.0.1 whose every answer announces ``length`` bytes of ``body`` and then
    sends ``sent`` of them, ``per_write`` at a time, ``pause`` seconds apart."""

    def __init__(self, body: bytes, sent: int, per_write: int = 1 << 16, pause: float = 0.0):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                import time

                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(0, sent, per_write):
                        self.wfile.write(body[i:min(i + per_write, sent)])
                        self.wfile.flush()
                        if pause:
                            time.sleep(pause)
                except OSError:  # the client gave up
                    pass
                self.close_connection = True

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()


def test_a_file_url_mirror_downloads(served, tmp_path):
    folder, _ = served
    (folder / "x.bin").write_bytes(b"statscope" * 1000)
    md5 = hashlib.md5(b"statscope" * 1000).hexdigest()
    got = download("x.bin", md5, [folder.as_uri()], tmp_path / "dest", quiet=True)
    assert got.read_bytes() == b"statscope" * 1000


def test_a_transfer_cut_short_is_a_failed_mirror_and_the_next_one_is_tried(served, tmp_path):
    folder, server = served
    body = bytes(range(256)) * 400
    (folder / "x.bin").write_bytes(body)
    cut = FaultServer(body, sent=len(body) // 2)
    try:
        got = download("x.bin", hashlib.md5(body).hexdigest(), [cut.url, server.url],
                       tmp_path / "dest", quiet=True)
        assert got.read_bytes() == body
        with pytest.raises(UnreachableError, match=r"the transfer ended after 51200 of 102400"):
            download("x.bin", hashlib.md5(body).hexdigest(), [cut.url], tmp_path / "d2",
                     quiet=True)
    finally:
        cut.stop()
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["x.bin"]


def test_a_mirror_that_trickles_is_abandoned(served, tmp_path, monkeypatch):
    # one byte every 0.1 s never lets a per-read timeout fire; the low-speed rule does
    from statscope.experiments import download as D

    monkeypatch.setattr(D, "LOW_SPEED_SECONDS", 1.0)
    folder, server = served
    body = b"slow" * 2000
    (folder / "x.bin").write_bytes(body)
    slow = FaultServer(body, sent=len(body), per_write=1, pause=0.1)
    try:
        got = download("x.bin", hashlib.md5(body).hexdigest(), [slow.url, server.url],
                       tmp_path / "dest", quiet=True, timeout=30)
    finally:
        slow.stop()
    assert got.read_bytes() == body


def test_temporary_files_a_killed_download_left_are_removed(served, tmp_path):
    import os
    import subprocess
    import sys
    import time

    folder, server = served
    (folder / "x.bin").write_bytes(b"data")
    dest = tmp_path / "dest"
    dest.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = dest / f".x.bin.{int(gone.stdout)}.k2j3.part"  # a download killed with kill -9
    live = dest / f".x.bin.{os.getpid()}.zz.part"  # one in progress (this process)
    old = dest / ".x.bin.abc123.part"  # an older name without a pid, two days old
    other = dest / ".y.bin.1.q.part"  # another file's: not this download's business
    for part in (dead, live, old, other):
        part.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    download("x.bin", hashlib.md5(b"data").hexdigest(), [server.url], dest, quiet=True)
    assert sorted(p.name for p in dest.iterdir()) == sorted([live.name, other.name, "x.bin"])


def test_a_cache_that_cannot_be_written_falls_back_to_the_subset_for_mnist(tmp_path,
                                                                          monkeypatch):
    # a read-only cache, offline: as unreachable, not an error before any mirror is tried
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's folder would be")
    monkeypatch.setenv("STATSCOPE_CACHE", str(blocker))
    with pytest.warns(StatscopeWarning, match=r"could not be downloaded: the cache "
                                              r"dest_dir=.*cannot create.*using the bundled"):
        ds = load_dataset("mnist", mirrors=[dead_url()], quiet=True)
    assert ds.name == "mnist-5k-subset"
    with pytest.raises(StatscopeError, match=r"could not be downloaded: the cache"):
        load_dataset("fashion-mnist", mirrors=[dead_url()], quiet=True)


def test_an_empty_split_is_refused_naming_the_file(tmp_path):
    files, _ = mnist_files()
    empty_images = idx_gz(np.zeros((0, 28, 28), np.uint8))
    empty_labels = idx_gz(np.zeros(0, np.uint8))
    files.update({"t10k-images-idx3-ubyte.gz": empty_images,
                  "t10k-labels-idx1-ubyte.gz": empty_labels})
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(StatscopeError, match=r"t10k-images-idx3-ubyte.gz.*holds no images"):
        load_dataset("mnist", tmp_path, download=False)
