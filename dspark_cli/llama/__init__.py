"""llama.cpp, through llama-cpp-python and ctypes: one GGUF with its context and KV cache (model.py), the
process-wide state (backend.py; process.py: what the CLI asks of its own process), the exactness policy
(kernels.py), ggml's device registry (ggml.py), the RPC backend (rpc.py), build and machine facts
(machine.py), GGUF headers (gguf_file.py), memory preflight (memory.py), pairing rules (vocab.py), the
quantizer (quantize.py). May import: errors, console, net, places. This __init__ imports nothing.
"""
