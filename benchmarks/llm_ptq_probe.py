"""SmolLM2-135M PTQ probes: held-out perplexity of each (method, error) pair after sq.calibrate.

The probes that chose the default weight estimator (BENCHMARKS.md section 11). Usage:
    python benchmarks/llm_ptq_probe.py "FP4 g32,NVFP4" "minmax:weight,search:output,analytic:output"
"""

import json
import sys
import time
import warnings

import torch

import statqat_ao as sq
from statqat_ao.models import load_smollm2, pydoc_split
from statqat_ao.models.text import perplexity
from statqat_ao.tools.llm_qat import LLMQATSettings, qat_run, statqat_recipe

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model, tok = load_smollm2()
split = pydoc_split(tok, held_out_windows=16)
st = LLMQATSettings(steps=0)
print("float", perplexity(model, split.held_out[-8:]), flush=True)
FORMATS = {"FP4 g32": ("fp4_e2m1", 32), "NVFP4": ("nvfp4", 16), "MXFP4": ("mxfp4", 32), "INT4 pc": ("int4", "channel"), "INT3 g32": ("int3", 32), "INT4 g32": ("int4", 32)}
methods = [(m, e) for m, e in [tuple(a.split(":")) for a in sys.argv[2].split(",")]]
for label in sys.argv[1].split(","):
    fmt, g = FORMATS[label]
    for m, e in methods:
        qc = sq.get_statqat_qconfig(fmt, None, weight_granularity=g, weight_method=m, weight_error=e, skip=["lm_head"])
        t = time.perf_counter()
        r = qat_run(model, split, statqat_recipe(qc), st, progress=False)
        print(json.dumps({"fmt": label, "method": m, "error": e, "ptq": round(r.ptq_perplexity, 3), "prepare_s": round(r.prepare_seconds, 1), "total_s": round(time.perf_counter() - t, 1)}), flush=True)
