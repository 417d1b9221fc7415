"""Lowering targets (installed as ``statqat_ao.backends``): torchao packed tensors, ONNX,
ExecuTorch. Every backend reads the codes and scales that convert produced."""
