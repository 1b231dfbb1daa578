"""Evaluation: what compression cost and how fast it runs.

data        texts, tokenization, sliding windows
perplexity  sliding-window perplexity (plain and layer-major) and the transformers reference
reference   the bitsandbytes NF4 reference model
harness     lm-evaluation-harness model class ``qstream`` (imports lm_eval)
results     the schema of result files
bench       speed against the hardware floor
report      the trade-off report across variants
"""
