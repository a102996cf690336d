"""HunyuanVideo 1.0 / I2V / 1.5 (comfy/ldm/hunyuan_video/model.py): its Flux-style double and single blocks sliced over tokens."""
