"""The main job (`make run`): BLOOMZ-560m -> q4_k_m GGUF -> an answer, end to end.

Uses bigscience/bloomz-560m from this machine if it is here (a folder given as argument or
in POCKETLM_BLOOMZ_DIR, or the Hugging Face cache); else, unless HF_HUB_OFFLINE=1, downloads
it (config, tokenizer, safetensors: what `pocketlm pull` takes, about 1.1 GB). If the Hub
cannot be reached within the metadata bound (10 s), it says so in one line and runs the
same pipeline (convert -> quantize -> load -> generate) on a small random BLOOM built on the
spot, every line of which says the answer is synthetic.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ID = "bigscience/bloomz-560m"
PROMPT = "Translate to English: Je t'aime."


def find_local_bloomz(arg: str | None) -> Path | None:
    """bloomz-560m from an explicit folder or the HF cache; never from the network."""
    for candidate in (arg, os.environ.get("POCKETLM_BLOOMZ_DIR")):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    from pocketlm.converters.core.errors import PocketLMError
    from pocketlm.loading.hub import HubRef, cached

    try:
        return cached(HubRef(REPO_ID))
    except PocketLMError:
        return None


def download_bloomz() -> tuple[Path | None, str]:
    """bloomz-560m from the Hub, or None and the one-line reason it could not be had."""
    from pocketlm.converters.core.errors import PocketLMError
    from pocketlm.loading.hub import HubRef, endpoint, offline, pull

    if offline():
        return None, "HF_HUB_OFFLINE=1, so nothing is downloaded"

    def announce(files: list[str], size: int | None) -> None:
        about = (
            f"about {size / 1e9:.1f} GB" if size and size >= 1e8 else f"{size / 1e6:.1f} MB" if size else "size unknown"
        )
        print(
            f"downloading {REPO_ID} from {endpoint()} ({about}: {', '.join(files)}); interrupt and run again to resume",
            flush=True,
        )

    try:
        return pull(HubRef(REPO_ID), progress=sys.stderr.isatty(), before_download=announce), ""
    except PocketLMError as e:
        return None, getattr(e, "reason", str(e))


def main(argv: list[str] | None = None) -> int:
    import pocketlm
    from pocketlm.converters import convert
    from pocketlm.converters.core.errors import PocketLMError
    from pocketlm.converters.synthetic import build_random_bloom
    from pocketlm.loading.cache import cache_root

    argv = sys.argv[1:] if argv is None else argv
    cache = cache_root()
    source = find_local_bloomz(argv[0] if argv else None)
    why = f"{argv[0]} holds no config.json" if argv else ""
    if source is None and not argv:
        source, why = download_bloomz()
    workdir = Path(tempfile.mkdtemp(prefix="pocketlm-demo-"))
    try:
        if source is not None:
            label = ""
            out = cache / "demo" / f"bloomz-560m-{source.resolve().name[:12]}-q4_k_m.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"using {REPO_ID} from {source}")
        else:
            label = "[synthetic] "
            print(
                f"{label}{REPO_ID} is not on this machine (folder, POCKETLM_BLOOMZ_DIR or Hugging Face "
                f"cache) and cannot be had: {why}. Running the same pipeline on a small random BLOOM; "
                "its answer is noise"
            )
            source = build_random_bloom(workdir / "random-bloom")
            out = workdir / "random-bloom-q4_k_m.gguf"
        if not out.exists():
            summary = convert(source, out, quant="q4_k_m", progress=sys.stderr.isatty())
            print(label + summary.describe().replace("\n", "\n" + label))
        else:
            print(f"reusing {out}")
        started = time.perf_counter()
        with pocketlm.load(out) as model:
            info = model.info
            print(
                f"{label}loaded {info.architecture} {info.quant} on {info.backend}/{info.device}, "
                f"{info.threads} threads, in {time.perf_counter() - started:.2f} s"
            )
            print(f"{label}prompt: {PROMPT}")
            sys.stdout.write(f"{label}answer: ")
            sys.stdout.flush()
            stream = model.stream_tokens(PROMPT, max_new_tokens=32)
            for piece in stream.texts():
                sys.stdout.write(piece)
                sys.stdout.flush()
            result = stream.result
            print(
                f"\n{label}{len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
                f"{result.tokens_per_second:.1f} tokens/s"
            )
        return 0
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
