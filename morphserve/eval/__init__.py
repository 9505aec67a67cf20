"""Quality evaluation.

* :mod:`morphserve.eval.scoring` - task-quality scores of generated answers (ROUGE-L, F1) under named schemes
  (LongBench's official one is the headline);
* :mod:`morphserve.eval.quality` - scoring a replay's outputs against their references, per task, both schemes;
* :mod:`morphserve.eval.lm_eval_model` and ``lm_eval_tasks/`` - the engine as an lm-eval model (``morphserve``)
  and task YAMLs that read workload records;
* :mod:`morphserve.eval.perplexity` - teacher-forced perplexity on held-out text, through transformers or the
  engine's own forward;
* :mod:`morphserve.eval.layer_error` - the per-layer output error of quantized layer variants on real activations.
"""
