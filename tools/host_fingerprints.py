"""Print the fingerprints of the host functions the pack mirrors (host/fingerprints.py) for the host this
finds, marking those no recorded host has. After the exactness tests pass on a new ComfyUI or
AnimateDiff-Evolved, add its fingerprints to RECORDED under the host's name (and, for a Wan subclass the pack
slices, to families/wan/patch.py WAN_SUBCLASSES).

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
    from comfyui_streamline.host import fingerprints as hf
    from comfyui_streamline.families.svd.forward import svd_functions
    from comfyui_streamline.families.wan.patch import WAN_SUBCLASSES, wan_functions
    from comfyui_streamline.testing import synthetic

    functions = {**hf.comfy_functions(), **hf.ade_functions(synthetic.ade_transformer_options(1)),
                 **svd_functions(), **wan_functions()}
    print("RECORDED (this host):")
    for name, function in functions.items():
        fingerprint = hf.fingerprint(function)
        recorded = hf.RECORDED.get(name, {}).get(fingerprint)
        print(f'    "{name}": "{fingerprint}",  # {recorded or "NOT RECORDED"}')
    import importlib
    import pkgutil

    import comfy.ldm.wan
    import comfy.ldm.wan.model as wan_model

    classes = []
    for module_info in pkgutil.iter_modules(comfy.ldm.wan.__path__):
        module = importlib.import_module(f"comfy.ldm.wan.{module_info.name}")
        classes += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, wan_model.WanModel)
                    and c.__module__ == module.__name__]
    print("Wan subclasses with their own forward_orig:")
    for cls in classes:
        if cls.forward_orig is wan_model.WanModel.forward_orig:
            continue
        fingerprint = hf.fingerprint(cls.forward_orig)
        known = WAN_SUBCLASSES.get(cls.__name__)
        mark = "recorded" if known and fingerprint in known.fingerprints else "not recorded: left to ComfyUI"
        print(f'    "{cls.__name__}": "{fingerprint}",  # {mark}')
    from comfyui_streamline.families.ltxv.patch import LTX_RECORDED, host_reason, ltxv_functions

    print(f"LTX_RECORDED (this host; families/ltxv/patch.py){': ' + host_reason() if host_reason() else ''}:")
    for name, function in ltxv_functions().items():
        fingerprint = hf.fingerprint(function)
        print(f'    "{name}": "{fingerprint}",  # {LTX_RECORDED.get(name, {}).get(fingerprint) or "NOT RECORDED"}')


if __name__ == "__main__":
    main()
