"""The paper's experiment and the package's command lines: a built-in corpus and base model
(``corpus``, ``base``), continual training with a weighting (``train``: ``hardfocus-train``),
methods side by side (``compare``: ``hardfocus-compare``), downstream evaluation with
lm-evaluation-harness (``downstream``), pictures (``plots``) and a seconds-long check of the
fused loss (``demo``: ``hardfocus-demo``, ``python -m hardfocus_fused.demo``).

Built on the loss core and the Hugging Face integration; nothing in either imports it.
"""
