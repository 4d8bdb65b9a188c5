"""utils.infra.download against a loopback HTTP server: resume with Range, restarts, bad files,
AugReg."""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import http.server
import io
import math
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tqdm

from models.configs import CHECKPOINT_FOLDERS, get_config, model_type_from_filename
from models.modeling import VisionTransformer
from models.npz import load_npz, state_dict_to_npz
from tests.helpers import (
    CIFAR_LAYOUT,
    REPO,
    QuietHandler,
    expect_user_error,
    fake_checkpoint,
    free_port,
    make_cifar_files,
    script_error,
    serve_cifar,
)
from utils.data.loaders import build_test_set
from utils.infra import download as dl
from utils.infra.errors import UserError
from utils.infra.file_io import save_npz

SOURCE = "imagenet21k"


def _fake_npz_bytes(tmp_path: Path, drop: str | None = None) -> bytes:
    """A tiny `testing` model exported in the official layout, as file bytes."""
    config = get_config("testing")
    model = VisionTransformer(config, img_size=32, num_classes=5)
    arrays = state_dict_to_npz(model.state_dict(), config)
    if drop:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(drop)}
    path = tmp_path / "src.npz"
    save_npz(path, arrays)
    return path.read_bytes()


class _Server:
    """A loopback server for `/<source>/<file>.npz` with switchable misbehaviour."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # send only this many bytes of the next response
        self.ignore_range = False
        self.trickle = False  # one byte every 20 ms
        self.no_length = False  # no Content-Length: the body ends when the connection does
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not server.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(status)
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.close_connection = True
                if server.trickle:
                    with contextlib.suppress(OSError):  # until the client hangs up
                        for byte in payload[:2000]:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.02)
                    return
                with contextlib.suppress(OSError):
                    self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def waits(monkeypatch) -> list[float]:
    """Retries do not wait in these tests; the pauses they would make are recorded."""
    waited: list[float] = []
    monkeypatch.setattr(
        dl, "time", types.SimpleNamespace(sleep=waited.append, monotonic=time.monotonic)
    )
    return waited


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def testing_file(monkeypatch) -> str:
    """Make the tiny `testing` model an "official" imagenet21k file for these tests."""
    monkeypatch.setitem(dl.OFFICIAL_FILES[SOURCE], "testing", "")
    return "/imagenet21k/testing.npz"


def _fetch(server: _Server, tmp_path: Path, **kw) -> Path:
    return dl.fetch_checkpoint(
        "testing", SOURCE, str(tmp_path / "ckpt"), server.url, progress=False, **kw
    )


def test_complete_download_is_verified_and_renamed(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    path = _fetch(server, tmp_path)
    assert path == tmp_path / "ckpt" / "testing.npz"
    assert path.read_bytes() == body
    assert not Path(f"{path}.part").exists()
    assert server.requests == [(testing_file, None)]
    assert "Transformer/encoder_norm/scale" in load_npz(path)


def test_interrupted_transfer_resumes_with_range(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    server.cut_after = 50_000
    path = _fetch(server, tmp_path, retries=2)
    assert path.read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]


def test_part_file_survives_failed_run_and_next_run_resumes(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    server.cut_after = 30_000
    with pytest.raises(UserError, match=r"Could not download http://127\.0\.0\.1.*--base_url"):
        _fetch(server, tmp_path, retries=0)
    part = tmp_path / "ckpt" / "testing.npz.part"
    assert part.read_bytes() == body[:30_000]
    assert not (tmp_path / "ckpt" / "testing.npz").exists()
    path = _fetch(server, tmp_path, retries=0)
    assert path.read_bytes() == body
    assert server.requests[-1] == (testing_file, "bytes=30000-")


def test_server_ignoring_range_restarts_cleanly(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    server.ignore_range = True
    part = tmp_path / "ckpt" / "testing.npz.part"
    part.parent.mkdir()
    part.write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    path = _fetch(server, tmp_path)
    assert server.requests == [(testing_file, "bytes=1000-")]
    assert path.read_bytes() == body


def test_complete_part_file_is_finished_without_refetching(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    part = tmp_path / "ckpt" / "testing.npz.part"
    part.parent.mkdir()
    part.write_bytes(body)
    path = _fetch(server, tmp_path)
    assert path.read_bytes() == body
    assert server.requests == [(testing_file, f"bytes={len(body)}-")]  # answered 416


def test_404_names_the_url(server, testing_file, tmp_path) -> None:
    with pytest.raises(UserError, match=r"testing\.npz does not exist \(HTTP 404\).*--base_url"):
        _fetch(server, tmp_path)
    assert not (tmp_path / "ckpt" / "testing.npz").exists()


def test_unreachable_server_suggests_a_mirror(testing_file, tmp_path) -> None:
    port = free_port()  # nobody listens on it
    with pytest.raises(UserError, match=r"Could not download http://127\.0\.0\.1:\d+/.*--base_url"):
        dl.fetch_checkpoint(
            "testing", SOURCE, str(tmp_path), f"http://127.0.0.1:{port}", progress=False, retries=0
        )


@contextlib.contextmanager
def _silent_server() -> Iterator[str]:
    """A server that accepts connections (the system completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_server_that_never_answers_is_given_up_on_after_the_timeout(
    tmp_path, capsys, waits
) -> None:
    argv = ["ViT-B_16", "--dir", str(tmp_path), "--timeout", "0.3", "--retries", "2"]
    start = time.perf_counter()
    with _silent_server() as url:
        err = expect_user_error(dl.main, [*argv, "--base_url", url], capsys)
    assert time.perf_counter() - start < 10  # 3 attempts of 0.3 s, not minutes
    assert f"Could not download {url}/imagenet21k/ViT-B_16.npz (3 attempt(s))" in err
    assert "the server had not answered within 0.3 s (raise --timeout" in err
    assert waits == [1.0, 2.0]  # backoff between the attempts
    assert dl.TIMEOUT == 30.0  # the default: half a minute of silence per attempt


def test_a_trickle_is_given_up_on_and_resumed_later(server, testing_file, tmp_path, waits) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    server.trickle = True  # 50 bytes/s: each read returns within the timeout, forever
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        _fetch(server, tmp_path, retries=1, timeout=0.3)
    assert time.perf_counter() - start < 5
    assert re.search(
        r"\(2 attempt\(s\)\): the server sent \d+ bytes in 0\.\d s, less than 1024 bytes/s "
        r"\(the connection is too slow to finish the file\)",
        str(info.value),
    )
    assert waits == [1.0]
    # Nothing at the final path; what arrived is kept and the next run continues from it.
    ckpt = tmp_path / "ckpt"
    part = ckpt / "testing.npz.part"
    kept = part.stat().st_size
    assert not (ckpt / "testing.npz").exists()
    assert 0 < kept < 100
    assert part.read_bytes() == body[:kept]
    server.trickle = False
    assert _fetch(server, tmp_path).read_bytes() == body
    assert server.requests[-1] == (testing_file, f"bytes={kept}-")


@contextlib.contextmanager
def _scripted_server(pieces: list[bytes], every: float = 0.2) -> Iterator[str]:
    """A server that answers every request with `pieces`, one every `every` seconds (about 20 s
    in all: bounded, so that a client that waits for the end fails instead of hanging)."""
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.05)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):  # until the client hangs up
                conn.recv(65536)
                for piece in pieces:
                    conn.sendall(piece)
                    if stop.wait(every):
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


# A status line, then one header byte every 0.2 s: every read returns within the timeout.
SLOW_HEADERS = [
    b"HTTP/1.1 200 OK\r\n",
    *(bytes([c]) for c in b"X-Slow: " + b"a" * 100),
    b"\r\nContent-Length: 0\r\n\r\n",
]


def test_a_server_slow_to_send_its_headers_is_given_up_on(tmp_path, capsys, waits) -> None:
    argv = ["ViT-B_16", "--dir", str(tmp_path), "--timeout", "0.3", "--retries", "1"]
    start = time.perf_counter()
    with _scripted_server(SLOW_HEADERS) as url:
        err = expect_user_error(dl.main, [*argv, "--base_url", url], capsys)
    assert time.perf_counter() - start < 5  # 2 attempts of 0.3 s, not until the server ends
    assert (
        f"Could not download {url}/imagenet21k/ViT-B_16.npz (2 attempt(s)): the server had not "
        "answered within 0.3 s (raise --timeout for a slow connection)."
    ) in err
    assert waits == [1.0]


def _fetch_cifar(url: str, folder: Path, retries: int) -> None:
    """CIFAR-10's archive from `url`, as `build_test_set` fetches it, with a 0.3 s timeout."""
    dl.fetch_archive(
        f"{url}/{CIFAR10.filename}",
        folder / CIFAR10.filename,
        CIFAR10.tgz_md5,
        CIFAR10.base_folder,
        mirror="the VIT_CIFAR_URL variable at a mirror",
        retries=retries,
        timeout=0.3,
    )


def test_a_cifar_server_slow_to_send_its_headers_is_given_up_on(tmp_path, waits) -> None:
    start = time.perf_counter()
    with _scripted_server(SLOW_HEADERS) as url, pytest.raises(UserError) as info:
        _fetch_cifar(url, tmp_path, retries=0)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    expected = (
        f"Could not download {url}/{CIFAR10.filename} (1 attempt(s)): the server had not "
        "answered within 0.3 s. Check the network connection"
    )
    assert message.startswith(expected), message


def test_a_trickle_inside_a_chunk_header_is_given_up_on(tmp_path, waits) -> None:
    """A chunked body whose chunk-size line never ends: http.client reads it as one line."""
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5;", *[b"x"] * 100]
    start = time.perf_counter()
    with _scripted_server(pieces) as url, pytest.raises(UserError) as info:
        dl.download(f"{url}/file", tmp_path / "file", retries=0, timeout=0.3, progress=False)
    assert time.perf_counter() - start < 5
    assert re.search(
        r"\(1 attempt\(s\)\): the server sent 0 bytes in 0\.\d s, less than 1024 bytes/s \(the "
        r"connection is too slow to finish the file\)",
        str(info.value),
    ), str(info.value)


@pytest.mark.parametrize("no_length", [False, True])
def test_a_body_larger_than_the_file_can_be_is_stopped_and_deleted(
    server, testing_file, tmp_path, monkeypatch, no_length
) -> None:
    # The listed size bounds the download: an announced or an endless larger body is refused.
    monkeypatch.setitem(dl.OFFICIAL_FILES[SOURCE], "testing", "1 MiB")
    server.files[testing_file] = bytes(64 << 20)
    server.no_length = no_length
    with pytest.raises(UserError) as info:
        _fetch(server, tmp_path)
    limit = math.ceil(1.02 * 2**20)
    found = re.match(
        rf"{re.escape(server.url + testing_file)} is larger than the file can be: (\d+) bytes or "
        rf"more, at most {limit} expected\.",
        str(info.value),
    )
    assert found
    # Announced: refused before a byte is written; endless: stopped within a read past the limit.
    if no_length:
        assert limit < int(found.group(1)) <= limit + dl.CHUNK
    else:
        assert int(found.group(1)) == 64 << 20
    assert list((tmp_path / "ckpt").iterdir()) == []
    assert len(server.requests) == 1  # not retried


def test_size_limits_come_from_the_listed_sizes() -> None:
    assert dl._limit("393.7 MiB") == math.ceil(393.7 * 1.02 * 2**20)
    assert dl._limit("2.46 GiB") == math.ceil(2.46 * 1.02 * 2**30) < dl.MAX_CHECKPOINT
    assert dl._limit("") == dl.MAX_CHECKPOINT
    for files in (*dl.OFFICIAL_FILES.values(), dl.AUGREG_SIZES):
        for listed in files.values():
            assert not listed or dl._limit(listed) < dl.MAX_CHECKPOINT


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_folder_is_said_so_without_retries(server, testing_file, tmp_path, capsys,
                                                         waits) -> None:  # fmt: skip
    # /proc refuses new files to every user, root included (a chmod would not stop root).
    for argv in (["ViT-B_16"], ["--list", "--source", "augreg"]):
        err = expect_user_error(
            dl.main, [*argv, "--dir", "/proc", "--base_url", server.url], capsys
        )
        assert "--dir /proc is not writable" in err
    assert server.requests == []
    # Found while downloading, too: one message, no "network" retries.
    server.files[testing_file] = _fake_npz_bytes(tmp_path)
    with pytest.raises(UserError) as info:
        dl.download(server.url + testing_file, "/proc/testing.npz", progress=False)
    assert str(info.value).startswith(
        "Cannot write /proc/testing.npz.part (No such file or directory): this is not a network "
        "problem."
    )
    assert waits == []
    assert len(server.requests) == 1


def _declares_terabytes(tmp_path: Path) -> bytes:
    """An .npz of 16 bytes whose one array declares a 10**6 x 10**6 float32 shape."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cls.npy", header.getvalue() + bytes(16))
    return path.read_bytes()


DELETED = "not a usable testing checkpoint and was deleted"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda tmp: np.random.default_rng(0).bytes(20_000), DELETED),
        (
            lambda tmp: _fake_npz_bytes(tmp, drop="Transformer/encoderblock_1/"),
            r"Missing \d+ key\(s\): Transformer/encoderblock_1/",
        ),
        (_declares_terabytes, DELETED + r": .*declares shape \(1000000, 1000000\) of float32"),
    ],
    ids=["corrupt", "missing keys", "declaring terabytes"],
)
def test_an_unusable_download_is_refused_and_deleted(
    server, testing_file, tmp_path, body, match
) -> None:
    server.files[testing_file] = body(tmp_path)
    with pytest.raises(UserError, match=match):
        _fetch(server, tmp_path)
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--base_url", "notaurl"], "argument --base_url: expected an http:// or https://"),
        (["--timeout", "0"], "argument --timeout: must be above 0, got 0"),
        (["--timeout", "nan"], "argument --timeout: expected a finite number, got nan"),
        (["--retries", "-1"], "argument --retries: cannot be negative, got -1"),
        (["--resolution", "0"], "argument --resolution: must be at least 1, got 0"),
        (["--dir", "{tmp}/a_file"], "--dir {tmp}/a_file is a file, not a folder"),
        (["--dir", "{tmp}/a_file/sub"], "--dir {tmp}/a_file/sub cannot be created"),
    ],
)
def test_bad_flags_are_one_message_and_exit_2(tmp_path, capsys, argv, expected) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = expect_user_error(dl.main, ["ViT-B_16", *argv], capsys)
    assert expected.replace("{tmp}", str(tmp_path)) in err


def test_a_bad_base_url_in_the_environment_is_one_message(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("VIT_BASE_URL", "storage.example/vit")  # no scheme
    err = expect_user_error(dl.main, ["ViT-B_16", "--dir", str(tmp_path)], capsys)
    assert "VIT_BASE_URL: expected an http:// or https:// address" in err


def test_base_url_from_environment(server, testing_file, tmp_path, monkeypatch) -> None:
    server.files[testing_file] = _fake_npz_bytes(tmp_path)
    monkeypatch.setenv("VIT_BASE_URL", server.url + "/")
    path = dl.fetch_checkpoint("testing", SOURCE, str(tmp_path), progress=False)
    assert path.exists()


def test_existing_file_is_kept_unless_forced(server, testing_file, tmp_path) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    dest = tmp_path / "ckpt" / "testing.npz"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    assert _fetch(server, tmp_path).read_bytes() == b"old"
    assert server.requests == []
    assert _fetch(server, tmp_path, force=True).read_bytes() == body


def test_names_sources_and_paths() -> None:
    assert dl.resolve_file("R50-ViT-B_16") == ("R50+ViT-B_16", "R50+ViT-B_16")
    assert dl.resolve_file("ViT-B_16-224", "imagenet21k+imagenet2012") == (
        "ViT-B_16-224",
        "ViT-B_16",
    )
    assert dl.checkpoint_path("ViT-B_16") == Path("checkpoint/ViT-B_16.npz")
    assert dl.checkpoint_path("ViT-B_16", "imagenet21k+imagenet2012", "d") == Path(
        "d/imagenet21k+imagenet2012_ViT-B_16.npz"
    )
    with pytest.raises(UserError, match="It exists in --source imagenet21k\\+imagenet2012"):
        dl.resolve_file("ViT-B_16-224", "imagenet21k")
    # A file only one source has needs no --source and keeps its official name.
    assert dl.default_source("ViT-B_16-224") == "imagenet21k+imagenet2012"
    assert dl.default_source("ViT-B_16") == "imagenet21k"
    assert dl.checkpoint_path("ViT-B_16-224", "imagenet21k+imagenet2012") == Path(
        "checkpoint/ViT-B_16-224.npz"
    )
    with pytest.raises(UserError, match="Unknown --source 'jft'"):
        dl.resolve_file("ViT-B_16", "jft")


def test_list_prints_every_official_file(capsys) -> None:
    dl.main(["--list"])
    out = capsys.readouterr().out
    assert "imagenet21k+imagenet2012:" in out
    assert "  ViT-B_16-224  (330.3 MiB)" in out
    assert "R50+ViT-L_32" in out


def test_cli_unknown_model_exits_2_without_traceback() -> None:
    err = script_error("-m", "utils.download", "ViT-Z_99")
    assert "No official imagenet21k checkpoint named 'ViT-Z_99'" in err
    assert "ViT-B_16" in err


def test_progress_bar_counts_resumed_bytes(server, testing_file, tmp_path, monkeypatch) -> None:
    body = _fake_npz_bytes(tmp_path)
    server.files[testing_file] = body
    server.cut_after = 40_000
    stream = io.StringIO()
    monkeypatch.setattr(dl, "tqdm", functools.partial(tqdm.tqdm, file=stream, mininterval=0))
    dl.fetch_checkpoint("testing", SOURCE, str(tmp_path / "ckpt"), server.url, retries=1)
    lines = stream.getvalue().replace("\r", "\n").splitlines()
    size = tqdm.tqdm.format_sizeof(len(body), divisor=1024)
    half = tqdm.tqdm.format_sizeof(40_000, divisor=1024)
    assert any(line.startswith("testing.npz") and f" {half}/{size} " in line for line in lines)
    assert f" {size}/{size} " in lines[-1]


# ---------------------------------------------------------------------------------------------
# AugReg: a fake augreg/index.csv with the official columns, selected as vit_jax selects.

INDEX_COLUMNS = [
    "name", "ds", "lr", "aug", "wd", "do", "sd", "best_val", "final_val", "final_test",
    "adapt_ds", "adapt_lr", "adapt_steps", "adapt_resolution", "adapt_final_val",
    "adapt_final_test", "params", "infer_samples_per_sec", "filename", "adapt_filename",
]  # fmt: skip
PAPER_NAMES = {"Ti_16": "Ti/16", "B_16": "B/16", "R_Ti_16": "R+Ti/16", "R26_S_32": "R26+S/32"}
PARAMS = {"Ti_16": 5_717_416, "B_16": 86_567_656, "R_Ti_16": 6_337_704, "R26_S_32": 36_431_912}

# The best ImageNet-21k Ti_16 pre-training (the file the official README recommends)...
TI_BEST = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"
# ...and a worse one whose fine-tuning nevertheless scores higher: never picked for "Ti_16".
TI_OTHER = "Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
# Higher final_val than every i21k row, but pre-trained on other data: never picked.
TI_I1K = "Ti_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1"
TI_I21K_30 = "Ti_16-i21k_30-30ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0"
R_TI_BEST = "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"


def _tuned(pretrained: str, ds: str, lr: float, res: int) -> str:
    return f"{pretrained}--{ds}-steps_{20 if ds == 'imagenet2012' else 10}k-lr_{lr}-res_{res}"


# (pre-training file, final_val, [(adapt_ds, adapt_lr, res, adapt_final_val), ...])
PRETRAININGS = [
    (TI_OTHER, 0.531, [("imagenet2012", 0.03, 384, 0.7950), ("cifar100", 0.01, 384, 0.88)]),
    (
        TI_BEST,
        0.552,
        [
            ("imagenet2012", 0.01, 224, 0.7530),
            ("imagenet2012", 0.03, 224, 0.7510),
            ("imagenet2012", 0.01, 384, 0.7790),
            ("imagenet2012", 0.03, 384, 0.7822),
            ("cifar100", 0.001, 224, 0.8710),
            ("oxford_iiit_pet", 0.003, 224, 0.9120),
        ],
    ),
    (TI_I1K, 0.781, [("imagenet2012", 0.01, 224, 0.7390)]),
    (TI_I21K_30, 0.602, [("imagenet2012", 0.03, 384, 0.7200)]),
    ("B_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", 0.6401, []),
    (
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
        0.6513,
        [("imagenet2012", 0.03, 384, 0.8549)],
    ),
    ("B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1", 0.8019, []),
    (R_TI_BEST, 0.4712, [("imagenet2012", 0.03, 384, 0.7540)]),
    ("R_Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.1-sd_0.1", 0.4428, []),
    ("R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", 0.6098, []),
    ("R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0", float("nan"), []),
]


def _index_bytes() -> bytes:
    """augreg/index.csv as the bucket serves it: one row per (pre-training, fine-tuning)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, INDEX_COLUMNS)
    writer.writeheader()
    for filename, final_val, tunings in PRETRAININGS:
        model, ds, _, lr, aug, wd, do, sd = filename.split("-")
        row = {
            "name": PAPER_NAMES[model],
            "ds": ds,
            "lr": lr.removeprefix("lr_"),
            "aug": aug.removeprefix("aug_"),
            "wd": wd.removeprefix("wd_"),
            "do": do.removeprefix("do_"),
            "sd": sd.removeprefix("sd_"),
            "best_val": "" if final_val != final_val else final_val + 0.002,
            "final_val": "" if final_val != final_val else final_val,
            "final_test": "",
            "params": PARAMS[model],
            "infer_samples_per_sec": 3000.0,
            "filename": filename,
        }
        for adapt_ds, adapt_lr, res, adapt_val in tunings or [(None, None, None, None)]:
            tuned = adapt_ds and {
                "adapt_ds": adapt_ds,
                "adapt_lr": adapt_lr,
                "adapt_steps": 20000 if adapt_ds == "imagenet2012" else 10000,
                "adapt_resolution": res,
                "adapt_final_val": adapt_val,
                "adapt_final_test": round(adapt_val - 0.004, 4),
                "adapt_filename": _tuned(filename, adapt_ds, adapt_lr, res),
            }
            writer.writerow({**row, **(tuned or {})})
    return out.getvalue().encode()


def _augreg_npz(tmp_path: Path, model: str, seed: int) -> bytes:
    """A small official-layout file for `model` (Ti_16-sized), distinct per seed."""
    path = tmp_path / f"src-{model}-{seed}.npz"
    save_npz(path, fake_checkpoint(get_config(model), 10, 32, seed=seed))
    return path.read_bytes()


@pytest.fixture
def augreg(server: _Server, tmp_path: Path) -> tuple[_Server, list[dl.AugRegRow]]:
    server.files["/augreg/index.csv"] = _index_bytes()
    index = tmp_path / "index.csv"
    index.write_bytes(server.files["/augreg/index.csv"])
    return server, dl.read_augreg_index(index)


def _requested(server: _Server) -> list[str]:
    return [path for path, _ in server.requests]


def test_augreg_model_downloads_best_i21k_pretraining_verified(augreg, tmp_path) -> None:
    server, _ = augreg
    ckpt = tmp_path / "ckpt"
    for seed, name in enumerate((TI_BEST, TI_OTHER, TI_I1K, TI_I21K_30)):
        server.files[f"/augreg/{name}.npz"] = _augreg_npz(tmp_path, "ViT-Ti_16", seed)
    path = dl.fetch_checkpoint("Ti_16", "augreg", str(ckpt), server.url, progress=False)
    # The official file name, next to the cached index; the bytes of the selected file.
    assert path == ckpt / f"{TI_BEST}.npz"
    assert path.read_bytes() == server.files[f"/augreg/{TI_BEST}.npz"]
    assert _requested(server) == ["/augreg/index.csv", f"/augreg/{TI_BEST}.npz"]
    assert (ckpt / "augreg_index.csv").read_bytes() == server.files["/augreg/index.csv"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["augreg_index.csv", path.name])


def test_augreg_index_is_cached(augreg, tmp_path) -> None:
    server, _ = augreg
    server.files[f"/augreg/{R_TI_BEST}.npz"] = _augreg_npz(tmp_path, "R+ViT-Ti_16", 0)
    server.files[f"/augreg/{TI_OTHER}.npz"] = _augreg_npz(tmp_path, "ViT-Ti_16", 1)
    ckpt = str(tmp_path / "ckpt")
    dl.fetch_checkpoint(TI_OTHER, "augreg", ckpt, server.url, progress=False)
    # A second selection reads the cached index: the only request is for the file.
    path = dl.fetch_checkpoint("R+ViT-Ti_16", None, ckpt, server.url, progress=False)
    assert path.name == f"{R_TI_BEST}.npz"
    assert _requested(server) == [
        "/augreg/index.csv",
        f"/augreg/{TI_OTHER}.npz",
        f"/augreg/{R_TI_BEST}.npz",
    ]
    # --force refreshes the index too.
    dl.fetch_checkpoint("R_Ti_16", "augreg", ckpt, server.url, force=True, progress=False)
    assert _requested(server)[3:] == ["/augreg/index.csv", f"/augreg/{R_TI_BEST}.npz"]


def test_augreg_selection_takes_best_final_val_of_i21k_only(augreg) -> None:
    _, rows = augreg
    assert dl.select_augreg(rows, "Ti_16") == TI_BEST  # not TI_I1K (0.781) nor i21k_30 (0.602)
    assert dl.select_augreg(rows, "B_16").startswith("B_16-i21k-300ep-lr_0.001-aug_medium1-")
    assert dl.select_augreg(rows, "R_Ti_16") == R_TI_BEST
    # A row without a score never wins.
    assert dl.select_augreg(rows, "R26_S_32") == PRETRAININGS[-2][0]


def test_augreg_accepts_registry_names_and_aliases(augreg) -> None:
    _, rows = augreg
    assert dl.select_augreg(rows, "ViT-Ti_16") == TI_BEST
    assert dl.select_augreg(rows, "R+ViT-Ti_16") == R_TI_BEST
    assert dl.select_augreg(rows, "R26+ViT-S_32") == dl.select_augreg(rows, "R26_S_32")
    # Without --source, AugReg spellings and file names mean augreg, and so do registry names
    # that only AugReg has (the rest keep their imagenet21k file).
    assert dl.default_source("Ti_16") == dl.default_source(f"{TI_OTHER}.npz") == "augreg"
    assert dl.default_source(_tuned(TI_BEST, "cifar100", 0.001, 224)) == "augreg"
    assert dl.default_source("R+ViT-Ti_16") == dl.default_source("ViT-S_16") == "augreg"
    assert dl.default_source("ViT-B_16") == dl.default_source("ViT-L_32") == "imagenet21k"
    assert dl.default_source("ViT-H_99") == "imagenet21k"  # whose error lists the choices


def test_augreg_full_file_names(augreg) -> None:
    _, rows = augreg
    assert dl.select_augreg(rows, TI_OTHER) == TI_OTHER
    assert dl.select_augreg(rows, f"{TI_I1K}.npz") == TI_I1K
    tuned = _tuned(TI_OTHER, "cifar100", 0.01, 384)
    assert dl.select_augreg(rows, tuned) == tuned
    # --adapt applies to the named pre-training.
    assert dl.select_augreg(rows, TI_OTHER, "imagenet2012") == _tuned(
        TI_OTHER, "imagenet2012", 0.03, 384
    )
    with pytest.raises(UserError, match="already fine-tuned \\(on cifar100\\); drop --adapt"):
        dl.select_augreg(rows, tuned, "imagenet2012")


def test_augreg_adapt_and_resolution_filters(augreg) -> None:
    _, rows = augreg
    # The fine-tunings of the selected pre-training only (TI_OTHER's 0.795 is not one).
    assert dl.select_augreg(rows, "Ti_16", "imagenet2012") == _tuned(
        TI_BEST, "imagenet2012", 0.03, 384
    )
    assert dl.select_augreg(rows, "Ti_16", "imagenet2012", 384) == _tuned(
        TI_BEST, "imagenet2012", 0.03, 384
    )
    assert dl.select_augreg(rows, "Ti_16", "imagenet2012", 224) == _tuned(
        TI_BEST, "imagenet2012", 0.01, 224
    )
    assert dl.select_augreg(rows, "Ti_16", "cifar100") == _tuned(TI_BEST, "cifar100", 0.001, 224)
    with pytest.raises(UserError) as info:
        dl.select_augreg(rows, "Ti_16", "imagenet2012", 512)
    message = str(info.value)
    assert f"No imagenet2012 fine-tuning at resolution 512 of {TI_BEST}" in message
    for offered in ("imagenet2012 --resolution 224", "imagenet2012 --resolution 384"):
        assert f"--adapt {offered}" in message
    assert "--adapt oxford_iiit_pet --resolution 224" in message
    with pytest.raises(UserError, match="add --adapt DATASET"):
        dl.select_augreg(rows, "Ti_16", resolution=384)
    with pytest.raises(UserError, match="It has no fine-tuned files"):
        dl.select_augreg(rows, "R26_S_32", "imagenet2012")


def test_augreg_adapt_download_keeps_the_official_name(augreg, tmp_path) -> None:
    server, _ = augreg
    tuned = _tuned(TI_BEST, "imagenet2012", 0.01, 224)
    server.files[f"/augreg/{tuned}.npz"] = _augreg_npz(tmp_path, "ViT-Ti_16", 3)
    path = dl.fetch_checkpoint(
        "ViT-Ti_16",
        "augreg",
        str(tmp_path),
        server.url,
        adapt="imagenet2012",
        resolution=224,
        progress=False,
    )
    assert path == tmp_path / f"{tuned}.npz"
    assert path.read_bytes() == server.files[f"/augreg/{tuned}.npz"]


def test_augreg_unknown_names_suggest_close_ones(augreg, tmp_path, capsys) -> None:
    server, rows = augreg
    with pytest.raises(UserError, match=r"No AugReg ImageNet-21k checkpoint for model 'Ti_61'\. "
                       r"Closest: Ti_16"):  # fmt: skip
        dl.select_augreg(rows, "Ti_61")
    typo = TI_BEST.replace("wd_0.03", "wd_0.3")
    with pytest.raises(UserError, match=f"Closest: {re.escape(TI_BEST)}"):
        dl.select_augreg(rows, typo)
    with pytest.raises(UserError, match=r"for model 'ViT-S_16' \(S_16\)\. Closest: B_16"):
        dl.select_augreg(rows, "ViT-S_16")  # no S_16 rows in this index
    argv = ["B_61", "--source", "augreg", "--dir", str(tmp_path), "--base_url", server.url]
    err = expect_user_error(dl.main, argv, capsys)
    assert "'B_61'" in err
    assert "Closest: B_16" in err
    assert "Models: B_16, R26_S_32, R_Ti_16, Ti_16." in err


def test_a_download_that_is_not_the_index_is_refused(server, tmp_path) -> None:
    server.files["/augreg/index.csv"] = b"<html>Sign in to continue</html>"
    with pytest.raises(UserError, match="not the AugReg index: it has no column"):
        dl.fetch_checkpoint("B_16", "augreg", str(tmp_path), server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name", [f"Ti_16-x/../../{TI_BEST}", "../escaped", "..", ".hidden", "a\\b", "a b", "x" * 201]
)
def test_an_index_naming_files_outside_dir_is_refused(augreg, tmp_path, capsys, name) -> None:
    server, _ = augreg
    server.files["/augreg/index.csv"] = _index_bytes().replace(
        f"{TI_BEST},".encode(), f"{name},".encode(), 1
    )
    ckpt = tmp_path / "a" / "ckpt"
    argv = ["Ti_16", "--source", "augreg", "--dir", str(ckpt), "--base_url", server.url]
    err = expect_user_error(dl.main, argv, capsys)
    assert f"names the file {name!r}, which is not a plain file name" in err
    assert "could be written outside --dir" in err
    assert _requested(server) == ["/augreg/index.csv"]  # no checkpoint fetched
    assert list(ckpt.iterdir()) == []  # and the index not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "index.csv"]
    # A cached copy is refused the same way.
    (ckpt / dl.AUGREG_INDEX).write_bytes(server.files["/augreg/index.csv"])
    with pytest.raises(UserError, match="not a plain file name"):
        dl.augreg_index(str(ckpt), server.url)


def test_list_augreg_table(augreg, tmp_path, capsys) -> None:
    server, _ = augreg
    base = ["--list", "--source", "augreg", "--dir", str(tmp_path), "--base_url", server.url]
    dl.main([*base, "Ti_16"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "model", "data", "aug", "wd", "do", "sd", "final_val", "params", "size", "file",
    ]  # fmt: skip
    rows = [line for line in lines[1:] if "Ti_16-" in line]
    assert len(rows) == 4  # one line per pre-training file, not per fine-tuning
    assert all(line.split()[-1].startswith("Ti_16-") for line in rows)
    starred = [line for line in rows if line.startswith("*")]
    assert len(starred) == 1
    # Known size of the recommended file; its hyper-parameters and score as columns.
    assert starred[0].split() == [
        "*", "Ti_16", "i21k", "none", "0.03", "0.0", "0.0", "0.5520", "5717416", "37", "MiB",
        TI_BEST,
    ]  # fmt: skip
    dl.main([*base, "ViT-Ti_16", "--adapt", "imagenet2012", "--resolution", "384"])
    lines = capsys.readouterr().out.splitlines()
    files = [line.split()[-1] for line in lines[1:] if "--imagenet2012-" in line]
    assert sorted(files) == sorted(
        [
            _tuned(TI_OTHER, "imagenet2012", 0.03, 384),
            _tuned(TI_BEST, "imagenet2012", 0.03, 384),
            _tuned(TI_BEST, "imagenet2012", 0.01, 384),
            _tuned(TI_I21K_30, "imagenet2012", 0.03, 384),
        ]
    )
    # The star marks what the same flags download, not the best score in the table (0.795).
    assert [line.split()[-1] for line in lines if line.startswith("*  ")] == [
        _tuned(TI_BEST, "imagenet2012", 0.03, 384)
    ]
    assert _requested(server) == ["/augreg/index.csv"]  # fetched once, then cached


def test_every_local_file_name_says_its_model() -> None:
    assert set(dl.SOURCES) == set(CHECKPOINT_FOLDERS)
    for source, files in dl.OFFICIAL_FILES.items():
        for stem in files:
            model = dl.resolve_file(stem, source)[1]
            assert get_config(model)  # a registered model
            assert model_type_from_filename(dl.checkpoint_path(stem, source)) == model
    # AugReg files keep their official name, which says the model too.
    assert model_type_from_filename(dl.checkpoint_path(R_TI_BEST, "augreg")) == "R+ViT-Ti_16"


def test_sam_and_gsam_folders() -> None:
    assert dl.resolve_file("ViT-B_16", "sam") == ("ViT-B_16", "ViT-B_16")
    # GSAM files are named like the plain model but hold the `gap` one.
    assert dl.resolve_file("ViT-S_32", "gsam") == ("ViT-S_32", "ViT-S_32-gap-norep")
    assert dl.checkpoint_path("ViT-S_32", "gsam") == Path("checkpoint/gsam_ViT-S_32.npz")
    assert dl.checkpoint_path("ViT-S_16", "sam", "d") == Path("d/sam_ViT-S_16.npz")
    with pytest.raises(UserError, match="It exists in --source sam, gsam, augreg"):
        dl.resolve_file("ViT-S_16")
    listing = dl.list_files("gsam")
    assert "gsam:\n  ViT-S_16  (model ViT-S_16-gap-norep)" in listing
    assert "imagenet21k" not in listing.split("Base URL")[0]
    with pytest.raises(UserError, match="--adapt and --resolution choose among AugReg files"):
        dl.fetch_checkpoint("ViT-B_16", "sam", adapt="imagenet2012")


# ---------------------------------------------------------------------------------------------
# CIFAR archives: the machinery above (timeout, retries, one message), a mirror, MD5, safe unpack.

CIFAR10 = CIFAR_LAYOUT["cifar10"][0]
ARCHIVE = f"/mirror/{CIFAR10.filename}"


@pytest.fixture
def cifar(server, monkeypatch, tmp_path) -> Iterator[tuple[_Server, Path]]:
    """A tiny CIFAR-10 (8 images per file) on the mirror `VIT_CIFAR_URL` names; torchvision's
    own address (another loopback server) must never be asked."""
    with serve_cifar("cifar10", monkeypatch, tmp_path):
        server.files[ARCHIVE] = (tmp_path / "www" / CIFAR10.filename).read_bytes()
        monkeypatch.setenv("VIT_CIFAR_URL", f"{server.url}/mirror/")
        yield server, tmp_path / "data"
        assert QuietHandler.requests == []


def test_cifar_comes_from_the_mirror_variable(cifar) -> None:
    server, data = cifar
    test_set, classes = build_test_set("cifar10", str(data), 32)
    assert len(test_set) == 8
    assert classes == [f"class_{i:03d}" for i in range(10)]
    assert server.requests == [(ARCHIVE, None)]
    assert sorted(p.name for p in data.iterdir()) == [CIFAR10.base_folder, CIFAR10.filename]
    build_test_set("cifar10", str(data), 32)
    assert len(server.requests) == 1  # found locally the second time


def test_a_cifar_server_that_never_answers_times_out(tmp_path, waits) -> None:
    start = time.perf_counter()
    with _silent_server() as url, pytest.raises(UserError) as info:
        _fetch_cifar(url, tmp_path, retries=1)
    assert time.perf_counter() - start < 10
    assert str(info.value) == (
        f"Could not download {url}/{CIFAR10.filename} (2 attempt(s)): the server had not "
        "answered within 0.3 s. Check the network connection, or point the VIT_CIFAR_URL "
        "variable at a mirror. Running the command again resumes a partial download."
    )
    assert waits == [1.0]


def test_a_damaged_cifar_folder_is_named_not_called_a_network_failure(cifar) -> None:
    server, data = cifar
    build_test_set("cifar10", str(data), 32)
    damaged = data / CIFAR10.base_folder / "data_batch_2"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(UserError) as info:
        build_test_set("cifar10", str(data), 32)
    assert str(info.value).startswith(
        f"{data / CIFAR10.base_folder} is damaged: data_batch_2 missing or not the published "
        f"file(s) (MD5). Delete the folder {data / CIFAR10.base_folder}"
    )
    assert len(server.requests) == 1  # nothing downloaded again, nothing replaced
    assert damaged.exists()


def test_a_damaged_cifar_archive_is_named_and_kept(cifar) -> None:
    server, data = cifar
    data.mkdir()
    archive = data / CIFAR10.filename
    archive.write_bytes(server.files[ARCHIVE][:-100])
    with pytest.raises(UserError) as info:
        build_test_set("cifar10", str(data), 32)
    assert str(info.value) == (
        f"{archive} is damaged: its MD5 is not the published {CIFAR10.tgz_md5}. Delete it to "
        "download it again."
    )
    assert server.requests == []
    assert archive.exists()


def test_a_download_that_is_not_the_cifar_archive_is_deleted(cifar) -> None:
    server, data = cifar
    server.files[ARCHIVE] = b"<html>mirror maintenance</html>"
    with pytest.raises(UserError, match=r"is not the published cifar-10-python\.tar\.gz .*deleted"):
        build_test_set("cifar10", str(data), 32)
    assert list(data.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "link"),
    [
        ("../escaped", None),
        ("{tmp}/escaped", None),  # an absolute path
        (f"{CIFAR10.base_folder}/../../escaped", None),
        ("elsewhere/data_batch_1", None),
        (f"{CIFAR10.base_folder}/data_batch_1", "/etc/passwd"),
    ],
)
def test_an_archive_member_outside_its_folder_is_never_unpacked(
    cifar, monkeypatch, name, link
) -> None:
    server, data = cifar
    name = name.replace("{tmp}", str(data.parent))
    files = make_cifar_files("cifar10")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file, payload in files.items():
            info = tarfile.TarInfo(f"{CIFAR10.base_folder}/{file}")
            info.size = len(payload)
            if f"{CIFAR10.base_folder}/{file}" != name:
                tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    server.files[ARCHIVE] = buffer.getvalue()
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(buffer.getvalue()).hexdigest())
    with pytest.raises(UserError) as info:
        build_test_set("cifar10", str(data), 32)
    assert str(info.value) == (
        f"{data / CIFAR10.filename} holds {name!r}, not a file inside {CIFAR10.base_folder}/: it "
        "is not the published archive and was not unpacked. Delete it to download it again."
    )
    assert sorted(p.name for p in data.iterdir()) == [CIFAR10.filename]
    assert not list(data.parent.rglob("escaped"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_cifar_folder_is_said_so_without_retries(cifar, waits) -> None:
    server, _ = cifar
    with pytest.raises(UserError) as info:
        build_test_set("cifar10", "/proc", 32)
    assert str(info.value).startswith(
        f"Cannot write /proc/{CIFAR10.filename}.part (No such file or directory): this is not a "
        "network problem."
    )
    assert waits == []
    assert len(server.requests) == 1


def test_the_command_an_error_suggests_works_as_typed(tmp_path) -> None:
    """It names the interpreter running the script, not a `python3` that may lack torch."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    failed = subprocess.run(
        [sys.executable, "-m", "utils.download", "NoSuch"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2
    suggested = re.search(r"\((\S+ -m utils\.download --list) shows all\)", failed.stderr).group(1)
    listed = subprocess.run(
        ["bash", "-c", suggested], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "ViT-B_16" in listed.stdout
