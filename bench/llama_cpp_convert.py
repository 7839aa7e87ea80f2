"""Run llama.cpp's own converter (convert_hf_to_gguf.py) as the reference in the converter bench.

llama.cpp's converter identifies a BPE pre-tokenizer by hashing the encoding of a sample text and
refuses vocabularies whose hash it does not know, which includes the synthetic checkpoint's tiny
vocabulary. This wrapper tells it "gpt-4o" (what it writes for the real gpt-oss tokenizer) so it
converts the same weights; nothing else is changed.

    python bench/llama_cpp_convert.py LLAMA_CPP_DIR SRC OUT
"""

import sys
from pathlib import Path

llama_dir, src, out = sys.argv[1:4]
sys.path.insert(0, llama_dir)
sys.path.insert(1, str(Path(llama_dir) / "gguf-py"))
import conversion.base  # noqa: E402
import convert_hf_to_gguf  # noqa: E402

conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-4o"
sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out]
convert_hf_to_gguf.main()
