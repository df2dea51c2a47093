"""One module per file format, each turning its files into (model, tokenizer) and back:
meta.py (params.json + consolidated.*.pth, and this project's rope.json), hf.py (config.json +
safetensors, and the export), gguf.py (llama.cpp). common.py holds the checks they share.
Only checkpoint.py imports these modules."""
