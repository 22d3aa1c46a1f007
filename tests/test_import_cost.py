"""Discovering the stage kinds stays cheap: every `tunegraph stage` process imports all task modules
(to validate the recipe), so heavy libraries must be imported inside stage functions, not at module top."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "peft", "bitsandbytes", "trl", "distilabel", "mergekit", "sentence_transformers",
         "datasketch", "gguf", "openai", "triton", "matplotlib", "sklearn", "pyarrow")


def test_stage_discovery_imports_no_heavy_library():
    code = ("import sys, json; from tunegraph.registry import all_kinds; all_kinds(); "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                            check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
