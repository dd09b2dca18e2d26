"""transformers' own load of a Hugging Face folder, timed the way `benches/ready.rs` times ours:
process start -> model ready -> first prefill (8 tokens). Run by hand in a venv with torch and
transformers (never by CI):

    python benches/transformers_load.py /work/models/next-shape
"""
import sys
import time

t0 = time.time()
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

t_import = time.time()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t_load = time.time()
with torch.no_grad():
    model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]]))
t_first = time.time()
print(
    f"import {t_import - t0:.2f} s | from_pretrained {t_load - t_import:.2f} s | "
    f"first prefill {t_first - t_load:.2f} s | total {t_first - t0:.2f} s"
)
