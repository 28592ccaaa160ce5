"""Generation: the Policy backends (transformers, vLLM) and the model loaders.

``base`` (chat rendering, request checks, the weight-sync types), ``hf`` and ``vllm`` (one backend
each), ``backends`` (``rollout.backend`` name -> builder), ``models`` (built-in and hub models).
Nothing here imports rollout or training: the runtime hands a backend what it needs.
"""
