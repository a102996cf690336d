"""Print the fingerprints of the host functions the pack mirrors (nodes/host_fingerprints.py), for the
host this finds, next to the recorded ones. After the exactness tests pass on a new ComfyUI or
AnimateDiff-Evolved, paste the printed table into RECORDED and TESTED_HOSTS.

    python tools/host_fingerprints.py [--comfyui PATH]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, ../.., ~/comfy/ComfyUI)")
    args = parser.parse_args()
    hostenv.enter_for_tool(args.comfyui, cpu=True, tool="host_fingerprints")
    from comfyui_streamline.nodes import host_fingerprints as hf
    from comfyui_streamline.tools import synthetic

    functions = {**hf.comfy_functions(), **hf.ade_functions(synthetic.ade_transformer_options(1))}
    print("RECORDED = {")
    for name, function in functions.items():
        mark = "" if hf.RECORDED.get(name) == hf.fingerprint(function) else "  # changed"
        print(f'    "{name}": "{hf.fingerprint(function)}",{mark}')
    print("}")


if __name__ == "__main__":
    main()
