"""Download official ViT checkpoints (REFERENCE.md §1) into `checkpoint/`, resumably.

    python3 -m utils.download ViT-B_16                                  # imagenet21k
    python3 -m utils.download ViT-B_16 --source imagenet21k+imagenet2012
    python3 -m utils.download --list

The file is fetched from `<base_url>/<source>/<file>.npz` (Google's public `vit_models` bucket
unless `--base_url` or the `VIT_BASE_URL` variable names a mirror with the same layout) into
`<file>.npz.part`. An interrupted transfer is continued with an HTTP `Range` request, both
within one run (a few retries) and by running the command again; a server that ignores `Range`
is handled by starting over. Only a complete file that opens as an `.npz` with every key the
model needs is renamed to its final name; a complete but unusable download is deleted (resuming
it could never repair it) and reported.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from models.configs import ALIASES, get_config, model_names
from models.npz import BASE_URL, CheckpointError, load_npz, npz_to_state_dict
from utils.errors import UserError, run_cli

__all__ = [
    "OFFICIAL_FILES",
    "checkpoint_path",
    "default_source",
    "download",
    "fetch_checkpoint",
    "list_files",
    "resolve_file",
    "verify",
]

logger = logging.getLogger(__name__)

# The official files per source folder, with the sizes the bucket lists (REFERENCE.md §1).
# A `-224` file is the model fine-tuned at 224 px instead of 384 px.
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
}
DEFAULT_SOURCE = "imagenet21k"
CHUNK = 1 << 20
RETRIES = 3


def resolve_file(name: str, source: str = DEFAULT_SOURCE) -> tuple[str, str]:
    """(official file stem, registry model) for a name the user typed.

    Accepts registry names, aliases (`R50-ViT-B_16`) and file stems (`ViT-B_16-224`).

    Raises:
        UserError: unknown source, or no such file in that source (lists the choices).
    """
    if source not in OFFICIAL_FILES:
        raise UserError(f"Unknown --source {source!r}; choose one of: {', '.join(OFFICIAL_FILES)}.")
    stem = ALIASES.get(name, name)
    files = OFFICIAL_FILES[source]
    if stem not in files:
        others = [s for s in OFFICIAL_FILES if s != source and stem in OFFICIAL_FILES[s]]
        hint = f" It exists in --source {others[0]}." if others else ""
        raise UserError(
            f"No official {source} checkpoint named {name!r}.{hint} Choose one of: "
            f"{', '.join(files)} (python3 -m utils.download --list shows all)."
        )
    return stem, re.sub(r"-\d+$", "", stem)


def checkpoint_path(stem: str, source: str = DEFAULT_SOURCE, directory: str = "checkpoint") -> Path:
    """Local file of an official checkpoint.

    Files keep their official name (`checkpoint/ViT-B_16.npz`, `checkpoint/ViT-B_16-224.npz`,
    where the README, train.py and the notebook look), except a file whose name also exists in
    `imagenet21k`: it gets its source as a prefix
    (`checkpoint/imagenet21k+imagenet2012_ViT-B_16.npz`) so the two never collide.
    """
    collides = source != DEFAULT_SOURCE and stem in OFFICIAL_FILES[DEFAULT_SOURCE]
    return Path(directory) / (f"{source}_{stem}.npz" if collides else f"{stem}.npz")


def default_source(name: str) -> str:
    """`imagenet21k` when it has the file, else the one source that has it."""
    stem = ALIASES.get(name, name)
    return next((s for s, files in OFFICIAL_FILES.items() if stem in files), DEFAULT_SOURCE)


def _network_error(url: str, err: BaseException) -> UserError:
    return UserError(
        f"Could not download {url}: {err}. Check the network connection, or point --base_url "
        "(or the VIT_BASE_URL variable) at a mirror with the same <source>/<file>.npz layout. "
        "Running the command again resumes a partial download."
    )


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse, int, int]:
    """Request `url` from byte `offset`; returns (response, start byte, total size or -1)."""
    headers = {"User-Agent": "vit-pytorch-download", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    response = urllib.request.urlopen(request, timeout=timeout)
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


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: continue `part` from its current size up to the end of `url`."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response, start, total = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # Asked from past the end: the part file is already complete, or not this file.
        match = re.search(r"/(\d+)$", err.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return
        logger.info("The partial file does not match the server's file: starting over.")
        part.unlink()
        response, start, total = _open(url, 0, timeout)
    with (
        response,
        open(part, "ab" if start else "wb") as handle,
        tqdm(
            total=total if total > 0 else None,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        ) as bar,
    ):
        while chunk := response.read(CHUNK):
            handle.write(chunk)
            bar.update(len(chunk))
    size = part.stat().st_size
    if total > 0 and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = RETRIES,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `<dest>.part`, resuming with HTTP Range; returns the `.part` path.

    The caller verifies the file and renames it. The `.part` file is kept when all attempts
    fail, so the next call continues where this one stopped.

    Raises:
        UserError: HTTP error (e.g. 404) or a network failure after `retries` retries.
    """
    part = Path(f"{os.fspath(dest)}.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout, progress)
            return part
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise UserError(
                    f"{url} does not exist (HTTP 404). Check the model name and --source "
                    "(python3 -m utils.download --list), or --base_url if you use a mirror."
                ) from None
            if attempt == retries or err.code < 500:
                raise _network_error(url, err) from None
        except (OSError, http.client.HTTPException) as err:
            if attempt == retries:
                raise _network_error(url, err) from None
            have = part.stat().st_size if part.exists() else 0
            logger.warning("Download interrupted at %d bytes (%s); resuming.", have, err)
        time.sleep(min(2.0**attempt, 10.0) * 0.1)
    raise AssertionError("unreachable")


def verify(path: str | os.PathLike, model: str) -> None:
    """Check that `path` opens as an `.npz` holding every key `model` needs.

    Raises:
        CheckpointError: unreadable, or keys missing (the message lists them).
    """
    weights = load_npz(path, model)
    npz_to_state_dict(weights, get_config(model), include_head=False)


def fetch_checkpoint(
    name: str,
    source: str | None = None,
    directory: str = "checkpoint",
    base_url: str | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    retries: int = RETRIES,
    timeout: float = 60.0,
) -> Path:
    """Download and verify one official checkpoint; returns its local path.

    An existing final file is kept unless `force`. Verification failure deletes the download.
    Without `source`, the file comes from `default_source(name)`.

    Raises:
        UserError: unknown name/source, network failure, or a file that is not a valid
            checkpoint for the model.
    """
    source = source or default_source(name)
    stem, model = resolve_file(name, source)
    dest = checkpoint_path(stem, source, directory)
    if dest.exists() and not force:
        logger.info("%s already exists; pass --force to download it again.", dest)
        return dest
    base = base_url or os.environ.get("VIT_BASE_URL") or BASE_URL
    url = f"{base.rstrip('/')}/{source}/{stem}.npz"
    logger.info("Downloading %s to %s", url, dest)
    part = download(url, dest, retries=retries, timeout=timeout, progress=progress)
    try:
        verify(part, model)
    except CheckpointError as err:
        part.unlink()
        raise UserError(
            f"The file downloaded from {url} is not a usable {model} checkpoint and was deleted: "
            f"{err} If you use a mirror (--base_url), check that it serves the official files."
        ) from None
    os.replace(part, dest)
    logger.info("Saved %s", dest)
    return dest


def list_files() -> str:
    """The official files per source, as `--list` prints them."""
    lines = []
    for source, files in OFFICIAL_FILES.items():
        lines.append(f"{source}:")
        for stem, size in files.items():
            note = f"  ({size})" if size else ""
            lines.append(f"  {stem}{note}")
    lines.append(f"Base URL: {BASE_URL} (override with --base_url or VIT_BASE_URL)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m utils.download",
        description="Download an official ViT checkpoint (.npz) into checkpoint/.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        help=f"model or file name, e.g. ViT-B_16, ViT-B_16-224; models: {', '.join(model_names())}",
    )
    parser.add_argument(
        "--source",
        choices=list(OFFICIAL_FILES),
        default=None,
        help=f"default: {DEFAULT_SOURCE}, or the only source that has the file",
    )
    parser.add_argument("--dir", default="checkpoint", help="where to save (default: checkpoint)")
    parser.add_argument(
        "--base_url",
        default=None,
        help=f"mirror with the same layout (default: $VIT_BASE_URL or {BASE_URL})",
    )
    parser.add_argument("--list", action="store_true", help="list the official files and exit")
    parser.add_argument("--force", action="store_true", help="download even if the file exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.list:
        print(list_files())
        return
    if not args.model:
        raise UserError(
            "Name a checkpoint, e.g. `python3 -m utils.download ViT-B_16`, or list them with "
            "--list."
        )
    path = fetch_checkpoint(args.model, args.source, args.dir, args.base_url, force=args.force)
    print(path)


if __name__ == "__main__":
    run_cli(main)
