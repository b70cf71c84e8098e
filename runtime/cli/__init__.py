"""The `pocketlm` command: run, serve, convert, quantize, info, doctor, pull, list, rm; the demo; JSONL batch jobs."""
