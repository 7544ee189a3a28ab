"""The names of ``vla-ray export``'s formats (torch-free, so the CLI's ``--help`` stays fast)."""

EXPORT_FORMATS = ("onnx", "torchscript", "onnx-int8", "onnx-fp16", "openvino", "triton")
