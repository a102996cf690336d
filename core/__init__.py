"""Plain-PyTorch parts of Streamlined Inference. Nothing in this package imports `comfy`."""
