"""OpenVINO helpers of the build side: ONNX -> IR, I/O and precision read from an IR, a parity session
adapter (``io``), and the NNCF quantization recipes (``quantize``)."""
