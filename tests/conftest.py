import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# STATQAT_TEST_DEVICE=cuda runs the tests with CUDA as torch's default device (a GPU
# machine's check; CI runs on the CPU).
if os.environ.get("STATQAT_TEST_DEVICE"):
    torch.set_default_device(os.environ["STATQAT_TEST_DEVICE"])
