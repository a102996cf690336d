"""families.unet"""
