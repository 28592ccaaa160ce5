"""Generation: the Policy backends (transformers, vLLM) and the model loaders.

A backend turns prompts into responses; the runtime picks one by ``rollout.backend``.
"""
