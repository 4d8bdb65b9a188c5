"""utils.download against a loopback HTTP server: resume with Range, restarts, bad files."""

from __future__ import annotations

import functools
import http.server
import io
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tqdm

from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import load_npz, state_dict_to_npz
from utils import download as dl
from utils.errors import UserError
from utils.file_io import save_npz

ROOT = Path(__file__).resolve().parents[1]
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
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


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
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError, match=r"Could not download http://127\.0\.0\.1:\d+/.*--base_url"):
        dl.fetch_checkpoint(
            "testing", SOURCE, str(tmp_path), f"http://127.0.0.1:{port}", progress=False, retries=0
        )


def test_corrupt_download_is_deleted(server, testing_file, tmp_path) -> None:
    server.files[testing_file] = np.random.default_rng(0).bytes(20_000)
    with pytest.raises(UserError, match="not a usable testing checkpoint and was deleted"):
        _fetch(server, tmp_path)
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_download_missing_model_keys_is_rejected(server, testing_file, tmp_path) -> None:
    server.files[testing_file] = _fake_npz_bytes(tmp_path, drop="Transformer/encoderblock_1/")
    with pytest.raises(UserError, match=r"Missing \d+ key\(s\): Transformer/encoderblock_1/"):
        _fetch(server, tmp_path)
    assert list((tmp_path / "ckpt").iterdir()) == []


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
    # Every official file maps to a registered model.
    for source, files in dl.OFFICIAL_FILES.items():
        for stem in files:
            assert get_config(dl.resolve_file(stem, source)[1])


def test_list_prints_every_official_file(capsys) -> None:
    dl.main(["--list"])
    out = capsys.readouterr().out
    assert "imagenet21k+imagenet2012:" in out
    assert "  ViT-B_16-224  (330.3 MiB)" in out
    assert "R50+ViT-L_32" in out


def test_cli_unknown_model_exits_2_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "utils.download", "ViT-Z_99"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "No official imagenet21k checkpoint named 'ViT-Z_99'" in result.stderr
    assert "ViT-B_16" in result.stderr
    assert "Traceback" not in result.stderr


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
