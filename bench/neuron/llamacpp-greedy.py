"""Records llama.cpp's greedy continuations of a few prompts on the test models, for
neuron/tests/llamacpp_greedy.rs: `bench/neuron/record-llamacpp-greedy` (run it again after
changing the prompts or models; the output is committed under neuron/tests/data).

Beside each continuation (decoded one token at a time) it records what llama.cpp itself picks at
the same positions when it reads the prompt and the continuation in one batch (`batched`): the
same model and tokens through its matrix-matrix kernels instead of its matrix-vector ones, i.e.
how far llama.cpp agrees with itself when only the order of its float additions changes."""
import argparse
import json
import pathlib

import llama_cpp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint.",
    "def fibonacci(n):",
    "Photosynthesis is the process by which plants",
    "1, 2, 3, 4, 5,",
]
NEW = 32
# Tokens recorded per step: the greedy one and its runners-up.
TOP = 5


def last_logits(llm):
    """The logits of the last token evaluated, read from llama.cpp (`Llama.scores` stays zero
    unless the model was opened with `logits_all`)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    for short, name, bos in [("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False),
                             ("gemma3", "gemma-3-270m-Q4_K_M.gguf", True)]:
        llm = llama_cpp.Llama(model_path=str(pathlib.Path(a.model_dir) / name), n_ctx=256,
                              n_threads=2, n_threads_batch=2, n_batch=256, verbose=False,
                              logits_all=True)
        cases = []
        for text in PROMPTS:
            prompt = llm.tokenize(text.encode(), add_bos=bos, special=True)
            llm.reset()
            llm.eval(prompt)
            out, top = [], []
            for _ in range(NEW):
                logits = last_logits(llm)
                best = np.argsort(logits)[-TOP:][::-1]
                out.append(int(best[0]))
                # The next best tokens and how far below the best llama.cpp scored them.
                top.append([[int(t), round(float(logits[best[0]] - logits[t]), 4)] for t in best[1:]])
                llm.eval([int(best[0])])
            # Teacher-forced in one batch: the logits of every position at once.
            llm.reset()
            llm.eval(prompt + out[:-1])
            rows = len(prompt) + NEW - 1
            every = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(rows, llm.n_vocab()))
            batched = [int(every[len(prompt) - 1 + i].argmax()) for i in range(NEW)]
            cases.append({"text": text, "prompt": prompt, "greedy": out, "runners_up": top,
                          "batched": batched})
        path = pathlib.Path(a.out_dir) / f"llamacpp-greedy-{short}.json"
        path.write_text(json.dumps({"model": name, "llama_cpp_python": llama_cpp.__version__,
                                    "cases": cases}, indent=1) + "\n")
        print(path)
        del llm


if __name__ == "__main__":
    main()
