"""The keys under which the pack keeps its state in ComfyUI's transformer_options and registers its wrappers:
one definition of each, for every family and technique.

State (transformer_options[key]):
- STREAMLINE_KEY: Streamline Model Patch's / Memory Budget's StreamlineState (techniques/slicing.py);
- REHASH_KEY: Step Rehash's RehashState (techniques/rehash.py).
Per call (a per-call copy of transformer_options):
- CALL_CONFIG_KEY: the SliceConfig the slicing wrapper chose for one DiT call (the Memory Budget's plan);
- REHASH_CALL_KEY: Step Rehash's RehashCall for one UNet call (its shallow/deep split);
- DIT_CALL_KEY: the per-call facts a DiT block hook needs (families/dit/hooks.py);
- DIT_REHASH_CALL_KEY: Step Rehash's per-call split of a DiT's blocks.
Wrapper keys (ModelPatcher.add_wrapper_with_key): STREAMLINE_WRAPPER_KEY, REHASH_WRAPPER_KEY, DIT_WRAPPER_KEY.
"""

STREAMLINE_KEY = "streamline"
REHASH_KEY = "streamline_rehash"
CALL_CONFIG_KEY = "streamline_call_config"
REHASH_CALL_KEY = "streamline_rehash_call"
DIT_CALL_KEY = "streamline_wan_call"
DIT_REHASH_CALL_KEY = "streamline_wan_rehash"

STREAMLINE_WRAPPER_KEY = "streamline"
REHASH_WRAPPER_KEY = "streamline_rehash"
DIT_WRAPPER_KEY = "streamline_wan"
