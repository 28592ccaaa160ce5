"""Math: the verification env, its datasets and the sandboxed verifier.

``data/`` holds the embedded problems and the prompt templates.
"""
