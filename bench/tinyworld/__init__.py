"""The embedded default world's judge and the recipes that build the committed files under ``models/``.

    judge.py          the prompt-fidelity judge (``make judge``: ``python -m bench.tinyworld.judge``)
    models.py         the tiny text-to-image stack's architectures, saved in the diffusers folder layout
    pretrain.py       the base model's training recipe (``make base-model``)
    train_rewards.py  tiny-clip, tiny-aesthetic, tiny-count (``make tiny-rewards``)

The base model's fidelity as the judge reads it is a tool: ``bench/tools/base_quality.py`` (``make base-quality``).
The world itself (grammar, renderer, hidden rating) is ``diffalign/world.py``: rewards and tests use it too.
"""
