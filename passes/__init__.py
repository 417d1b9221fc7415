"""Graph transforms over torch.fx GraphModules and torch.export programs (installed as
``statqat_ao.passes``): prepare (insert StatQAT fake-quant), fold BatchNorm, share
qparams, convert. Imports the core package only."""
