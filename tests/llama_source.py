"""llama.cpp's own source, of the release the installed llama-cpp-python vendors, as a test reference.

Files of `vendor/llama.cpp/` come from that release's sdist on PyPI (pip's cache after the first
fetch, as `make setup` does) into .cache/llama.cpp/. Without them the tests that need them fail
with a message that says how to get them: a missing reference never turns into a skip.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LLAMA_DIR = ROOT / ".cache" / "llama.cpp"
VENDOR = "/vendor/llama.cpp/"


def llama_cpp_source(*wanted: str) -> Path:
    """.cache/llama.cpp holding `wanted` (files or folders, relative to llama.cpp's root), fetched when missing."""
    missing = [w for w in wanted if not (LLAMA_DIR / w).exists()]
    if not missing:
        return LLAMA_DIR
    version = importlib.metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory() as td:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               "-d", td, f"llama-cpp-python=={version}"], capture_output=True, text=True, timeout=900)
        sdists = list(Path(td).glob("*.tar.gz"))
        if proc.returncode or not sdists:
            pytest.fail(f"llama.cpp's {', '.join(missing)} (the reference this test compares with) is not in "
                        f"{LLAMA_DIR} and could not be fetched from PyPI (llama-cpp-python=={version} sdist): "
                        f"{proc.stderr.strip()[-600:]}; run `make setup` where PyPI is reachable")
        with tarfile.open(sdists[0]) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.partition(VENDOR)[2]
                if rel and any(rel == w or rel.startswith(w.rstrip("/") + "/") for w in wanted):
                    m.name = rel
                    members.append(m)
            LLAMA_DIR.mkdir(parents=True, exist_ok=True)
            tar.extractall(LLAMA_DIR, members=members, filter="data")
    still = [w for w in wanted if not (LLAMA_DIR / w).exists()]
    if still:
        pytest.fail(f"the llama-cpp-python=={version} sdist has no vendor/llama.cpp/{', '.join(still)}")
    return LLAMA_DIR


def cpp_definition(source: str, head: str) -> str:
    """The definition starting with `head` in C++ `source`, through its closing brace (string
    literals skipped: regexes hold braces)."""
    start = source.index(head)
    depth, i, in_str = 0, source.index("{", start), False
    while True:
        c = source[i]
        if in_str:
            in_str = c != '"' or source[i - 1] == "\\"
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                return source[start:end + (source[end] == ";")]
        i += 1


_FIND_BEST_MODEL_MAIN = r"""
#include <cctype>
#include <iostream>
#include <regex>
#include <string>
#include <vector>
static bool string_ends_with(const std::string & s, const std::string & x) {
    return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}
static bool string_remove_suffix(std::string & s, const std::string & x) {
    if (!string_ends_with(s, x)) return false;
    s.resize(s.size() - x.size());
    return true;
}
namespace hf_cache { struct hf_file { std::string path; }; using hf_files = std::vector<hf_file>; }
%s
int main(int argc, char ** argv) {  // TAG FILE...: the file `llama-server -hf REPO:TAG` downloads
    hf_cache::hf_files files;
    for (int i = 2; i < argc; i++) files.push_back({argv[i]});
    std::cout << find_best_model(files, argv[1]).path;
}
"""


def find_best_model_binary(out_dir: Path) -> Path:
    """llama.cpp's own `find_best_model` (common/download.cpp: which file `-hf REPO:TAG` picks), built
    from the pinned release's source into a command `BINARY TAG FILE...` that prints the file."""
    src = (llama_cpp_source("common/download.cpp") / "common" / "download.cpp").read_text()
    parts = [cpp_definition(src, h) for h in ("struct gguf_split_info {", "static gguf_split_info get_gguf_split_info(",
                                              "static bool gguf_filename_is_model(",
                                              "static hf_cache::hf_file find_best_model(")]
    cpp, exe = out_dir / "find_best_model.cpp", out_dir / "find_best_model"
    cpp.write_text(_FIND_BEST_MODEL_MAIN % "\n".join(parts))
    proc = subprocess.run(["c++", "-std=c++17", "-O0", str(cpp), "-o", str(exe)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        pytest.fail(f"building llama.cpp's find_best_model failed: {proc.stderr[-1500:]}")
    return exe
