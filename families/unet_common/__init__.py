"""families.unet_common"""
