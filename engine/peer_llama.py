"""llama.cpp on the embedded model's GGUF file, one request at a time (as llama-cpp-python's
own server serves them). `drhouse bench peer` runs this file with the Python of the
environment `make bench-peer` builds, so it imports only the standard library and llama_cpp.

    python engine/peer_llama.py SPEC.json   # prints one JSON object
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str) -> int:
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    with open(spec_path) as f:
        spec = json.load(f)
    if not spec.get("repack", True):  # as our engine: AMX repacking segfaults on some CPUs
        defaults = low.llama_model_default_params

        def unpacked() -> object:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = unpacked
    started = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=2048, n_threads=spec["threads"],
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - started
    llm(spec["prompts"][0], max_tokens=4)  # warm-up
    replies = []
    for i, prompt in enumerate(spec["prompts"]):
        sent = time.perf_counter()
        first, tokens, text = None, 0, ""
        for chunk in llm(prompt, max_tokens=spec["max_tokens"], stream=True, seed=i,
                         temperature=spec["temperature"], top_p=spec["top_p"],
                         repeat_penalty=spec["repeat_penalty"]):
            choice = chunk["choices"][0]
            if first is None:
                first = time.perf_counter()
            if choice.get("finish_reason") is None:  # the last chunk only says why it ended
                tokens += 1
            text += choice["text"]
        done = time.perf_counter()
        replies.append({"ms": (done - sent) * 1000,
                        "ttft_ms": ((first or done) - sent) * 1000, "tokens": tokens,
                        "text": text})
    total_s = sum(r["ms"] for r in replies) / 1000
    print(json.dumps({"load_s": load_s, "replies": replies,
                      "tokens": sum(r["tokens"] for r in replies),
                      "tokens_per_s": sum(r["tokens"] for r in replies) / total_s,
                      "threads": spec["threads"], "repack": spec.get("repack", True)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
