"""Models named by Hugging Face Hub id: `org/name[@revision]`.

Only what PocketLM needs is downloaded: config, tokenizer and the weights of one storage
format (safetensors preferred, never both), or, for repos of ready-made GGUF files, the one
file of the wanted quant type. Everything goes through huggingface_hub and its cache, so
HF_HOME, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE mean what they always mean; with
HF_HUB_OFFLINE=1 no request is made at all and only cached files are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from convert.errors import ModelLoadError

log = logging.getLogger(__name__)

REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "spiece.model"]
SAFETENSORS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
PYTORCH = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
# Without --quant, the first of these a GGUF repo offers: a good size/quality balance first.
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


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def gguf_quant(filename: str) -> str | None:
    """The quant type in a GGUF file name (e.g. bloomz-560m.Q4_K_M.gguf -> q4_k_m)."""
    name = filename.lower()
    for quant in sorted(GGUF_PREFERENCE + ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_1", "q5_1"], key=len, reverse=True):
        if re.search(rf"(^|[^a-z0-9]){quant}([^a-z0-9]|$)", name):
            return quant
    return None


def pick_gguf(files: list[str], quant: str | None, ref: HubRef) -> str:
    """The GGUF file to use: the requested quant, else the preferred one available."""
    by_quant: dict[str, str] = {}
    for f in sorted(files):
        q = gguf_quant(f)
        if q and q not in by_quant:
            by_quant[q] = f
    if quant:
        if quant.lower() not in by_quant:
            raise ModelLoadError(f"{ref} has no {quant} GGUF file; available: {', '.join(sorted(by_quant)) or ', '.join(files)}")
        return by_quant[quant.lower()]
    for q in GGUF_PREFERENCE:
        if q in by_quant:
            log.warning("%s offers %s; using %s (choose with --quant)", ref, ", ".join(sorted(by_quant)), q)
            return by_quant[q]
    if len(files) == 1:
        return files[0]
    raise ModelLoadError(f"{ref}: cannot tell the quant types of its GGUF files ({', '.join(files)}); name one with --quant")


def checkpoint_patterns(files: list[str]) -> list[str]:
    """allow_patterns for a checkpoint repo: config, tokenizer, and one storage format's weights."""
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    return CONFIG_FILES + (SAFETENSORS if has_safetensors else PYTORCH)


def _missing(ref: HubRef, why: str) -> ModelLoadError:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    folder = "models--" + ref.repo.replace("/", "--")
    return ModelLoadError(
        f"{ref} is not available here ({why}); on a connected machine run `pocketlm pull {ref}` and copy "
        f"{cache}/{folder} into this machine's {cache}, or pass a local folder instead"
    )


def local_snapshot(ref: HubRef) -> Path:
    """The cached snapshot folder for a ref, found without any request (the cache's layout:
    refs/<branch> holds a commit, snapshots/<commit>/ the files). huggingface_hub's own
    offline lookup insists on every file of the repo, and PocketLM fetches only some."""
    from huggingface_hub import constants

    storage = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo.replace("/", "--"))
    revision = ref.revision or "main"
    commit = revision if (storage / "snapshots" / revision).is_dir() else None
    if commit is None and (storage / "refs" / revision).is_file():
        commit = (storage / "refs" / revision).read_text().strip()
    if not commit or not (storage / "snapshots" / commit).is_dir():
        raise _missing(ref, "not in the Hugging Face cache and the Hub is not reachable")
    return storage / "snapshots" / commit


def _from_folder(folder: Path, ref: HubRef, quant: str | None) -> Path:
    """A cached snapshot as PocketLM uses it: a GGUF file or a checkpoint folder."""
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if ggufs and not (folder / "config.json").is_file():
        return folder / pick_gguf(ggufs, quant, ref)
    if not (folder / "config.json").is_file():
        raise _missing(ref, f"the cached snapshot {folder} is incomplete")
    return folder


def _safe_name(name: object) -> bool:
    """A repo file name that stays inside the download folder (listings come from the network)."""
    return isinstance(name, str) and bool(name) and not name.startswith(("/", "\\")) and ".." not in Path(name).parts


def pull(ref: HubRef, quant: str | None = None, progress: bool = True) -> Path:
    """Download (or find in the cache) what PocketLM needs of a hub repo; return its local path."""
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        raise ModelLoadError("hub ids need huggingface_hub: pip install huggingface_hub") from None
    if offline():
        return _from_folder(local_snapshot(ref), ref, quant)
    try:
        info = HfApi().model_info(ref.repo, revision=ref.revision)
    except RevisionNotFoundError:
        raise ModelLoadError(f"{ref}: no such revision on the Hub") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{ref.repo}: no such model on the Hub (or it is private: set HF_TOKEN)") from None
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        log.warning("the Hub is not reachable (%s); using the local cache", type(e).__name__)
        return _from_folder(local_snapshot(ref), ref, quant)
    files = [s.rfilename for s in info.siblings or [] if _safe_name(s.rfilename)]
    ggufs = [f for f in files if f.endswith(".gguf")]
    weights = any(f.endswith((".safetensors", ".bin")) for f in files)
    if not ggufs and not weights:
        raise ModelLoadError(f"{ref}: the repo holds no weights PocketLM can convert (no .safetensors, .bin or .gguf)")
    # By the name asked for (not info.sha), so the cache records the branch -> commit ref that
    # offline use resolves later.
    with _progress_bars(progress):
        if ggufs and not weights:
            return Path(hf_hub_download(ref.repo, pick_gguf(ggufs, quant, ref), revision=ref.revision))
        return Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=checkpoint_patterns(files)))


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if show else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()
