"""Front ends: the qconfig, torch.ao's fake-quantize and observer modules, and torchao's
PT2E quantizer. They build quantizers; graph rewriting lives in ``statqat_ao.passes``."""
