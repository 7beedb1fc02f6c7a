# Runs scripts/benchmark_quality.py unchanged except that the EvaluationSuite's reference-logit
# cache is off (one pruned row per process: the cache cannot be reused, it only holds memory:
# 8 windows x 513 x 262144 x 4 B x 3 texts = 12.9 GB for Gemma-3-270M).
import runpy
import sys

import prunenet.evaluation.suite as suite

_orig = suite.EvaluationSuite.__init__


def _init(self, *a, **k):
    k["cache_reference"] = False
    _orig(self, *a, **k)


suite.EvaluationSuite.__init__ = _init
sys.argv = ["scripts/benchmark_quality.py", *sys.argv[1:]]
runpy.run_path("scripts/benchmark_quality.py", run_name="__main__")
