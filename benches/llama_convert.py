"""Converts a synthetic model folder (`moe-serve synth`) with llama.cpp's own
`convert_hf_to_gguf.py`, for benchmarks against llama.cpp on the same weights.

The synthetic byte-level BPE tokenizer is unknown to the converter's pre-tokenizer hash table;
it uses Qwen2's split pattern, so the pre-tokenizer is declared `qwen2`. Everything else is the
converter as shipped. Run by hand in a venv with torch, numpy and transformers:

    python benches/llama_convert.py LLAMA_CPP_DIR MODEL_DIR --outtype bf16 --outfile OUT.gguf
"""
import runpy
import sys

llama = sys.argv[1]
sys.path.insert(0, llama)
sys.path.insert(0, llama + "/gguf-py")
import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [llama + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
