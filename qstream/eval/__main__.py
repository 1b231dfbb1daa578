"""``python -m qstream.eval --model qstream --model_args path=DIR ... --tasks T``: lm-eval's
own command line with the ``qstream`` model registered."""
import sys

from qstream.eval.harness import lm_eval_main  # the package module, so the registry sees one class

sys.exit(lm_eval_main())
