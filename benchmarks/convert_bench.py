"""Conversion time and peak memory, PocketLM's converters next to the upstream one.

For each real-shape random checkpoint (see common.py) runs, each in its own process:
`python -m pocketlm.converters` at several quant types, and, for the T5 family, CTranslate2's own
transformers converter (`ct2-transformers-converter`, which needs torch and transformers and
loads the whole model) at int8. Writes benchmarks/results/convert.json and prints a table.

    .venv/bin/python benchmarks/convert_bench.py [bloomz-560m flan-t5-small mt0-large]
"""

from __future__ import annotations

import json
import shutil
import sys

from common import CACHE, ensure_checkpoint, peak_rss, write_result

PLAN = {
    "bloomz-560m": [("pocketlm", q) for q in ("f16", "q8_0", "q4_k_m")],
    "flan-t5-small": [("pocketlm", "int8"), ("pocketlm", "float32"), ("ctranslate2", "int8")],
    "mt0-large": [("pocketlm", "int8"), ("ctranslate2", "int8")],
}


def command(tool: str, src: str, out: str, quant: str) -> list[str]:
    if tool == "pocketlm":
        return [sys.executable, "-m", "pocketlm.converters", src, "-o", out, "--quant", quant, "--force", "--json"]
    return [
        sys.executable,
        "-m",
        "ctranslate2.converters.transformers",
        "--model",
        src,
        "--output_dir",
        out,
        "--quantization",
        quant,
        "--force",
    ]


def main(names: list[str]) -> int:
    rows = []
    for name in names:
        src = ensure_checkpoint(name)
        size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
        for tool, quant in PLAN[name]:
            out = CACHE / (f"{name}-{tool}-{quant}.gguf" if name.startswith("bloom") else f"{name}-{tool}-{quant}")
            row = {"model": name, "tool": tool, "quant": quant, "checkpoint_mib": round(size / 2**20)}
            try:
                seconds, rss, _ = peak_rss(command(tool, str(src), str(out), quant))
                row.update(
                    seconds=round(seconds, 1),
                    peak_rss_mib=round(rss / 2**20),
                    peak_rss_vs_checkpoint=round(rss / size, 2),
                )
            except RuntimeError as e:
                row["error"] = str(e).strip().splitlines()[-1][:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    path = write_result(
        "convert", {"command": "python benchmarks/convert_bench.py " + " ".join(names), "results": rows}
    )
    print(f"\nwrote {path}\n")
    print("| model | checkpoint (MiB) | converter | quant | time (s) | peak RSS (MiB) | RSS / checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['checkpoint_mib']} | {r['tool']} | {r['quant']} | failed: {r['error']} | | |")
        else:
            print(
                f"| {r['model']} | {r['checkpoint_mib']} | {r['tool']} | {r['quant']} | {r['seconds']} | "
                f"{r['peak_rss_mib']} | {r['peak_rss_vs_checkpoint']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(PLAN)))
