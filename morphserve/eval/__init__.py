"""Quality evaluation.

* :mod:`morphserve.eval.scoring` - task-quality scores of generated answers (ROUGE-L, F1) under named schemes;
* :mod:`morphserve.eval.perplexity` - teacher-forced perplexity on held-out text, through transformers or the
  engine's own forward;
* :mod:`morphserve.eval.layer_error` - the per-layer output error of quantized layer variants on real activations.
"""
