"""The runtime: an export served under expert parallelism.

engine.py     Engine: start (the process group, the model with its served MoE layers, each with its expert
              store), serve (generate or translate every request), share, gather
lockstep.py   LockStep: the ranks calling the model together, idle ones with empty batches
generate.py   batched, KV-cached text generation (greedy, temperature, top-k, top-p)
translate.py  batched translation (greedy, beam search) and BLEU
recorder.py   LoadRecorder: each MoE call's expert loads, for placement fitting and the cache studies
"""
