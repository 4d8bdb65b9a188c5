"""Download official ViT checkpoints into `checkpoint/`, resumably.

    python -m utils.download ViT-B_16                                  # imagenet21k
    python -m utils.download ViT-B_16 --source imagenet21k+imagenet2012
    python -m utils.download B_16 --source augreg                      # recommended AugReg
    python -m utils.download B_16 --source augreg --adapt imagenet2012 --resolution 384
    python -m utils.download --list [--source augreg [B_16]]

The file is fetched from `<base_url>/<source>/<file>.npz` (Google's public `vit_models` bucket
unless `--base_url` or the `VIT_BASE_URL` variable names a mirror with the same layout) into
`<file>.npz.part`. An interrupted transfer is continued with an HTTP `Range` request, both
within one run (`--retries`, 1, 2, 4, ... s apart) and by running the command again; a server
that ignores `Range` is handled by starting over. An attempt is given up on when the server
has not answered (status line and headers) within `--timeout` seconds, or sends less than
`MIN_RATE` (1 KiB/s) over any `--timeout` seconds after (a trickle); a download larger than
the file can be (its listed size, else `MAX_CHECKPOINT`, 4 GiB) is stopped and deleted,
whether the server says so in advance or sends an endless body. A folder that cannot be
written to is reported as such, without retries. Only a complete file that opens as an `.npz`
with every key the model needs is renamed to its final name; a complete but unusable
download is deleted (resuming it could never repair it) and reported.

AugReg checkpoints ("How to train your ViT?", Steiner et al. 2021) are chosen as vit_jax's
`configs/augreg.py` and `train.py` choose them: a name with a `-` is a file name; a bare model
(`B_16`, or a registry name such as `ViT-B_16`) takes, among the ImageNet-21k pre-trainings
(`ds == "i21k"`) of `augreg/index.csv`, the one with the best `final_val`. The index is
downloaded once and cached next to the checkpoints (`checkpoint/augreg_index.csv`); an index
that names a file other than by a plain file name (`../x`) is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import http.client
import logging
import math
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from models.configs import (
    ALIASES,
    AUGREG_MODELS,
    CONFIGS,
    augreg_name,
    get_config,
    is_augreg_filename,
    model_names,
    model_type_from_filename,
)
from models.npz import BASE_URL, CheckpointError, load_npz, npz_to_state_dict
from utils.infra.console import python_command
from utils.infra.errors import UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    http_url,
    non_negative_int,
    positive_int,
    seconds,
    setup_logging,
)
from utils.infra.run_files import check_folder

__all__ = [
    "AUGREG",
    "OFFICIAL_FILES",
    "SOURCES",
    "AugRegRow",
    "augreg_index",
    "augreg_table",
    "checkpoint_path",
    "default_source",
    "download",
    "fetch_archive",
    "fetch_checkpoint",
    "list_files",
    "mirror_url",
    "read_augreg_index",
    "resolve_file",
    "select_augreg",
]

logger = logging.getLogger(__name__)

# The official files per source folder, with the sizes the bucket lists. A `-224` file is the
# model fine-tuned at 224 px instead of 384 px. `sam` and `gsam` hold ViTs trained from scratch
# on ImageNet-1k with SAM (Chen et al. 2021) and GSAM (Zhuang et al. 2022); the GSAM files hold
# the `gap` models (`ViT-B_16` there is `ViT-B_16-gap-norep`).
OFFICIAL_FILES: dict[str, dict[str, str]] = {
    "imagenet21k": {
        "ViT-B_16": "393.7 MiB",
        "ViT-B_32": "400.0 MiB",
        "ViT-B_8": "",
        "ViT-L_16": "1.22 GiB",
        "ViT-L_32": "1.23 GiB",
        "ViT-H_14": "2.46 GiB",
        "R50+ViT-B_16": "439.9 MiB",
        "R26+ViT-B_32": "",
        "R50+ViT-L_32": "",
    },
    "imagenet21k+imagenet2012": {
        "ViT-B_16": "",
        "ViT-B_16-224": "330.3 MiB",
        "ViT-B_32": "",
        "ViT-B_8": "",
        "ViT-L_16": "",
        "ViT-L_16-224": "",
        "ViT-L_32": "",
        "R50+ViT-B_16": "377.6 MiB",
    },
    "sam": {"ViT-S_16": "", "ViT-B_16": "", "ViT-B_32": "", "ViT-L_16": "", "ViT-L_32": ""},
    "gsam": {"ViT-S_16": "", "ViT-S_32": "", "ViT-B_16": "", "ViT-B_32": ""},
}
DEFAULT_SOURCE = "imagenet21k"
# Sources a plain model name is looked up in when no --source is given.
MODEL_SOURCES = ("imagenet21k", "imagenet21k+imagenet2012")
# Folders whose file names repeat other folders' names: local copies carry the folder as prefix.
PREFIXED_SOURCES = ("sam", "gsam")
AUGREG = "augreg"
SOURCES = (*OFFICIAL_FILES, AUGREG)
AUGREG_INDEX = "augreg_index.csv"
# Columns of augreg/index.csv that selecting a file needs.
AUGREG_COLUMNS = (
    "filename",
    "ds",
    "final_val",
    "adapt_ds",
    "adapt_resolution",
    "adapt_final_val",
    "adapt_filename",
)
# Sizes of the recommended AugReg pre-training files (vision_transformer README); others unknown.
AUGREG_SIZES = {
    "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0": "1243 MiB",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0": "391 MiB",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0": "115 MiB",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1": "1337 MiB",
    "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0": "170 MiB",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0": "37 MiB",
    "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0": "398 MiB",
    "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0": "118 MiB",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0": "40 MiB",
}
CHUNK = 1 << 20
RETRIES = 3
TIMEOUT = 30.0  # seconds without a byte from the server before an attempt is given up
MIN_RATE = 1024  # bytes/s: an attempt that averages less over TIMEOUT seconds has stalled
BACKOFF = 1.0  # seconds before the first retry; doubled before each further one (at most 30)
# The most a download may be where no size is listed: the largest official file (ViT-H_14) is
# 2.46 GiB, the AugReg index a few MiB.
MAX_CHECKPOINT = 4 << 30
MAX_INDEX = 256 << 20
CHECKPOINT_MIRROR = (
    "--base_url (or the VIT_BASE_URL variable) at a mirror with the same <source>/<file>.npz layout"
)
# A name from a server becomes a local file name: letters, digits and `_.+=-`, no path.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,199}")


def _closest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """`Closest: a, b.` for the choices that resemble `name` (difflib), or ''."""
    close = difflib.get_close_matches(name, sorted(set(choices) - {name}), n=n, cutoff=0.6)
    return f" Closest: {', '.join(close)}." if close else ""


def resolve_file(name: str, source: str = DEFAULT_SOURCE) -> tuple[str, str]:
    """(official file stem, registry model) for a name the user typed, in a plain folder.

    Accepts registry names, aliases (`R50-ViT-B_16`, `B_16`) and file stems (`ViT-B_16-224`).

    Raises:
        UserError: unknown source, or no such file in that source (lists the choices).
    """
    if source not in OFFICIAL_FILES:
        raise UserError(f"Unknown --source {source!r}; choose one of: {', '.join(SOURCES)}.")
    stem = ALIASES.get(name, name)
    files = OFFICIAL_FILES[source]
    if stem not in files:
        others = [s for s in OFFICIAL_FILES if s != source and stem in OFFICIAL_FILES[s]]
        if stem in AUGREG_MODELS.values():
            others.append(AUGREG)
        hint = f" It exists in --source {', '.join(others)}." if others else ""
        known = [f for folder in OFFICIAL_FILES.values() for f in folder] + model_names()
        raise UserError(
            f"No official {source} checkpoint named {name!r}.{hint}{_closest(name, known)} "
            f"Choose one of: {', '.join(files)} ({download_command()} --list shows all)."
        )
    model = model_type_from_filename(f"{source}/{stem}.npz")
    assert model is not None, f"{source}/{stem} names no registered model"
    return stem, model


def checkpoint_path(stem: str, source: str = DEFAULT_SOURCE, directory: str = "checkpoint") -> Path:
    """Local file of an official checkpoint.

    Files keep their official name (`checkpoint/ViT-B_16.npz`, `checkpoint/ViT-B_16-224.npz`,
    AugReg names, where the README, train.py and the notebook look), except where a name would
    be ambiguous: an `imagenet21k+imagenet2012` file whose name also exists in `imagenet21k`,
    and every `sam` and `gsam` file, get their source as a prefix
    (`checkpoint/imagenet21k+imagenet2012_ViT-B_16.npz`, `checkpoint/gsam_ViT-B_16.npz`).
    `models.configs.model_type_from_filename` reads these names back.
    """
    collides = source in PREFIXED_SOURCES or (
        source != DEFAULT_SOURCE and stem in OFFICIAL_FILES[DEFAULT_SOURCE]
    )
    return Path(directory) / (f"{source}_{stem}.npz" if collides else f"{stem}.npz")


def default_source(name: str) -> str:
    """The source a name means without --source.

    `augreg` for AugReg spellings (`B_16`) and file names; else `imagenet21k` when it has the
    file, else `imagenet21k+imagenet2012` when that has it, else `augreg` for a model with
    AugReg checkpoints (`ViT-S_16`, `R+ViT-Ti_16`).
    """
    if name in AUGREG_MODELS or is_augreg_filename(name):
        return AUGREG
    stem = ALIASES.get(name, name)
    found = next((s for s in MODEL_SOURCES if stem in OFFICIAL_FILES[s]), None)
    if found is None and stem in AUGREG_MODELS.values():
        return AUGREG
    return found or DEFAULT_SOURCE


class _StalledError(OSError):
    """The server sends, but too slowly to ever finish (a network failure: retried).

    `answered`: whether its headers had arrived (else it was too slow to answer at all)."""

    def __init__(self, what: str, answered: bool):
        super().__init__(what)
        self.answered = answered


class _Watch:
    """The rate rule of one attempt, kept by a thread of its own, whatever the attempt waits in.

    The server has `timeout` seconds from the start of the attempt to answer (connect, status
    line, headers); after, at least `MIN_RATE` bytes/s of the body must arrive over every
    `timeout` seconds. A socket timeout only notices silence: a server that sends a byte of its
    headers (or of a chunk-size line) every second would be waited on forever. A broken rule
    shuts the connection down, which ends any read the download is waiting in; `check` then
    raises `_StalledError`.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.lock = threading.Lock()
        self.since = time.monotonic()  # start of the current window
        self.received = 0  # body bytes in it
        self.answered = False
        self.broken: str | None = None
        self.sock: socket.socket | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="download-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def watch(self, sock: socket.socket) -> None:
        """The connection to shut down (a redirect's replaces the first)."""
        with self.lock:
            self.sock = sock
            if self.broken:
                self._shut_down()

    def answer(self) -> None:
        """The headers are in: the body's windows start now. (Headers that a cut ended early
        are not an answer.)"""
        with self.lock:
            if not self.broken:
                self.answered, self.since, self.received = True, time.monotonic(), 0

    def add(self, size: int) -> None:
        with self.lock:
            self.received += size

    def check(self, err: BaseException | None = None) -> None:
        """Stop watching; raise `_StalledError` where the rule was broken, or where `err` (what
        ended the exchange) is a socket timeout before the server answered."""
        with self.lock:
            self.stopped.set()
        timed_out = isinstance(getattr(err, "reason", err), TimeoutError)
        if not self.broken and timed_out and not self.answered:
            self.broken = self._unanswered()
        if self.broken:
            raise _StalledError(self.broken, self.answered)

    def _unanswered(self) -> str:
        return f"the server had not answered within {self.timeout:g} s"

    def _run(self) -> None:
        while not self.stopped.wait(max(0.0, self.since + self.timeout - time.monotonic())):
            with self.lock:
                elapsed = time.monotonic() - self.since
                if self.stopped.is_set() or elapsed < self.timeout:  # or answered meanwhile
                    continue
                if not self.answered:
                    self.broken = self._unanswered()
                elif self.received < MIN_RATE * elapsed:
                    self.broken = (
                        f"the server sent {self.received} bytes in {elapsed:.1f} s, less than "
                        f"{MIN_RATE} bytes/s"
                    )
                else:
                    self.since, self.received = time.monotonic(), 0
                    continue
                self._shut_down()
                return

    def _shut_down(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile
                # the plain socket's shutdown, also under TLS: ends a read waiting in any thread
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _WatchedConnections:
    """A urllib handler part that hands every connection it opens to a `_Watch`."""

    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch

    def do_open(self, http_class: type, req: urllib.request.Request, **options: object):
        def connection(host: str, **kw: object) -> http.client.HTTPConnection:
            conn = http_class(host, **kw)
            connect = conn.connect

            def watched() -> None:
                connect()
                self.watch.watch(conn.sock)

            conn.connect = watched
            return conn

        return super().do_open(connection, req, **options)


class _WatchedHTTP(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_WatchedConnections, urllib.request.HTTPSHandler):
    pass


def _network_error(
    url: str, err: BaseException, attempts: int, timeout: float, mirror: str, timeout_flag: str
) -> UserError:
    reason = getattr(err, "reason", err)  # urllib wraps a connect timeout in a URLError
    timed_out = isinstance(err, TimeoutError) or isinstance(reason, TimeoutError)
    slow = timed_out or (isinstance(err, _StalledError) and not err.answered)
    what = f"the server sent nothing for {timeout:g} s" if timed_out else str(err)
    hint = f" (raise {timeout_flag} for a slow connection)" if slow and timeout_flag else ""
    if isinstance(err, _StalledError) and err.answered:
        hint = " (the connection is too slow to finish the file)"
    return UserError(
        f"Could not download {url} ({attempts} attempt(s)): {what}{hint}. Check the network "
        f"connection, or point {mirror}. Running the command again resumes a partial download."
    )


def _too_large(url: str, part: Path, size: int, limit: int) -> UserError:
    part.unlink(missing_ok=True)
    return UserError(
        f"{url} is larger than the file can be: {size} bytes or more, at most {limit} expected. "
        "It is not the file asked for, and what had arrived was deleted. If you use a mirror "
        "(--base_url), check that it serves the official files."
    )


def _not_writable(path: Path, err: OSError) -> UserError:
    return UserError(
        f"Cannot write {path} ({err.strerror or err}): this is not a network problem. Pass a "
        "folder you can write to, or free space there; a partial download is kept and resumed."
    )


def _open(url: str, offset: int, watch: _Watch) -> tuple[http.client.HTTPResponse, int, int]:
    """Request `url` from byte `offset`; returns (response, start byte, total size or -1)."""
    headers = {"User-Agent": "vit-pytorch-download", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(_WatchedHTTP(watch), _WatchedHTTPS(watch))
    response = opener.open(request, timeout=watch.timeout)
    watch.answer()
    length = int(response.headers.get("Content-Length") or -1)
    if offset and response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            total = int(match.group(2)) if match.group(2) != "*" else -1
            return response, offset, total
        response.close()
        raise OSError(f"the server answered the range request with {match and match.group(0)}")
    if offset:
        logger.info("The server ignored the range request: downloading from the start.")
    return response, 0, length


def _transfer(url: str, part: Path, timeout: float, progress: bool, limit: int) -> None:
    """One attempt: continue `part` from its current size up to the end of `url`.

    Fails when the server has not answered in `timeout` seconds or less than `MIN_RATE`
    bytes/s arrive over `timeout` seconds (`_Watch`), and (deleting `part`) when the file grows
    or is announced beyond `limit` bytes.
    """
    with _Watch(timeout) as watch:
        try:
            complete = _receive(url, part, progress, limit, watch)
        except (OSError, http.client.HTTPException) as err:
            watch.check(err)  # the watch cut the connection, or the server never answered
            raise
        if not complete:
            watch.check()


def _receive(url: str, part: Path, progress: bool, limit: int, watch: _Watch) -> bool:
    """`_transfer`'s exchange; returns whether the server's size is known and reached."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response, start, total = _open(url, offset, watch)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Asked from past the end: the part file is already complete, or not this file.
        match = re.search(r"/(\d+)$", err.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return True
        logger.info("The partial file does not match the server's file: starting over.")
        part.unlink()
        response, start, total = _open(url, 0, watch)
    with contextlib.ExitStack() as stack:
        stack.enter_context(response)
        if total > limit:
            raise _too_large(url, part, total, limit)
        try:
            handle = stack.enter_context(open(part, "ab" if start else "wb"))
        except OSError as err:
            raise _not_writable(part, err) from None
        bar = stack.enter_context(
            tqdm(
                total=total if total > 0 else None,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            )
        )
        size = start
        # read1 returns what has arrived: read(CHUNK) would wait for a whole chunk of a trickle.
        while chunk := response.read1(CHUNK):
            size += len(chunk)
            if size > limit:
                handle.close()
                raise _too_large(url, part, size, limit)
            try:
                handle.write(chunk)
                handle.flush()  # a full disk shows here, not later as a "network" error
            except OSError as err:
                raise _not_writable(part, err) from None
            bar.update(len(chunk))
            watch.add(len(chunk))
    size = part.stat().st_size
    if total > 0 and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    return total > 0


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
    progress: bool = True,
    limit: int = MAX_CHECKPOINT,
    mirror: str = CHECKPOINT_MIRROR,
    timeout_flag: str = "--timeout",
) -> Path:
    """Fetch `url` to `<dest>.part`, resuming with HTTP Range; returns the `.part` path.

    The caller verifies the file and renames it. The `.part` file is kept when all attempts
    fail, so the next call continues where this one stopped.

    Args:
        retries: further attempts after a network failure or a server error (5xx).
        timeout: seconds the server has to answer (connect, status line, headers); also the
            window over which at least `MIN_RATE` bytes/s of the body must arrive after.
        limit: the most bytes the file can have; a larger one is deleted and refused.
        mirror: how to use a mirror, for the messages ("--base_url ... at a mirror ...").
        timeout_flag: the flag that sets `timeout`, for the messages ('' where none does).

    Raises:
        UserError: HTTP error (e.g. 404), a network failure after `retries` retries, a file
            over `limit`, or a folder that cannot be written to (not retried).
    """
    part = Path(f"{os.fspath(dest)}.part")
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_writable(part.parent, err) from None
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress, limit)
            return part
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise UserError(
                    f"{url} does not exist (HTTP 404). Check the name, or point {mirror}."
                ) from None
            if attempt == retries or err.code < 500:
                raise _network_error(url, err, attempt + 1, timeout, mirror, timeout_flag) from None
        except (OSError, http.client.HTTPException) as err:
            if attempt == retries:
                raise _network_error(url, err, attempt + 1, timeout, mirror, timeout_flag) from None
            have = part.stat().st_size if part.exists() else 0
            logger.warning("Download interrupted at %d bytes (%s); resuming.", have, err)
        time.sleep(min(BACKOFF * 2**attempt, 30.0))
    raise AssertionError("unreachable")


def _extract(archive: Path, folder: str) -> None:
    """Unpack `archive`, which must hold only files and folders under `folder/`, next to it.

    Unpacked into a temporary folder first: `folder` appears whole, or not at all.
    """
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            parts = PurePosixPath(member.name).parts
            if not (member.isfile() or member.isdir()) or parts[:1] != (folder,) or ".." in parts:
                raise UserError(
                    f"{archive} holds {member.name!r}, not a file inside {folder}/: it is not the "
                    "published archive and was not unpacked. Delete it to download it again."
                )
        unpacked = tempfile.mkdtemp(prefix=f".{folder}-", dir=archive.parent)
        try:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(unpacked, members=members, **safe)
            os.replace(os.path.join(unpacked, folder), archive.parent / folder)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)


def fetch_archive(
    url: str,
    archive: str | os.PathLike,
    md5: str,
    folder: str,
    *,
    mirror: str,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
    limit: int = MAX_CHECKPOINT,
) -> None:
    """Download `url` to `archive` unless it is there, check its published MD5, unpack `folder/`.

    A download whose MD5 differs is deleted; an archive that was already there is never
    replaced: a damaged one is reported, naming it.

    Raises:
        UserError: network failure (after `retries`), a damaged archive, one that holds anything
            but files under `folder/` (links, absolute paths, `..`), or a folder that cannot be
            written to.
    """
    from torchvision.datasets.utils import check_integrity  # torch: not for --help

    archive = Path(archive)
    if not archive.exists():
        logger.info("Downloading %s to %s", url, archive)
        part = download(
            url,
            archive,
            retries=retries,
            timeout=timeout,
            limit=limit,
            mirror=mirror,
            timeout_flag="",
        )
        if not check_integrity(part, md5):
            part.unlink()
            raise UserError(
                f"The file downloaded from {url} is not the published {archive.name} (its MD5 is "
                f"not {md5}) and was deleted. If you use a mirror, point {mirror}."
            )
        os.replace(part, archive)
    elif not check_integrity(archive, md5):
        raise UserError(
            f"{archive} is damaged: its MD5 is not the published {md5}. Delete it to download it "
            "again."
        )
    try:
        _extract(archive, folder)
    except (OSError, tarfile.TarError, EOFError) as err:
        raise UserError(
            f"Could not unpack {archive} into {archive.parent} ({err}): not a network problem. "
            "Free space there, or pass a folder you can write to."
        ) from None


# --------------------------------------------------------------------------------------------
# AugReg: augreg/index.csv describes every file (vit_jax/checkpoint.py, `get_augreg_df`)


@dataclass(frozen=True, slots=True)
class AugRegRow:
    """One row of `augreg/index.csv`: a pre-training file and one fine-tuning of it.

    Scores are NaN where the index has none; `adapt_resolution` is 0 then.
    """

    name: str  # paper spelling, e.g. "B/16"
    ds: str  # pre-training data: i1k, i21k, i21k_30
    lr: str
    aug: str
    wd: str
    do: str
    sd: str
    final_val: float
    params: str
    filename: str  # pre-training file, without .npz
    adapt_ds: str
    adapt_resolution: int
    adapt_final_val: float
    adapt_filename: str  # fine-tuned file, without .npz

    @property
    def model(self) -> str:
        """The AugReg model spelling the file name begins with (`B_16`, `R26_S_32`)."""
        return self.filename.split("-")[0]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _resolution(text: str) -> int:
    value = _number(text)
    return 0 if math.isnan(value) else int(value)


def _rank(score: float) -> float:
    """A score to sort by: a missing (NaN) score ranks last."""
    return -math.inf if math.isnan(score) else score


def read_augreg_index(path: str | os.PathLike) -> list[AugRegRow]:
    """Parse a copy of `augreg/index.csv`.

    Raises:
        UserError: not a CSV with the columns the selection needs.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in AUGREG_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise UserError(
                    f"{path} is not the AugReg index: it has no column(s) {', '.join(missing)}. "
                    "Delete it (or pass --force) to download augreg/index.csv again."
                )
            rows = [
                AugRegRow(
                    name=row.get("name", ""),
                    ds=row["ds"],
                    lr=row.get("lr", ""),
                    aug=row.get("aug", ""),
                    wd=row.get("wd", ""),
                    do=row.get("do", ""),
                    sd=row.get("sd", ""),
                    final_val=_number(row["final_val"]),
                    params=row.get("params", ""),
                    filename=row["filename"].removesuffix(".npz"),
                    adapt_ds=row["adapt_ds"],
                    adapt_resolution=_resolution(row["adapt_resolution"]),
                    adapt_final_val=_number(row["adapt_final_val"]),
                    adapt_filename=row["adapt_filename"].removesuffix(".npz"),
                )
                for row in reader
            ]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(
            f"{path} is not a readable AugReg index ({err}). Delete it (or pass --force) to "
            "download augreg/index.csv again."
        ) from None
    for line, row in enumerate(rows, start=2):
        for name in (row.filename, row.adapt_filename):
            if name and not PLAIN_NAME.fullmatch(name):
                raise UserError(
                    f"{path} is not a usable AugReg index: line {line} names the file {name!r}, "
                    "which is not a plain file name (letters, digits, '_.+=-'; no folders) and "
                    "could be written outside --dir. Delete it (or pass --force) to download "
                    "augreg/index.csv again; if it comes from a mirror (--base_url), the mirror "
                    "does not serve the official index."
                )
    return rows


def mirror_url(given: str | None, variable: str = "VIT_BASE_URL", default: str = BASE_URL) -> str:
    """The mirror to download from: `given`, else the environment `variable`, else `default`.

    Raises:
        UserError: not an http(s) address.
    """
    url = given or os.environ.get(variable) or default
    try:
        return http_url(url).rstrip("/")
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{'base_url' if given else variable}: {err}.") from None


def augreg_index(
    directory: str = "checkpoint",
    base_url: str | None = None,
    *,
    refresh: bool = False,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
) -> list[AugRegRow]:
    """The rows of `augreg/index.csv`, downloaded once into `<directory>/augreg_index.csv`.

    Raises:
        UserError: network failure, or a download that is not the index (it is then deleted).
    """
    path = Path(directory) / AUGREG_INDEX
    if path.exists() and not refresh:
        return read_augreg_index(path)
    url = f"{mirror_url(base_url)}/{AUGREG}/index.csv"
    logger.info("Downloading the AugReg index %s to %s", url, path)
    stale = Path(f"{path}.part")
    try:
        stale.unlink(missing_ok=True)  # small: always fetched whole
    except OSError as err:
        raise _not_writable(stale, err) from None
    part = download(url, path, retries=retries, timeout=timeout, progress=False, limit=MAX_INDEX)
    try:
        rows = read_augreg_index(part)
    except UserError:
        part.unlink()
        raise
    os.replace(part, path)
    return rows


def _best_pretrainings(rows: Iterable[AugRegRow]) -> dict[str, AugRegRow]:
    """Per model, the ImageNet-21k pre-training with the best `final_val` (vit_jax/train.py)."""
    best: dict[str, AugRegRow] = {}
    for r in rows:
        if r.ds == "i21k" and (
            r.model not in best or _rank(r.final_val) > _rank(best[r.model].final_val)
        ):
            best[r.model] = r
    return best


def _augreg_spelling(name: str) -> str:
    """`B_16` for `B_16`, `ViT-B_16` or `R50-ViT-...` style names; file names unchanged."""
    name = name.removesuffix(".npz")
    model = ALIASES.get(name, name)
    return augreg_name(model) if model in CONFIGS else name


def select_augreg(
    rows: Sequence[AugRegRow],
    name: str,
    adapt: str | None = None,
    resolution: int | None = None,
) -> str:
    """The AugReg file (stem) that `name` selects, as vit_jax selects it.

    Args:
        rows: the index (`augreg_index`).
        name: a model (`B_16`, `ViT-B_16`, `R+ViT-Ti_16`): its ImageNet-21k pre-training with
            the best `final_val`; or a full file name (contains `-`).
        adapt: take a fine-tuned file of that pre-training instead: on this dataset
            (`imagenet2012`, `cifar100`, ...), the best `adapt_final_val` of those that match.
        resolution: only fine-tunings at this resolution (224, 384).

    Raises:
        UserError: no such model or file (names the closest ones), or no such fine-tuning
            (lists those there are).
    """
    if resolution is not None and adapt is None:
        raise UserError(
            "--resolution chooses among fine-tuned files: add --adapt DATASET, e.g. "
            "--adapt imagenet2012 --resolution 384."
        )
    given, name = name, _augreg_spelling(name)
    shown = repr(name) if given in (name, f"{name}.npz") else f"{given!r} ({name})"
    if "-" in name:
        # vit_jax/configs/augreg.py: a name with a dash is a file name.
        if not any(r.filename == name for r in rows):
            tuned = next((r for r in rows if r.adapt_filename == name), None)
            if tuned is None:
                model = name.split("-")[0]
                known = {r.filename for r in rows} | {
                    r.adapt_filename for r in rows if r.model == model
                }
                raise UserError(
                    f"No AugReg checkpoint named {shown} in augreg/index.csv."
                    f"{_closest(name, known | set(AUGREG_MODELS), n=3)} List them with "
                    f"{download_command()} --list --source augreg {model}."
                )
            if adapt is not None:
                raise UserError(
                    f"{name} is already fine-tuned (on {tuned.adapt_ds}); drop --adapt and "
                    "--resolution, or name its pre-training file."
                )
            return name
        pretrained = name
    else:
        best = _best_pretrainings(rows)
        if name not in best:
            raise UserError(
                f"No AugReg ImageNet-21k checkpoint for model {shown}.{_closest(name, best)} "
                f"Models: {', '.join(sorted(best))}."
            )
        pretrained = best[name].filename
    if adapt is None:
        return pretrained
    tunings = [r for r in rows if r.filename == pretrained and r.adapt_filename]
    matches = [
        r for r in tunings if r.adapt_ds == adapt and resolution in (None, r.adapt_resolution)
    ]
    if not matches:
        offered = sorted({(r.adapt_ds, r.adapt_resolution) for r in tunings})
        at = f" at resolution {resolution}" if resolution is not None else ""
        there = "; ".join(f"--adapt {ds} --resolution {res}" for ds, res in offered)
        raise UserError(
            f"No {adapt} fine-tuning{at} of {pretrained} in augreg/index.csv. "
            + (f"It has: {there}." if offered else "It has no fine-tuned files.")
        )
    return max(matches, key=lambda r: _rank(r.adapt_final_val)).adapt_filename


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    )


def _score(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def augreg_table(
    rows: Sequence[AugRegRow],
    model: str | None = None,
    adapt: str | None = None,
    resolution: int | None = None,
) -> str:
    """The AugReg files as a table to choose from, as `--list --source augreg` prints it.

    Pre-training files (one line each, best first per model and data; `*` marks the one a bare
    model name selects), or with `adapt` the fine-tuned files on that dataset.
    """
    spelling = _augreg_spelling(model) if model else None
    chosen = [r for r in rows if spelling in (None, r.model)]
    if adapt is not None:
        lines = sorted(
            (r for r in chosen if r.adapt_ds == adapt and resolution in (None, r.adapt_resolution)),
            key=lambda r: (r.model, r.ds, -_rank(r.adapt_final_val)),
        )
        selected = set()
        for name in _best_pretrainings(chosen):
            with contextlib.suppress(UserError):  # no such fine-tuning of that model
                selected.add(select_augreg(rows, name, adapt, resolution))
        header = ("adapt", "res", "adapt_final_val", "file")
        cells = [
            (r.adapt_ds, r.adapt_resolution, _score(r.adapt_final_val), r.adapt_filename)
            for r in lines
        ]
    else:
        selected = {r.filename for r in _best_pretrainings(rows).values()}
        unique = {r.filename: r for r in reversed(chosen)}  # first row of each file
        lines = sorted(unique.values(), key=lambda r: (r.model, r.ds, -_rank(r.final_val)))
        header = ("aug", "wd", "do", "sd", "final_val", "params", "size", "file")
        cells = [
            (
                r.aug,
                r.wd,
                r.do,
                r.sd,
                _score(r.final_val),
                r.params,
                AUGREG_SIZES.get(r.filename, ""),
                r.filename,
            )
            for r in lines
        ]
    flags = [f"--adapt {adapt}"] if adapt else []
    flags += [f"--resolution {resolution}"] if resolution is not None else []
    if not lines:
        models = sorted({r.model for r in rows})
        wanted = [f"model {spelling}"] if spelling else []
        raise UserError(
            f"No AugReg files match {', '.join(wanted + flags)}.{_closest(spelling or '', models)} "
            f"Models: {', '.join(models)}; fine-tuning data: "
            f"{', '.join(sorted({r.adapt_ds for r in rows if r.adapt_ds}))}."
        )
    table = _table(
        ("", "model", "data", *header),
        [
            ("*" if c[-1] in selected else "", r.model, r.ds, *c)  # c[-1]: the file
            for r, c in zip(lines, cells, strict=True)
        ],
    )
    return (
        f"{table}\n* = what `{download_command()} MODEL --source augreg"
        f"{''.join(f' {flag}' for flag in flags)}` selects "
        "(from the ImageNet-21k pre-training with the best final_val). Pass a file name to take "
        "another."
    )


# --------------------------------------------------------------------------------------------
# Fetching


def _limit(listed: str) -> int:
    """The most bytes a file of listed size `"393.7 MiB"` can have (2% over, for the rounding);
    `MAX_CHECKPOINT` where none is listed."""
    match = re.fullmatch(r"([\d.]+) ([MG])iB", listed)
    if not match:
        return MAX_CHECKPOINT
    return math.ceil(float(match.group(1)) * 1.02 * (1 << (20 if match.group(2) == "M" else 30)))


def fetch_checkpoint(
    name: str,
    source: str | None = None,
    directory: str = "checkpoint",
    base_url: str | None = None,
    *,
    adapt: str | None = None,
    resolution: int | None = None,
    force: bool = False,
    progress: bool = True,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
) -> Path:
    """Download and verify one official checkpoint; returns its local path.

    An existing final file is kept unless `force` (which also refreshes the cached AugReg
    index). Verification failure deletes the download. Without `source`, the file comes from
    `default_source(name)`; for `augreg`, `select_augreg` picks it (`adapt`, `resolution`).

    Raises:
        UserError: unknown name/source, network failure, or a file that is not a valid
            checkpoint for the model.
    """
    source = source or default_source(name)
    if source == AUGREG:
        rows = augreg_index(directory, base_url, refresh=force, retries=retries, timeout=timeout)
        stem = select_augreg(rows, name, adapt, resolution)
        listed = AUGREG_SIZES.get(stem, "")
        logger.info("AugReg file for %s: %s", name, stem)
        model = model_type_from_filename(f"{stem}.npz")
        if model is None:
            raise UserError(f"{stem} is an AugReg model this code has no config for.")
    elif adapt is not None or resolution is not None:
        raise UserError("--adapt and --resolution choose among AugReg files: add --source augreg.")
    else:
        stem, model = resolve_file(name, source)
        listed = OFFICIAL_FILES[source][stem]
    dest = checkpoint_path(stem, source, directory)
    if dest.exists() and not force:
        logger.info("%s already exists; pass --force to download it again.", dest)
        return dest
    url = f"{mirror_url(base_url)}/{source}/{stem}.npz"
    logger.info("Downloading %s to %s", url, dest)
    part = download(
        url, dest, retries=retries, timeout=timeout, progress=progress, limit=_limit(listed)
    )
    try:  # it opens as an .npz holding every key the model needs
        npz_to_state_dict(load_npz(part, model), get_config(model), include_head=False)
    except CheckpointError as err:
        part.unlink()
        raise UserError(
            f"The file downloaded from {url} is not a usable {model} checkpoint and was deleted: "
            f"{err} If you use a mirror (--base_url), check that it serves the official files."
        ) from None
    os.replace(part, dest)
    logger.info("Saved %s", dest)
    return dest


def list_files(source: str | None = None) -> str:
    """The official files per source (or of one), as `--list` prints them."""
    lines = []
    for folder, files in OFFICIAL_FILES.items():
        if source not in (None, folder):
            continue
        lines.append(f"{folder}:")
        for stem, size in files.items():
            model = model_type_from_filename(f"{folder}/{stem}.npz")
            notes = [size] if size else []
            if model != re.sub(r"-\d+$", "", stem):
                notes.append(f"model {model}")
            lines.append(f"  {stem}" + (f"  ({', '.join(notes)})" if notes else ""))
    if source is None:
        lines.append(
            f"{AUGREG}: {len(AUGREG_MODELS)} models (e.g. B_16, R26_S_32), thousands of files; "
            f"see {download_command()} --list --source augreg [MODEL]"
        )
    lines.append(f"Base URL: {BASE_URL} (override with --base_url or VIT_BASE_URL)")
    return "\n".join(lines)


def download_command() -> str:
    """This module's command line, as typed with the interpreter running it."""
    return python_command("-m", "utils.download")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=download_command(), description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="model or file name, e.g. ViT-B_16, ViT-B_16-224, B_16 (AugReg), an AugReg file "
        f"name; with --list --source augreg: only this model. Models: {', '.join(model_names())}",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        help=f"default: {AUGREG} for AugReg names, else {DEFAULT_SOURCE} or the only source that "
        "has the file",
    )
    parser.add_argument(
        "--adapt",
        metavar="DATASET",
        help="AugReg: the fine-tuned file on DATASET (e.g. imagenet2012, cifar100) instead of "
        "the pre-training",
    )
    parser.add_argument(
        "--resolution",
        type=positive_int,
        help="AugReg with --adapt: only fine-tunings at this resolution (224 or 384)",
    )
    parser.add_argument("--dir", default="checkpoint", help="where to save")
    parser.add_argument(
        "--base_url",
        type=http_url,
        help=f"mirror with the same layout (default: $VIT_BASE_URL or {BASE_URL})",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=TIMEOUT,
        help="seconds the server has to answer (connect, send its headers) before an attempt "
        "fails; also the span over which at least 1 KiB/s must arrive after",
    )
    parser.add_argument(
        "--retries",
        type=non_negative_int,
        default=RETRIES,
        help="attempts after the first when the connection fails (1, 2, 4, ... s apart)",
    )
    parser.add_argument("--list", action="store_true", help="list the official files and exit")
    parser.add_argument(
        "--force", action="store_true", help="download even if the file (or AugReg index) exists"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    setup_logging()
    args = parse_args(argv)
    network = {"retries": args.retries, "timeout": args.timeout}
    if args.list:
        if args.source == AUGREG:
            check_folder(Path(args.dir), "--dir")
            rows = augreg_index(args.dir, args.base_url, refresh=args.force, **network)
            print(augreg_table(rows, args.model, args.adapt, args.resolution))
        else:
            print(list_files(args.source))
        return
    if not args.model:
        raise UserError(
            "Name a checkpoint, e.g. `python3 -m utils.download ViT-B_16`, or list them with "
            "--list."
        )
    check_folder(Path(args.dir), "--dir")
    path = fetch_checkpoint(
        args.model,
        args.source,
        args.dir,
        args.base_url,
        adapt=args.adapt,
        resolution=args.resolution,
        force=args.force,
        **network,
    )
    print(path)


if __name__ == "__main__":
    run_cli(main)
