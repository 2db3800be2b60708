"""Merge a LoRA adapter into its base, for an export that asks for a merged model of a
checkpoint that holds no ``merged/``: ``python -m posttrain.trainer.merge_export --base B
--adapter A --tokenizer T --out FOLDER``.

Its own process because merging needs torch and peft, which the API process never imports. The
base loads as stored (its own dtype), as a checkpoint's own ``merged/`` is made
(``checkpoints.write_checkpoint``), so the merged model gives the logits of base + adapter. Exit
status 0 and a complete folder, or non-zero with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys


def merge(*, base: str, adapter: str, tokenizer: str, out: str, trust_remote_code: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.trainer.merge_export")
    parser.add_argument("--base", required=True, help="the base model folder")
    parser.add_argument("--adapter", required=True, help="the LoRA adapter folder")
    parser.add_argument("--tokenizer", required=True, help="the folder whose tokenizer goes with the model")
    parser.add_argument("--out", required=True, help="an empty folder to write the merged model into")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    try:
        merge(base=args.base, adapter=args.adapter, tokenizer=args.tokenizer, out=args.out,
              trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - the reason goes to stderr, the caller reads the status
        print(f"merge failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
