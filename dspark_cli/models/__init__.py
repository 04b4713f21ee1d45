"""Where models come from: the registry of pairs (registry.py, models.toml), model references
(refs.py: paths, org/repo:file, registry names), downloads from the Hugging Face hub (hub.py) and the
built-in demo pair (demo.py). May import: utilities, llama.
"""
