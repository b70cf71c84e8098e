"""Models named by Hugging Face Hub id: `org/name[@revision]`.

Only what PocketLM needs is downloaded: config, tokenizer and the weights of one storage
format (safetensors preferred, never both), or, for repos of ready-made GGUF files, the one
model of the wanted quant type (every file of a split one, `-00001-of-0000N.gguf`...).
Everything goes through huggingface_hub and its cache, so HF_HOME, HF_TOKEN, HF_ENDPOINT and
HF_HUB_OFFLINE mean what they always mean; with HF_HUB_OFFLINE=1 no request is made at all
and only cached files are used.

The network is allowed to fail in every way it does on planes, behind captive portals and
firewalls: any fault (no DNS, refused, no answer, reset, TLS, HTTP 5xx/429, an HTML page
instead of the API) means "the Hub is not reachable", and the cached snapshot is used if
there is one. Metadata calls give up after `metadata_timeout()` seconds (10 by default;
POCKETLM_HUB_TIMEOUT, else HF_HUB_ETAG_TIMEOUT); a download that receives nothing for
HF_HUB_DOWNLOAD_TIMEOUT seconds is resumed (5 times, with Range requests), then given up in
one line; what arrived stays, and the next command continues it (`_fetch_blob`). A local
disk that is full or read-only is not a network fault: one line names the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pocketlm.converters.checkpoint import MODEL_FILES, find_weight_files, sha256_file
from pocketlm.converters.core.errors import (
    CheckpointError,
    ModelLoadError,
    PocketLMError,
    first_line,
    write_failure,
    writing,
)
from pocketlm.converters.core.gguf_split import split_files, split_parts

log = logging.getLogger(__name__)

REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
CONFIG_FILES = list(MODEL_FILES)
SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
PYTORCH = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
# Without --quant, the first of these a GGUF repo offers: a good size/quality balance first.
DEFAULT_TIMEOUT = 10.0
DOWNLOAD_TRIES = 6  # as huggingface_hub: the first try and 5 resumptions
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
T = TypeVar("T")
GGUF_PREFERENCE = ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q4_0", "q5_0", "q6_k", "q8_0", "f16", "bf16", "f32"]


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_ref(text: str) -> HubRef | None:
    """A hub reference, unless `text` names something on disk (paths win over repo ids)."""
    if Path(text).expanduser().exists():
        return None
    m = REPO_REF.match(text)
    return HubRef(m["repo"], m["revision"]) if m else None


class HubUnreachable(Exception):
    """A network fault talking to the Hub, described for one line of output."""


def metadata_timeout() -> float:
    """Seconds a metadata call may take: POCKETLM_HUB_TIMEOUT, else HF_HUB_ETAG_TIMEOUT, else 10."""
    for name in ("POCKETLM_HUB_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                seconds = float(value)
            except ValueError:
                raise PocketLMError(f"{name}={value!r}: not a number of seconds") from None
            if not seconds > 0:
                raise PocketLMError(f"{name}={value!r}: must be more than 0 seconds")
            return seconds
    return DEFAULT_TIMEOUT


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # only file systems give these


def disk_fault(error: BaseException) -> OSError | None:
    """The local file-system error behind `error` (a full or read-only disk, a folder this
    process may not write), if that is what it is."""
    cause: BaseException | None = error
    for _ in range(8):
        if cause is None:
            return None
        if isinstance(cause, OSError) and (
            cause.errno in DISK_ERRNOS or (isinstance(cause, PermissionError) and cause.filename is not None)
        ):
            return cause
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


def network_fault(error: BaseException) -> str | None:
    """What went wrong on the way to the Hub, or None if `error` is not a network fault.

    huggingface_hub 2.x talks through httpx2, whose transport errors are not OSError; its own
    HTTP errors are. The causes are unwrapped to name the fault a user can act on."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    where = endpoint()
    if isinstance(error, HubUnreachable):
        return str(error)
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is on"
    if isinstance(error, LocalEntryNotFoundError):  # huggingface_hub's own "unreachable, not cached"
        cause = error.__cause__ or error.__context__
        return (network_fault(cause) if cause is not None else None) or f"{where} could not be reached"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status is None:
            return f"{where}: {first_line(error)}"
        if status == 429:
            return f"{where} answered HTTP 429 (too many requests: rate limited)"
        portal = "html" in error.response.headers.get("content-type", "")
        return f"{where} answered HTTP {status}" + (" with an HTML page (a proxy or captive portal?)" if portal else "")
    if isinstance(error, (httpx2.TransportError, OSError)):
        if disk_fault(error) is not None:
            return None
        chain, cause = [], error
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if isinstance(error, httpx2.TimeoutException) or any(
            isinstance(c, (socket.timeout, TimeoutError)) for c in chain
        ):
            return f"no answer from {where} in time"
        if any(isinstance(c, socket.gaierror) for c in chain):
            return f"cannot resolve the host of {where} (no DNS: offline?)"
        if any(isinstance(c, ConnectionRefusedError) for c in chain):
            return f"{where} refused the connection"
        if any(isinstance(c, ssl.SSLError) for c in chain) or "SSL" in str(error):
            return f"TLS with {where} failed ({first_line(error)})"
        if any(isinstance(c, ConnectionResetError) for c in chain):
            return f"{where} reset the connection"
        if isinstance(error, httpx2.ProxyError):
            return f"the proxy failed ({first_line(error)})"
        return f"{where}: {first_line(error)}"
    return None


def _bounded_session(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a default timeout: it has none, and its
    repo_info/list calls pass none, so a silent server would hold them forever."""
    import httpx2
    from huggingface_hub.utils import get_session

    session = get_session()
    if session.timeout.read is None and session.timeout.connect is None:
        session.timeout = httpx2.Timeout(seconds)


def _within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`, or HubUnreachable once `seconds` pass. DNS lookups and servers that trickle
    bytes are not bounded by socket timeouts; the abandoned call ends in a daemon thread."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, name="pocketlm-hub", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise HubUnreachable(f"no answer from {endpoint()} within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def gguf_quant(filename: str) -> str | None:
    """The quant type in a GGUF file name (e.g. bloomz-560m.Q4_K_M.gguf -> q4_k_m; a split
    model's files, bloomz-7b1-Q4_K_M-00001-of-00003.gguf, by their common name)."""
    parts = split_parts(Path(filename).name)
    name = (filename if parts is None else parts[0]).lower()
    from pocketlm.converters.core.formats import FORMATS

    for quant in sorted(FORMATS["gguf"].quants, key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){quant}([^a-z0-9]|$)", name):
            return quant
    return None


def gguf_models(files: list[str]) -> dict[str, list[str]]:
    """The GGUF models among a repo's files: each model's files (one, or every file of a split
    model, as llama.cpp names them), by its first file."""
    models: dict[str, list[str]] = {}
    for f in sorted(files):
        folder, name = f.rpartition("/")[0], f.rpartition("/")[2]
        shards = [f"{folder}/{n}" if folder else n for n in split_files(name)]
        models.setdefault(shards[0], shards)
    return models


def pick_gguf(files: list[str], quant: str | None, ref: HubRef) -> list[str]:
    """The files of the GGUF model to use (several for a split model, its first first): the
    requested quant, else the preferred one available."""
    models = gguf_models(files)
    by_quant: dict[str, list[str]] = {}
    for first, shards in models.items():
        q = gguf_quant(first)
        if q and q not in by_quant:
            by_quant[q] = shards
    if quant:
        if quant.lower() not in by_quant:
            raise ModelLoadError(
                f"{ref} has no {quant} GGUF file; available: {', '.join(sorted(by_quant)) or ', '.join(files)}"
            )
        chosen = by_quant[quant.lower()]
    else:
        chosen = next((by_quant[q] for q in GGUF_PREFERENCE if q in by_quant), None)
        if chosen is not None:
            q = gguf_quant(chosen[0])
            log.warning("%s offers %s; using %s (choose with --quant)", ref, ", ".join(sorted(by_quant)), q)
        elif len(models) == 1:
            chosen = next(iter(models.values()))
        else:
            raise ModelLoadError(
                f"{ref}: cannot tell the quant types of its GGUF files ({', '.join(files)}); name one with --quant"
            )
    return chosen


def checkpoint_patterns(files: list[str]) -> list[str]:
    """allow_patterns for a checkpoint repo: config, tokenizer, and one storage format's weights."""
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return CONFIG_FILES + (SAFETENSORS if has_safetensors else PYTORCH)


def _missing(ref: HubRef, why: str) -> ModelLoadError:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    folder = "models--" + ref.repo.replace("/", "--")
    error = ModelLoadError(
        f"{ref} is not available here ({why}); on a connected machine run `pocketlm pull {ref}` and copy "
        f"{cache}/{folder} into this machine's {cache}, or pass a local folder instead"
    )
    error.reason = why  # type: ignore[attr-defined]  # the part in parentheses, for callers' own lines
    return error


def _storage(ref: HubRef) -> Path:
    """The repo's folder in the Hugging Face cache (models--org--name)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo.replace("/", "--"))


def local_snapshot(ref: HubRef) -> Path:
    """The cached snapshot folder for a ref, found without any request (the cache's layout:
    refs/<branch> holds a commit, snapshots/<commit>/ the files). huggingface_hub's own
    offline lookup insists on every file of the repo, and PocketLM fetches only some."""
    storage = _storage(ref)
    revision = ref.revision or "main"
    commit = revision if (storage / "snapshots" / revision).is_dir() else None
    if commit is None and (storage / "refs" / revision).is_file():
        commit = (storage / "refs" / revision).read_text().strip()
    if not commit or not (storage / "snapshots" / commit).is_dir():
        raise _missing(ref, "not in the Hugging Face cache and the Hub is not reachable")
    return storage / "snapshots" / commit


def cached(ref: HubRef, quant: str | None = None) -> Path:
    """What PocketLM uses of a ref's complete cached snapshot, found without any request."""
    return _from_folder(local_snapshot(ref), ref, quant)


def _from_folder(folder: Path, ref: HubRef, quant: str | None) -> Path:
    """A cached snapshot as PocketLM uses it: a GGUF file or a complete checkpoint folder."""
    ggufs = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))
    if ggufs and not (folder / "config.json").is_file():
        chosen = pick_gguf(ggufs, quant, ref)
        lacking = [f for f in chosen if f not in ggufs]
        if lacking:
            raise _missing(
                ref,
                f"the cached snapshot lacks {', '.join(lacking)} of the {len(chosen)} files of {chosen[0]} "
                f"(an interrupted download? `pocketlm pull {ref}` resumes it)",
            )
        return folder / chosen[0]
    incomplete = _incomplete(folder)
    if incomplete:
        raise _missing(
            ref,
            f"the cached snapshot is incomplete: {incomplete} (an interrupted download? "
            f"`pocketlm pull {ref}` resumes it)",
        )
    return folder


def _incomplete(folder: Path) -> str | None:
    """What a downloaded checkpoint folder still lacks (config.json, a weight shard), if anything."""
    if not (folder / "config.json").is_file():
        return f"{folder / 'config.json'} is missing"
    try:
        find_weight_files(folder)
    except CheckpointError as e:
        return str(e)
    return None


def _safe_name(name: object) -> bool:
    """A repo file name that stays inside the download folder (listings come from the network)."""
    return isinstance(name, str) and bool(name) and not name.startswith(("/", "\\")) and ".." not in Path(name).parts


def pull(
    ref: HubRef,
    quant: str | None = None,
    progress: bool = True,
    before_download: Callable[[list[str], int | None], None] | None = None,
) -> Path:
    """Download (or find in the cache) what PocketLM needs of a hub repo; return its local path.

    Any network fault falls back to the cached snapshot with a warning, or, without one,
    raises a one-line ModelLoadError saying how to get the model onto this machine.
    `before_download(files, total_bytes)` hears what is about to be fetched (sizes asked of
    the Hub only then; None if it does not say)."""
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ModelLoadError("hub ids need huggingface_hub: pip install huggingface_hub") from None
    if offline():
        return cached(ref, quant)
    seconds = metadata_timeout()
    try:
        _bounded_session(seconds)
        info = _within(
            seconds,
            lambda: HfApi().model_info(
                ref.repo, revision=ref.revision, timeout=seconds, files_metadata=before_download is not None
            ),
        )
    except RevisionNotFoundError:
        raise ModelLoadError(f"{ref}: no such revision on the Hub") from None
    except GatedRepoError:
        raise ModelLoadError(f"{ref.repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{ref.repo}: no such model on the Hub (or it is private: set HF_TOKEN)") from None
    except (ValueError, KeyError, TypeError) as e:  # 200 with a body that is not the API's JSON
        return _fall_back(
            ref,
            quant,
            f"{endpoint()} answered with something that is not the Hub API "
            f"(a proxy or captive portal?): {type(e).__name__}",
        )
    except Exception as e:
        reason = network_fault(e)
        if reason is None:
            raise
        return _fall_back(ref, quant, reason)
    files = [s.rfilename for s in info.siblings or [] if _safe_name(s.rfilename)]
    ggufs = [f for f in files if f.endswith(".gguf")]
    weights = any(f.endswith((".safetensors", ".bin")) for f in files)
    if not ggufs and not weights:
        raise ModelLoadError(f"{ref}: the repo holds no weights PocketLM can convert (no .safetensors, .bin or .gguf)")
    if ggufs and not weights:
        patterns = pick_gguf(ggufs, quant, ref)
        lacking = [f for f in patterns if f not in ggufs]
        if lacking:
            raise ModelLoadError(
                f"{ref}: {patterns[0]} is split in {len(patterns)} files, but the repo lacks {', '.join(lacking)}"
            )
    else:
        patterns = checkpoint_patterns(files)
    wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
    if before_download is not None:
        sizes = [s.size for s in info.siblings or [] if s.rfilename in wanted]
        before_download(wanted, None if None in sizes else sum(sizes))
    try:
        for name in wanted:
            if name.endswith(WEIGHT_SUFFIXES):
                _fetch_blob(ref, name, info.sha, seconds, progress)
        # By the name asked for (not info.sha), so the cache records the branch -> commit ref
        # that offline use resolves later; the weights are in blobs/ already, only linked here.
        with _progress_bars(progress), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Not enough free disk space")  # a full disk is one error line
            if ggufs and not weights:  # a model's file, or every file of a split model: the first is the model
                got = [
                    hf_hub_download(ref.repo, name, revision=ref.revision, etag_timeout=seconds) for name in patterns
                ]
                return Path(got[0])
            folder = Path(
                snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns, etag_timeout=seconds)
            )
    except Exception as e:
        disk = disk_fault(e)
        if disk is not None:
            raise write_failure(disk.filename or _storage(ref), disk) from None
        reason = network_fault(e)
        if reason is None:
            raise
        failed = ModelLoadError(
            f"downloading {ref} failed ({reason}); what arrived is kept: run the same command again to resume"
        )
        try:
            older = cached(ref, quant)
        except ModelLoadError:
            raise failed from None
        log.warning("%s; using the cached %s", failed, older)
        return older
    incomplete = _incomplete(folder)
    if incomplete:
        raise ModelLoadError(
            f"downloading {ref} left it incomplete ({incomplete}): run the same command again to retry"
        )
    return folder


def _fetch_blob(ref: HubRef, name: str, commit: str | None, seconds: float, progress: bool) -> None:
    """Download one weight file into the cache's blobs/ folder, resumable across runs.

    huggingface_hub 2.x deletes a partial file when it gives up, so a new command would start
    a 1 GB file again. Here what arrives stays in blobs/<etag>.pocketlm-partial and the next
    try continues it with a Range request; once whole (size, and sha256 for LFS files) it
    becomes blobs/<etag>, which snapshot_download/hf_hub_download then only link. Files stored
    on Xet are left to huggingface_hub: Xet's chunk cache keeps what arrived."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    from tqdm import tqdm

    meta = get_hf_file_metadata(hf_hub_url(ref.repo, name, revision=commit or ref.revision), timeout=seconds)
    if not meta.etag or (meta.xet_file_data is not None and not constants.HF_HUB_DISABLE_XET):
        return
    blobs = _storage(ref) / "blobs"
    blob = blobs / meta.etag
    if blob.exists() or not _safe_name(meta.etag) or "/" in meta.etag:
        return
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / (meta.etag + ".pocketlm-partial")
    bar = tqdm(total=meta.size, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False)
    try:
        for attempt in range(DOWNLOAD_TRIES):
            have = partial.stat().st_size if partial.exists() else 0
            if meta.size is not None and have >= meta.size:
                break
            bar.reset(meta.size)
            bar.update(have)
            headers = build_hf_headers() | ({"Range": f"bytes={have}-"} if have else {})
            try:
                with get_session().stream(
                    "GET",
                    meta.location,
                    headers=headers,
                    follow_redirects=True,
                    timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                ) as response:
                    hf_raise_for_status(response)
                    resumed = have and response.status_code == 206
                    try:
                        with open(partial, "ab" if resumed else "wb") as f:
                            for chunk in response.iter_bytes(1 << 20):
                                f.write(chunk)
                                bar.update(len(chunk))
                    except OSError as e:  # the disk, not the network: kept for the next command to resume
                        kept = partial.exists() and partial.stat().st_size > 0
                        if partial.exists() and not kept:
                            partial.unlink()
                        note = " (what arrived is kept: with room, the same command resumes)" if kept else ""
                        raise write_failure(partial, e, note=note) from None
            except Exception as e:
                reason = network_fault(e)
                if reason is None or attempt == DOWNLOAD_TRIES - 1:
                    raise
                got = partial.stat().st_size if partial.exists() else 0
                log.warning("download of %s interrupted (%s); resuming at %.1f MB", name, reason, got / 1e6)
                time.sleep(1)
    finally:
        bar.close()
    size = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and size != meta.size:
        raise HubUnreachable(f"{name} stopped at {size} of {meta.size} bytes")
    if re.fullmatch(r"[0-9a-f]{64}", meta.etag) and sha256_file(partial) != meta.etag:
        partial.unlink()
        raise ModelLoadError(
            f"downloading {ref} gave a {name} whose sha256 differs from the Hub's: run the same command again"
        )
    with writing(blob):
        os.replace(partial, blob)


def _fall_back(ref: HubRef, quant: str | None, reason: str) -> Path:
    """The cached snapshot when the Hub cannot be reached; the one-line error without one."""
    try:
        folder = local_snapshot(ref)
    except ModelLoadError:
        raise _missing(ref, f"the Hub is not reachable: {reason}; nothing cached") from None
    log.warning("the Hub is not reachable (%s); using the cached %s", reason, folder)
    return _from_folder(folder, ref, quant)


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if show else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()
