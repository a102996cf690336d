"""families.svd"""
